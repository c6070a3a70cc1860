"""``load_ct``: one entry point for every CT source (DICOM folder or file, NIfTI, NRRD, MetaImage).

Whatever the file, the result is a :class:`CTVolume` in HU indexed ``[k, j, i]`` with an IJK-to-RAS matrix, and
values below -1024 HU (padding outside the scanned field of view, e.g. -2048 or -3024) set to -1024 HU, the air
floor of CT scanners, so that a DRR never integrates a fictitious "negative air" around the patient.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..images import CTVolume, ImageError, ImageWarning, value_doubt
from .common import (AIR_HU, ITK_FORMAT_NAMES, ITK_SUFFIXES, RASTER_SUFFIXES, existing_path, is_dicom_file,
                     suffix_of)
from .dicom_series import read_dicom_series, series_uid_of
from .itk import array_of, ijk_to_ras, read_itk, text_metadata


def load_ct(path: str | os.PathLike, series_uid: str | None = None, units: str = "hu") -> CTVolume:
    """Load a CT volume in HU from a DICOM folder, one DICOM slice (its whole series is loaded), NIfTI
    (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``).

    ``series_uid`` picks one series when a DICOM folder holds several (without it that is an ImageError listing
    them). Values below -1024 HU become -1024 HU (air). Problems that were worked around (gantry tilt, uneven
    slices, values that do not look like HU, e.g. a label map) are listed in ``metadata["warnings"]`` and issued as
    :class:`ImageWarning`. ``units="mu"`` says the voxels hold attenuation in 1/mm (e.g. an analytic phantom); they
    are checked as such. Anything that is not a CT volume raises ImageError.
    """
    if units not in ("hu", "mu"):
        raise ImageError(f"{path}: units must be 'hu' or 'mu', not {units!r}")
    ct = _load(existing_path(path), series_uid)
    ct.units = units
    doubt = value_doubt(float(ct.array_hu.min()), float(ct.array_hu.max()), units)
    if doubt:
        ct.metadata["warnings"].append(doubt)
        warnings.warn(f"{ct.source}: {doubt}", ImageWarning, stacklevel=2)
    return ct


def _load(p: Path, series_uid: str | None) -> CTVolume:
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    suffix = suffix_of(p)
    if is_dicom_file(p) or suffix in (".dcm", ".dicom"):
        return read_dicom_series(p.parent, series_uid or series_uid_of(p))
    if suffix in RASTER_SUFFIXES:
        raise ImageError(f"{p}: is a 2D picture ({suffix}); a CT must be a 3D volume "
                         "(DICOM folder, NIfTI, NRRD or MetaImage)")
    if suffix not in ITK_SUFFIXES:
        raise ImageError(f"{p}: not a CT file; expected a DICOM folder or {', '.join(ITK_SUFFIXES)}")
    if series_uid is not None:
        raise ImageError(f"{p}: series_uid applies to DICOM only, not to a {suffix} file")
    return _load_itk_volume(p, ITK_FORMAT_NAMES[suffix])


def _load_itk_volume(path: Path, format_name: str) -> CTVolume:
    image = read_itk(path)
    if image.GetSize()[2] == 1:
        w, h = image.GetSize()[:2]
        raise ImageError(f"{path}: is a 2D image ({w} x {h}, one slice); a CT must be a 3D volume")
    hu = array_of(image)
    below = hu < AIR_HU
    hu[below] = AIR_HU
    fields = text_metadata(image)
    metadata = {"source": str(path), "format": format_name, "padding_voxels": int(below.sum()), "air_hu": AIR_HU,
                "description": fields.get("descrip", "") or fields.get("ITK_FileNotes", ""), "warnings": []}
    return CTVolume(hu, ijk_to_ras(image), metadata=metadata, source=str(path))
