"""X2CT preprocessing for the reconstruction methods: phantom, NIfTI and DICOM sources, the 320 mm cube's
placement (x/y centred, superior end kept), equality with the explicit 1 mm cube, the body mask removing a
table, split files and seeded splits, one-line errors, and the shared LIDC-IDRI CT when it is available."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # training/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))

from SVDRRLogic.images import CTVolume  # noqa: E402
from SVDRRLogic.io import write_ct  # noqa: E402
from SVDRRLogic.phantoms.chest import chest_ijk_to_ras  # noqa: E402
from SVDRRLogic.recon_grid import ReconGrid  # noqa: E402
from training.recon import preprocess as pp  # noqa: E402

SHARED_LIDC = ROOT.parent / "shared" / "data" / "lidc0001_256.nii.gz"


def _ct(hu: np.ndarray, spacing, center=(0.0, 0.0, 0.0)) -> CTVolume:
    m = chest_ijk_to_ras(hu.shape, spacing)
    m[:3, 3] += np.asarray(center)
    return CTVolume(hu, m)


def _body_with_table(spacing=2.0) -> CTVolume:
    """An elliptic body (40 HU) with two lungs (-850 HU) and, 16 mm posterior to it, a 10 mm table (300 HU)."""
    hu = np.full((12, 100, 100), -1024.0, dtype=np.float32)
    jj, ii = np.mgrid[:100, :100]
    hu[:, ((ii - 50) / 35.0) ** 2 + ((jj - 45) / 25.0) ** 2 <= 1] = 40.0
    for ci in (35, 65):
        hu[:, ((ii - ci) / 10.0) ** 2 + ((jj - 43) / 14.0) ** 2 <= 1] = -850.0
    hu[:, 78:83, 10:90] = 300.0
    return _ct(hu, (spacing,) * 3)


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err


# -- phantoms, files, DICOM ------------------------------------------------------------------------------------
def test_phantom_source_writes_volumes_manifest_and_split(tmp_path):
    out = tmp_path / "cases"
    rc = pp.main(["--source", "phantom:3", "--out", str(out), "--size", "32", "--phantom-shape", "16,32,32",
                  "--test-fraction", "0.34", "--seed", "5"])
    assert rc == 0
    manifest = json.loads((out / pp.MANIFEST).read_text())
    split = json.loads((out / pp.SPLIT).read_text())
    assert manifest["format"] == pp.FORMAT and manifest["size"] == 32 and not manifest["failed"]
    ids = [c["id"] for c in manifest["cases"]]
    assert ids == ["phantom-0005", "phantom-0006", "phantom-0007"]
    assert [c["seed"] for c in manifest["cases"]] == [5, 6, 7]
    assert len(split["test"]) == 1 and sorted(split["train"] + split["test"]) == ids
    for case in manifest["cases"]:
        vol = np.load(out / case["file"])
        assert vol.shape == (32, 32, 32) and vol.dtype == np.float16
        assert 0.0 <= vol.min() and vol.max() <= 1.0 and 0.05 < vol.mean() < 0.4
        assert case["grid"]["size"] == 32 and case["grid"]["field_mm"] == 320.0
        assert case["split"] in ("train", "test") and case["z_placement"] == "superior"
    assert split == pp.assign_split(ids, None, 0.34, seed=5)


def test_nifti_and_nrrd_folder(tmp_path):
    src = tmp_path / "cts"
    (src / "sub").mkdir(parents=True)
    hu = np.full((20, 24, 24), -1024.0, dtype=np.float32)
    hu[4:16, 6:18, 6:18] = 60.0
    ct = _ct(hu, (8.0, 8.0, 10.0))
    write_ct(src / "alpha.nii.gz", ct)
    write_ct(src / "sub" / "beta.nrrd", ct)
    out = tmp_path / "out"
    assert pp.main(["--source", str(src), "--out", str(out), "--size", "16", "--dtype", "float32",
                    "--body-mask", "none"]) == 0
    manifest = json.loads((out / pp.MANIFEST).read_text())
    assert [c["id"] for c in manifest["cases"]] == ["alpha", "beta"]
    expected, _, _ = pp.to_unit_grid(ct, 16)
    for case in manifest["cases"]:
        assert case["spacing"] == [8.0, 8.0, 10.0] and case["z_placement"] == "centred"
        np.testing.assert_allclose(np.load(out / case["file"]), expected, atol=1e-5)


def _write_dicom_slice(path: Path, hu: np.ndarray, z: float, *, series_uid: str, modality: str = "CT",
                       number: int = 7) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality, ds.StudyInstanceUID = CTImageStorage, modality, "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.PatientID, ds.StudyDate, ds.SeriesNumber = "anon", "20000101", number
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [-60.0, -60.0, z]
    ds.PixelSpacing, ds.Rows, ds.Columns = [8.0, 8.0], *hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = hu.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_lidc_style_dicom_tree_one_case_per_ct_series(tmp_path):
    series = tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0007" / "01-01-2000-1234" / "3000566.000000-5678"
    xray = tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0007" / "01-01-2000-999" / "1.000000-1"
    series.mkdir(parents=True)
    xray.mkdir(parents=True)
    slice_hu = np.full((16, 16), -1000, dtype=np.int16)
    slice_hu[4:12, 4:12] = 50
    for k in range(6):
        _write_dicom_slice(series / f"{k:03d}.dcm", slice_hu, 10.0 * k, series_uid="1.2.3.4.5", number=3000566)
    _write_dicom_slice(xray / "x.dcm", slice_hu, 0.0, series_uid="1.2.3.4.6", modality="DX", number=1)
    cases, skipped = pp.discover(tmp_path / "LIDC-IDRI")
    assert [c.case_id for c in cases] == ["LIDC-IDRI-0007.20000101.3000566"]
    assert cases[0].kind == "dicom" and Path(cases[0].path) == series
    assert len(skipped) == 1 and "DX" in skipped[0]["reason"]
    entry = pp.preprocess_case(cases[0], tmp_path, 8, body_mask="none")
    vol = np.load(tmp_path / entry["file"])
    assert vol.shape == (8, 8, 8) and vol.max() > 0.4


# -- geometry --------------------------------------------------------------------------------------------------
def _tall_ct(n_slices: int) -> CTVolume:
    """Air, a 20 mm slab at each end in z (0 HU) and a bright column along z through the x/y centre; 5 mm
    slices, off-centre."""
    hu = np.full((n_slices, 60, 50), -1024.0, dtype=np.float32)
    hu[:4] = hu[-4:] = 0.0
    mid = n_slices // 2
    hu[mid - 10:mid + 10, 27:33, 22:28] = 1476.0
    return _ct(hu, (2.0, 2.0, 5.0), center=(30.0, -20.0, 100.0))


def test_cube_keeps_the_superior_end_and_centres_x_y():
    ct = _tall_ct(80)                                 # 400 mm: 80 mm are cropped at the inferior end
    unit, grid, placement = pp.to_unit_grid(ct, 32)
    assert placement == "superior"
    np.testing.assert_allclose(grid.center_ras[:2], ct.center_ras[:2], atol=1e-9)
    top_voxel_z = ct.center_ras[2] + 79 * 5.0 / 2
    assert grid.center_ras[2] + 159.5 == pytest.approx(top_voxel_z)
    assert unit[-1].max() > 0.3 and unit[:3].max() == 0.0     # superior slab kept, inferior one cropped
    column = unit[16]
    jj, ii = np.mgrid[:32, :32]
    assert (column * jj).sum() / column.sum() == pytest.approx(15.5, abs=0.02)
    assert (column * ii).sum() / column.sum() == pytest.approx(15.5, abs=0.02)


def test_short_ct_is_centred_in_z_like_x2ct_padding():
    ct = _tall_ct(40)                                 # 200 mm: padded evenly with air
    unit, grid, placement = pp.to_unit_grid(ct, 32)
    assert placement == "centred"
    np.testing.assert_allclose(grid.center_ras, ct.center_ras, atol=1e-9)
    assert unit[:5].max() == 0.0 and unit[-5:].max() == 0.0
    np.testing.assert_allclose(unit.sum(axis=(1, 2)), unit.sum(axis=(1, 2))[::-1], atol=1e-3)


def test_file_orientation_does_not_change_the_result():
    ct = _tall_ct(80)
    flipped = ct.ijk_to_ras.copy()
    flipped[:, :2] *= -1                               # RAS-stored axes, e.g. a NIfTI from another converter
    flipped[:3, 3] = ct.ijk_to_ras[:3, :3] @ np.array([49.0, 59.0, 0.0]) + ct.ijk_to_ras[:3, 3]
    other = CTVolume(ct.array_hu[:, ::-1, ::-1], flipped)
    np.testing.assert_allclose(pp.to_unit_grid(other, 32)[0], pp.to_unit_grid(ct, 32)[0], atol=1e-6)


def test_sampling_only_needed_planes_equals_the_whole_1mm_cube():
    from scipy.ndimage import zoom

    from SVDRRLogic.phantoms import chest_phantom
    ct = chest_phantom(shape=(16, 32, 32), spacing=pp.phantom_spacing((16, 32, 32)), seed=3)
    for size in (8, 12):
        unit, grid, _ = pp.to_unit_grid(ct, size, field_mm=60)
        cube = ReconGrid(size=60, center_ras=grid.center_ras, field_mm=60).sample_ct(ct)
        np.testing.assert_allclose(unit, zoom(cube, size / 60, order=1, grid_mode=True, mode="nearest"),
                                   atol=1e-5)


# -- body mask -------------------------------------------------------------------------------------------------
def test_auto_body_mask_removes_the_table_and_keeps_the_lungs():
    ct = _body_with_table()
    mask = pp.auto_body_mask(ct)
    assert not mask[:, 78:83].any()                   # table
    assert mask[:, 43, 35].all() and mask[:, 43, 65].all()   # lung centres: holes of every axial slice
    assert mask[:, 45, 50].all() and mask[:, 45, 14].all()    # body, and its edge kept by the dilation


def test_body_mask_auto_and_from_file_through_the_cli(tmp_path):
    ct = _body_with_table()
    src, masks = tmp_path / "src", tmp_path / "masks"
    src.mkdir()
    masks.mkdir()
    write_ct(src / "case1.nii.gz", ct)
    body = np.where(pp.auto_body_mask(ct), 1.0, 0.0).astype(np.float32)
    ras_stored = ct.ijk_to_ras.copy()                  # the mask stored with other axes: resampled by placement
    ras_stored[:, 0] *= -1
    ras_stored[:3, 3] = ct.ijk_to_ras[:3, :3] @ np.array([99.0, 0.0, 0.0]) + ct.ijk_to_ras[:3, 3]
    write_ct(masks / "case1_outMultiLabelMask.nii.gz", CTVolume(body[:, :, ::-1], ras_stored))
    table = {}
    for mode in ("none", "auto", str(masks)):
        out = tmp_path / f"out-{len(table)}"
        assert pp.main(["--source", str(src), "--out", str(out), "--size", "64", "--body-mask", mode]) == 0
        vol = np.load(out / "case1.npy").astype(np.float32)
        table[mode] = int((vol > 0.48).sum())          # 300 HU -> 0.53; the body (40 HU) stays below 0.43
    assert table["none"] > 0 and table["auto"] == 0 and table[str(masks)] == 0


# -- split -----------------------------------------------------------------------------------------------------
def test_split_files_match_x2ct_names():
    ids = ["LIDC-IDRI-0001.20000101.3000566", "LIDC-IDRI-0002", "LIDC-IDRI-0003.a", "LIDC-IDRI-0003.b", "other"]
    train = ["LIDC-IDRI-0001.20000101.3000566.1", "LIDC-IDRI-0003.20000101.1.1"]
    test = ["LIDC-IDRI-0002.20000101.3000522.1", "LIDC-IDRI-0004.20000101.9.1"]
    split = pp.assign_split(ids, (train, test))
    assert split["train"] == ["LIDC-IDRI-0001.20000101.3000566"] and split["test"] == ["LIDC-IDRI-0002"]
    assert split["unlisted"] == ["LIDC-IDRI-0003.a", "LIDC-IDRI-0003.b", "other"]
    assert split["missing"] == ["LIDC-IDRI-0003.20000101.1.1", "LIDC-IDRI-0004.20000101.9.1"]


def test_seeded_fraction_is_deterministic_and_sized():
    ids = [f"case-{i:03d}" for i in range(50)]
    a = pp.assign_split(ids, None, 0.1, seed=1)
    assert a == pp.assign_split(list(reversed(ids)), None, 0.1, seed=1)
    assert len(a["test"]) == 5 and not set(a["test"]) & set(a["train"])
    assert pp.assign_split(ids[:2], None, 0.1)["test"] and not pp.assign_split(ids, None, 0.0)["test"]


def test_split_files_and_workers_through_the_cli(tmp_path):
    (tmp_path / "train.txt").write_text("phantom-0000\nphantom-0001\n")
    (tmp_path / "test.txt").write_text("phantom-0002\n")
    out = tmp_path / "out"
    assert pp.main(["--source", "phantom:3", "--out", str(out), "--size", "8", "--phantom-shape", "8,16,16",
                    "--split-files", str(tmp_path / "train.txt"), str(tmp_path / "test.txt"), "--workers", "2"]) == 0
    split = json.loads((out / pp.SPLIT).read_text())
    assert split["train"] == ["phantom-0000", "phantom-0001"] and split["test"] == ["phantom-0002"]


# -- errors ----------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    _one_line_error(capsys, pp.main(["--source", str(tmp_path / "nope"), "--out", out]), "nope", "not found")
    _one_line_error(capsys, pp.main(["--source", "phantom:x", "--out", out]), "phantom:N")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, pp.main(["--source", str(tmp_path / "empty"), "--out", out]), "no CT found")
    _one_line_error(capsys, pp.main(["--source", "phantom:1", "--out", out, "--size", "2"]), "--size")
    _one_line_error(capsys, pp.main(["--source", "phantom:1"]), "--out")
    _one_line_error(capsys, pp.main(["--source", "phantom:1", "--out", out, "--split-files", "a.txt", "b.txt"]),
                    "a.txt")


def test_a_failing_case_is_listed_and_exit_code_1(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_ct(src / "good.nii.gz", _ct(np.full((8, 8, 8), 40.0, dtype=np.float32), (10.0,) * 3))
    (src / "bad.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "out"
    assert pp.main(["--source", str(src), "--out", str(out), "--size", "8"]) == 1
    manifest = json.loads((out / pp.MANIFEST).read_text())
    assert [c["id"] for c in manifest["cases"]] == ["good"]
    assert manifest["failed"][0]["id"] == "bad" and "\n" not in manifest["failed"][0]["error"]


# -- real data -------------------------------------------------------------------------------------------------
def test_shared_lidc_ct_at_size_32(tmp_path):
    if not SHARED_LIDC.is_file():
        pytest.skip(f"shared LIDC-IDRI CT not available ({SHARED_LIDC})")
    src = tmp_path / "src"
    src.mkdir()
    (src / "LIDC-IDRI-0001.nii.gz").symlink_to(SHARED_LIDC)
    out = tmp_path / "out"
    assert pp.main(["--source", str(src), "--out", str(out), "--size", "32"]) == 0
    case = json.loads((out / pp.MANIFEST).read_text())["cases"][0]
    assert case["id"] == "LIDC-IDRI-0001" and case["spacing"] == [1.40625, 1.40625, 2.5]
    assert case["z_placement"] == "superior"                  # 133 x 2.5 mm = 332 mm: the top 320 mm kept
    vol = np.load(out / case["file"]).astype(np.float32)
    assert vol.shape == (32, 32, 32) and 0.1 < vol.mean() < 0.3
    lungs = vol[20, 10:22, 6:26]                              # mid-chest axial slice: lungs darker than soft tissue
    assert lungs.min() < 0.15 and vol[20].max() > 0.45
    shutil.rmtree(out)
