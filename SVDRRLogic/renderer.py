"""``DRRRenderer``: a CT prepared once on a device, rendered for any number of C-arm views.

It owns the choices a user makes once per CT (device, HU model) and keeps the slice stacks the projector needs,
so interactive re-rendering costs only the projection. GPU memory exhaustion is handled here: the work is split
into smaller chunks, and if even that fails the error says what to change.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .attenuation import MU_WATER_PER_MM, apply_output, hu_to_mu
from .geometry import CArmGeometry
from .images import CTVolume
from .projector import back_project, default_chunk, plan_views, project_groups, slabs

_MIN_CHUNK = 1 << 14


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA device is available; use device 'cpu' or 'auto'")
    return dev


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


class DRRRenderer:
    """Renders DRRs of one CT. ``render`` takes a geometry or a list of them (same detector size)."""

    def __init__(self, ct: CTVolume, device: str | torch.device = "auto", hu_model: str = "physical",
                 mu_water: float = MU_WATER_PER_MM, chunk: int | None = None):
        """``chunk`` bounds the ray-plane samples per step (memory); the default suits the device."""
        self.ct = ct
        self.device = resolve_device(device)
        self.hu_model = hu_model if ct.units == "hu" else "mu"
        mu = ct.array_hu if ct.units == "mu" else hu_to_mu(ct.array_hu, hu_model, mu_water)
        try:
            self.volume = torch.from_numpy(mu).to(self.device)
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError(f"the CT ({ct.array_hu.nbytes / 2**20:.0f} MiB as float32) does not fit in GPU "
                               "memory; use device 'cpu' or a downsampled CT") from None
        self.ijk_to_ras = ct.ijk_to_ras
        self._ras_to_ijk = np.linalg.inv(ct.ijk_to_ras)
        self._stacks: dict[tuple[int, int], torch.Tensor] = {}
        self.chunk = chunk or default_chunk(self.device)

    def _stack(self, axis: int, oversample: int) -> torch.Tensor:
        """Plane stacks are built on first use and kept: live re-rendering then costs only the projection."""
        if (axis, oversample) not in self._stacks:
            self._stacks[(axis, oversample)] = slabs(self.volume, axis, oversample)
        return self._stacks[(axis, oversample)]

    def _check_source_outside(self, geometries: Sequence[CArmGeometry]) -> None:
        nk, nj, ni = self.volume.shape
        for g in geometries:
            ijk = self._ras_to_ijk[:3, :3] @ g.source + self._ras_to_ijk[:3, 3]
            if np.all(ijk >= -0.5) and np.all(ijk <= np.array([ni, nj, nk]) - 0.5):
                raise ValueError(f"the X-ray source {np.round(g.source, 1).tolist()} lies inside the CT volume; "
                                 "increase the source-to-isocenter distance")

    def render_tensor(self, geometries: CArmGeometry | Sequence[CArmGeometry], output: str = "line-integral",
                      oversample: int = 2) -> torch.Tensor:
        """Views as a tensor on the renderer's device: (rows, cols) for one geometry, (views, rows, cols) else.

        ``oversample=1`` halves the cost for live preview; 2 (default) is the accurate Simpson integration.
        """
        single = isinstance(geometries, CArmGeometry)
        geoms = [geometries] if single else list(geometries)
        if not geoms:
            raise ValueError("no views to render")
        self._check_source_outside(geoms)
        try:  # the ray plan, the plane stacks and the projection all live on the device
            groups, (h, w) = plan_views(geoms, self.ijk_to_ras, self.volume.shape, self.device, oversample)
            with torch.no_grad():
                flat = self._project(groups, len(geoms) * h * w, oversample)
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError("out of memory while rendering; render fewer views at once, use a smaller "
                               "detector, or device 'cpu'") from None
        images = apply_output(flat.view(len(geoms), h, w), output)
        return images[0] if single else images

    def _project(self, groups, n_rays: int, oversample: int) -> torch.Tensor:
        """Projection that retries with smaller chunks when a GPU runs short of memory; the smaller chunk serves
        this call only, so a moment of memory pressure (another job on the GPU) does not slow every later render."""
        stacks = {g.axis: self._stack(g.axis, oversample) for g in groups}
        chunk = self.chunk
        while True:
            try:
                return project_groups(self.volume, stacks, groups, n_rays, chunk)
            except torch.cuda.OutOfMemoryError:
                if self.device.type != "cuda" or chunk <= _MIN_CHUNK:
                    raise
                torch.cuda.empty_cache()
                chunk //= 4

    def render(self, geometries: CArmGeometry | Sequence[CArmGeometry], output: str = "line-integral",
               oversample: int = 2) -> np.ndarray:
        """float32 numpy image(s): line integral of mu*mm (default), transmission, or display-normalized."""
        return self.render_tensor(geometries, output, oversample).cpu().numpy()

    def back_project(self, images: np.ndarray | torch.Tensor, geometries: Sequence[CArmGeometry]) -> torch.Tensor:
        """Adjoint of ``render`` (line-integral output) summed over views, as a [k, j, i] tensor."""
        imgs = torch.as_tensor(images, dtype=torch.float32, device=self.device)  # numpy, or a tensor anywhere
        return back_project(imgs, self.ijk_to_ras, self.volume.shape, list(geometries), self.chunk)
