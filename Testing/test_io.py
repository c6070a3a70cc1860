"""SVDRRLogic.io against real files written in tmp_path with pydicom, SimpleITK, nibabel and Pillow.

Every reader is checked for values and geometry (IJK-to-RAS, LPS sign flip), every writer by reading its output
back, and every kind of bad input for a one-line ImageError naming the file.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian,
                         JPEGBaseline8Bit, generate_uid)
from pydicom.valuerep import DSfloat

from SVDRRLogic.geometry import CArmGeometry
from SVDRRLogic.images import CTVolume, ImageError, XRayImage
from SVDRRLogic.io import (AIR_HU, SYNTHETIC_MARK, ImageWarning, kind_of, list_dicom_series, load_ct, load_xray,
                           patient_orientation, write_ct, write_image)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# -- file builders ---------------------------------------------------------------------------------------------
def _ds_list(values) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in values]


def _base_dataset(sop_class: str, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.PatientID, ds.PatientName = "1.2.3.4", "P0001", "Test^Patient"
    ds.SamplesPerPixel = 1
    return ds


def write_ct_slice(path: Path, stored: np.ndarray, position, *, series_uid: str, orientation=AXIAL,
                   spacing=(0.8, 0.6), description: str = "chest", padding: int | None = None,
                   modality: str = "CT") -> None:
    """One signed 16-bit CT slice, slope 2 and intercept -1024 (HU = 2 * stored - 1024)."""
    ds = _base_dataset(CTImageStorage)
    ds.SeriesInstanceUID, ds.SeriesDescription, ds.Modality = series_uid, description, modality
    ds.StudyDescription = "thorax"
    ds.ImageOrientationPatient = _ds_list(orientation)
    ds.ImagePositionPatient = _ds_list(position)
    ds.PixelSpacing = _ds_list(spacing)
    ds.Rows, ds.Columns = stored.shape
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = DSfloat(2), DSfloat(-1024)
    if padding is not None:
        ds.add_new(0x00280120, "SS", padding)  # PixelPaddingValue
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, positions, *, series_uid: str = "1.2.3.4.100", orientation=AXIAL,
                 shape=(16, 16), description: str = "chest", order=None) -> np.ndarray:
    """Slices k = 0..n-1 at ``positions`` with stored value 400 + 10 k + 3 j + i, with air (0) in the first and
    bone (900) in the last voxel of each slice, as a CT has, written in ``order`` (file names do not follow slice
    order). Returns the expected HU volume [k, j, i]."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(positions)
    kk, jj, ii = np.meshgrid(np.arange(n), np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    stored = 400 + 10 * kk + 3 * jj + ii
    stored[:, 0, 0], stored[:, -1, -1] = 0, 900
    for name, k in enumerate(order if order is not None else range(n)):
        write_ct_slice(folder / f"IM{name:04d}.dcm", stored[k], positions[k], series_uid=series_uid,
                       orientation=orientation, description=description)
    return (2.0 * stored - 1024.0).astype(np.float32)


def write_xray_dicom(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 12,
                     transfer_syntax: str = ExplicitVRLittleEndian, pixel_data: bytes | None = None,
                     frames: int = 1, **attributes) -> None:
    """A DX For Presentation image; ``attributes`` are extra DICOM keywords (spacings, angles, windows...)."""
    ds = _base_dataset(DigitalXRayImageStorageForPresentation, transfer_syntax)
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "DX"
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape[-2:]
    allocated = 8 if stored.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixel_data if pixel_data is not None else stored.tobytes()
    if pixel_data is not None:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def itk_image(array_kji: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(np.asarray(direction, dtype=float).flatten().tolist())
    return image


def oblique_rotation() -> np.ndarray:
    a, b = math.radians(25.0), math.radians(-15.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def assert_one_line_error(excinfo, path: Path, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert path.name in message
    for word in words:
        assert word.lower() in message.lower(), message


# -- CT from ITK formats -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_ct_round_trip_keeps_values_and_oblique_placement(tmp_path, suffix):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 2000, size=(5, 6, 7)).astype(np.float32)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = oblique_rotation() * np.array([0.7, 0.9, 2.5])
    ijk_to_ras[:3, 3] = (-12.5, 30.25, 101.0)
    written = write_ct(tmp_path / f"ct{suffix}", CTVolume(hu, ijk_to_ras))
    ct = load_ct(written)
    np.testing.assert_allclose(ct.array_hu, hu, atol=1e-4)
    np.testing.assert_allclose(ct.ijk_to_ras, ijk_to_ras, atol=1e-4)
    assert ct.metadata["warnings"] == [] and ct.metadata["source"] == str(written)


def test_nrrd_lps_header_becomes_ras(tmp_path):
    """A file's LPS origin and axes appear in RAS with x and y negated."""
    lps_direction = oblique_rotation()
    sitk.WriteImage(itk_image(np.zeros((3, 4, 5), np.int16), (0.5, 0.75, 2.0), (10.0, -20.0, 30.0), lps_direction),
                    str(tmp_path / "ct.nrrd"))
    ct = load_ct(tmp_path / "ct.nrrd")
    lps = np.eye(4)
    lps[:3, :3] = lps_direction * np.array([0.5, 0.75, 2.0])
    lps[:3, 3] = (10.0, -20.0, 30.0)
    np.testing.assert_allclose(ct.ijk_to_ras, FLIP @ lps, atol=1e-9)
    np.testing.assert_allclose(ct.ijk_to_ras[:3, 3], (-10.0, 20.0, 30.0))


def test_nifti_matches_nibabel_ras_affine(tmp_path):
    """nibabel reads NIfTI affines as RAS without ITK in between: an independent check of the sign convention."""
    affine = np.eye(4)
    affine[:3, :3] = oblique_rotation() * np.array([1.2, 0.8, 3.0])
    affine[:3, 3] = (5.0, -7.5, 12.0)
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # nibabel order [i, j, k]
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "ct.nii"))
    ct = load_ct(tmp_path / "ct.nii")
    np.testing.assert_allclose(ct.ijk_to_ras, affine, atol=1e-5)
    np.testing.assert_array_equal(ct.array_hu, data.transpose(2, 1, 0))


def test_values_below_air_become_air(tmp_path):
    hu = np.full((3, 4, 5), 40.0, np.float32)
    hu[0, 0, :3] = (-2048.0, -3024.0, -1100.0)
    sitk.WriteImage(itk_image(hu), str(tmp_path / "ct.mha"))
    ct = load_ct(tmp_path / "ct.mha")
    assert ct.array_hu.min() == AIR_HU == -1024.0
    assert ct.metadata["padding_voxels"] == 3


# -- CT from DICOM ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", [AXIAL, tuple(np.round(np.concatenate(
    [oblique_rotation()[:, 0], oblique_rotation()[:, 1]]), 6))], ids=["axial", "oblique"])
