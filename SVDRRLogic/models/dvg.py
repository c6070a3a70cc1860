"""DVG-Diffusion's networks (Xie et al., TIP 2026), assembled: configurations, construction and model folders.

Five networks and a scheduler (``../shared/reference/dvg-and-patch-diffusion.md`` section C):

- ``ct_vqgan``: the 3D VQ-GAN of Medical Diffusion for CT (f = 4, latents of ``embedding_dim`` channels); its
  pre-quantization latent, normalized to [-1, 1] with the codebook's min/max, is what the diffusion works on;
- ``vpge``: the view-parameter-guided encoder of the input X-rays, a VQ-GAN of the same design whose encoder reads
  the sum of their back-projections (only the encoder is used, unquantized, unnormalized);
- ``vpge_new``: the same for the back-projection of the synthesized extra view;
- ``coarse`` (G_z): a factorized 3D U-Net from the input latent to an initial CT latent (called with t = 0);
- ``denoiser`` (g_theta): a factorized 3D U-Net on [z_in, z_new, z_t] predicting z_0;
- a 100-step DDPM with the cosine schedule (s = 0.008, betas clipped at 0.9999) and x0 prediction, as diffusers'
  ``DDPMScheduler`` with those betas.

``input_views`` lists how many X-rays a model was trained with; the extra view is synthesized at
``new_view_azimuth[count]`` (45 degrees for two inputs as in the paper, 90 for one). The X-ray scale factors
reproduce XraySyn's projector units (line integral in voxel units / 10; back-projection x 10 in voxel units) so
the released weights see the magnitudes they were trained on.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from .recon_folder import build_from_folder, load_module, save_model_folder
from .seeding import seeded_init
from .unet3d import Unet3D
from .vqgan3d import VQGAN3D

KIND = "dvg"
PARTS = ("ct_vqgan", "vpge", "vpge_new", "coarse", "denoiser")

_VQ_PAPER = {"n_hiddens": 16, "downsample": [4, 4, 4], "embedding_dim": 8, "n_codes": 16384}
_VQ_DEMO = {"n_hiddens": 8, "downsample": [4, 4, 4], "embedding_dim": 4, "n_codes": 512, "norm_groups": 8}
_VQ_TINY = {"n_hiddens": 8, "downsample": [4, 4, 4], "embedding_dim": 4, "n_codes": 32, "norm_groups": 4}
CONFIGS: dict[str, dict] = {
    # The authors' sizes: 128^3 CT, 8 x 32^3 latents, G_z 35.7 M and g_theta 134.5 M parameters.
    "paper": {
        "grid": 128, "input_views": [2], "new_view_azimuth": {"1": 90.0, "2": 45.0},
        "timesteps": 100, "air_threshold": 0.04,
        "ct_vqgan": _VQ_PAPER, "vpge": _VQ_PAPER, "vpge_new": _VQ_PAPER,
        "coarse": {"dim": 64, "dim_mults": [1, 2, 4, 8], "channels": 8, "out_dim": 8},
        "denoiser": {"dim": 128, "dim_mults": [1, 2, 4, 8], "channels": 24, "out_dim": 8},
    },
    # The embedded demo: 64^3 (5 mm voxels) -> 4 x 16^3 latents, trainable on a CPU, ~3 M parameters (12 MB).
    "demo": {
        "grid": 64, "input_views": [1, 2], "new_view_azimuth": {"1": 90.0, "2": 45.0},
        "timesteps": 100, "air_threshold": 0.04,
        "ct_vqgan": _VQ_DEMO, "vpge": _VQ_DEMO, "vpge_new": _VQ_DEMO,
        "coarse": {"dim": 16, "dim_mults": [1, 2, 4], "channels": 4, "out_dim": 4, "attn_heads": 2,
                   "attn_dim_head": 16},
        "denoiser": {"dim": 24, "dim_mults": [1, 2, 4], "channels": 12, "out_dim": 4, "attn_heads": 2,
                     "attn_dim_head": 16},
    },
    # Tests: 16^3 -> 4 x 4^3 latents, runs in a fraction of a second.
    "tiny": {
        "grid": 16, "input_views": [1, 2], "new_view_azimuth": {"1": 90.0, "2": 45.0},
        "timesteps": 10, "air_threshold": 0.04,
        "ct_vqgan": _VQ_TINY, "vpge": _VQ_TINY, "vpge_new": _VQ_TINY,
        "coarse": {"dim": 8, "dim_mults": [1, 2], "channels": 4, "out_dim": 4, "attn_heads": 2, "attn_dim_head": 8},
        "denoiser": {"dim": 8, "dim_mults": [1, 2], "channels": 12, "out_dim": 4, "attn_heads": 2,
                     "attn_dim_head": 8},
    },
}


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.9999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule as DVG computes it (betas clipped to [0, 0.9999]; diffusers' and
    MONAI's built-in cosine schedules clip at 0.999, which changes the last beta)."""
    x = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64)
    alphas_cumprod = np.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, max_beta)


