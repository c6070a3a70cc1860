"""Turn a training checkpoint into a model folder (authors' layout, loadable by ``SVDRRPipeline.from_folder``).

    python -m training.svdrr.export --config training/configs/svdrr-256.yaml \\
        --checkpoint runs/svdrr-256/checkpoint-50000 --out models/svdrr-256-step50k [--ema]

The frozen parts (VAE, CLIP, scheduler, feature extractor) come from the config's model section, exactly as in
training; the trained transformer and ``cc_projection`` from the checkpoint's ``model.safetensors`` (or, with
``--ema``, the EMA weights saved with the checkpoint, read with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import load_config

EMA_FILE = "custom_checkpoint_0.pkl"


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names without DDP's ``module.`` or torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for name, tensor in state.items():
        for prefix in ("module.", "_orig_mod."):
            name = name.removeprefix(prefix)
        out[name] = tensor
    return out


def export_checkpoint(cfg: dict, checkpoint: str | Path, out: str | Path, ema: bool = False) -> Path:
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file

    from .model_setup import build_components, export_model
    from .objective import SVDRRDenoiser
    checkpoint = Path(checkpoint).expanduser()
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{checkpoint}: no model.safetensors (not an accelerate checkpoint of this trainer)")
    parts, _ = build_components(cfg["model"])
    denoiser = SVDRRDenoiser(parts.transformer, parts.cc_projection)
    denoiser.load_state_dict(strip_wrappers(load_file(str(weights))), strict=True)
    if ema:
        path = checkpoint / EMA_FILE
        if not path.is_file():
            raise SystemExit(f"{checkpoint}: no EMA state ({EMA_FILE}); was train.use_ema on?")
        shadow = EMAModel(denoiser.parameters())
        shadow.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        shadow.copy_to(denoiser.parameters())
    return export_model(parts, denoiser.transformer, denoiser.cc_projection, out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.svdrr.export", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(export_checkpoint(cfg, args.checkpoint, args.out, ema=args.ema))
    return 0


if __name__ == "__main__":
    sys.exit(main())
