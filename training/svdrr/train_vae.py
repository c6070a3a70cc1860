"""Train the VAE of a small SV-DRR configuration as an autoencoder of rendered DRRs (CPU, minutes).

The released models use the frozen SDXL VAE. The small configurations have no pretrained VAE, and a random frozen
one makes every sample decode to noise, so the demonstration model's VAE is trained first, on every view of the
training split (PA, hemisphere and arc PNGs), normalized exactly as the pipeline normalizes its input:
L1 + MSE reconstruction of ``latent_dist.sample()`` plus a small KL term, AdamW. At the end ``scaling_factor`` is set
to 1 / std of the training latents (what the diffusion model sees), and the VAE is saved with ``save_pretrained``
(safetensors) where ``model.vae_from`` of the training config points.

    python -m training.svdrr.train_vae --config training/configs/demo.yaml --out training/runs/demo-vae
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("training.svdrr.train_vae")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.svdrr.train_vae", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the diffusion training config (data.root, model.architecture)")
    ap.add_argument("--out", required=True, help="folder for the VAE (config.json + safetensors)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def load_images(root: Path, patients: list[dict], resolution: int) -> torch.Tensor:
    """Every rendered view of ``patients`` as (N, 3, R, R) in [-1, 1], as :func:`normalize_source` makes it."""
    from SVDRRLogic.pipelines import normalize_source

    from .data import read_png
    images = []
    for p in patients:
        for png in sorted((root / p["folder"]).rglob("*.png")):
            images.append(normalize_source(read_png(png), resolution)[0])
    return torch.stack(images)


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate import PartialState
    from diffusers import AutoencoderKL

    from SVDRRLogic.models.svdrr import component_configs

    from .config import load_config
    from .manifest import read_manifest, select_patients
    from .train import ensure_dataset
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config)
    ensure_dataset(cfg["data"], PartialState(cpu=True))
    root, resolution = Path(cfg["data"]["root"]).expanduser(), int(cfg["model"]["resolution"])
    patients = select_patients(read_manifest(root), cfg["data"]["split"], cfg["data"]["max_slice_spacing"])
    images = load_images(root, patients, resolution)
    log.info("%d images of %d patients (%s split), %d px", len(images), len(patients), cfg["data"]["split"],
             resolution)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**component_configs(cfg["model"]["architecture"], resolution)["vae"]).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, log_lines = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        x = images[torch.randint(len(images), (args.batch_size,), generator=gen)]
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x, x.flip(-1))
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=gen)).sample
        l1, mse = (rec - x).abs().mean(), ((rec - x) ** 2).mean()
        kl = dist.kl().mean()
        loss = l1 + mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps:
            # PSNR on [0, 1] images, as the evaluation measures them
            psnr = float(10 * torch.log10(4.0 / mse.detach())) if mse > 0 else float("inf")
            record = {"step": step, "l1": float(l1), "mse": float(mse), "kl": float(kl), "psnr": psnr,
                      "seconds": round(time.perf_counter() - started, 1)}
            log_lines.append(record)
            log.info("%s", record)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.sample(generator=gen)
                             for i in range(0, min(len(images), 2048), 256)])
        std = float(latents.std())
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        x = images[:256]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = float(10 * torch.log10(4.0 / ((rec - x) ** 2).mean()))
    vae.save_pretrained(out, safe_serialization=True)
    summary = {"images": len(images), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "kl_weight": args.kl_weight, "seconds": round(time.perf_counter() - started, 1),
               "latent_std": std, "scaling_factor": vae.config.scaling_factor, "final": log_lines[-1],
               "reconstruction_psnr_db": psnr}
    (out / "train_log.json").write_text(json.dumps({"summary": summary, "log": log_lines}, indent=1) + "\n")
    grid = torch.cat([torch.cat(list(x[:8, 0]), 1), torch.cat(list(rec[:8, 0]), 1)], 0)
    from PIL import Image
    Image.fromarray(np.uint8((grid.numpy() + 1) * 127.5)).save(out / "reconstructions.png")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
