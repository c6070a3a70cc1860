"""The cube an X-ray-to-CT model reconstructs into, and the X-rays it sees, placed in our RAS / C-arm convention.

Both reconstruction methods (DVG-Diffusion, 3D patch EDM) work on the X2CT-GAN protocol of LIDC-IDRI: a 320 mm
cube (1 mm resampling, 320^3 crop), resized to N^3 (128^3 in the papers, 2.5 mm voxels) and windowed to the stored
values [0, 2500] = HU + 1024, divided by 2500 ("unit" values in [0, 1]). :class:`ReconGrid` is that cube placed in
the scene: its array is ``[k, j, i]`` with i toward the patient's left, j posterior and k superior (the LPS
identity orientation the X2CT volumes had after ``SimpleITK`` reading), centred on a RAS point.

The X-rays are rendered and back-projected with our projector in the geometry the models were trained with: the
XraySyn cone beam used by DVG-Diffusion (source-isocentre 1000 and source-detector 1200 voxel units, a detector of
N pixels of one voxel unit at N = 128), scaled to the physical 320 mm cube, i.e. the ``dvg-xraysyn`` preset with its
detector resampled to N pixels. :func:`xraysyn_view` is the one place where XraySyn's view angle maps to ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .geometry import CArmGeometry
from .images import CTVolume, ImageError, XRayImage

#: X2CT-GAN stores CT numbers + 1024 and windows them to [0, 2500] before dividing by 2500.
HU_OFFSET = 1024.0
WINDOW = 2500.0
FIELD_MM = 320.0
PRESET = "dvg-xraysyn"
#: XraySyn's rotation about the cranio-caudal array axis for the views DVG-Diffusion uses (radians).
XRAYSYN_FRONTAL, XRAYSYN_LATERAL, XRAYSYN_NEW_VIEW = -0.5 * math.pi, 0.0, -0.25 * math.pi


def xraysyn_view(theta_x: float) -> tuple[float, float]:
    """(azimuth, elevation) in degrees of the XraySyn / DVG-Diffusion view rotated by ``theta_x`` radians.

    DVG's code names theta_x = -pi/2 the frontal view and 0 the lateral one from the patient's right side, and
    synthesizes its extra view at -pi/4. Its rotation turns the C-arm about the cranio-caudal axis, so it is our
    azimuth shifted by 90 degrees: azimuth = degrees(theta_x) + 90, elevation 0. Frontal -> 0 (PA), lateral ->
    +90 (source on the patient's right), new view -> +45. The direction of the shift follows the authors'
    naming of the views; their array flips are not documented, so models trained by this project (which render
    and back-project with this same function) are exact, and the released weights expect these views by inference.
    """
    az = math.degrees(float(theta_x)) + 90.0
    az = (az + 180.0) % 360.0 - 180.0
    return (180.0 if az == -180.0 else az), 0.0


def hu_to_unit(hu: np.ndarray) -> np.ndarray:
    """HU -> the models' [0, 1] values (X2CT window [0, 2500] of HU + 1024)."""
    return np.clip((np.asarray(hu, dtype=np.float32) + HU_OFFSET) / WINDOW, 0.0, 1.0)


def unit_to_hu(unit: np.ndarray) -> np.ndarray:
    """The models' [0, 1] values -> HU (the inverse of :func:`hu_to_unit` inside the window)."""
    return np.asarray(unit, dtype=np.float32) * WINDOW - HU_OFFSET


@dataclass(frozen=True)
class ReconGrid:
    """An N^3 cube of ``field_mm`` centred on ``center_ras``, with the X-ray geometry the models use on it."""

    size: int = 128
    center_ras: tuple[float, float, float] = (0.0, 0.0, 0.0)
    field_mm: float = FIELD_MM

    def __post_init__(self) -> None:
        object.__setattr__(self, "center_ras", tuple(float(x) for x in np.asarray(self.center_ras).reshape(-1)))
        if int(self.size) < 4 or len(self.center_ras) != 3 or not np.isfinite(self.center_ras).all():
            raise ImageError(f"a reconstruction grid needs at least 4 voxels and a finite centre, got size "
                             f"{self.size}, centre {self.center_ras}")
        object.__setattr__(self, "size", int(self.size))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size,) * 3

    @property
    def spacing(self) -> float:
        return self.field_mm / self.size

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """i -> patient left, j -> posterior, k -> superior; the centre of the cube at ``center_ras``."""
        m = np.diag([-self.spacing, -self.spacing, self.spacing, 1.0])
        half = (self.size - 1) / 2.0
        m[:3, 3] = np.asarray(self.center_ras) - m[:3, :3] @ np.full(3, half)
        return m

    def geometry(self, azimuth: float, elevation: float = 0.0) -> CArmGeometry:
        """The training geometry of the models (``dvg-xraysyn``: SAD 2500, SDD 3000 mm) with N pixels spanning the
        same 320 mm detector, aimed at the grid's centre."""
        base = CArmGeometry.preset(PRESET)
        pixel = base.pixel[0] * base.detector[0] / self.size
        return base.replace(detector=(self.size, self.size), pixel=(pixel, pixel),
                            isocenter=self.center_ras).with_view(azimuth, elevation)

    def sample_ct(self, ct: CTVolume) -> np.ndarray:
        """The CT resampled (trilinear) into the grid as unit values [k, j, i]; outside the CT is air."""
        from scipy.ndimage import map_coordinates
        if ct.units != "hu":
            raise ImageError(f"{ct.source}: reconstruction models take a CT in HU, not {ct.units}")
        n = self.size
        k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij")
        ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
        src = np.linalg.inv(ct.ijk_to_ras) @ self.ijk_to_ras @ ijk1
        hu = map_coordinates(ct.array_hu, src[2::-1], order=1, mode="constant", cval=-HU_OFFSET)
        return hu_to_unit(hu.reshape(self.shape))

    def to_ct(self, unit: np.ndarray, name: str, *, synthetic: bool = True, **metadata) -> CTVolume:
        """A [k, j, i] array of unit values on this grid as a CT in HU, marked synthetic unless told otherwise."""
        unit = np.asarray(unit, dtype=np.float32)
        if unit.shape != self.shape:
            raise ValueError(f"volume of shape {unit.shape} is not on the {self.shape} grid")
        meta = dict(metadata, grid={"size": self.size, "center_ras": list(self.center_ras),
                                    "field_mm": self.field_mm})
        if synthetic:
            meta["synthetic"] = True
        return CTVolume(unit_to_hu(unit), self.ijk_to_ras, metadata=meta, source=name)


    def project(self, volume, views: Sequence[CArmGeometry]):
        """Line integrals (views, N, N) in mm of a [k, j, i] torch volume on this grid (differentiable)."""
        from .projector import forward_project
        return forward_project(volume, self.ijk_to_ras, list(views), oversample=1)

    def back_project(self, images, views: Sequence[CArmGeometry], *, spread: bool = False):
        """The adjoint of :meth:`project`: a [k, j, i] torch volume per view, stacked (views, k, j, i).

        ``spread=True`` divides each by the back-projection of a detector of ones, so every voxel holds the mean
        image value along the rays through it: the cone-beam form of replicating an image along its projection
        axis (what the patch EDM model conditions on). Voxels no ray reaches are 0.
        """
        import torch

        from .projector import back_project
        out = torch.stack([back_project(img[None], self.ijk_to_ras, self.shape, [g], oversample=1)
                           for img, g in zip(images, views)])
        if spread:
            ones = torch.ones_like(images[:1])
            weight = torch.stack([back_project(ones, self.ijk_to_ras, self.shape, [g], oversample=1) for g in views])
            out = torch.where(weight > 1e-6 * weight.amax(), out / weight.clamp_min(1e-12), torch.zeros_like(out))
        return out


