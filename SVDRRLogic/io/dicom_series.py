"""DICOM CT series: find the series in a folder and stack one into a CTVolume in RAS.

Slices are ordered by their position along the slice normal (ImageOrientationPatient row x column direction),
never by file name or InstanceNumber, which scanners and anonymizers do not keep reliably. A stack that an affine
IJK-to-RAS cannot describe exactly -- gantry tilt (slices shifted in-plane as they advance) or uneven slice spacing
(a gap, mixed thicknesses) -- is resampled onto a regular orthogonal grid, and the reason is reported both as an
:class:`ImageWarning` and in ``metadata["warnings"]``, so downstream code (projector, Slicer) only ever sees
orthogonal, evenly spaced volumes.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from ..images import CTVolume, ImageError, ImageWarning
from .common import AIR_HU, LPS_TO_RAS, dicom_pixels, existing_path, is_dicom_file, read_dicom

#: Positions closer than this along the normal are the same slice (mm).
SAME_SLICE_MM = 1e-3
#: An in-plane drift of the slice origins above this fraction of a pixel counts as gantry tilt.
TILT_PIXELS = 0.01


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found in a folder: what a user needs to pick it, and the files that make it up."""

    uid: str
    description: str
    modality: str
    files: tuple[Path, ...]

    @property
    def n_slices(self) -> int:
        return len(self.files)

    def __str__(self) -> str:
        return f"{self.uid} ({self.modality or '?'}, {self.n_slices} slices, '{self.description}')"