def make_scheduler(timesteps: int) -> DDPMScheduler:
    """x0-prediction ancestral DDPM with static clipping of x0 to [-1, 1] and the posterior variance."""
    return DDPMScheduler(num_train_timesteps=timesteps, trained_betas=cosine_betas(timesteps).tolist(),
                         prediction_type="sample", clip_sample=True, clip_sample_range=1.0,
                         variance_type="fixed_small", timestep_spacing="leading")


@dataclass
class DVGComponents:
    config: dict
    ct_vqgan: VQGAN3D
    vpge: VQGAN3D
    vpge_new: VQGAN3D
    coarse: Unet3D
    denoiser: Unet3D
    scheduler: DDPMScheduler

    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in PARTS}

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "DVGComponents":
        """VQ-GANs stay in float32 (nearest-code search and group norms at 128^3); the U-Nets take ``dtype``."""
        for name in PARTS:
            getattr(self, name).to(device=device, dtype=dtype if name in ("coarse", "denoiser") else torch.float32)
        return self


def resolve_config(config: str | dict) -> dict:
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown DVG configuration {config!r}; choose one of {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    cfg = copy.deepcopy(config)
    vq = cfg["ct_vqgan"]
    if len(set(vq["downsample"])) != 1 or cfg["grid"] % vq["downsample"][0]:
        raise ValueError("DVG configuration: the VQ-GAN must down-sample the grid by one integer factor per axis")
    latent = latent_size(cfg)
    if cfg["denoiser"]["channels"] != 3 * vq["embedding_dim"] or cfg["coarse"]["channels"] != vq["embedding_dim"]:
        raise ValueError("DVG configuration: the U-Nets' channels must follow the VQ-GAN's embedding_dim")
    if latent % 2 ** (len(cfg["denoiser"]["dim_mults"]) - 1):
        raise ValueError(f"DVG configuration: latent size {latent} does not fit the U-Net's down-sampling")
    return cfg


def build_dvg(config: str | dict = "tiny", *, seed: int = 0, empty: bool = False) -> DVGComponents:
    """Randomly initialized networks (``empty=True``: on the meta device, for sizes and shapes only)."""
    cfg = resolve_config(config)
    device = torch.device("meta") if empty else torch.device("cpu")
    with seeded_init(seed), device:
        nets = {name: VQGAN3D(**cfg[name]) for name in ("ct_vqgan", "vpge", "vpge_new")}
        nets.update(coarse=Unet3D(**cfg["coarse"]), denoiser=Unet3D(**cfg["denoiser"]))
    return DVGComponents(config=cfg, scheduler=make_scheduler(cfg["timesteps"]), **nets)


def save_dvg(parts: DVGComponents, folder: str | os.PathLike) -> Path:
    return save_model_folder(folder, KIND, parts.config, parts.modules())


def create_random(folder: str | os.PathLike, config: str | dict = "tiny", *, seed: int = 0) -> Path:
    """A randomly initialized model folder (tests, and the start of training)."""
    return save_dvg(build_dvg(config, seed=seed), folder)


def load_dvg(folder: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> DVGComponents:
    """Build the configured networks and fill them from the folder's safetensors (keys and shapes checked)."""
    parts = build_from_folder(folder, KIND, lambda cfg: build_dvg(cfg, empty=True), "DVG")
    for name in PARTS:
        load_module(getattr(parts, name), folder, name)
    return parts.to(device, dtype)


def latent_size(config: dict) -> int:
    """Side of the latent cube: the grid divided by the VQ-GAN's per-axis down-sampling (128 / 4 = 32)."""
    return config["grid"] // config["ct_vqgan"]["downsample"][0]
