"""CT from frontal and lateral X-rays with the 3D patch EDM model (Yoon et al.), in our C-arm convention.

1. The X-rays are fitted to the model's detector and min-max normalized (:meth:`ReconstructionPipeline.prepare`),
   then each is spread back along its own rays through the grid (``grid.back_project(spread=True)``), so any
   frontal or lateral view with a known geometry gives the channel the model was trained on.
2. Each X-ray goes to the model channel of the trained view whose beam line is nearest (a PA and an AP view share
   the frontal channel). A model trained with view dropout also takes one X-ray (the other channel is zeros);
   without it, one X-ray is refused.
3. EDM's Heun sampler from seeded noise, D(x) evaluated over the whole volume: at once on a CPU, on a GPU in the
   thickest slabs that fit in free memory (thinner after an out-of-memory error), or in ``patch_slices`` slabs.
   Slabs overlap and are blended linearly, and every voxel's coordinate channel is its global k position, so a
   slab sees exactly what it saw in training.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..geometry import rotation
from ..images import ImageError, XRayImage
from ..models.patch_edm import (EDMDenoiser, SlabDenoiser, heun_sample, karras_sigmas, load_patch_edm,
                                slab_coordinates, slab_multiple)
from .reconstruction import Progress, ReconstructionOutput, ReconstructionPipeline, noise
from .svdrr import resolve_dtype

#: An input view more than this many degrees off every trained beam line is extrapolation (warned).
VIEW_TOLERANCE_DEG = 20.0
#: Share of the free GPU memory a slab may plan to use (the rest: allocator slack, attention growing faster).
MEMORY_SHARE = 0.7


def beam_line_angle(view: Sequence[float], other: Sequence[float]) -> float:
    """Angle in degrees between the beam lines of two (azimuth, elevation) views, ignoring the beam's sense."""
    def direction(az: float, el: float) -> np.ndarray:
        return rotation(az, el) @ np.array([0.0, -1.0, 0.0])   # isocenter -> source (DESIGN.md section 3)
    cos = abs(float(direction(*view) @ direction(*other)))
    return math.degrees(math.acos(min(1.0, cos)))


def view_channels(views: Sequence[Sequence[float]], trained: Sequence[Sequence[float]]) -> list[int]:
    """The model channel of each input view: the trained view with the nearest beam line. Two inputs on one
    channel are refused; an input more than :data:`VIEW_TOLERANCE_DEG` off its channel is warned about."""
    channels = []
    for view in views:
        angles = [beam_line_angle(view, t) for t in trained]
        best = int(np.argmin(angles))
        if angles[best] > VIEW_TOLERANCE_DEG:
            warnings.warn(f"X-ray view {tuple(view)} is {angles[best]:.0f} degrees off the nearest view the model "
                          f"was trained with {tuple(trained[best])}: extrapolation", stacklevel=3)
        channels.append(best)
    if len(set(channels)) != len(channels):
        raise ImageError(f"views {[tuple(v) for v in views]} fall on the same model view; give one frontal and one "
                         f"lateral X-ray (trained views {[tuple(t) for t in trained]})")
    return channels