def list_dicom_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Every image series under ``folder`` (searched recursively), largest first.

    Only headers are read. Files without the DICOM preamble (notes, thumbnails) are skipped, as are objects with no
    image (DICOMDIR, structured reports) and localizer (scout) images, which are never part of a CT volume.
    """
    root = existing_path(folder)
    if not root.is_dir():
        raise ImageError(f"{root}: is a file, not a folder of DICOM files")
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in _files_under(root):
        ds = _read_header(path)
        if ds is not None:
            groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    series = [SeriesInfo(uid=uid, description=str(members[0][1].get("SeriesDescription", "")),
                         modality=str(members[0][1].get("Modality", "")),
                         files=tuple(sorted(p for p, _ in members))) for uid, members in groups.items()]
    return sorted(series, key=lambda s: (-s.n_slices, s.uid))


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> CTVolume:
    """The CT volume of the only series in ``folder``, or of ``series_uid`` when the folder holds several."""
    root = Path(folder)
    info = _choose(list_dicom_series(root), root, series_uid)
    return _stack(info, root)


def series_uid_of(path: Path) -> str:
    """The SeriesInstanceUID of one DICOM file, so that giving a single slice loads its whole series."""
    ds = read_dicom(path, stop_before_pixels=True)
    if "SeriesInstanceUID" not in ds or "Rows" not in ds:
        raise ImageError(f"{path}: DICOM file holds no image (or is truncated)")
    return str(ds.SeriesInstanceUID)


# -- discovery -------------------------------------------------------------------------------------------------
def _files_under(root: Path) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        found += [Path(folder, n) for n in sorted(names)]
    return found


def _read_header(path: Path) -> Dataset | None:
    """Header of an image file belonging to a series; None for what is not part of any image series."""
    if not is_dicom_file(path):
        return None
    ds = read_dicom(path, stop_before_pixels=True)
    if "SeriesInstanceUID" not in ds or "Rows" not in ds:
        return None
    if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
        return None
    return ds


def _choose(series: list[SeriesInfo], root: Path, series_uid: str | None) -> SeriesInfo:
    listing = "; ".join(str(s) for s in series)
    if not series:
        raise ImageError(f"{root}: no DICOM image series found in this folder")
    if series_uid is not None:
        for s in series:
            if s.uid == series_uid:
                return s
        raise ImageError(f"{root}: no series with UID {series_uid}; the folder holds: {listing}")
    volumes = [s for s in series if s.modality == "CT" and s.n_slices > 1] if len(series) > 1 else series
    if len(volumes) == 1:  # one CT beside radiographs or a single scout: that is the one
        return volumes[0]
    raise ImageError(f"{root}: {len(series)} DICOM series found; choose one (--series UID on the command line, "
                     f"series_uid= in Python): {listing}")


# -- stacking --------------------------------------------------------------------------------------------------
def _stack(info: SeriesInfo, root: Path) -> CTVolume:
    datasets = [read_dicom(p) for p in info.files]
    if len(datasets) == 1:
        frames = int(datasets[0].get("NumberOfFrames", 1) or 1)
        kind = f"a multi-frame DICOM ({frames} frames), not supported" if frames > 1 else "a single 2D image"
        raise ImageError(f"{info.files[0]}: series {info.uid} is {kind}; a CT needs a series of slices")
    row_dir, col_dir, (dx, dy) = _common_plane(datasets, info)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    _reject_duplicates(positions[order] @ normal, [info.files[i] for i in order])
    hu, padded = zip(*(_slice_hu(datasets[i], info.files[i]) for i in order))
    volume, lps, notes = _regular_grid(np.stack(hu), positions[order], row_dir, col_dir, dx, dy)
    resampled = bool(notes)
    first = datasets[order[0]]
    if info.modality and info.modality != "CT":
        notes.append(f"modality is {info.modality}, not CT: values may not be Hounsfield units")
    for note in notes:
        warnings.warn(f"{root}: {note}", ImageWarning, stacklevel=4)
    metadata = {
        "source": str(root), "format": "dicom", "modality": info.modality, "series_uid": info.uid,
        "series_description": info.description, "study_description": str(first.get("StudyDescription", "")),
        "patient_id": str(first.get("PatientID", "")), "n_files": info.n_slices,
        "padding_voxels": int(sum(padded)), "air_hu": AIR_HU, "resampled": resampled, "warnings": notes,
    }
    return CTVolume(volume, LPS_TO_RAS @ lps, metadata=metadata, source=str(root))


def _common_plane(datasets: list[Dataset], info: SeriesInfo) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Row and column directions and (column, row) pixel spacing, which every slice must share."""
    first = datasets[0]
    for ds, path in zip(datasets, info.files):
        missing = [k for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise ImageError(f"{path}: lacks {', '.join(missing)}, so slices cannot be placed in 3D "
                             "(not a cross-sectional image?)")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ImageError(f"{path}: multi-frame (enhanced) DICOM is not supported; export single-frame slices")
        same = (ds.Rows == first.Rows and ds.Columns == first.Columns
                and np.allclose([float(x) for x in ds.ImageOrientationPatient],
                                [float(x) for x in first.ImageOrientationPatient], atol=1e-4)
                and np.allclose([float(x) for x in ds.PixelSpacing], [float(x) for x in first.PixelSpacing],
                                atol=1e-4))
        if not same:
            raise ImageError(f"{path}: size, orientation or pixel spacing differs from {info.files[0].name} "
                             f"within series {info.uid}")
    iop = np.array([float(x) for x in first.ImageOrientationPatient])
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    if abs(row_dir @ col_dir) > 1e-3:
        raise ImageError(f"{info.files[0]}: ImageOrientationPatient row and column directions are not perpendicular")
    row_spacing, col_spacing = (float(x) for x in first.PixelSpacing)
    return row_dir, col_dir, (col_spacing, row_spacing)


def _reject_duplicates(distances: np.ndarray, files: list[Path]) -> None:
    same = np.flatnonzero(np.diff(distances) < SAME_SLICE_MM)
    if same.size:
        k = int(same[0])
        raise ImageError(f"{files[k].parent}: {files[k].name} and {files[k + 1].name} lie at the same position "
                         f"({distances[k]:.3f} mm along the normal); the series mixes acquisitions")


def _slice_hu(ds: Dataset, path: Path) -> tuple[np.ndarray, int]:
    """One slice in HU (rescale slope/intercept or modality LUT applied), with padding turned into air.

    Pixels equal to PixelPaddingValue (or inside PixelPaddingRangeLimit) are outside the scanned field of view; they
    and anything below -1024 HU (e.g. the -2048 or -3024 that scanners write around the circular field of view)
    become -1024 HU, the air floor of a CT. Returns the slice and how many pixels were padding.
    """
    stored = dicom_pixels(ds, path)
    if stored.ndim != 2:
        raise ImageError(f"{path}: expected one grayscale slice, got pixel data of shape {stored.shape}")
    hu = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    padding = _padding_mask(ds, stored) | (hu < AIR_HU)
    hu[padding] = AIR_HU
    return hu.astype(np.float32), int(padding.sum())


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    if "PixelPaddingValue" not in ds:
        return np.zeros(stored.shape, dtype=bool)
    a = int(ds.PixelPaddingValue)
    lo, hi = sorted((a, int(ds.get("PixelPaddingRangeLimit", a))))
    return (stored >= lo) & (stored <= hi)


def _regular_grid(slices: np.ndarray, positions: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray,
                  dx: float, dy: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sorted slices as a volume on a regular orthogonal grid, its IJK-to-LPS matrix, and what had to be fixed."""
    normal = np.cross(row_dir, col_dir)
    depth = (positions - positions[0]) @ normal
    steps = np.diff(depth)
    offsets = positions - positions[0] - np.outer(depth, normal)
    shifts = np.stack([offsets @ row_dir / dx, offsets @ col_dir / dy], axis=1)  # in-plane drift, pixels (i, j)
    notes = []
    if np.abs(shifts).max() > TILT_PIXELS:
        tilt = np.degrees(np.arctan2(np.linalg.norm(offsets[-1]), depth[-1]))
        notes.append(f"gantry tilt of {tilt:.2f} degrees (slice origins drift sideways along the stack); "
                     "resampled to an orthogonal grid")
    step = float(np.median(steps))
    if np.ptp(steps) > max(0.01, 0.01 * step):
        notes.append(f"uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm); "
                     f"resampled linearly to {step:.3f} mm")
    if notes:
        slices, origin_pixels = _resample(slices, depth, shifts, step)
    else:
        step, origin_pixels = float(depth[-1] / (len(depth) - 1)), np.zeros(2)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row_dir * dx, col_dir * dy, normal * step
    lps[:3, 3] = positions[0] + origin_pixels[0] * dx * row_dir + origin_pixels[1] * dy * col_dir
    return slices, lps, notes


def _resample(slices: np.ndarray, depth: np.ndarray, shifts: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Undo the in-plane drift of each slice, then interpolate linearly to evenly spaced depths.

    The in-plane grid grows so that no tissue shifted by a tilt falls off its edge; the returned (i, j) pixel
    offset of the new grid's origin relative to the first slice's origin places it in space.
    """
    low = np.floor(np.minimum(shifts.min(axis=0), 0.0)).astype(int)
    high = np.ceil(np.maximum(shifts.max(axis=0), 0.0)).astype(int)
    n, rows, cols = slices.shape
    canvas = np.full((rows + high[1] - low[1], cols + high[0] - low[0]), AIR_HU, dtype=np.float32)
    aligned = np.empty((n,) + canvas.shape, dtype=np.float32)
    for k in range(n):
        canvas[:rows, :cols] = slices[k]
        aligned[k] = ndimage.shift(canvas, (shifts[k, 1] - low[1], shifts[k, 0] - low[0]), order=1,
                                   mode="grid-constant", cval=AIR_HU)
    targets = np.arange(int(round(depth[-1] / step)) + 1) * step
    below = np.clip(np.searchsorted(depth, targets, side="right") - 1, 0, n - 2)
    weight = np.clip((targets - depth[below]) / (depth[below + 1] - depth[below]), 0.0, 1.0)[:, None, None]
    return ((1.0 - weight) * aligned[below] + weight * aligned[below + 1]).astype(np.float32), low.astype(float)