def test_dicom_series_sorted_by_position_along_normal(tmp_path, orientation):
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-5.0, 7.0, 10.0])
    positions = [np.round(origin + 2.5 * k * normal, 6) for k in range(6)]
    expected = write_series(tmp_path / "series", positions, orientation=orientation, order=[3, 0, 5, 1, 4, 2])
    ct = load_ct(tmp_path / "series")
    assert ct.shape == (6, 16, 16)
    np.testing.assert_array_equal(ct.array_hu, expected)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * 0.6, col_dir * 0.8, normal * 2.5, positions[0]
    np.testing.assert_allclose(ct.ijk_to_ras, FLIP @ lps, atol=1e-4)
    assert ct.metadata["modality"] == "CT" and ct.metadata["series_description"] == "chest"
    assert ct.metadata["patient_id"] == "P0001" and ct.metadata["warnings"] == []


def test_dicom_padding_value_becomes_air(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(3):
        stored = np.full((8, 8), 600, np.int16)
        stored[0, :2] = -2048
        write_ct_slice(folder / f"{k}.dcm", stored, (0.0, 0.0, 2.0 * k), series_uid="1.2.3.9",
                       padding=-2048 if k == 0 else None)
    ct = load_ct(folder)
    # slice 0 declares PixelPaddingValue; the others hold -2048 * 2 - 1024 HU, far below air: both become air
    assert np.all(ct.array_hu[:, 0, :2] == AIR_HU)
    assert np.all(ct.array_hu[:, 1:, :] == 2 * 600 - 1024)
    assert ct.metadata["padding_voxels"] == 6


def test_single_dicom_file_loads_its_series(tmp_path):
    write_series(tmp_path / "s", [(0, 0, 3.0 * k) for k in range(4)])
    assert load_ct(tmp_path / "s" / "IM0002.dcm").shape == (4, 16, 16)


def test_two_series_in_one_folder_need_a_choice(tmp_path):
    write_series(tmp_path / "mixed" / "a", [(0, 0, 2.0 * k) for k in range(3)], series_uid="1.2.3.4.1",
                 description="soft tissue")
    write_series(tmp_path / "mixed" / "b", [(0, 0, 2.0 * k) for k in range(4)], series_uid="1.2.3.4.2",
                 description="lung kernel")
    (tmp_path / "mixed" / "notes.txt").write_text("not DICOM")
    with pytest.raises(ImageError) as excinfo:
        load_ct(tmp_path / "mixed")
    assert_one_line_error(excinfo, tmp_path / "mixed", "2 DICOM series", "1.2.3.4.1", "1.2.3.4.2", "soft tissue",
                          "lung kernel", "3 slices", "4 slices", "CT", "series_uid=", "--series")
    infos = list_dicom_series(tmp_path / "mixed")
    assert [(s.uid, s.n_slices, s.modality) for s in infos] == [("1.2.3.4.2", 4, "CT"), ("1.2.3.4.1", 3, "CT")]
    assert load_ct(tmp_path / "mixed", series_uid="1.2.3.4.1").shape == (3, 16, 16)
    with pytest.raises(ImageError, match="no series with UID 9.9"):
        load_ct(tmp_path / "mixed", series_uid="9.9")
    # one CT volume beside a radiograph: nothing to choose
    write_series(tmp_path / "ct_and_film" / "ct", [(0, 0, 2.0 * k) for k in range(3)], series_uid="1.2.3.4.1")
    write_xray_dicom(tmp_path / "ct_and_film" / "film.dcm", np.zeros((8, 8), np.uint16))
    assert load_ct(tmp_path / "ct_and_film").shape == (3, 16, 16)


def test_gantry_tilt_is_reported_and_resampled_in_place(tmp_path):
    """Slices advance 2.5 mm in z and 2.5 tan(20 deg) mm in y: a 20 degree tilt. After resampling onto an orthogonal
    grid, a bright voxel of each source slice must sit at the same RAS point as in the file."""
    shift = 2.5 * math.tan(math.radians(20.0))
    positions = [(0.0, round(k * shift, 6), 2.5 * k) for k in range(6)]
    folder = tmp_path / "tilt"
    folder.mkdir()
    for k, position in enumerate(positions):
        stored = np.full((16, 16), 400, np.int16)
        stored[5, 6] = 1400
        write_ct_slice(folder / f"{k}.dcm", stored, position, series_uid="1.2.3.5")
    with pytest.warns(ImageWarning, match="gantry tilt of 20.00 degrees"):
        ct = load_ct(folder)
    assert any("tilt" in w for w in ct.metadata["warnings"])
    m = ct.ijk_to_ras
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.diag([0.36, 0.64, 6.25]), atol=1e-9)  # orthogonal
    assert ct.shape[0] == 6 and ct.shape[1] > 16  # rows grew so the drifting anatomy stays inside
    for k, position in enumerate(positions):
        j, i = np.unravel_index(np.argmax(ct.array_hu[k]), ct.shape[1:])
        expected_lps = np.array(position) + 6 * 0.6 * np.array([1, 0, 0]) + 5 * 0.8 * np.array([0, 1, 0])
        found_ras = (m @ np.array([i, j, k, 1.0]))[:3]
        np.testing.assert_allclose(found_ras, FLIP[:3, :3] @ expected_lps, atol=0.8)


