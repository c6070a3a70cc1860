"""The ``svdrr`` command line as a user types it, including every way it can be misused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from SVDRRLogic.cli import main
from SVDRRLogic.geometry import CArmGeometry
from SVDRRLogic.io import load_xray

SMALL = ["--detector", "48,40", "--pixel", "8"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_render_phantom_with_negative_angles_as_typed(tmp_path, capsys):
    code, out, err = run(capsys, "render", "--phantom", "chest", "-o", str(tmp_path), "--view", "-30,10",
                         "--view", "0,0", *SMALL, "--format", "nrrd", "--device", "cpu")
    assert code == 0, err
    manifest = json.loads((tmp_path / "views.json").read_text())
    assert manifest["synthetic"] is True
    views = manifest["views"]
    assert [(v["azimuth"], v["elevation"]) for v in views] == [(-30.0, 10.0), (0.0, 0.0)]
    geom = CArmGeometry.from_dict(views[0])
    assert geom.detector == (48, 40) and geom.pixel == (8.0, 8.0) and geom.preset_name == "svdrr-lidc"
    np.testing.assert_allclose(views[0]["projection_matrix"], geom.projection_matrix)
    img = load_xray(tmp_path / views[0]["file"])
    assert img.array.shape == (40, 48) and img.array.max() > 1.0  # chest line integrals reach several mu*mm


def test_view_sets_and_formats(tmp_path, capsys):
    code, _, err = run(capsys, "render", "--phantom", "chest", "-o", str(tmp_path), "--views", "arc:-10:10:10",
                       *SMALL, "--format", "png", "--output", "display", "--device", "cpu")
    assert code == 0, err
    views = json.loads((tmp_path / "views.json").read_text())["views"]
    assert [v["azimuth"] for v in views] == [-10.0, 0.0, 10.0]
    assert all((tmp_path / v["file"]).exists() for v in views)
    code, _, err = run(capsys, "render", "--phantom", "chest", "-o", str(tmp_path / "dcm"), "--views",
                       "arc:-10:10:10", *SMALL, "--format", "dcm", "--device", "cpu")
    assert code == 0, err
    import pydicom
    sets = [pydicom.dcmread(tmp_path / "dcm" / v["file"]) for v in
            json.loads((tmp_path / "dcm" / "views.json").read_text())["views"]]
    assert len({(d.StudyInstanceUID, d.SeriesInstanceUID) for d in sets}) == 1  # one series, in view order
    assert [d.InstanceNumber for d in sets] == [1, 2, 3] and len({d.SOPInstanceUID for d in sets}) == 3


def test_mu_intensity_gives_exact_line_integrals(tmp_path, capsys):
    """A water-like cube of 0.02/mm given in mu: the central ray crosses 80 mm of it."""
    m = np.diag([-2.0, -2.0, 2.0, 1.0])
    m[:3, 3] = [39.0, 39.0, -39.0]
    from SVDRRLogic.images import CTVolume
    from SVDRRLogic.io import write_ct
    write_ct(tmp_path / "cube.nrrd", CTVolume(np.full((40, 40, 40), 0.02, np.float32), m, units="mu"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "render", str(tmp_path / "cube.nrrd"), "-o", str(out), "--intensity", "mu",
                       "--detector", "9,9", "--pixel", "1", "--sad", "500", "--sdd", "700", "--device", "cpu")
    assert code == 0, err
    views = json.loads((out / "views.json").read_text())["views"]
    img = load_xray(out / views[0]["file"]).array
    assert img[4, 4] == pytest.approx(80 * 0.02, rel=1e-3)


def test_broken_resources_and_a_closed_pipe_are_not_tracebacks(tmp_path, capsys, monkeypatch):
    from SVDRRLogic.resources import load_json
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "geometry.json").write_text("{ not json")
    monkeypatch.setenv("SVDRR_RESOURCES", str(tmp_path))
    load_json.cache_clear()
    try:
        code, _, err = run(capsys, "--version")
    finally:
        monkeypatch.delenv("SVDRR_RESOURCES")
        load_json.cache_clear()
    assert code == 2 and err.count("\n") == 1 and "geometry.json is not valid JSON" in err, err
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away, as `svdrr models list | head -c 1` does
    with os.fdopen(write_end, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["models", "list", "--json"]) == 0
        monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_a_failed_render_leaves_no_views_behind(tmp_path, capsys):
    out = tmp_path / "set"
    (out / "view_0001_az+090.00_el+000.00.nrrd").mkdir(parents=True)  # the second view cannot be written
    code, _, err = run(capsys, "render", "--phantom", "chest", "-o", str(out), "--view", "0", "--view", "90",
                       "--detector", "8,8", "--pixel", "40", "--device", "cpu", "--batch", "1")
    assert code == 2 and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["view_0001_az+090.00_el+000.00.nrrd"]  # only what was there
    code, _, err = run(capsys, "render", "--phantom", "chest", "-o", str(tmp_path / "new" / "set"), "--views",
                       "arc:0:1e9:1e-3")
    assert code == 2 and "at most 100000" in err and not (tmp_path / "new").exists()


def test_a_failed_render_into_a_new_folder_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import SVDRRLogic.export as export
    real, calls = export.write_image, []

    def disk_full_on_the_second_view(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "write_image", disk_full_on_the_second_view)
    code, _, err = run(capsys, "render", "--phantom", "chest", "-o", str(tmp_path / "set"), "--view", "0",
                       "--view", "90", "--detector", "8,8", "--pixel", "40", "--device", "cpu", "--batch", "1")
    assert code == 2 and "No space left" in err and len(calls) == 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the first view and the folder made for the set: gone


def test_a_label_map_given_as_ct_renders_with_a_one_line_warning(tmp_path, capsys):
    from SVDRRLogic.images import CTVolume
    from SVDRRLogic.io import write_ct
    labels = np.zeros((12, 12, 12), np.float32)
    labels[3:9, 3:9, 3:9] = 2.0
    write_ct(tmp_path / "labels.nii.gz", CTVolume(labels, np.diag([4.0, 4.0, 4.0, 1.0])))
    code, _, err = run(capsys, "render", str(tmp_path / "labels.nii.gz"), "-o", str(tmp_path / "out"),
                       "--detector", "8,8", "--pixel", "8", "--device", "cpu")
    assert code == 0 and err.count("\n") == 1, err
    assert err.startswith("svdrr: warning: ") and "values 0..2 do not look like Hounsfield units" in err, err
    code, _, err = run(capsys, "render", str(tmp_path / "labels.nii.gz"), "-o", str(tmp_path / "mu"), "--intensity",
                       "mu", "--detector", "8,8", "--pixel", "8", "--device", "cpu")
    assert code == 0 and err == "", err  # 0..2 per mm is plausible attenuation: no HU check applies
    write_ct(tmp_path / "hu.nii.gz", CTVolume(labels * 500.0 - 1000.0, np.diag([4.0, 4.0, 4.0, 1.0])))
    code, _, err = run(capsys, "render", str(tmp_path / "hu.nii.gz"), "-o", str(tmp_path / "hu"), "--intensity",
                       "mu", "--detector", "8,8", "--pixel", "8", "--device", "cpu")
    assert code == 0 and err.startswith("svdrr: warning: ") and "are they HU?" in err, err


@pytest.mark.parametrize("argv,message", [
    (["render", "/nonexistent/ct.nii.gz", "-o", "{tmp}"], "does not exist"),
    (["render", "--phantom", "chest", "-o", "{tmp}", "--view", "abc"], "--view"),
    (["render", "--phantom", "chest", "-o", "{tmp}", "--sad", "5"], "source-to-isocenter"),
    (["render", "--phantom", "chest", "-o", "{tmp}", "--sad", "1000", "--sdd", "900"], "must exceed SAD"),
    (["render", "--phantom", "chest", "-o", "{tmp}", "--views", "sphere:3"], "bad view set"),
    (["render", "--phantom", "chest", "-o", "{tmp}", "--preset", "nope"], "invalid choice"),
    (["render", "-o", "{tmp}"], "either a CT path or --phantom"),
    (["render", "--phantom", "chest", "-o", "{tmp}", "--detector", "10.5,3"], "whole pixel"),
    (["render", "--phantom", "chest", "-o", "{tmp}", "--isocenter", "1,2"], "3 numbers"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path / "o")) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("svdrr: error:") and message in lines[0], err
    assert "Traceback" not in err


def test_a_2d_image_given_as_ct_is_refused(tmp_path, capsys):
    from PIL import Image
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "film.png")
    code, _, err = run(capsys, "render", str(tmp_path / "film.png"), "-o", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "film.png" in err
    assert not (tmp_path / "o" / "views.json").exists()


def test_module_entry_point_runs_in_a_fresh_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "SVDRRLogic", "render", "--phantom", "chest", "-o",
                           str(tmp_path), "--view", "-20,5", *SMALL, "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "views.json").read_text())["views"][0]["azimuth"] == -20.0
    bad = subprocess.run([sys.executable, "-m", "SVDRRLogic", "render", str(tmp_path / "missing.nrrd"),
                          "-o", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_bench_prints_rows_for_every_setting(tmp_path, capsys):
    from SVDRRLogic.io import write_ct
    from SVDRRLogic.phantoms import chest_phantom
    write_ct(tmp_path / "ct.nrrd", chest_phantom(shape=(24, 40, 40), spacing=(9.0, 9.0, 13.0)))
    code, out, err = run(capsys, "bench", "--ct", str(tmp_path / "ct.nrrd"), "--sizes", "16,24", "--repeat", "1",
                         "--batch", "2", "--no-peers", "--no-large", "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    speed = result["speed"]
    assert {(r["renderer"], r["size"], r["views"]) for r in speed} == {
        (name, size, views) for name in ("svdrr", "svdrr fast") for size in (16, 24) for views in (1, 2)}
    assert all(r["ms_per_view"] > 0 for r in speed)
    acc = {r["renderer"]: r for r in result["accuracy"]}
    assert acc["svdrr"]["median_rel_err_pct"] < 0.1 and acc["svdrr"]["rel_rmse_pct"] < 0.5


def test_bench_peak_memory_sees_an_allocation_freed_inside_the_block():
    import mmap
    import torch
    from SVDRRLogic.bench import PeakMemory
    with PeakMemory(torch.device("cpu")) as mem:
        # fresh anonymous pages, touched, then unmapped before the block ends (a malloc could reuse resident pages)
        block = mmap.mmap(-1, 50 * 2**20)
        block.write(b"x" * len(block))
        block.close()
    assert 45 < mem.peak_mib < 200


def test_demo_writes_an_orbit_and_a_contact_sheet(tmp_path, capsys, monkeypatch):
    from PIL import Image
    monkeypatch.setenv("SVDRR_HOME", str(tmp_path / "home"))  # the demo model is resolved into this cache
    code, out, err = run(capsys, "demo", "-o", str(tmp_path), "--device", "cpu")
    assert code == 0, err
    sheet = np.asarray(Image.open(tmp_path / "contact_sheet.png"))
    assert sheet.ndim == 2 and sheet.shape[0] > 400 and sheet.std() > 20  # tiles, not a blank page
    views = json.loads((tmp_path / "orbit" / "views.json").read_text())["views"]
    assert len(views) == 11 and views[0]["azimuth"] == -90.0
