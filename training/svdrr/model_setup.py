"""Where a training stage's weights come from, and how a trained model is written (svdrr-method.md section 3.1).

- ``init_from``: an SV-DRR folder of the previous (lower-resolution) stage, in the authors' layout -- every part is
  loaded, and the transformer is re-configured for the new resolution: ``sample_size = R / 8`` and the position
  embedding's ``interpolation_scale`` scaled by R / R_previous (PixArt's fixed sin-cos embeddings then span the same
  range at every resolution, the "weak-to-strong" interpolation); its state dict does not depend on the resolution;
- ``pixart``: a local PixArt-Sigma diffusers folder: every transformer tensor whose name and shape match is copied,
  the patch-embedding convolution gets PixArt's 4 input channels in channels 0-3 (the noisy latent) and zeros in
  4-7 (the source latent), the T5 ``caption_projection`` is dropped; its ``vae/`` is the default VAE;
- otherwise the transformer starts from scratch (random, ``cc_projection`` with the authors' identity init).

The frozen VAE and CLIP image encoder come from ``vae_from`` / ``image_encoder_from``, else from the sources above,
else they are random (only meaningful for the tiny test model). Weights are read from safetensors only, or from a
``.bin`` through ``torch.load(weights_only=True)``; nothing from the folders is executed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel
from transformers import CLIPVisionModelWithProjection

from SVDRRLogic.models import (ModelLoadError, SVDRRComponents, build_svdrr, check_compatible, load_svdrr, save_svdrr,
                               vae_scale_factor)

log = logging.getLogger("training.svdrr.model_setup")
PATCH_EMBED = "pos_embed.proj.weight"


def retarget_transformer(transformer: PixArtTransformer2DModel, resolution: int,
                         latent_factor: int) -> PixArtTransformer2DModel:
    """The same weights in a transformer configured for ``resolution`` (see module docstring)."""
    cfg = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    old_resolution = cfg["sample_size"] * latent_factor
    if resolution % (latent_factor * cfg["patch_size"]):
        raise ModelLoadError(f"resolution {resolution} is not a multiple of {latent_factor * cfg['patch_size']}")
    if resolution == old_resolution:
        return transformer
    cfg["sample_size"] = resolution // latent_factor
    cfg["interpolation_scale"] = float(cfg.get("interpolation_scale") or 1.0) * resolution / old_resolution
    new = PixArtTransformer2DModel.from_config(cfg)
    new.load_state_dict(transformer.state_dict(), strict=True)
    log.info("transformer re-configured from %d px to %d px (interpolation_scale %g)", old_resolution, resolution,
             cfg["interpolation_scale"])
    return new.to(transformer.dtype)


def _component_dir(folder: str | Path, sub: str) -> Path:
    path = Path(folder).expanduser()
    if (path / sub / "config.json").is_file():
        return path / sub
    if (path / "config.json").is_file():
        return path
    raise ModelLoadError(f"{path}: neither {sub}/config.json nor config.json found")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: its ``*.safetensors`` (sharded too), else a pickled ``.bin`` read with
    ``weights_only=True``."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(folder.glob("*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise ModelLoadError(f"{folder}: no weights (*.safetensors or *.bin)")


def init_from_pixart(transformer: PixArtTransformer2DModel, pixart: str | Path) -> dict:
    """Copy PixArt-Sigma's transformer weights into ``transformer`` (module docstring); returns a summary."""
    theirs = read_state_dict(_component_dir(pixart, "transformer"))
    ours = transformer.state_dict()
    copied, skipped, widened = [], [], []
    with torch.no_grad():
        for name, tensor in theirs.items():
            if name not in ours:
                skipped.append(name)
            elif ours[name].shape == tensor.shape:
                ours[name].copy_(tensor.to(ours[name].dtype))
                copied.append(name)
            elif name == PATCH_EMBED and ours[name].shape[0] == tensor.shape[0] \
                    and ours[name].shape[2:] == tensor.shape[2:] and ours[name].shape[1] > tensor.shape[1]:
                ours[name].zero_()
                ours[name][:, :tensor.shape[1]].copy_(tensor.to(ours[name].dtype))
                widened.append(name)
            else:
                skipped.append(f"{name} {tuple(tensor.shape)} vs {tuple(ours[name].shape)}")
    missing = [n for n in ours if n not in theirs]
    if len(copied) + len(widened) < 0.9 * len(ours):
        raise ModelLoadError(f"{pixart}: only {len(copied) + len(widened)} of {len(ours)} transformer tensors match;"
                             f" not a PixArt-Sigma transformer of this architecture (e.g. {(skipped or missing)[:3]})")
    log.info("PixArt-Sigma init: %d tensors copied, %s widened (extra input channels zero), %d skipped (%s), "
             "%d new", len(copied), widened, len(skipped), skipped[:3], len(missing))
    return {"copied": len(copied), "widened": widened, "skipped": skipped, "missing": missing}


