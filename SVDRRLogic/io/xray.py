"""``load_xray``: one entry point for every 2D X-ray source (DICOM, pictures, single-slice volumes we write).

All results follow one convention: ``array[row, col]``, higher value = more attenuation (bone bright),
``pixel_spacing = (row_mm, col_mm)``; ``metadata`` says where the spacing came from and whether it is known.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..geometry import CArmGeometry, GeometryError
from ..images import ImageError, XRayImage
from .common import (ITK_FORMAT_NAMES, ITK_SUFFIXES, SYNTHETIC_MARK, existing_path, is_dicom_file, parse_geometry,
                     suffix_of)
from .dicom_xray import read_dicom_xray
from .itk import ITK_GEOMETRY_KEY, array_of, ijk_to_ras, read_itk, text_metadata
from .raster import read_raster


def load_xray(path: str | os.PathLike, apply_window: bool = False) -> XRayImage:
    """Load one X-ray: DICOM (CR, DX, DR, secondary capture; MONOCHROME1 inverted; JPEG-compressed too), PNG,
    JPEG or TIFF (colour becomes gray, spacing 1.0 mm unless our own PNG says otherwise), or a single-slice NRRD,
    NIfTI or MetaImage such as the DRRs :func:`write_image` produces.

    Values stay as stored (after rescale slope/intercept) unless ``apply_window`` is True, which maps the first
    stored DICOM window to [0, 1]. A volume, a folder or anything that is not an image raises ImageError.
    """
    p = existing_path(path)
    if p.is_dir():
        raise ImageError(f"{p}: is a folder; an X-ray is one image file (a folder of DICOM slices is a CT)")
    if is_dicom_file(p) or suffix_of(p) in (".dcm", ".dicom"):
        return read_dicom_xray(p, apply_window)
    if apply_window:
        raise ImageError(f"{p}: apply_window needs a DICOM file with a stored window")
    if suffix_of(p) in ITK_SUFFIXES:
        return _read_single_slice(p)
    return read_raster(p)


#: The manifests that list a set of our images with each one's view (``svdrr render``, ``svdrr synthesize``).
MANIFESTS = ("views.json", "synthesis.json")


def _listed_view(path: Path, shape: tuple[int, int], placement: np.ndarray) -> tuple[CArmGeometry, str] | None:
    """(view, manifest name): the view a manifest beside ``path`` records for it, when that view has the image's
    size and places the detector where the file does (so a stale or foreign manifest is ignored); else None."""
    for name in MANIFESTS:
        try:
            records = json.loads((path.parent / name).read_text(encoding="utf-8"))["views"]
            record = next(r for r in records if r.get("file") == path.name)
            geometry = CArmGeometry.from_dict(record)
        except (OSError, ValueError, KeyError, TypeError, StopIteration, GeometryError):
            continue
        if geometry.shape == shape and np.allclose(geometry.detector_ijk_to_ras, placement, rtol=1e-5, atol=0.05):
            return geometry, name
    return None


def _read_single_slice(path: Path) -> XRayImage:
    image = read_itk(path)
    columns, rows, slices = image.GetSize()
    if slices != 1:
        raise ImageError(f"{path}: is a 3D volume ({columns} x {rows} x {slices}), not an X-ray (a CT?)")
    fields = text_metadata(image)
    metadata = {"source": str(path), "format": ITK_FORMAT_NAMES[suffix_of(path)], "pixel_spacing_source": "header",
                "spacing_at": "unknown", "spacing_known": True,
                "synthetic": SYNTHETIC_MARK in fields.get("ITK_FileNotes", "") + fields.get("descrip", ""),
                "kind": fields.get("svdrr_kind", "")}
    matrix = ijk_to_ras(image)
    if ITK_GEOMETRY_KEY in fields:
        metadata["geometry"], matrix = parse_geometry(fields[ITK_GEOMETRY_KEY], str(path))
        metadata["spacing_at"] = "detector"
    else:  # NIfTI keeps no text fields: the view comes from the set's manifest, if it agrees with the file
        listed = _listed_view(path, (rows, columns), matrix)
        if listed is not None:
            metadata.update(geometry=listed[0].to_dict(), spacing_at="detector", geometry_from=listed[1])
    spacing = image.GetSpacing()
    return XRayImage(array_of(image)[0], (spacing[1], spacing[0]), metadata=metadata, ijk_to_ras=matrix,
                     source=str(path))
