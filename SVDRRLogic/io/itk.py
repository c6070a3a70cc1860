"""SimpleITK bridge for NIfTI, NRRD and MetaImage: read and write with the LPS <-> RAS conversion done here only.

ITK keeps origin, spacing and direction in LPS. A volume's IJK-to-LPS matrix is ``[direction * spacing | origin]``;
negating its first two rows gives IJK-to-RAS. ``GetArrayFromImage`` returns ``[k, j, i]``, our array order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..images import ImageError
from .common import LPS_TO_RAS, itk_error_text, suffix_of
from .voxel_data import metaimage_problem, nifti_problem

#: NRRD/MetaImage header key holding the C-arm geometry JSON of the DRRs we write.
ITK_GEOMETRY_KEY = "svdrr_geometry"

#: The format names accepted by the writers, with the extension SimpleITK needs to choose its writer.
ITK_FORMATS = {"nrrd": ".nrrd", "nii": ".nii", "nii.gz": ".nii.gz", "mha": ".mha"}


def read_itk(path: Path) -> sitk.Image:
    """Read any file SimpleITK understands as a 3D scalar image (2D ones get a single slice), or ImageError.

    Files cut short, and NaN or infinity in NIfTI, are rejected here (:mod:`.voxel_data`): ITK would fill them
    with 0 or fail with a misleading message; in other formats NaN reaches the array and the image types reject it.
    """
    suffix = suffix_of(path)
    if suffix in (".mha", ".mhd"):
        problem = metaimage_problem(path)
        if problem:
            raise ImageError(f"{path}: {problem}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageError(f"{path}: cannot be read as an image ({itk_error_text(exc)})") from None
    if suffix in (".nii", ".nii.gz"):
        problem = nifti_problem(path)
        if problem:
            raise ImageError(f"{path}: {problem}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} values per voxel "
                         "(colour or vector image); expected a scalar image")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries([image])
    if image.GetDimension() != 3:
        raise ImageError(f"{path}: is a {image.GetDimension()}D image; expected 2D or 3D")
    return image


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a 3D ITK image."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ m


def array_of(image: sitk.Image) -> np.ndarray:
    """Voxel values as float32 ``[k, j, i]``."""
    return sitk.GetArrayFromImage(image).astype(np.float32)


def text_metadata(image: sitk.Image) -> dict[str, str]:
    """The file's key/value header fields (NRRD ``key:=value``, MetaImage tags, NIfTI ``descrip``)."""
    return {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}


def to_itk(array_kji: np.ndarray, ijk_to_ras_matrix: np.ndarray, fields: dict[str, str]) -> sitk.Image:
    """A float32 ITK image placed by an IJK-to-RAS matrix (converted to LPS), carrying text header fields."""
    lps = LPS_TO_RAS @ np.asarray(ijk_to_ras_matrix, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji, dtype=np.float32))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    for key, value in fields.items():
        image.SetMetaData(key, value)
    return image


def write_itk(image: sitk.Image, path: Path, shown: Path) -> None:
    """Write to ``path`` with gzip where the format allows it (NRRD, MetaImage; NIfTI follows the .gz of the
    name); errors name ``shown``, the final file, rather than the temporary one actually written."""
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as exc:
        raise ImageError(f"{shown}: cannot be written ({itk_error_text(exc)})") from None