def load_vae(folder: str | Path) -> AutoencoderKL:
    path = _component_dir(folder, "vae")
    if any(path.glob("*.safetensors")):
        return AutoencoderKL.from_pretrained(path, use_safetensors=True, local_files_only=True)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path))
    vae.load_state_dict(read_state_dict(path))
    return vae


def load_image_encoder(folder: str | Path) -> CLIPVisionModelWithProjection:
    path = _component_dir(folder, "image_encoder")
    if any(path.glob("*.safetensors")):
        return CLIPVisionModelWithProjection.from_pretrained(path, use_safetensors=True, local_files_only=True)
    from transformers import CLIPVisionConfig
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(path))
    state = read_state_dict(path)
    encoder.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")}, strict=False)
    return encoder


def build_components(model_cfg: dict) -> tuple[SVDRRComponents, dict]:
    """All six parts for training at ``model_cfg["resolution"]`` on the CPU in float32, and where each came from."""
    resolution = int(model_cfg["resolution"])
    origin = {}
    if model_cfg.get("init_from"):
        parts = load_svdrr(model_cfg["init_from"], device="cpu", dtype=torch.float32)
        factor = vae_scale_factor(parts.vae.config)
        parts.transformer = retarget_transformer(parts.transformer, resolution, factor)
        origin = dict.fromkeys(("transformer", "cc_projection", "vae", "image_encoder"), model_cfg["init_from"])
    else:
        parts = build_svdrr(model_cfg["architecture"], resolution, seed=model_cfg.get("seed", 0))
        origin = dict.fromkeys(("transformer", "cc_projection", "vae", "image_encoder"), "random")
        origin["cc_projection"] = "random (identity on the embedding block)"
        if model_cfg.get("pixart"):
            origin["pixart"] = init_from_pixart(parts.transformer, model_cfg["pixart"])
            origin["transformer"] = model_cfg["pixart"]
            vae_dir = Path(model_cfg["pixart"]).expanduser() / "vae"
            if not model_cfg.get("vae_from") and (vae_dir / "config.json").is_file():
                parts.vae, origin["vae"] = load_vae(vae_dir), str(vae_dir)
    if model_cfg.get("vae_from"):
        parts.vae, origin["vae"] = load_vae(model_cfg["vae_from"]), model_cfg["vae_from"]
    if model_cfg.get("image_encoder_from"):
        parts.image_encoder = load_image_encoder(model_cfg["image_encoder_from"])
        origin["image_encoder"] = model_cfg["image_encoder_from"]
    parts.vae.register_to_config(sample_size=resolution)
    check_compatible(parts, "training model")
    for frozen in ("vae", "image_encoder"):
        if origin[frozen] == "random":
            log.warning("the frozen %s is random: fine for the tiny test model, meaningless for a real run "
                        "(set model.%s_from)", frozen, frozen)
    for module in (parts.transformer, parts.cc_projection):
        module.requires_grad_(True).train()
    for module in (parts.vae, parts.image_encoder):
        module.requires_grad_(False).eval()
    return parts, origin


def export_model(parts: SVDRRComponents, transformer, cc_projection, out: str | Path) -> Path:
    """Write a model folder (authors' layout, :func:`SVDRRLogic.models.load_svdrr` reads it) with the trained
    ``transformer`` and ``cc_projection`` and the frozen parts of ``parts``."""
    trained = SVDRRComponents(transformer=transformer, vae=parts.vae, image_encoder=parts.image_encoder,
                              feature_extractor=parts.feature_extractor, cc_projection=cc_projection,
                              scheduler=parts.scheduler)
    check_compatible(trained, "exported model")
    return save_svdrr(trained, out)
