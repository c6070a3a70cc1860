"""What the X-ray-to-CT pipelines share: the call shape, input preparation and the output.

Both methods (:class:`~SVDRRLogic.pipelines.dvg.DVGReconstructionPipeline`, :class:`~SVDRRLogic.pipelines.
patch_edm.PatchEDMReconstructionPipeline`) are called as ``pipe(xrays, views, ...)``: one or two X-rays with their
(azimuth, elevation) in degrees in our C-arm convention, and return a :class:`ReconstructionOutput` whose CT is in
HU on a :class:`~SVDRRLogic.recon_grid.ReconGrid` placed in RAS, marked synthetic, with the intermediate products
beside it. The X-rays are fitted to the model's detector and normalized to [0, 1] here, once, the way the models
were trained (:func:`~SVDRRLogic.recon_grid.fit_xray`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..geometry import CArmGeometry
from ..images import CTVolume, ImageError, XRayImage
from ..io.common import geometry_from_metadata
from ..recon_grid import ReconGrid, check_views, fit_xray
from .svdrr import seed_of

#: ``callback(fraction, message)``: fraction of the work done in [0, 1]; raise from it to stop.
Progress = Callable[[float, str], None]
NOTE = "reconstructed by a generative model from X-rays: a plausible CT, not a measurement; not for diagnosis"


@dataclass
class ReconstructionOutput:
    """The CT (HU, RAS, synthetic), the X-rays as the model saw them, and named intermediate products."""

    ct: CTVolume
    inputs: list[XRayImage]
    intermediates: dict[str, CTVolume | XRayImage] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedInput:
    grid: ReconGrid
    views: list[CArmGeometry]
    images: torch.Tensor            # (V, N, N) in [0, 1] on the pipeline's device
    inputs: list[XRayImage]
    seed: int


class ReconstructionPipeline(DiffusionPipeline):
    """Base of the reconstruction pipelines: subclasses set ``method`` and ``grid_size`` and implement
    ``__call__`` with :meth:`prepare` and :meth:`finish`."""

    method = "reconstruction"

    @property
    def grid_size(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the networks are (diffusers' own property expects ``ModelMixin`` parts; ours are plain modules)."""
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                return next(module.parameters()).device
        return torch.device("cpu")

    def prepare(self, xrays: Sequence[XRayImage | np.ndarray], views: Sequence[Sequence[float]],
                center_ras: Sequence[float] | None, generator: torch.Generator | int | None) -> PreparedInput:
        """Check the inputs (one line per problem), place the grid and fit each X-ray to its view's detector."""
        xrays = [x if isinstance(x, XRayImage) else XRayImage(np.asarray(x)) for x in xrays]
        if len(xrays) not in (1, 2):
            raise ImageError(f"reconstruction takes one or two X-rays, got {len(xrays)}")
        angles = check_views(views, len(xrays))
        if center_ras is None:
            stored = geometry_from_metadata(xrays[0].metadata)
            center_ras = stored.isocenter if stored is not None else (0.0, 0.0, 0.0)
        grid = ReconGrid(self.grid_size, tuple(center_ras))
        geoms = [grid.geometry(az, el) for az, el in angles]
        fitted = [fit_xray(x, g) for x, g in zip(xrays, geoms)]
        inputs = [XRayImage(a, pixel_spacing=g.pixel[::-1], ijk_to_ras=g.detector_ijk_to_ras, source=x.source,
                            metadata={"geometry": g.to_dict(), "kind": "model input", "normalization": "[0, 1]",
                                      "synthetic": bool(x.metadata.get("synthetic", False))})  # as its source
                  for a, g, x in zip(fitted, geoms, xrays)]
        images = torch.from_numpy(np.stack(fitted)).to(self.device)
        return PreparedInput(grid, geoms, images, inputs, seed_of(generator))

    def finish(self, unit: torch.Tensor | np.ndarray, prepared: PreparedInput, name: str, **metadata) -> CTVolume:
        """The model's [0, 1] volume as a synthetic CT in HU on the grid, with how it was made."""
        arr = unit.detach().float().cpu().numpy() if isinstance(unit, torch.Tensor) else np.asarray(unit)
        return prepared.grid.to_ct(np.clip(arr, 0.0, 1.0), name, method=self.method, seed=prepared.seed,
                                   views=[[g.azimuth, g.elevation] for g in prepared.views], note=NOTE, **metadata)


def noise(seed: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Standard normal noise from a CPU generator, so a seed gives the same volume on every device."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed)).to(device)