def test_uneven_spacing_is_reported_and_interpolated(tmp_path):
    depths = [0.0, 2.5, 5.0, 10.0, 12.5, 15.0]  # one slice missing
    expected = write_series(tmp_path / "gap", [(0.0, 0.0, z) for z in depths])
    with pytest.warns(ImageWarning, match="uneven slice spacing"):
        ct = load_ct(tmp_path / "gap")
    assert ct.shape == (7, 16, 16) and ct.spacing[2] == pytest.approx(2.5)
    np.testing.assert_allclose(ct.array_hu[3], (expected[2] + expected[3]) / 2, atol=1e-3)
    np.testing.assert_allclose(ct.array_hu[4], expected[3], atol=1e-3)
    assert any("uneven" in w for w in ct.metadata["warnings"])


# -- X-ray from DICOM ------------------------------------------------------------------------------------------------
def test_monochrome1_is_inverted_so_dense_is_bright(tmp_path):
    stored = np.full((8, 10), 3000, np.uint16)
    stored[2:4, 3:6] = 200  # bone: displayed white in MONOCHROME1, so a low stored value
    write_xray_dicom(tmp_path / "cr.dcm", stored, photometric="MONOCHROME1", WindowCenter=DSfloat(1000),
                     WindowWidth=DSfloat(2000))
    xr = load_xray(tmp_path / "cr.dcm")
    np.testing.assert_array_equal(xr.array, 4095.0 - stored)
    assert xr.array[3, 4] > xr.array[0, 0]
    assert xr.metadata["inverted"] and xr.metadata["photometric_interpretation"] == "MONOCHROME1"
    assert xr.metadata["windows"] == [(3095.0, 2000.0)] and not xr.metadata["window_applied"]
    windowed = load_xray(tmp_path / "cr.dcm", apply_window=True)
    assert windowed.array.min() >= 0.0 and windowed.array.max() <= 1.0
    assert windowed.array[3, 4] == pytest.approx(0.9) and windowed.array[0, 0] == 0.0


