"""Projection radiographs from DICOM (CR, DX, DR, XA single frames, secondary captures, and our own DRR files).

Intensity convention of every XRayImage: higher value = more attenuation (bone bright), the polarity of a DRR line
integral. MONOCHROME2 files already follow it; MONOCHROME1 files (where the smallest value is displayed white) are
inverted within their possible value range. Values are otherwise kept as stored after the Modality LUT (rescale
slope/intercept), because models normalize each image themselves; the stored display windows are recorded in
``metadata["windows"]`` (in the output polarity) and applied only when the caller asks for ``apply_window``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from ..images import ImageError, XRayImage
from .common import SYNTHETIC_MARK, dicom_pixels, parse_geometry, read_dicom

#: Where we keep the C-arm geometry JSON of the DRRs we write: a private block in an odd (private) group.
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "SVDRR 1.0"
GEOMETRY_ELEMENT = 0x01

_CROSS_SECTIONAL = ("CT", "MR", "PT", "NM")


def read_dicom_xray(path: Path, apply_window: bool = False) -> XRayImage:
    """One single-frame DICOM radiograph in the module's convention (see the module docstring)."""
    ds = read_dicom(path)
    _check_is_radiograph(ds, path)
    values, (lo, hi) = _modality_values(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    inverted = photometric == "MONOCHROME1"
    if inverted:
        values = lo + hi - values
    windows = _windows(ds, lo + hi if inverted else None)
    if apply_window:
        values = _apply_voi(ds, values, lo + hi if inverted else None, windows, path)
    spacing, spacing_meta = _pixel_spacing(ds)
    metadata = {"source": str(path), "format": "dicom", "photometric_interpretation": photometric,
                "inverted": inverted, "windows": windows, "window_applied": apply_window,
                **spacing_meta, **_acquisition(ds)}
    ijk_to_ras = None
    stored_geometry = _geometry_text(ds)
    if stored_geometry:
        metadata["geometry"], ijk_to_ras = parse_geometry(stored_geometry, str(path))
    return XRayImage(values, spacing, metadata=metadata, ijk_to_ras=ijk_to_ras, source=str(path))


def _check_is_radiograph(ds: Dataset, path: Path) -> None:
    if "PixelData" not in ds:
        raise ImageError(f"{path}: DICOM file holds no pixel data (not an image, or truncated)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(f"{path}: is a 3D/multi-frame DICOM ({frames} frames), not a single X-ray image")
    modality = str(ds.get("Modality", ""))
    if modality in _CROSS_SECTIONAL:
        raise ImageError(f"{path}: is a {modality} slice, not a projection radiograph (load its series with load_ct)")


def _modality_values(ds: Dataset, path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Pixel values after the Modality LUT, and the range they can span (for MONOCHROME1 inversion)."""
    stored = dicom_pixels(ds, path)
    if stored.ndim == 3 and stored.shape[-1] == 3:  # colour secondary capture: ITU-R BT.601 luma
        gray = stored.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return gray, (0.0, float(2 ** int(ds.BitsStored) - 1))
    if stored.ndim != 2:
        raise ImageError(f"{path}: expected a single 2D image, got pixel data of shape {stored.shape}")
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2 ** bits - 1])
    ends = np.asarray(apply_modality_lut(ends, ds), dtype=np.float64)
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    return values, (float(ends.min()), float(ends.max()))


def _windows(ds: Dataset, flip: float | None) -> list[tuple[float, float]]:
    """Stored (center, width) pairs, mirrored by ``flip - center`` when the image was inverted."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return []
    centers, widths = (np.atleast_1d(np.asarray(ds[k].value, dtype=np.float64))
                       for k in ("WindowCenter", "WindowWidth"))
    return [(float(flip - c if flip is not None else c), float(w)) for c, w in zip(centers, widths)]


def _apply_voi(ds: Dataset, values: np.ndarray, flip: float | None, windows: list[tuple[float, float]],
               path: Path) -> np.ndarray:
    """The first stored VOI transform mapped to [0, 1]: a VOI LUT Sequence when present, else the first window
    (DICOM LINEAR_EXACT, or SIGMOID when the file asks for it)."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        lut = np.asarray(item.LUTData, dtype=np.float64).ravel()
        first = float(item.LUTDescriptor[1])
        raw = values if flip is None else flip - values  # the LUT is indexed by the stored polarity
        mapped = lut[np.clip(np.rint(raw - first), 0, lut.size - 1).astype(np.int64)]
        span = max(float(lut.max() - lut.min()), 1e-12)
        mapped = (mapped - lut.min()) / span
        return mapped if flip is None else 1.0 - mapped
    if not windows:
        raise ImageError(f"{path}: no VOI LUT or window stored, cannot apply one; load without apply_window")
    center, width = windows[0]
    if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)


def _pixel_spacing(ds: Dataset) -> tuple[tuple[float, float], dict]:
    """(row, column) spacing in mm, preferring PixelSpacing (calibrated to the patient) over ImagerPixelSpacing
    (at the detector face, magnified by SID/SOD); the metadata says which was used and where it applies."""
    meta: dict = {}
    if "ImagerPixelSpacing" in ds:
        meta["imager_pixel_spacing"] = [float(x) for x in ds.ImagerPixelSpacing]
    for keyword, where in (("PixelSpacing", "patient"), ("ImagerPixelSpacing", "detector"),
                           ("NominalScannedPixelSpacing", "film")):
        if keyword in ds and ds[keyword].value:
            row, col = (float(x) for x in ds[keyword].value)
            meta.update(pixel_spacing_source=keyword, spacing_at=where, spacing_known=True)
            return (row, col), meta
    meta.update(pixel_spacing_source=None, spacing_at="unknown", spacing_known=False)
    return (1.0, 1.0), meta


def _acquisition(ds: Dataset) -> dict:
    """What the file says about the exposure and the C-arm, under stable names; absent attributes are left out."""
    numeric = {"positioner_primary_angle": "PositionerPrimaryAngle",
               "positioner_secondary_angle": "PositionerSecondaryAngle",
               "sid": "DistanceSourceToDetector", "sod": "DistanceSourceToPatient",
               "magnification": "EstimatedRadiographicMagnificationFactor"}
    text = {"modality": "Modality", "view_position": "ViewPosition", "series_description": "SeriesDescription",
            "image_comments": "ImageComments", "derivation_description": "DerivationDescription",
            "conversion_type": "ConversionType", "patient_id": "PatientID", "body_part": "BodyPartExamined"}
    meta = {name: float(ds[k].value) for name, k in numeric.items() if k in ds and ds[k].value not in (None, "")}
    meta.update({name: str(ds[k].value) for name, k in text.items() if k in ds and ds[k].value})
    if "PatientOrientation" in ds and ds.PatientOrientation:
        meta["patient_orientation"] = [str(x) for x in ds.PatientOrientation]
    meta["synthetic"] = (SYNTHETIC_MARK in meta.get("image_comments", "")
                         or SYNTHETIC_MARK in meta.get("derivation_description", "")
                         or meta.get("conversion_type") == "SYN")
    return meta


def _geometry_text(ds: Dataset) -> str:
    try:
        return str(ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[GEOMETRY_ELEMENT].value)
    except KeyError:
        return ""
