"""The 3D patch EDM model of Yoon et al. (CT from bi-directional X-rays): configurations, the preconditioned
denoiser, its loss, the Heun sampler and the slab utilities (``../shared/reference/dvg-and-patch-diffusion.md``
sections E and F.2).

The network is MONAI's ``DiffusionModelUNet`` (3D), the closest stock equivalent of the authors' SongUNet3D
(9.83 M against 10.33 M parameters at the paper size). Its input has ``2 + len(views)`` channels, in this order:

- ``c_in * x_noisy``, the noisy CT in unit values (HU + 1024) / 2500 in [0, 1]: the authors diffuse their [0, 1]
  volumes as they are, with sigma_data 0.5, and so does this model;
- one channel per X-ray view: the X-ray (min-max normalized to [0, 1]) spread back along its own rays through the
  volume (:meth:`~SVDRRLogic.recon_grid.ReconGrid.back_project` with ``spread=True``, the cone-beam form of the
  authors' replication along the projection axis); not scaled by c_in, as theirs;
- the coordinate channel: the global position along k of each voxel, (k / (N - 1) - 0.5) * 2 in [-1, 1].

Training sees slabs of ``patch_slices`` along array axis 0 (k, superior), the axis the frontal and lateral
views share, so a slab's view channels hold exactly the rows of the X-rays that cross it. The coordinate channel
tells the network where the slab lies; sampling a whole volume, at once or slab by slab (:class:`SlabDenoiser`),
gives each voxel the coordinate it had in training.

EDM (Karras et al. 2022): D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), coefficients from diffusers'
``EDMEulerScheduler`` (its "epsilon" prediction is EDM's F); training sigmas are log-normal (P_mean -1.2, P_std
1.2); sampling is EDM's Algorithm 2 (Heun, S_churn 0) on the Karras sigma grid (rho 7, sigma 0.002..80).
"""
from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import EDMEulerScheduler
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from ..recon_grid import XRAYSYN_FRONTAL, XRAYSYN_LATERAL, xraysyn_view
from .recon_folder import build_from_folder, load_module, save_model_folder
from .seeding import seeded_init

KIND = "patch-edm"
WEIGHTS = "denoiser"
#: Frontal (0, 0) then lateral (90, 0): the order of the view channels.
VIEWS = [list(xraysyn_view(XRAYSYN_FRONTAL)), list(xraysyn_view(XRAYSYN_LATERAL))]
_EDM = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "p_mean": -1.2, "p_std": 1.2}

CONFIGS: dict[str, dict] = {
    # SongUNet3D's sizes in MONAI terms (32 channels x [1, 2, 2, 2], 4 blocks per level, self-attention only at
    # the bottom, GroupNorm of 8 groups where theirs has C/4 <= 32), 9.83 M parameters, on the 128^3 grid with
    # 64-slice slabs (the authors' slab thickness). 500 Heun steps as their generate.py; no view dropout.
    "paper": {
        "unet": {"channels": [32, 64, 64, 64], "num_res_blocks": 4, "attention_levels": [False, False, False, True],
                 "num_head_channels": 64, "norm_num_groups": 8},
        "grid": 128, "patch_slices": 64, "views": VIEWS, "view_dropout": 0.0, "num_inference_steps": 500,
        **_EDM,
    },
    # What a 2-core CPU trains in about half an hour on 64^3 phantoms (5 mm voxels), 1.07 M parameters; the view
    # dropout lets it reconstruct from a single X-ray too.
    "demo": {
        "unet": {"channels": [16, 32, 32], "num_res_blocks": 2, "attention_levels": [False, False, True],
                 "num_head_channels": 32, "norm_num_groups": 8},
        "grid": 64, "patch_slices": 16, "views": VIEWS, "view_dropout": 0.2, "num_inference_steps": 18,
        **_EDM,
    },
    # Tests: 16^3, two levels with attention at the bottom (the paper's code path), runs in milliseconds.
    "tiny": {
        "unet": {"channels": [8, 16], "num_res_blocks": 1, "attention_levels": [False, True],
                 "num_head_channels": 8, "norm_num_groups": 4},
        "grid": 16, "patch_slices": 8, "views": VIEWS, "view_dropout": 0.0, "num_inference_steps": 12,
        **_EDM,
    },
}


