"""DVG-Diffusion as a reconstruction method of the shared evaluation harness (:mod:`training.recon.evaluate`).

:func:`reconstruct_factory` loads a model folder once and returns ``reconstruct(xrays, views, grid)``: the
pipeline's full inference path (X-rays fitted and min-max normalized, all the denoising steps the model was
trained with, seed 0 so repeated evaluations agree), the CT placed on ``grid.center_ras`` and returned as unit
values, the scale the harness compares volumes in.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from SVDRRLogic.recon_grid import ReconGrid, hu_to_unit


def reconstruct_factory(model_path: str, device: str = "auto") -> Callable[..., np.ndarray]:
    from SVDRRLogic.pipelines.dvg import DVGReconstructionPipeline
    pipe = DVGReconstructionPipeline.from_folder(model_path, device=device)

    def reconstruct(xrays: Sequence[np.ndarray], views: Sequence[tuple[float, float]], grid: ReconGrid) -> np.ndarray:
        if grid.size != pipe.grid_size:
            raise ValueError(f"model {pipe.model_name} reconstructs on a {pipe.grid_size}^3 grid, the evaluation "
                             f"asks for {grid.size}^3")
        out = pipe(list(xrays), list(views), center_ras=grid.center_ras, generator=0)
        return hu_to_unit(out.ct.array_hu)

    return reconstruct
