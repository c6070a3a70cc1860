"""Training of the 3D patch EDM X-ray-to-CT model (Yoon et al.; ``../shared/reference/dvg-and-patch-diffusion.md``
section E), on the cases of :mod:`training.recon.preprocess`:

- :mod:`.data` -- per case the spread back-projections of its frontal and lateral DRRs (computed once, kept in
  RAM), random slabs along k with their global coordinates;
- :mod:`.train` -- the accelerate loop: EDM loss, Adam, EMA with a half-life, checkpoints and resume, export of the
  EMA weights to a model folder;
- :func:`reconstruct_factory` -- the method's entry for the evaluation harness (``training.recon.evaluate``).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch


def reconstruct_factory(model_path: str | os.PathLike, device: str | torch.device = "auto") -> Callable:
    """``reconstruct(xrays, views, grid) -> unit volume`` of a patch EDM model folder, for the evaluation harness.

    The model runs in float32 (as the authors sampled) with its default number of Heun steps and seed 0, so an
    evaluation is reproducible. The CT comes back as unit values [k, j, i] on ``grid``: the model's own array when
    ``grid`` is the cube the model reconstructed into, else resampled onto ``grid``.
    """
    from SVDRRLogic.pipelines.patch_edm import PatchEDMReconstructionPipeline
    from SVDRRLogic.recon_grid import ReconGrid, hu_to_unit

    pipe = PatchEDMReconstructionPipeline.from_folder(model_path, device=device, dtype="fp32")

    def reconstruct(xrays: Sequence, views: Sequence[Sequence[float]], grid: ReconGrid) -> np.ndarray:
        ct = pipe(xrays, views, center_ras=grid.center_ras, generator=0, keep_intermediates=False).ct
        if grid == ReconGrid(pipe.grid_size, grid.center_ras):
            return hu_to_unit(ct.array_hu)
        return grid.sample_ct(ct)

    return reconstruct