def slab_multiple(config: dict) -> int:
    """Slab thicknesses (and the grid) must be multiples of this: the U-Net halves every axis per level."""
    return 2 ** (len(config["unet"]["channels"]) - 1)


def resolve_config(config: str | dict) -> dict:
    """A preset name or a configuration dict, checked, as a fresh copy."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown patch EDM configuration {config!r}; choose one of {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    cfg = copy.deepcopy(config)
    unet, m = cfg["unet"], slab_multiple(cfg)
    problems = []
    if len(unet["attention_levels"]) != len(unet["channels"]):
        problems.append("unet.attention_levels needs one entry per level of unet.channels")
    if cfg["grid"] % m or cfg["patch_slices"] % m or not 0 < cfg["patch_slices"] <= cfg["grid"]:
        problems.append(f"grid and patch_slices must be multiples of {m} (the U-Net's down-sampling), "
                        f"with 0 < patch_slices <= grid")
    if not cfg["views"] or any(len(v) != 2 for v in cfg["views"]):
        problems.append("views must be a non-empty list of (azimuth, elevation) pairs")
    if not 0.0 <= cfg["view_dropout"] < 1.0 or (cfg["view_dropout"] and len(cfg["views"]) < 2):
        problems.append("view_dropout must be in [0, 1), and needs at least two views")
    if cfg["num_inference_steps"] < 1 or not 0 < cfg["sigma_min"] < cfg["sigma_max"] or cfg["sigma_data"] <= 0:
        problems.append("num_inference_steps >= 1, 0 < sigma_min < sigma_max and sigma_data > 0 are required")
    if problems:
        raise ValueError("patch EDM configuration: " + "; ".join(problems))
    return cfg


def edm_scheduler(config: dict) -> EDMEulerScheduler:
    """The diffusers scheduler whose preconditioning and Karras sigma grid the model uses (its ``step`` is not)."""
    return EDMEulerScheduler(sigma_min=config["sigma_min"], sigma_max=config["sigma_max"],
                             sigma_data=config["sigma_data"], rho=config["rho"], prediction_type="epsilon")


class EDMDenoiser(nn.Module):
    """D(x; sigma, views, coordinate) = c_skip x + c_out F([c_in x, views, coordinate], ln(sigma) / 4).

    The preconditioning runs in the dtype of ``x`` (float64 in the sampler, as the authors' sampler), the U-Net in
    its own parameters' dtype. ``config`` is the model configuration (:func:`resolve_config`); it is kept as an
    attribute so a loaded model carries what it was trained with.
    """

    def __init__(self, unet: nn.Module, config: dict):
        super().__init__()
        self.unet = unet
        self.config = config
        self.scheduler = edm_scheduler(config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor,
                coord: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 1, T, N, N) noisy; ``sigma`` a number or (B,); ``cond`` (B, V, T, N, N); ``coord`` (B, 1, T,
        N, N) or anything broadcastable to it, such as (B, 1, T, 1, 1)."""
        batch, spatial = x.shape[0], x.shape[2:]
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1, 1).expand(batch, -1, -1,
                                                                                                    -1, -1)
        inputs = torch.cat([self.scheduler.precondition_inputs(x, s), cond.to(x.dtype),
                            coord.to(x.dtype).expand(batch, 1, *spatial)], dim=1)
        c_noise = self.scheduler.precondition_noise(s.reshape(-1)).float()
        out = self.unet(inputs.to(self.dtype), c_noise)
        return self.scheduler.precondition_outputs(x, out.to(x.dtype), s)


def build_patch_edm(config: str | dict = "tiny", *, seed: int = 0, empty: bool = False) -> EDMDenoiser:
    """A randomly initialized denoiser (MONAI's initialization: the output layers start at zero, so D = c_skip x);
    ``empty=True`` builds it on the meta device (sizes and shapes only)."""
    cfg = resolve_config(config)
    unet = cfg["unet"]
    with seeded_init(seed), torch.device("meta") if empty else torch.device("cpu"):
        net = DiffusionModelUNet(spatial_dims=3, in_channels=2 + len(cfg["views"]), out_channels=1,
                                 channels=tuple(unet["channels"]), num_res_blocks=unet["num_res_blocks"],
                                 attention_levels=tuple(unet["attention_levels"]),
                                 num_head_channels=unet["num_head_channels"], norm_num_groups=unet["norm_num_groups"])
    return EDMDenoiser(net, cfg)