def test_voi_lut_sequence_is_applied_on_request(tmp_path):
    """A VOI LUT Sequence (a table, not a window) maps stored values through the table, in bone-bright polarity."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    stored = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.uint16)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [8, 0, 8])
    item.add_new("LUTData", "US", [0, 10, 20, 40, 80, 160, 200, 255])  # a non-linear display curve
    write_xray_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=Sequence([item]))
    out = load_xray(tmp_path / "lut.dcm", apply_window=True).array
    np.testing.assert_allclose(out, np.array(item.LUTData, float).reshape(2, 4) / 255.0)
    write_xray_dicom(tmp_path / "lut1.dcm", stored, photometric="MONOCHROME1", VOILUTSequence=Sequence([item]))
    inverted = load_xray(tmp_path / "lut1.dcm", apply_window=True).array
    np.testing.assert_allclose(inverted, 1.0 - out)  # MONOCHROME1: low stored values are the dense ones


def test_rescale_and_acquisition_attributes(tmp_path):
    stored = np.arange(80, dtype=np.uint16).reshape(8, 10)
    write_xray_dicom(tmp_path / "dx.dcm", stored, RescaleSlope=DSfloat(0.5), RescaleIntercept=DSfloat(10),
                     PositionerPrimaryAngle=DSfloat(30), PositionerSecondaryAngle=DSfloat(-10),
                     DistanceSourceToDetector=DSfloat(1800), DistanceSourceToPatient=DSfloat(1650),
                     ViewPosition="PA")
    xr = load_xray(tmp_path / "dx.dcm")
    np.testing.assert_allclose(xr.array, 0.5 * stored + 10)
    meta = xr.metadata
    assert (meta["positioner_primary_angle"], meta["positioner_secondary_angle"]) == (30.0, -10.0)
    assert (meta["sid"], meta["sod"], meta["view_position"], meta["modality"]) == (1800.0, 1650.0, "PA", "DX")
    assert not meta["synthetic"] and not meta["spacing_known"] and xr.pixel_spacing == (1.0, 1.0)


def test_pixel_spacing_preferred_over_imager_pixel_spacing(tmp_path):
    stored = np.zeros((8, 10), np.uint16)
    write_xray_dicom(tmp_path / "both.dcm", stored, PixelSpacing=_ds_list((0.15, 0.16)),
                     ImagerPixelSpacing=_ds_list((0.2, 0.21)))
    write_xray_dicom(tmp_path / "imager.dcm", stored, ImagerPixelSpacing=_ds_list((0.2, 0.21)))
    both, imager = load_xray(tmp_path / "both.dcm"), load_xray(tmp_path / "imager.dcm")
    assert both.pixel_spacing == (0.15, 0.16) and both.metadata["pixel_spacing_source"] == "PixelSpacing"
    assert both.metadata["spacing_at"] == "patient" and both.metadata["imager_pixel_spacing"] == [0.2, 0.21]
    assert imager.pixel_spacing == (0.2, 0.21) and imager.metadata["pixel_spacing_source"] == "ImagerPixelSpacing"
    assert imager.metadata["spacing_at"] == "detector" and imager.metadata["spacing_known"]


def test_jpeg_compressed_dx_is_decoded(tmp_path):
    yy, xx = np.mgrid[0:32, 0:48]
    gray = (4 * xx + 2 * yy).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=95)
    write_xray_dicom(tmp_path / "jpeg.dcm", gray, bits=8, transfer_syntax=JPEGBaseline8Bit,
                     pixel_data=encapsulate([buffer.getvalue()]), LossyImageCompression="01")
    assert pydicom.dcmread(tmp_path / "jpeg.dcm").file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    xr = load_xray(tmp_path / "jpeg.dcm")
    assert xr.array.shape == (32, 48)
    assert np.abs(xr.array - gray).mean() < 2.0


# -- X-ray from pictures ---------------------------------------------------------------------------------------------
def test_png_8_and_16_bit_keep_values_with_unknown_spacing(tmp_path):
    values8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    values16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(values8).save(tmp_path / "a.png")
    Image.fromarray(values16).save(tmp_path / "b.png")
    a, b = load_xray(tmp_path / "a.png"), load_xray(tmp_path / "b.png")
    np.testing.assert_array_equal(a.array, values8)
    np.testing.assert_array_equal(b.array, values16)
    for xr in (a, b):
        assert xr.pixel_spacing == (1.0, 1.0) and not xr.metadata["spacing_known"]
        assert xr.metadata["spacing_at"] == "unknown" and not xr.metadata["synthetic"]


def test_rgb_jpeg_becomes_gray(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "red.jpg", quality=100)
    xr = load_xray(tmp_path / "red.jpg")
    assert xr.array.shape == (16, 16) and xr.metadata["color_converted"]
    np.testing.assert_allclose(xr.array, 0.299 * 200, atol=3.0)


# -- writers ---------------------------------------------------------------------------------------------------------
def drr(geometry: CArmGeometry) -> np.ndarray:
    rows, cols = geometry.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    return (0.01 * xx + 0.1 * np.sin(yy) + 2.0).astype(np.float32)


def test_patient_orientation_letters():
    g = CArmGeometry()
    assert (patient_orientation(g.u), patient_orientation(g.v)) == ("L", "F")
    g90 = g.with_view(90.0, 0.0)
    assert (patient_orientation(g90.u), patient_orientation(g90.v)) == ("P", "F")
    assert patient_orientation(g.with_view(30.0, 0.0).u) == "LP"


@pytest.mark.parametrize("synthesized", [False, True])
def test_dicom_writer_round_trip(tmp_path, synthesized):
    g = CArmGeometry(azimuth=30.0, elevation=-10.0, detector=(12, 9), pixel=(0.7, 0.8), isocenter=(1.0, 2.0, 3.0))
    image = drr(g)
    path = write_image(tmp_path / "view.dcm", image, g, kind="synthesized" if synthesized else "drr")
    xr = load_xray(path)
    step = (image.max() - image.min()) / 65535
    np.testing.assert_allclose(xr.array, image, atol=step)
    meta = xr.metadata
    assert (meta["positioner_primary_angle"], meta["positioner_secondary_angle"]) == (30.0, -10.0)
    assert (meta["sid"], meta["sod"]) == (1800.0, 1650.0)
    assert xr.pixel_spacing == (0.8, 0.7) and meta["spacing_at"] == "detector"
    assert meta["synthetic"] and CArmGeometry.from_dict(meta["geometry"]) == g
    np.testing.assert_allclose(xr.ijk_to_ras, g.detector_ijk_to_ras)
    ds = pydicom.dcmread(path)
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.BurnedInAnnotation == "NO"
    assert SYNTHETIC_MARK in ds.ImageComments and SYNTHETIC_MARK in ds.DerivationDescription
    assert ds.ConversionType == "SYN" and ds.Modality == "DX"
    assert ds.SeriesDescription.startswith(SYNTHETIC_MARK) == synthesized
    assert list(ds.PatientOrientation) == [patient_orientation(g.u), patient_orientation(g.v)]
    assert sitk.ReadImage(str(path)).GetSpacing()[:2] == pytest.approx((0.7, 0.8))  # GDCM/ITK see the pixel size


def test_dicom_writer_pa_view_is_l_f(tmp_path):
    g = CArmGeometry(detector=(6, 5))
    ds = pydicom.dcmread(write_image(tmp_path / "pa.dcm", drr(g), g))
    assert list(ds.PatientOrientation) == ["L", "F"]
    assert [float(x) for x in ds.ImagerPixelSpacing] == [0.7, 0.7]


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_volume_writer_places_image_on_the_detector(tmp_path, suffix):
    g = CArmGeometry(azimuth=-40.0, elevation=15.0, detector=(10, 7), pixel=(0.9, 0.6), isocenter=(5.0, -3.0, 20.0))
    image = drr(g)
    path = write_image(tmp_path / f"drr{suffix}", image, g)
    written = sitk.ReadImage(str(path))
    assert written.GetSize() == (10, 7, 1) and written.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written)[0], image)
    centres = g.pixel_centers()
    for row, col in [(0, 0), (0, 9), (6, 0), (6, 9)]:
        lps = written.TransformContinuousIndexToPhysicalPoint((col, row, 0))
        np.testing.assert_allclose(FLIP[:3, :3] @ lps, centres[row, col], atol=1e-3)
    back = load_xray(path)
    np.testing.assert_array_equal(back.array, image)
    assert back.metadata["synthetic"]


@pytest.mark.parametrize("suffix", [".nrrd", ".png"])
def test_an_acquired_xray_handed_on_stays_unmarked_and_keeps_its_kind(tmp_path, suffix):
    film = XRayImage(np.arange(30, dtype=np.float32).reshape(5, 6), (0.2, 0.3), source="film")
    copy = load_xray(write_image(tmp_path / f"copy{suffix}", film, kind=kind_of(film)))
    assert kind_of(film) == "xray" and not copy.metadata["synthetic"] and kind_of(copy) == "xray"
    np.testing.assert_allclose(copy.array, film.array, atol=30 / 65535)
    view = load_xray(write_image(tmp_path / f"view{suffix}", film.array, CArmGeometry(detector=(6, 5)),
                                 kind="synthesized"))
    assert view.metadata["synthetic"] and kind_of(view) == "synthesized"
    with pytest.raises(ImageError, match="DICOM only of images it made"):
        write_image(tmp_path / "copy.dcm", film, kind="xray")
    with pytest.raises(ValueError, match="unknown image kind"):
        write_image(tmp_path / "copy.nrrd", film, kind="photo")


def test_a_nifti_drr_takes_its_view_from_the_manifest_of_its_set(tmp_path):
    """NIfTI has no room for our geometry text: the set's views.json supplies it, when it agrees with the file."""
    g = CArmGeometry(azimuth=90.0, elevation=5.0, detector=(10, 7), pixel=(0.9, 0.6), isocenter=(5.0, -3.0, 20.0))
    path = write_image(tmp_path / "view.nii.gz", drr(g), g)
    assert "geometry" not in load_xray(path).metadata  # no manifest: the view is unknown
    (tmp_path / "views.json").write_text(json.dumps({"views": [{"file": "view.nii.gz", **g.to_dict()}]}))
    back = load_xray(path)
    assert CArmGeometry.from_dict(back.metadata["geometry"]) == g and back.metadata["geometry_from"] == "views.json"
    stale = g.with_view(0.0, 0.0)  # a manifest of another set that reused the name
    (tmp_path / "views.json").write_text(json.dumps({"views": [{"file": "view.nii.gz", **stale.to_dict()}]}))
    assert "geometry" not in load_xray(path).metadata