def fit_xray(xray: XRayImage | np.ndarray, target: CArmGeometry) -> np.ndarray:
    """An X-ray resampled onto ``target``'s detector and min-max normalized to [0, 1], as the models were fed.

    When the image carries its C-arm geometry (our DRRs and synthesized views), pixels are matched at the
    isocentre plane (pixel size x SAD/SDD), so a DRR rendered in another geometry still lands at the right scale.
    Otherwise (a plain radiograph) the image is centre-cropped to a square and resized to the detector, the
    authors' recipe for real X-rays; the caller gives its view angles.
    """
    from scipy.ndimage import map_coordinates

    from .io.common import geometry_from_metadata
    image = xray if isinstance(xray, XRayImage) else XRayImage(np.asarray(xray, dtype=np.float32))
    arr = image.array.astype(np.float64)
    rows, cols = arr.shape
    w, h = target.detector
    stored = geometry_from_metadata(image.metadata)
    t_iso = np.array(target.pixel[::-1]) * target.sad / target.sdd          # (row, col) mm at the isocentre
    if stored is not None:
        s_iso = np.array(stored.pixel[::-1]) * stored.sad / stored.sdd
    else:
        side = min(rows, cols)
        s_iso = np.array([t_iso[0] * h / side, t_iso[1] * w / side])
    r = ((np.arange(h) - (h - 1) / 2.0) * t_iso[0] / s_iso[0] + (rows - 1) / 2.0)
    c = ((np.arange(w) - (w - 1) / 2.0) * t_iso[1] / s_iso[1] + (cols - 1) / 2.0)
    rr, cc = np.meshgrid(r, c, indexing="ij")
    out = map_coordinates(arr, [rr, cc], order=1, mode="constant", cval=float(arr.min()))
    lo, hi = float(out.min()), float(out.max())
    if not hi > lo:
        raise ImageError(f"{image.source}: the X-ray is constant over the model's field of view")
    return ((out - lo) / (hi - lo)).astype(np.float32)


def check_views(views: Sequence[Sequence[float]], count: int) -> list[tuple[float, float]]:
    """``count`` finite (azimuth, elevation) pairs in degrees, or a one-line error."""
    out = []
    for v in views:
        pair = tuple(float(x) for x in v)
        if len(pair) != 2 or not all(math.isfinite(x) for x in pair) or abs(pair[1]) > 90:
            raise ImageError(f"a view must be AZIMUTH,ELEVATION in degrees with |elevation| <= 90, got {v}")
        out.append(pair)
    if len(out) != count:
        raise ImageError(f"{count} X-ray(s) need {count} view(s), got {len(out)}")
    return out


def backprojection_baseline(grid: ReconGrid, images, views: Sequence[CArmGeometry]) -> np.ndarray:
    """The plain reconstruction every method is compared with: the mean of the views' spread back-projections of
    the min-max normalized X-rays, min-max scaled to [0, 1] (unit values; no learning, no filtering)."""
    import torch
    imgs = torch.stack([torch.as_tensor(fit_xray(im.cpu().numpy() if isinstance(im, torch.Tensor) else im, g))
                        for im, g in zip(images, views)])
    mean = grid.back_project(imgs, views, spread=True).mean(0).numpy()
    lo, hi = float(mean.min()), float(mean.max())
    return ((mean - lo) / max(hi - lo, 1e-12)).astype(np.float32)