class PatchEDMReconstructionPipeline(ReconstructionPipeline):
    """3D patch EDM: frontal and lateral X-rays (or one, for a model trained with view dropout) in, a CT in HU on
    the model's grid out."""

    method = "patch-edm"

    def __init__(self, denoiser: EDMDenoiser):
        super().__init__()
        self.register_modules(denoiser=denoiser)
        self.model_name = "patch-edm"

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device = "auto",
                    dtype: str | torch.dtype = "auto", *, name: str | None = None) -> "PatchEDMReconstructionPipeline":
        """Load a model folder (:func:`~SVDRRLogic.models.patch_edm.load_patch_edm`). ``device="auto"``: CUDA when
        present; ``dtype="auto"``: float16 on CUDA, float32 on the CPU (the sampler state is float64 either way)."""
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        pipe = cls(load_patch_edm(folder, device, resolve_dtype(dtype, device)))
        pipe.model_name = name or os.path.basename(os.path.normpath(str(folder)))
        return pipe

    @property
    def model_config(self) -> dict:
        return self.denoiser.config

    @property
    def grid_size(self) -> int:
        return int(self.model_config["grid"])

    @torch.no_grad()
    def __call__(self, xrays: Sequence[XRayImage | np.ndarray], views: Sequence[Sequence[float]], *,
                 center_ras: Sequence[float] | None = None, num_inference_steps: int | None = None,
                 generator: torch.Generator | int | None = None, callback: Progress | None = None,
                 patch_slices: int | None = None, keep_intermediates: bool = True) -> ReconstructionOutput:
        """Reconstruct a CT from ``xrays`` taken at ``views`` ((azimuth, elevation) degrees, our convention).

        ``center_ras``: centre of the reconstructed cube (default: the isocenter stored with the first X-ray, else
        the origin). ``num_inference_steps``: Heun steps (default: the model's; the authors used 500).
        ``generator``: an int seed or a ``torch.Generator`` (its initial seed). ``callback(fraction, message)``.
        ``patch_slices``: slab thickness in slices (rounded up to the U-Net's multiple); None chooses it.
        ``keep_intermediates``: also return each X-ray's spread back-projection as ``back_projection_<i>``, a
        CTVolume on the grid whose unit values are the spread [0, 1] image values (so they display like a CT:
        0 -> -1024 HU, 1 -> 1476 HU), marked ``quantity="spread back-projection"``.
        """
        cfg = self.model_config
        steps = int(num_inference_steps or cfg["num_inference_steps"])
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, not {steps}")
        if patch_slices is not None and int(patch_slices) < 1:
            raise ValueError(f"patch_slices must be at least 1, not {patch_slices}")
        report = callback or (lambda _f, _m: None)
        prep = self.prepare(xrays, views, center_ras, generator)
        angles = [(g.azimuth, g.elevation) for g in prep.views]
        trained = [tuple(v) for v in cfg["views"]]
        if len(angles) < len(trained) and not cfg["view_dropout"]:
            raise ImageError(f"model {self.model_name} was trained with {len(trained)} X-rays {trained} and no view "
                             f"dropout, so it needs all of them; got {len(angles)}")
        channels = view_channels(angles, trained)
        report(0.0, "spreading the X-rays back through the volume")
        grid, dev, n = prep.grid, self.device, self.grid_size
        spread = grid.back_project(prep.images, prep.views, spread=True)
        cond = torch.zeros((1, len(trained), n, n, n), device=dev)
        for i, c in enumerate(channels):
            cond[0, c] = spread[i]
        slabs = SlabDenoiser(self.denoiser, cond, self._slab_thickness(patch_slices, cond), slab_multiple(cfg))
        unit = heun_sample(slabs, noise(prep.seed, (1, 1, n, n, n), dev), karras_sigmas(cfg, steps),
                           callback=lambda i, k: report(0.02 + 0.98 * i / k, f"denoising step {i}/{k}"))
        report(1.0, "done")
        ct = self.finish(unit[0, 0], prep, f"{self.model_name} reconstruction", model=self.model_name, steps=steps,
                         sampler="EDM Heun (Algorithm 2, S_churn 0)", slab_slices=slabs.thickness,
                         view_channels=channels)
        inter = {}
        if keep_intermediates:
            for i, (c, view) in enumerate(zip(channels, angles)):
                inter[f"back_projection_{i}"] = grid.to_ct(
                    spread[i].float().cpu().numpy(), f"spread back-projection of X-ray {i}",
                    quantity="spread back-projection", view=list(view), model_channel=c)
        return ReconstructionOutput(ct=ct, inputs=prep.inputs, intermediates=inter, metadata=ct.metadata)

    def _slab_thickness(self, patch_slices: int | None, cond: torch.Tensor) -> int:
        """The requested thickness rounded up to the U-Net's multiple; else the whole volume on a CPU, and on a GPU
        the thickest slab whose measured memory per slice fits in :data:`MEMORY_SHARE` of the free memory."""
        m, n = slab_multiple(self.model_config), self.grid_size
        if patch_slices is not None:
            return min(n, -(-int(patch_slices) // m) * m)
        if self.device.type != "cuda":
            return n
        free, _ = torch.cuda.mem_get_info(self.device)
        probe = min(n, 2 * m)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        x = torch.zeros((1, 1, probe, n, n), device=self.device, dtype=torch.float64)
        coord = slab_coordinates(0, probe, n).to(self.device).view(1, 1, probe, 1, 1)
        self.denoiser(x, 1.0, cond[..., :probe, :, :], coord)
        per_slice = max(1, torch.cuda.max_memory_allocated(self.device) - base) / probe
        return max(m, min(n, int(MEMORY_SHARE * free / per_slice) // m * m))