def test_png_writer_round_trip(tmp_path):
    g = CArmGeometry(azimuth=10.0, detector=(9, 6), pixel=(0.5, 0.6))
    image = drr(g)
    path = write_image(tmp_path / "drr.png", XRayImage(image, (0.6, 0.5)), g, kind="synthesized")
    picture = Image.open(path)
    assert picture.mode == "I;16" and picture.text["svdrr:synthetic"] == SYNTHETIC_MARK
    assert json.loads(picture.text["svdrr:geometry"])["azimuth"] == 10.0
    assert float(picture.text["svdrr:scale"]) == pytest.approx((image.max() - image.min()) / 65535)
    stored = np.asarray(picture)
    assert stored.min() == 0 and stored.max() == 65535
    xr = load_xray(path)
    np.testing.assert_allclose(xr.array, image, atol=(image.max() - image.min()) / 65535)
    assert xr.pixel_spacing == (0.6, 0.5) and xr.metadata["synthetic"] and xr.metadata["kind"] == "synthesized"
    np.testing.assert_allclose(xr.ijk_to_ras, g.detector_ijk_to_ras)


def test_explicit_format_and_reloaded_geometry(tmp_path):
    g = CArmGeometry(azimuth=5.0, detector=(6, 4))
    first = load_xray(write_image(tmp_path / "a.nrrd", drr(g), g))
    out = write_image(tmp_path / "drr.out", first, format="dcm")  # geometry comes from the loaded image
    assert load_xray(out).metadata["positioner_primary_angle"] == 5.0
    with pytest.raises(ImageError, match="cannot tell the output format"):
        write_image(tmp_path / "drr.xyz", drr(g), g)
    with pytest.raises(ImageError, match="does not match the C-arm detector"):
        write_image(tmp_path / "x.png", np.zeros((3, 3), np.float32), g)


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "view.dcm"
    target.write_bytes(b"previous content")

    def half_write(xray, path, geometry, kind, series):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("SVDRRLogic.io.writers.write_dicom", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_image(target, np.ones((4, 4), np.float32))
    assert target.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view.dcm"]


# -- bad input -------------------------------------------------------------------------------------------------------
def test_missing_and_empty_inputs(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "empty_folder").mkdir()
    for loader in (load_ct, load_xray):
        with pytest.raises(ImageError) as excinfo:
            loader(tmp_path / "nothing.nrrd")
        assert_one_line_error(excinfo, tmp_path / "nothing.nrrd", "does not exist")
        with pytest.raises(ImageError) as excinfo:
            loader(tmp_path / "empty.nii.gz")
        assert_one_line_error(excinfo, tmp_path / "empty.nii.gz", "empty")
    with pytest.raises(ImageError) as excinfo:
        load_ct(tmp_path / "empty_folder")
    assert_one_line_error(excinfo, tmp_path / "empty_folder", "no DICOM")
    with pytest.raises(ImageError) as excinfo:
        load_xray(tmp_path / "empty_folder")
    assert_one_line_error(excinfo, tmp_path / "empty_folder", "folder")


def test_text_file_is_not_an_image(tmp_path):
    for name in ("notes.txt", "fake.png", "fake.nrrd"):
        (tmp_path / name).write_text("this is not an image\n")
    for loader, name, word in ((load_ct, "notes.txt", "not a CT file"), (load_xray, "notes.txt", "not an image"),
                               (load_xray, "fake.png", "not an image"), (load_ct, "fake.nrrd", "cannot be read")):
        with pytest.raises(ImageError) as excinfo:
            loader(tmp_path / name)
        assert_one_line_error(excinfo, tmp_path / name, word)


def test_2d_given_as_ct_and_3d_given_as_xray(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "film.png")
    sitk.WriteImage(itk_image(np.zeros((8, 8), np.float32)[None]), str(tmp_path / "slice.nrrd"))
    sitk.WriteImage(itk_image(np.zeros((4, 8, 8), np.float32)), str(tmp_path / "volume.nrrd"))
    (tmp_path / "dx").mkdir()
    write_xray_dicom(tmp_path / "dx" / "dx.dcm", np.zeros((8, 8), np.uint16))
    write_xray_dicom(tmp_path / "cine.dcm", np.zeros((3, 8, 8), np.uint16), frames=3)
    write_series(tmp_path / "ct", [(0, 0, 2.0 * k) for k in range(3)])
    cases = [(load_ct, "film.png", "2D picture"), (load_ct, "slice.nrrd", "2D image"),
             (load_ct, "dx/dx.dcm", "single 2D image"), (load_xray, "volume.nrrd", "3D volume"),
             (load_xray, "cine.dcm", "multi-frame"), (load_xray, "ct/IM0000.dcm", "CT slice")]
    for loader, name, words in cases:
        with pytest.raises(ImageError) as excinfo:
            loader(tmp_path / name)
        assert_one_line_error(excinfo, tmp_path / name, words)


def test_nan_and_absurd_spacing_are_rejected(tmp_path):
    hu = np.zeros((3, 4, 5), np.float32)
    hu[1, 2, 3] = np.nan
    sitk.WriteImage(itk_image(hu), str(tmp_path / "nan.nii.gz"))  # ITK's NIfTI reader alone would give 0 there
    sitk.WriteImage(itk_image(hu), str(tmp_path / "nan.nrrd"))
    nib.save(nib.Nifti1Image(np.where(np.isnan(hu), -np.inf, 0.0).T, np.eye(4)), str(tmp_path / "inf.nii"))
    sitk.WriteImage(itk_image(np.zeros((3, 4, 5), np.float32), spacing=(1.0, 1.0, 500.0)), str(tmp_path / "far.mha"))
    Image.fromarray(np.array([[0.0, np.inf], [1.0, 2.0]], np.float32)).save(tmp_path / "inf.tif")
    for loader, name, word in ((load_ct, "nan.nii.gz", "NaN"), (load_ct, "nan.nrrd", "NaN"),
                               (load_ct, "inf.nii", "infinite"), (load_ct, "far.mha", "absurd voxel spacing"),
                               (load_xray, "inf.tif", "infinite"), (load_xray, "nan.nii.gz", "NaN")):
        with pytest.raises(ImageError) as excinfo:
            loader(tmp_path / name)
        assert_one_line_error(excinfo, tmp_path / name, word)


def test_truncated_dicom_files(tmp_path):
    write_xray_dicom(tmp_path / "dx.dcm", np.arange(400, dtype=np.uint16).reshape(20, 20))
    data = (tmp_path / "dx.dcm").read_bytes()
    (tmp_path / "cut_pixels.dcm").write_bytes(data[:-300])
    (tmp_path / "cut_header.dcm").write_bytes(data[:200])
    for name in ("cut_pixels.dcm", "cut_header.dcm"):
        with pytest.raises(ImageError) as excinfo:
            load_xray(tmp_path / name)
        assert_one_line_error(excinfo, tmp_path / name, "DICOM" if name == "cut_header.dcm" else "pixel data")
    write_series(tmp_path / "ct", [(0, 0, 2.0 * k) for k in range(4)])
    slice_file = tmp_path / "ct" / "IM0002.dcm"
    slice_file.write_bytes(slice_file.read_bytes()[:-100])
    with pytest.raises(ImageError) as excinfo:
        load_ct(tmp_path / "ct")
    assert_one_line_error(excinfo, slice_file, "pixel data")


def test_volume_files_cut_short_are_refused_not_filled_with_zeros(tmp_path, capfd):
    """A copy that stopped halfway: ITK's NIfTI reader would fill the rest with 0 HU, its MetaImage reader would
    print C++ diagnostics and blame a missing file."""
    hu = np.random.default_rng(0).uniform(-1000, 1000, (12, 20, 24)).astype(np.float32)
    for name, compress in (("ct.nii.gz", True), ("ct.nii", False), ("ct.mha", False), ("zipped.mha", True),
                           ("ct.mhd", False)):
        sitk.WriteImage(itk_image(hu), str(tmp_path / name), useCompression=compress)
        data = tmp_path / ("ct.raw" if name == "ct.mhd" else name)
        data.write_bytes(data.read_bytes()[:data.stat().st_size * 2 // 3])
        capfd.readouterr()
        with pytest.raises(ImageError) as excinfo:
            load_ct(tmp_path / name)
        assert_one_line_error(excinfo, tmp_path / name, "truncated")
        assert capfd.readouterr().err == ""  # nothing printed by the libraries


def test_an_output_folder_that_cannot_be_written_is_one_error_naming_the_file(capfd):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, a folder no one may create files in")
    with pytest.raises(ImageError) as excinfo:
        write_image("/proc/drr.nii.gz", np.ones((4, 4), np.float32))
    assert_one_line_error(excinfo, Path("/proc/drr.nii.gz"), "cannot write in /proc")
    assert capfd.readouterr().err == ""


# -- real data -------------------------------------------------------------------------------------------------------
def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"reference data {path} is absent (the shared data folder sits beside the checkout)")
    return path


def test_real_chest_ct():
    ct = load_ct(shared_file("lidc0001_2p5mm.nii.gz"))
    assert ct.shape == (133, 144, 144)
    np.testing.assert_allclose(ct.spacing, 2.5, atol=1e-4)
    assert ct.array_hu.min() == AIR_HU and 1000 < ct.array_hu.max() < 4000
    air_fraction = float(np.mean(ct.array_hu < -900))  # air around the body and in the lungs
    assert 0.3 < air_fraction < 0.9
    assert ct.metadata["format"] == "nifti"


def test_real_chest_film():
    xr = load_xray(shared_file("cxr_nih_00000001_000.png"))
    assert xr.array.shape == (512, 512) and 0 <= xr.array.min() and xr.array.max() <= 255
    assert not xr.metadata["spacing_known"] and xr.metadata["format"] == "png"
