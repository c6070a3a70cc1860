"""Helpers shared by the readers and writers: input checks, atomic output, the LPS/RAS flip, synthetic marking.

Kept in one place so that every reader rejects a missing or empty file with the same one-line message, and every
writer marks synthetic output with the same words.
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..geometry import CArmGeometry, GeometryError
from ..images import ImageError

#: Written into every image we produce, so nobody mistakes a DRR or a diffusion output for an acquired film.
SYNTHETIC_MARK = "SYNTHETIC - NOT FOR DIAGNOSIS"

#: Files (DICOM, NRRD, ITK) store LPS; the scene is RAS. The flip is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: CT values below this are padding or reconstruction artefacts, not tissue; they become air.
AIR_HU = -1024.0

#: Extensions SimpleITK reads for us, with the format name recorded in ``metadata["format"]``.
ITK_FORMAT_NAMES = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage",
                    ".mhd": "metaimage"}
ITK_SUFFIXES = tuple(ITK_FORMAT_NAMES)
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def existing_path(path: str | os.PathLike) -> Path:
    """The path as a Path, after checking that it exists and, if a file, is not empty (folders are the caller's
    business)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ImageError(f"{p}: file or folder does not exist")
    if p.is_file() and p.stat().st_size == 0:
        raise ImageError(f"{p}: file is empty")
    return p


def suffix_of(path: Path) -> str:
    """Lower-case extension, keeping the double one of ``.nii.gz``."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble ("DICM" at byte 128), whatever its name."""
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def first_line(exc: BaseException) -> str:
    """An exception as ``Type: first line`` (libraries' messages may span lines; ours must not)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def read_dicom(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """pydicom's reader with every parse failure (truncation, bad tags) turned into a one-line ImageError."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise ImageError(f"{path}: not a DICOM file (no DICM marker at byte 128)") from None
    except Exception as exc:  # pydicom raises many types (EOFError, struct.error, ValueError, ...)
        raise ImageError(f"{path}: truncated or corrupt DICOM file ({first_line(exc)})") from None


def dicom_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Decoded stored pixel values (JPEG and other compressed syntaxes via pylibjpeg), or a one-line ImageError."""
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise many types for truncated or unsupported pixel data
        raise ImageError(f"{path}: pixel data cannot be decoded, truncated or unsupported ({first_line(exc)})") \
            from None


def itk_error_text(exc: Exception) -> str:
    """The one informative line of a multi-line ITK exception (its "Description:"), for one-line messages."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Description:"):
            return ln[len("Description:"):].strip()
    return lines[-1] if lines else type(exc).__name__


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The temporary name keeps ``suffix`` because SimpleITK picks its writer (and gzip) from the extension. Being in
    the same folder makes ``os.replace`` a rename on one file system, so readers see the old file or the new one,
    never a half-written one. The temporary file is created first (with the usual permissions, which
    ``tempfile.mkstemp`` would restrict to the owner), so a folder that cannot be written is one clear error
    naming the final file, before any writer (some of which print C diagnostics) runs.
    """
    final = Path(path).expanduser()
    if not final.parent.is_dir():
        raise ImageError(f"{final}: output folder {final.parent} does not exist")
    tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp{suffix}"
    try:
        tmp.touch(exist_ok=False)
    except OSError as exc:
        raise ImageError(f"{final}: cannot write in {final.parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def all_or_nothing(written: list, folder: Path | None = None) -> Iterator[list]:
    """A set of files made in the block is complete or absent: when the block fails or is interrupted, every path
    appended to ``written`` is removed, and ``folder`` too when it did not exist before and is left empty."""
    new_folder = folder is not None and not Path(folder).exists()
    try:
        yield written
    except BaseException:
        for path in written:
            Path(path).unlink(missing_ok=True)
        if new_folder and Path(folder).is_dir() and not any(Path(folder).iterdir()):
            Path(folder).rmdir()
        raise


def quantize_u16(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Min-max scale float values to uint16 for formats without floats (PNG, DICOM); ``value ~ offset + stored *
    scale`` recovers them to within half a step. A constant image stores zeros with scale 0."""
    offset = float(values.min())
    scale = (float(values.max()) - offset) / 65535.0
    if scale == 0.0:
        return np.zeros(values.shape, dtype=np.uint16), offset, 0.0
    return np.round((values - offset) / scale).astype(np.uint16), offset, scale


def geometry_json(geometry: CArmGeometry) -> str:
    """Compact one-line JSON of a view (fits NRRD key/value lines and PNG text chunks)."""
    return json.dumps(geometry.to_dict(), separators=(",", ":"))


def parse_geometry(text: str, source: str) -> tuple[dict, np.ndarray]:
    """The geometry dict stored in one of our files and the detector IJK-to-RAS it implies, validated."""
    try:
        d = json.loads(text)
        return d, CArmGeometry.from_dict(d).detector_ijk_to_ras
    except (ValueError, TypeError, KeyError, GeometryError) as exc:
        raise ImageError(f"{source}: stored C-arm geometry is corrupt ({exc})") from None


def geometry_from_metadata(metadata: dict) -> CArmGeometry | None:
    """The C-arm view an image was loaded with (from one of our files), so a re-save keeps it."""
    d = metadata.get("geometry")
    return CArmGeometry.from_dict(d) if d else None