def save_patch_edm(denoiser: EDMDenoiser, folder: str | os.PathLike) -> Path:
    return save_model_folder(folder, KIND, denoiser.config, {WEIGHTS: denoiser})


def create_random(folder: str | os.PathLike, config: str | dict = "tiny", *, seed: int = 0) -> Path:
    """A randomly initialized model folder (tests)."""
    return save_patch_edm(build_patch_edm(config, seed=seed), folder)


def load_patch_edm(folder: str | os.PathLike, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> EDMDenoiser:
    """Build the configured denoiser and fill it from ``denoiser.safetensors`` (keys and shapes checked)."""
    denoiser = build_from_folder(folder, KIND, lambda cfg: build_patch_edm(cfg, empty=True), "patch EDM")
    load_module(denoiser, folder, WEIGHTS)
    return denoiser.to(device=device, dtype=dtype).eval()


# -- training ------------------------------------------------------------------------------------------------

def sample_sigmas(count: int, p_mean: float = -1.2, p_std: float = 1.2,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` training noise levels, ln(sigma) ~ N(p_mean, p_std^2) (EDM's training distribution)."""
    gen_device = generator.device if generator is not None else device
    return (torch.randn(count, generator=generator, device=gen_device) * p_std + p_mean).exp().to(device)


def edm_loss(denoiser: Callable, x0: torch.Tensor, cond: torch.Tensor, coord: torch.Tensor, *,
             sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
             generator: torch.Generator | None = None, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """EDM's loss: lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2,
    the mean over voxels and batch.

    The authors sum over voxels and multiply by 0.05 / batch / 2; with Adam that constant only rescales the
    effective learning rate (and epsilon), so the mean is used here, which keeps the loss ~1 at the start whatever
    the slab size. ``sigma`` (B,) fixes the noise levels instead of drawing them (checks, per-level validation).
    ``generator`` draws sigma and the noise (on its own device) for reproducible checks.
    """
    batch = x0.shape[0]
    if sigma is None:
        sigma = sample_sigmas(batch, p_mean, p_std, generator, x0.device)
    s = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device).reshape(-1, 1, 1, 1, 1)
    gen_device = generator.device if generator is not None else x0.device
    n = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    weight = (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
    denoised = denoiser(x0 + s * n, s.reshape(-1), cond, coord)
    return (weight * (denoised - x0) ** 2).mean()


# -- sampling ------------------------------------------------------------------------------------------------

def karras_sigmas(config: dict, steps: int) -> torch.Tensor:
    """The ``steps + 1`` noise levels of EDM's sampler: sigma_max .. sigma_min on the rho-7 grid, then 0."""
    scheduler = edm_scheduler(config)
    scheduler.set_timesteps(int(steps))
    return scheduler.sigmas.to(torch.float64)


def heun_sample(denoiser_fn: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
                sigmas: torch.Tensor, *, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """EDM's Algorithm 2 without churn (deterministic): x_0 = sigmas[0] * ``noise``, then per step an Euler step of
    dx/dsigma = (x - D(x; sigma)) / sigma and, unless the next sigma is 0, Heun's second-order correction.

    ``denoiser_fn(x, sigma)`` returns D(x; sigma) for the whole state; the state is float64 as in the authors'
    sampler. ``callback(step, steps)`` after each step (raise from it to stop). 2 * steps - 1 evaluations.
    """
    levels = [float(s) for s in sigmas]
    x = noise.to(torch.float64) * levels[0]
    steps = len(levels) - 1
    for i, (cur, nxt) in enumerate(itertools.pairwise(levels)):
        slope = (x - denoiser_fn(x, cur).to(torch.float64)) / cur
        x_next = x + (nxt - cur) * slope
        if nxt > 0:
            slope_next = (x_next - denoiser_fn(x_next, nxt).to(torch.float64)) / nxt
            x_next = x + (nxt - cur) * 0.5 * (slope + slope_next)
        x = x_next
        if callback is not None:
            callback(i + 1, steps)
    return x


# -- slabs ---------------------------------------------------------------------------------------------------

def slab_coordinates(start: int, thickness: int, total: int) -> torch.Tensor:
    """(thickness,) float32: the coordinate channel's values (k / (total - 1) - 0.5) * 2 for k in the slab, the
    authors' formula, so the same k gets the same value in every slab and in the whole volume."""
    k = torch.arange(start, start + thickness, dtype=torch.float64)
    return ((k / (total - 1) - 0.5) * 2.0).float()


def slab_starts(total: int, thickness: int, overlap: int) -> list[int]:
    """First slices of the slabs that cover ``total`` slices, consecutive slabs sharing at least ``overlap``
    (the last one flush with the end)."""
    if thickness >= total:
        return [0]
    if not 0 <= overlap < thickness:
        raise ValueError(f"slab overlap must be in [0, {thickness}), got {overlap}")
    starts = list(range(0, total - thickness, thickness - overlap))
    return starts + [total - thickness]


def slab_weights(start: int, thickness: int, total: int, overlap: int) -> torch.Tensor:
    """(thickness,) blending weights: linear ramps over ``overlap`` slices on the sides that face another slab,
    1 elsewhere, never 0, so ramps of neighbouring slabs cross-fade and every slice keeps some weight."""
    w = torch.ones(thickness, dtype=torch.float64)
    if overlap > 0:
        ramp = (torch.arange(thickness, dtype=torch.float64) + 0.5) / overlap
        if start > 0:
            w = torch.minimum(w, ramp)
        if start + thickness < total:
            w = torch.minimum(w, ramp.flip(0))
    return w


def split_slabs(volume: torch.Tensor, thickness: int, overlap: int) -> list[tuple[int, torch.Tensor]]:
    """(start, view) pairs of slabs along dimension -3 (k of a [..., k, j, i] tensor); views, not copies."""
    total = volume.shape[-3]
    return [(s, volume[..., s:s + thickness, :, :]) for s in slab_starts(total, min(thickness, total), overlap)]


def assemble_slabs(slabs: Sequence[tuple[int, torch.Tensor]], total: int, overlap: int) -> torch.Tensor:
    """The volume from (start, slab) pairs, overlaps blended by :func:`slab_weights` (normalized by their sum)."""
    first = slabs[0][1]
    out = torch.zeros((*first.shape[:-3], total, *first.shape[-2:]), dtype=first.dtype, device=first.device)
    norm = torch.zeros(total, dtype=torch.float64)
    for start, slab in slabs:
        w = slab_weights(start, slab.shape[-3], total, overlap)
        out[..., start:start + slab.shape[-3], :, :] += slab * w.to(slab).view(-1, 1, 1)
        norm[start:start + slab.shape[-3]] += w
    return out / norm.to(out).view(-1, 1, 1)


class SlabDenoiser:
    """D(x; sigma) of a whole volume evaluated slab by slab with global coordinates, for :func:`heun_sample`.

    Slabs of ``thickness`` slices (a multiple of ``multiple``) overlap by a quarter of a slab and are blended
    linearly. A CUDA out-of-memory error halves the thickness (down to ``multiple``) and retries the evaluation,
    which is stateless, so sampling carries on; :attr:`thickness` then reports what was used.
    """

    def __init__(self, denoiser: Callable, cond: torch.Tensor, thickness: int, multiple: int = 1):
        self.denoiser, self.cond, self.multiple = denoiser, cond, int(multiple)
        self.total = cond.shape[-3]
        self.thickness = min(self.total, int(thickness))

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        while True:
            try:
                return self._evaluate(x, sigma)
            except torch.cuda.OutOfMemoryError:
                if self.thickness <= self.multiple:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.thickness = max(self.multiple, self.thickness // 2 // self.multiple * self.multiple)

    def _evaluate(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        overlap = self.thickness // 4 if self.thickness < self.total else 0
        out = []
        for start, slab in split_slabs(x, self.thickness, overlap):
            t = slab.shape[-3]
            coord = slab_coordinates(start, t, self.total).to(x.device).view(1, 1, t, 1, 1)
            out.append((start, self.denoiser(slab, sigma, self.cond[..., start:start + t, :, :], coord)))
        return assemble_slabs(out, self.total, overlap)


def parameter_count(config: str | dict) -> int:
    """Parameters of the configured U-Net (built on the meta device)."""
    return sum(p.numel() for p in build_patch_edm(config, empty=True).parameters())
