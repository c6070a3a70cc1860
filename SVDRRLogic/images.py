"""In-memory image types shared by every layer: a CT volume and a 2D X-ray, both carrying RAS geometry.

Arrays are numpy ``float32``; geometry is a 4x4 IJK-to-RAS matrix in millimetres (patient RAS, as in Slicer's
scene), so nothing downstream needs to know which file convention (LPS for DICOM/NRRD/ITK) an image came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ImageError(ValueError):
    """An input that is not a usable image; the message names the source and the problem in one line."""


class ImageWarning(UserWarning):
    """An image was loaded but something about it deserves attention (gantry tilt, uneven slices, resampling,
    values unlike HU); the message names the source and the problem in one line."""


@dataclass
class CTVolume:
    """A CT (or any scalar volume) indexed ``array_hu[k, j, i]``, with ``ijk_to_ras`` mapping (i, j, k, 1) to RAS mm.

    ``array_hu`` holds Hounsfield units by default; when ``units == "mu"`` it holds linear attenuation in 1/mm
    (used for analytic phantoms, whose line integrals are known exactly).
    """

    array_hu: np.ndarray
    ijk_to_ras: np.ndarray
    units: str = "hu"
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.array_hu = np.ascontiguousarray(self.array_hu, dtype=np.float32)
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        check_volume(self.array_hu, self.ijk_to_ras, self.source)
        if self.units not in ("hu", "mu"):
            raise ImageError(f"{self.source}: units must be 'hu' or 'mu', not {self.units!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array_hu.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (di, dj, dk) in mm: the column norms of the direction-scaled matrix."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    def corners_ras(self) -> np.ndarray:
        """The 8 corners of the volume's outer voxel boundaries (half a voxel beyond the centres), RAS mm, (8, 3)."""
        k, j, i = self.shape
        idx = np.array([[a, b, c, 1.0] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5) for c in (-0.5, k - 0.5)])
        return (self.ijk_to_ras @ idx.T).T[:, :3]

    @property
    def center_ras(self) -> np.ndarray:
        """Centre of the bounding box, the default C-arm isocenter (DESIGN.md section 3)."""
        k, j, i = self.shape
        return (self.ijk_to_ras @ np.array([(i - 1) / 2, (j - 1) / 2, (k - 1) / 2, 1.0]))[:3]


@dataclass
class XRayImage:
    """A 2D projection image indexed ``array[row, col]`` with ``pixel_spacing = (row_mm, col_mm)``.

    ``metadata`` carries what the source said (modality, photometric interpretation, positioner angles, distances,
    ``synthetic`` flag); ``ijk_to_ras`` places the image in 3D when its geometry is known (DRRs), else it is None.
    """

    array: np.ndarray
    pixel_spacing: tuple[float, float] = (1.0, 1.0)
    metadata: dict[str, Any] = field(default_factory=dict)
    ijk_to_ras: np.ndarray | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.array = np.ascontiguousarray(self.array, dtype=np.float32)
        if self.array.ndim != 2 or min(self.array.shape) < 2:
            raise ImageError(f"{self.source}: an X-ray must be a 2D image, got shape {self.array.shape}")
        if not np.isfinite(self.array).all():
            raise ImageError(f"{self.source}: image contains NaN or infinite values")
        sp = tuple(float(s) for s in self.pixel_spacing)
        if len(sp) != 2 or not all(np.isfinite(sp)) or min(sp) <= 0 or max(sp) > 100:
            raise ImageError(f"{self.source}: absurd pixel spacing {self.pixel_spacing} mm")
        self.pixel_spacing = sp  # type: ignore[assignment]


def value_doubt(lo: float, hi: float, units: str = "hu") -> str | None:
    """Why a volume whose values span ``lo``..``hi`` does not look like a CT in ``units``, or None when it does.

    In HU a CT holds air near -1000 and tissue above 0 (a label map or an MR image does not); as attenuation in
    1/mm it lies between 0 and a few per mm (lead at 70 keV: about 3.4), so negative or HU-sized values mean HU
    were given as attenuation."""
    if units == "hu" and (lo > -200.0 or hi < 0.0):
        return f"values {lo:.0f}..{hi:.0f} do not look like Hounsfield units: DRRs will not be realistic"
    if units == "mu" and (lo < 0.0 or hi > 10.0):
        return f"values {lo:.4g}..{hi:.4g} do not look like attenuation in 1/mm (are they HU?)"
    return None


def check_volume(array: np.ndarray, ijk_to_ras: np.ndarray, source: str) -> None:
    """Reject what cannot be a CT: wrong dimensionality, degenerate axes, NaN/inf, absurd or singular spacing."""
    if array.ndim != 3:
        raise ImageError(f"{source}: a CT must be a 3D volume, got {array.ndim}D data of shape {array.shape}")
    if min(array.shape) < 2:
        raise ImageError(f"{source}: a CT needs at least 2 voxels along every axis, got shape {array.shape} "
                         "(is this a 2D image?)")
    if not np.isfinite(array).all():
        raise ImageError(f"{source}: volume contains NaN or infinite values")
    if ijk_to_ras.shape != (4, 4) or not np.isfinite(ijk_to_ras).all():
        raise ImageError(f"{source}: IJK-to-RAS must be a finite 4x4 matrix")
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    if spacing.min() < 1e-3 or spacing.max() > 50.0:
        raise ImageError(f"{source}: absurd voxel spacing {np.round(spacing, 4).tolist()} mm (expected 0.001-50 mm)")
    if abs(np.linalg.det(ijk_to_ras[:3, :3] / spacing)) < 1e-3:
        raise ImageError(f"{source}: voxel axes are degenerate (singular direction matrix)")
