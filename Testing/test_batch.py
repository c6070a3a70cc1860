"""The headless batch script (``SVDRRSlicer/Scripts/SVDRRBatch.py``) end to end, as a user runs it.

Under plain Python with the ``slicer-core`` wheel, in a subprocess: images and ``views.json`` on disk, the scene
bundle loads back with the CT, the DRRs or the orbit sequence and the C-arm; bad arguments and inputs end with one
line on stderr, exit code 2 and nothing written. Inside Slicer the same code runs with ``slicer.mrmlScene`` and
``slicer.util.exit``; that route is exercised here with a stand-in for the Slicer application.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the batch script needs slicer-core (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' module is not slicer-core", allow_module_level=True)

from SVDRRLogic import CArmGeometry, CTVolume, mrml  # noqa: E402
from SVDRRLogic.io import load_xray, write_ct  # noqa: E402
from SVDRRLogic.mrml_carm import IMAGE_REFERENCE  # noqa: E402
from SVDRRLogic.mrml_scene import ATTR_KIND, ATTR_VIEW  # noqa: E402
from SVDRRLogic.phantoms import chest_phantom  # noqa: E402
from SVDRRLogic.session import CARM_NAME  # noqa: E402

import slicer_standin  # noqa: E402  (Testing/slicer_standin.py)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "SVDRRSlicer" / "Scripts" / "SVDRRBatch.py"
SMALL = ["--detector", "40,32", "--pixel", "9", "--device", "cpu"]


def batch_module():
    spec = importlib.util.spec_from_file_location("SVDRRBatch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_batch(*args, cwd=None, wait=True):
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k != "SVDRR_DEBUG"}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def nodes_of(scene, class_name):
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def leftovers(folder: Path):
    return sorted(p.name for p in folder.rglob(".svdrr-*"))


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "small chest.nrrd"
    return write_ct(path, chest_phantom(shape=(24, 48, 48), spacing=(7.4, 7.4, 13.4)))


def test_render_phantom_to_files_and_scene(tmp_path):
    out, bundle = tmp_path / "out", tmp_path / "scene" / "render.mrb"
    code, stdout, stderr = run_batch("render", "--phantom", "chest", "--view", "30,-10", "--view", "-20,5", *SMALL,
                                     "-o", out, "--scene", bundle)
    assert code == 0, stderr
    assert stderr == ""  # VTK and MRML chatter is kept off stderr
    assert "2 view(s) of 40x32 px" in stdout and str(bundle) in stdout

    manifest = json.loads((out / "views.json").read_text())
    views = manifest["views"]
    assert manifest["synthetic"] is True and [(v["azimuth"], v["elevation"]) for v in views] == [(30, -10), (-20, 5)]
    for view in views:
        image = load_xray(out / view["file"])
        assert image.array.shape == (32, 40) and image.array.max() > 1.0
    geometries = [CArmGeometry.from_dict(v) for v in views]

    scene = mrml.load_scene_bundle(bundle)
    volumes = nodes_of(scene, "vtkMRMLScalarVolumeNode")
    (ct,) = [n for n in volumes if mrml.classify_volume_node(n)[0] == "ct"]
    assert ct.GetName().startswith("SVDRR chest phantom") and ct.GetDisplayNode() is not None
    drrs = [n for n in volumes if n.GetAttribute(ATTR_KIND) == "DRR"]
    assert [mrml.geometry_from_node(n) for n in drrs] == geometries
    assert all(n.GetName().endswith(" (synthetic)") for n in drrs)
    np.testing.assert_allclose(mrml.xray_from_volume_node(drrs[0]).array, load_xray(out / views[0]["file"]).array,
                               rtol=1e-5, atol=1e-5)
    carm = mrml.CArmDisplay.from_scene(scene, CARM_NAME)
    assert carm is not None and carm.geometry == geometries[0]
    assert carm.detector_node.GetNodeReference(IMAGE_REFERENCE) is drrs[0]
    np.testing.assert_allclose(carm.source_position(), geometries[0].source, atol=1e-6)
    assert any(n.GetVisibility() for n in nodes_of(scene, "vtkMRMLVolumeRenderingDisplayNode"))
    assert leftovers(tmp_path) == []


def test_orbit_of_a_ct_file_as_a_sequence(tmp_path, small_ct):
    out, bundle = tmp_path / "orbit", tmp_path / "orbit.mrb"
    code, _, stderr = run_batch("--", "orbit", small_ct, "--views", "arc:-30:30:30", "--preset", "x2ct",
                                     "--detector", "24,24", "--pixel", "12", "--device", "cpu", "--format", "png",
                                     "-o", out, "--scene", bundle)
    assert code == 0, stderr
    views = json.loads((out / "views.json").read_text())["views"]
    assert [v["azimuth"] for v in views] == [-30.0, 0.0, 30.0]
    assert sorted(p.name for p in out.iterdir()) == sorted([v["file"] for v in views] + ["views.json"])
    assert all(v["file"].endswith(".png") and v["preset_name"] == "x2ct" for v in views)

    scene = mrml.load_scene_bundle(bundle)
    cts = [n for n in nodes_of(scene, "vtkMRMLScalarVolumeNode") if n.GetAttribute(ATTR_KIND) == "CT"]
    assert [n.GetName() for n in cts] == ["small chest"]
    (sequence,) = nodes_of(scene, "vtkMRMLSequenceNode")
    items = mrml.orbit_items(sequence)
    assert [index for index, _ in items] == ["-30", "0", "30"]
    assert [item.GetAttribute(ATTR_VIEW) for _, item in items] == ["0", "1", "2"]
    assert [mrml.geometry_from_node(item).azimuth for _, item in items] == [-30.0, 0.0, 30.0]
    (browser,) = nodes_of(scene, "vtkMRMLSequenceBrowserNode")
    proxy = browser.GetProxyNode(sequence)
    carm = mrml.CArmDisplay.from_scene(scene, CARM_NAME)
    assert carm is not None and carm.geometry.azimuth == -30.0 and carm.geometry.preset_name == "x2ct"
    assert carm.detector_node.GetNodeReference(IMAGE_REFERENCE) is proxy
    assert leftovers(tmp_path) == []


BAD = {  # the arguments after "render", and what the one line must say
    "unknown preset": (["--phantom", "chest", "--preset", "no-such-preset"], "unknown geometry preset"),
    "missing CT": (["no/such/ct.nii.gz"], "does not exist"),
    "bad view set": (["--phantom", "chest", "--views", "sphere:3"], "bad view set 'sphere:3'"),
    "absurd SAD": (["--phantom", "chest", "--sad", "2"], "source-to-isocenter distance 2.0 mm is absurd"),
}


def check_one_line_and_nothing_written(code, stdout, stderr, folder, message):
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("SVDRRBatch: error: "), stderr
    assert message in stderr and "Traceback" not in stderr, stderr
    assert stdout == ""
    assert sorted(p.name for p in folder.iterdir()) == []  # no .mrb, no output folder, no staging folder


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_and_inputs(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = batch_module().run(["render", *BAD[case][0], *SMALL, "-o", "out", "--scene", "scene.mrb"])
    out, err = capsys.readouterr()
    check_one_line_and_nothing_written(code, out, err, tmp_path, BAD[case][1])


def test_bad_arguments_as_a_user_runs_them(tmp_path):
    """The same through the interpreter: no traceback, exit code 2 (each case in its own process, concurrently)."""
    runs = {}
    for case in BAD:
        folder = tmp_path / case.replace(" ", "-")
        folder.mkdir()
        runs[case] = (folder, run_batch("render", *BAD[case][0], *SMALL, "-o", "out", "--scene", "scene.mrb",
                                        cwd=folder, wait=False))
    for case, (folder, process) in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        check_one_line_and_nothing_written(process.returncode, stdout, stderr, folder, BAD[case][1])


def test_a_label_map_as_ct_renders_with_a_one_line_warning(tmp_path):
    labels = np.zeros((10, 10, 10), np.float32)
    labels[2:8, 2:8, 2:8] = 5.0
    path = write_ct(tmp_path / "labels.nii.gz", CTVolume(labels, np.diag([5.0, 5.0, 5.0, 1.0])))
    code, _, stderr = run_batch("render", path, *SMALL, "-o", tmp_path / "out")
    assert code == 0, stderr
    assert stderr.startswith("SVDRRBatch: warning: ") and stderr.count("\n") == 1, stderr
    assert "values 0..5 do not look like Hounsfield units" in stderr


@pytest.mark.parametrize("args, message", [
    (["render", "--phantom", "chest"], "nothing to write"),
    (["render", "--phantom", "chest", "--scene", "x.zip"], "ending in .mrb"),
    (["render", "--phantom", "chest", "--screenshot", "x.jpg"], "ending in .png"),
    (["render", "--phantom", "chest", "CT.nrrd", "-o", "o"], "either a CT path or --phantom chest"),
    (["render", "--phantom", "chest", "-o", "o", "--view", "ten"], "--view AZ,EL must be comma-separated numbers"),
    (["render", "--phantom", "chest", "-o", "o", "--detector", "10.5,4"], "whole, positive pixel counts"),
    (["render", "--phantom", "chest", "-o", "o", "--format", "gif"], "invalid choice: 'gif'"),
    (["render", "--phantom", "chest", "-o", "o", "--batch", "0"], "--batch must be at least 1"),
    (["render", "--phantom", "chest", "-o", "o", "--view", "0,400"], "angles out of range"),
    (["render", "--phantom", "chest", "-o", "o", "--sad", "1000", "--sdd", "900"], "must exceed SAD"),
    (["render", "--phantom", "chest", "-o", "o", "--views", "hemisphere:0"], "hemisphere view count"),
    (["render", "--phantom", "mouse", "-o", "o"], "invalid choice: 'mouse'"),
    (["reconstruct", "--phantom", "chest"], "invalid choice: 'reconstruct'"),
    ([], "required: COMMAND"),
])
def test_misuse_is_one_line_with_exit_code_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = batch_module().run(args)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("SVDRRBatch: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_arguments_after_a_double_dash_and_negative_angles():
    batch = batch_module()
    assert batch.script_arguments(["--", "render", "--phantom", "chest"]) == ["render", "--phantom", "chest"]
    assert batch.script_arguments(["render", "x"]) == ["render", "x"]
    args = batch.parse_arguments(["--", "render", "--phantom", "chest", "--view", "-30,10", "--view", "-.5",
                                  "--isocenter", "-1,-2,-3", "--scene", "s.mrb"])
    assert args.view == [(-30.0, 10.0), (-0.5, 0.0)] and args.isocenter == (-1.0, -2.0, -3.0)
    assert args.scene.is_absolute() and args.scene.name == "s.mrb" and args.screenshot_size == (900, 700)


def test_choices_mirror_the_engine():
    from SVDRRLogic.attenuation import HU_MODELS, OUTPUTS
    from SVDRRLogic.io.writers import IMAGE_FORMATS

    batch = batch_module()
    assert set(batch.FORMATS) == set(IMAGE_FORMATS)
    assert batch.HU_MODELS == HU_MODELS and batch.OUTPUTS == OUTPUTS


def test_inside_slicer_the_application_scene_and_exit_are_used(tmp_path, small_ct):
    """As under ``Slicer --no-main-window --python-script SVDRRBatch.py -- ARGS`` (see slicer_standin.py)."""
    good = slicer_standin.start(SCRIPT, "render", small_ct, "--view", "10,0", *SMALL, "--scene",
                                tmp_path / "in-slicer.mrb")
    bad = slicer_standin.start(SCRIPT, "render", "--phantom", "chest", "--views", "sphere:3", "--scene",
                               tmp_path / "bad.mrb")
    code, report, err = slicer_standin.finish(good)
    assert code == 0, err
    assert report == {"exits": [0], "drr_nodes": 1}  # the DRR went into slicer.mrmlScene; slicer.util.exit(0)
    scene = mrml.load_scene_bundle(tmp_path / "in-slicer.mrb")
    assert mrml.CArmDisplay.from_scene(scene, CARM_NAME).geometry.azimuth == 10.0

    code, report, err = slicer_standin.finish(bad)
    assert report["exits"] == [2]
    assert err.count("\n") == 1 and "SVDRRBatch: error: bad view set" in err, err
    assert not (tmp_path / "bad.mrb").exists()
