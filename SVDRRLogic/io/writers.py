"""Writers for DRRs, synthesized views and reconstructed CTs; every write is atomic and marked synthetic.

Formats: ``nrrd``, ``nii``, ``nii.gz``, ``mha`` (float32; a 2D image is a one-slice volume placed on the C-arm's
detector plane, so Slicer shows it where the X-ray would be), ``png`` (16-bit, min-max scaled; the scale, the
synthetic flag and the geometry JSON in text chunks) and ``dcm`` (see :mod:`.dicom_writer`). The format comes from
the explicit ``format`` argument or else from the file name.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..geometry import CArmGeometry
from ..images import CTVolume, ImageError, XRayImage
from .common import SYNTHETIC_MARK, atomic_output, geometry_from_metadata, geometry_json, quantize_u16, suffix_of
from .dicom_writer import DicomSeries, write_dicom
from .itk import ITK_FORMATS, ITK_GEOMETRY_KEY, to_itk, write_itk
from .raster import KEY_GEOMETRY, KEY_KIND, KEY_OFFSET, KEY_SCALE, KEY_SPACING, KEY_SYNTHETIC

IMAGE_FORMATS = {**ITK_FORMATS, "png": ".png", "dcm": ".dcm"}
#: What :func:`write_image` writes: a DRR, a model-synthesized view (both marked synthetic), an acquired X-ray.
IMAGE_KINDS = ("drr", "synthesized", "xray")


def write_image(path: str | os.PathLike, image: XRayImage | np.ndarray, geometry: CArmGeometry | None = None, *,
                format: str | None = None, kind: str = "drr", series: DicomSeries | None = None) -> Path:
    """Write a projection image to ``path`` and return the path.

    ``kind`` says what the image is (:data:`IMAGE_KINDS`): ``drr`` (rendered from a CT) and ``synthesized`` (made
    by a model) are marked synthetic; ``xray`` is an acquired X-ray handed on unchanged (an input copied for a
    worker or a record), so it carries no synthetic mark, and SVDRR writes no DICOM of it. ``geometry`` is the
    C-arm view the image belongs to; without it the view stored in ``image.metadata`` (an image loaded from one of
    our files) is used; with no view at all, volume formats place the image by its ``ijk_to_ras``, else as a PA
    film centred on the origin. ``format`` is one of nrrd, nii, nii.gz, mha, png, dcm; by default it follows the
    extension. ``series``: the DICOM study, series and instance number of the image (default: a series of its own).
    """
    out = Path(path).expanduser()
    fmt = _format_of(out, format, IMAGE_FORMATS)
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image kind {kind!r}; choose one of {', '.join(IMAGE_KINDS)}")
    if kind == "xray" and fmt == "dcm":
        raise ImageError(f"{out}: SVDRR writes DICOM only of images it made; write an acquired X-ray as "
                         f"{', '.join(f for f in IMAGE_FORMATS if f != 'dcm')}")
    if geometry is None:
        geometry = geometry_from_metadata(getattr(image, "metadata", {}))
    xray = _as_xray(image, geometry, out)
    with atomic_output(out, IMAGE_FORMATS[fmt]) as tmp:
        if fmt == "png":
            _write_png(xray, tmp, geometry, kind)
        elif fmt == "dcm":
            write_dicom(xray, tmp, geometry, kind, series)
        else:
            fields = {"svdrr_kind": kind} | ({} if kind == "xray" else {"ITK_FileNotes": SYNTHETIC_MARK})
            if geometry is not None:
                fields[ITK_GEOMETRY_KEY] = geometry_json(geometry)
            write_itk(to_itk(xray.array[None], _placement(xray, geometry), fields), tmp, out)
    return out


def kind_of(image: XRayImage) -> str:
    """The :data:`IMAGE_KINDS` entry to write ``image`` again as: ``xray`` unless it is synthetic, else what it
    was made as (``synthesized`` for a model's view, from a file's or a Slicer node's kind; else ``drr``)."""
    if not image.metadata.get("synthetic"):
        return "xray"
    return "synthesized" if str(image.metadata.get("kind", "")).lower().startswith("synthesized") else "drr"


def write_ct(path: str | os.PathLike, volume: CTVolume, *, format: str | None = None) -> Path:
    """Write a CT volume (e.g. a reconstruction) as float32 NRRD, NIfTI or MetaImage in the file's LPS convention.

    A volume whose ``metadata["synthetic"]`` is true (made by a model, not a scanner) carries the synthetic mark.
    """
    out = Path(path).expanduser()
    fmt = _format_of(out, format, ITK_FORMATS)
    fields = {"ITK_FileNotes": SYNTHETIC_MARK} if volume.metadata.get("synthetic") else {}
    with atomic_output(out, ITK_FORMATS[fmt]) as tmp:
        write_itk(to_itk(volume.array_hu, volume.ijk_to_ras, fields), tmp, out)
    return out


def _format_of(path: Path, format: str | None, known: dict[str, str]) -> str:
    if format is not None:
        fmt = format.lower().lstrip(".")
        if fmt not in known:
            raise ImageError(f"{path}: unknown output format {format!r}; choose one of {', '.join(known)}")
        return fmt
    by_suffix = {suffix: name for name, suffix in known.items()}
    if suffix_of(path) not in by_suffix:
        raise ImageError(f"{path}: cannot tell the output format from the extension; use one of "
                         f"{', '.join(by_suffix)} or pass format=")
    return by_suffix[suffix_of(path)]


def _as_xray(image: XRayImage | np.ndarray, geometry: CArmGeometry | None, path: Path) -> XRayImage:
    """An XRayImage of the data to write, checked against the view it is said to belong to."""
    if isinstance(image, XRayImage):
        xray = image
    else:
        spacing = (geometry.pixel[1], geometry.pixel[0]) if geometry is not None else (1.0, 1.0)
        xray = XRayImage(np.asarray(image), spacing, metadata={"spacing_known": geometry is not None},
                         source=str(path))
    if geometry is not None and geometry.shape != xray.array.shape:
        raise ImageError(f"{path}: image of shape {xray.array.shape} does not match the C-arm detector of "
                         f"{geometry.shape[0]} rows x {geometry.shape[1]} columns")
    return xray


def _placement(xray: XRayImage, geometry: CArmGeometry | None) -> np.ndarray:
    """IJK-to-RAS of the image as a one-slice volume: on the detector when the view is known, else where the image
    says it lies, else as a PA film in the coronal plane through the origin (patient's right on the left)."""
    if geometry is not None:
        return geometry.detector_ijk_to_ras
    if xray.ijk_to_ras is not None:
        return xray.ijk_to_ras
    rows, cols = xray.array.shape
    row_mm, col_mm = xray.pixel_spacing
    u, v = np.array([-1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2] = u * col_mm, v * row_mm, np.cross(u, v)
    m[:3, 3] = -(cols - 1) / 2 * col_mm * u - (rows - 1) / 2 * row_mm * v
    return m


def _write_png(xray: XRayImage, path: Path, geometry: CArmGeometry | None, kind: str) -> None:
    stored, offset, scale = quantize_u16(xray.array)
    info = PngInfo()
    info.add_text(KEY_OFFSET, repr(offset))
    info.add_text(KEY_SCALE, repr(scale))
    if kind != "xray":
        info.add_text(KEY_SYNTHETIC, SYNTHETIC_MARK)
    info.add_text(KEY_KIND, kind)
    if geometry is not None:
        info.add_text(KEY_SPACING, f"{geometry.pixel[1]!r} {geometry.pixel[0]!r}")
        info.add_text(KEY_GEOMETRY, geometry_json(geometry), zip=True)
    elif xray.metadata.get("spacing_known", True):
        info.add_text(KEY_SPACING, " ".join(repr(s) for s in xray.pixel_spacing))
    Image.fromarray(stored).save(path, format="PNG", pnginfo=info)
