"""Novel X-ray views with SV-DRR, end to end on a tiny random model: the API, ``svdrr synthesize`` (misuse included),
the worker task through ``SVDRRLogic.jobs`` (a real subprocess), the import into a scene (slicer-core) and the demo
step. All on the CPU in seconds: the images are noise from random weights; files, geometry, settings, determinism
and errors are what is checked.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")

from SVDRRLogic import weights  # noqa: E402
from catalogue_files import embedded_entry  # noqa: E402
from SVDRRLogic.cli import main  # noqa: E402
from SVDRRLogic.geometry import CArmGeometry, GeometryError  # noqa: E402
from SVDRRLogic.images import ImageError, XRayImage  # noqa: E402
from SVDRRLogic.io import load_xray, write_image  # noqa: E402
from SVDRRLogic.jobs import FAILED, FINISHED, Job, write_job_file  # noqa: E402
from SVDRRLogic.models import create_random  # noqa: E402
from SVDRRLogic.pipelines import svdrr_relative_pose  # noqa: E402
from SVDRRLogic.synthesize import MANIFEST_NAME, synthesize_views, target_geometry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "SVDRRSlicer" / "Scripts" / "SVDRRWorker.py"
ISO = (10.0, -20.0, 30.0)


pytestmark = pytest.mark.usefixtures("own_cache")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return create_random(tmp_path_factory.mktemp("models") / "tiny-svdrr", "tiny", 32, seed=0)


def structured_image(rows=40, cols=48):
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    image = 0.02 * x + 0.01 * y
    image[8:20, 10:30] += 1.0
    image[(y - 28) ** 2 + (x - 34) ** 2 < 36] += 2.0
    return image


@pytest.fixture(scope="module")
def xray_png(tmp_path_factory):
    """A picture without C-arm geometry (like a scanned film)."""
    return write_image(tmp_path_factory.mktemp("xray") / "film.png", structured_image())


@pytest.fixture(scope="module")
def drr_nrrd(tmp_path_factory):
    """A DRR file of ours: PA view around ISO, geometry stored in the file."""
    geom = CArmGeometry.preset("svdrr-lidc", isocenter=ISO, detector=(48, 40), pixel=(7.5, 7.5))
    return write_image(tmp_path_factory.mktemp("drr") / "pa.nrrd", structured_image(), geom)


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors (one line too: cli._Parser.error)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def manifest_of(folder):
    return json.loads((Path(folder) / MANIFEST_NAME).read_text())


# -- the API ------------------------------------------------------------------------------------------------------
def test_views_are_written_on_their_detectors_with_a_manifest(model, drr_nrrd, tmp_path):
    events = []
    views = [(-30.0, 10.0), (0.0, 0.0), (45.0, -5.0)]
    paths = synthesize_views(drr_nrrd, model, views, tmp_path / "out", steps=3, guidance=2.5, seed=7, device="cpu",
                             fmt="nrrd", batch=2, progress=lambda f, m: events.append((f, m)))
    assert [p.name for p in paths] == ["view_0000_az-030.00_el+010.00.nrrd", "view_0001_az+000.00_el+000.00.nrrd",
                                       "view_0002_az+045.00_el-005.00.nrrd"]
    m = manifest_of(tmp_path / "out")
    assert m["synthetic"] is True and "not for diagnosis" in m["note"] and m["kind"] == "Synthesized X-ray"
    assert (m["steps"], m["guidance_scale"], m["seed"], m["batch"], m["format"]) == (3, 2.5, 7, 2, "nrrd")
    assert m["device"].startswith("cpu") and m["resolution"] == 32 and m["preset"] == "svdrr-lidc"
    assert m["model"]["name"] == "tiny-svdrr" and m["model"]["folder"] == str(model) and not m["model"]["catalogue"]
    assert m["demo_model"] is False and m["model"]["demo"] is False
    assert m["input"]["file"] == str(drr_nrrd) and m["input"]["geometry"]["isocenter"] == list(ISO)
    assert m["source_view"] == [0.0, 0.0]
    # the model's output covers the preset's detector (512 x 0.7 mm) with 32 pixels, around the input's isocenter
    base = target_geometry("svdrr-lidc", 32, ISO)
    assert base.detector == (32, 32) and base.pixel == pytest.approx((358.4 / 32, 358.4 / 32))
    for record, path, (a, e) in zip(m["views"], paths, views):
        expected = base.with_view(a, e)
        assert record["file"] == path.name and CArmGeometry.from_dict(record) == expected
        assert record["relative_pose"] == pytest.approx(svdrr_relative_pose((0.0, 0.0), (a, e)))
        assert record["metadata"]["synthetic"] is True and record["metadata"]["seed"] == 7
        image = load_xray(path)
        assert image.array.shape == (32, 32) and 0.0 <= image.array.min() <= image.array.max() <= 1.0
        assert image.metadata["synthetic"] is True
        assert CArmGeometry.from_dict(image.metadata["geometry"]) == expected
        np.testing.assert_allclose(image.ijk_to_ras, expected.detector_ijk_to_ras, atol=1e-6)
    # progress: a report after every denoising step (2 batches x 3 steps), rising to 1
    steps = [m for _f, m in events if "step" in m]
    assert len(steps) == 6 and steps[0] == "views 1-2 of 3: step 1/3" and steps[-1] == "view 3 of 3: step 3/3"
    fractions = [f for f, _m in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_an_in_memory_xray_and_explicit_source_view(model, tmp_path):
    image = XRayImage(structured_image(), source="memory film")
    with pytest.warns(UserWarning, match="trained only with a PA"):
        paths = synthesize_views(image, model, [(10.0, 0.0)], tmp_path, steps=1, device="cpu",
                                 source_view=(-20.0, 5.0), input_label="my film")
    m = manifest_of(tmp_path)
    assert len(paths) == 1 and paths[0].suffix == ".png"
    assert m["input"]["label"] == "my film" and m["input"]["geometry"] is None and m["source_view"] == [-20.0, 5.0]
    assert m["views"][0]["isocenter"] == [0.0, 0.0, 0.0]
    assert m["views"][0]["relative_pose"] == pytest.approx(svdrr_relative_pose((-20.0, 5.0), (10.0, 0.0)))


# -- the command line ---------------------------------------------------------------------------------------------
def test_cli_negative_angles_as_typed_and_determinism(model, xray_png, tmp_path, capsys):
    def synthesize(folder, *extra):
        code, out, err = run(capsys, "synthesize", xray_png, "-o", tmp_path / folder, "--model", model,
                             "--steps", 2, "--device", "cpu", *extra)
        assert code == 0, err
        assert "synthetic images, not for diagnosis" in out
        return [load_xray(tmp_path / folder / r["file"]).array for r in manifest_of(tmp_path / folder)["views"]]

    views = ["--view", "-30,10", "--view", "0,-15"]
    a = synthesize("a", *views)
    assert [(r["azimuth"], r["elevation"]) for r in manifest_of(tmp_path / "a")["views"]] == [(-30.0, 10.0),
                                                                                                (0.0, -15.0)]
    b = synthesize("b", *views)                          # same seed: the same images, bit for bit
    c = synthesize("c", *views, "--seed", "1")
    d = synthesize("d", *views, "--batch", "1")          # other batching: the same noise, float round-off only
    for x, y, z, w in zip(a, b, c, d):
        np.testing.assert_array_equal(x, y)
        assert np.abs(x - z).max() > 1e-2
        np.testing.assert_allclose(x, w, atol=1e-4)
    synthesize("e", "--views", "arc:-20:20:20", "--source-view", "-10,0", "--format", "nrrd")
    m = manifest_of(tmp_path / "e")
    assert [r["azimuth"] for r in m["views"]] == [-20.0, 0.0, 20.0] and m["source_view"] == [-10.0, 0.0]
    assert all(r["file"].endswith(".nrrd") for r in m["views"])


def damage(model, tmp_path, how):
    folder = Path(shutil.copytree(model, tmp_path / "damaged"))
    weights_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    if how == "missing subfolder":
        shutil.rmtree(folder / "vae")
    elif how == "garbage weights":
        weights_file.write_bytes(b"not a safetensors file" * 10)
    elif how == "truncated weights":
        weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    return folder


@pytest.mark.parametrize("how, message", [
    ("missing subfolder", "missing subfolder(s) vae"),
    ("garbage weights", "vae/diffusion_pytorch_model.safetensors: damaged weights file"),
    ("truncated weights", "vae/diffusion_pytorch_model.safetensors: damaged weights file"),
])
def test_bad_model_folder_is_one_line_exit_2(model, xray_png, tmp_path, capsys, how, message):
    code, out, err = run(capsys, "synthesize", xray_png, "-o", tmp_path / "out", "--model",
                         damage(model, tmp_path, how), "--view", "30,0", "--steps", 1, "--device", "cpu")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("svdrr: error: ") and message in err, err
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


@pytest.mark.parametrize("model_arg, offline, message", [
    ("no-such-model", False, "unknown model 'no-such-model'"),
    ("./no/such/folder", False, "no model folder at ./no/such/folder"),
    ("dvg-diffusion", False, "is a dvg model, not an SV-DRR"),
    ("svdrr-dit-fb-256", True, "not in the cache and offline mode is on"),
])
def test_bad_model_names_are_one_line_exit_2(xray_png, tmp_path, capsys, monkeypatch, model_arg, offline, message):
    if offline:
        monkeypatch.setenv("SVDRR_OFFLINE", "1")
    code, _out, err = run(capsys, "synthesize", xray_png, "-o", tmp_path, "--model", model_arg, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["synthesize", "{tmp}/missing.png"], "missing.png: file or folder does not exist"),
    (["synthesize", "{tmp}/flat.png"], "image is constant"),
    (["synthesize", "{xray}", "--view", "0,200"], "angles out of range"),
    (["synthesize", "{xray}", "--views", "arc:1:2"], "bad view set"),
    (["synthesize", "{xray}", "--steps", "0"], "--steps and --batch must be at least 1"),
    (["synthesize", "{xray}", "--view", "ten,0"], "comma-separated numbers"),
    (["synthesize", "{xray}", "--guidance", "-1"], "guidance must be a number >= 0"),
    (["synthesize", "{xray}", "--source-view", "abc"], "--source-view AZ,EL must be"),
])
def test_bad_input_is_one_line_exit_2(model, xray_png, tmp_path, capsys, argv, message):
    write_image(tmp_path / "flat.png", np.ones((16, 16), np.float32))
    argv = [a.format(tmp=tmp_path, xray=xray_png) for a in argv]
    code, _out, err = run(capsys, *argv, "-o", tmp_path / "out", "--model", model, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and err.startswith("svdrr: error:") and message in err, err


# -- the worker task (a real subprocess) --------------------------------------------------------------------------
def worker_job(folder, spec):
    return Job([sys.executable, str(WORKER), str(write_job_file(spec, Path(folder) / "job.json"))])


@pytest.fixture(scope="module")
def worker_run(model, drr_nrrd, tmp_path_factory):
    """One finished ``synthesize_views`` job: (job, all its events, the output folder)."""
    folder = tmp_path_factory.mktemp("worker")
    spec = {"task": "synthesize_views", "xray": str(drr_nrrd), "model": str(model), "views": "arc:-30:30:30",
            "output_dir": str(folder / "out"), "steps": 3, "guidance": 3.0, "seed": 5, "device": "cpu",
            "format": "nrrd", "batch": 2, "input_label": "PA DRR"}
    job = worker_job(folder, spec).start()
    events = job.wait(timeout=180)
    return job, events, folder / "out"


def test_worker_reports_every_step_and_its_files(worker_run, drr_nrrd):
    job, events, out = worker_run
    assert job.state == FINISHED, job.error
    steps = [e["message"] for e in events if e["type"] == "progress" and "step" in e["message"]]
    assert steps == [f"views 1-2 of 3: step {i}/3" for i in (1, 2, 3)] + [f"view 3 of 3: step {i}/3" for i in (1, 2, 3)]
    fractions = [e["fraction"] for e in events if e["type"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    result = job.result
    assert result["task"] == "synthesize_views" and result["count"] == 3 and result["synthetic"] is True
    assert result["synthesis_json"] == str(out / MANIFEST_NAME) and result["demo_model"] is False
    assert [Path(p).name for p in result["outputs"]] == [r["file"] for r in manifest_of(out)["views"]]
    assert manifest_of(out)["input"]["label"] == "PA DRR" and manifest_of(out)["seed"] == 5
    assert manifest_of(out)["input"]["file"] == str(drr_nrrd)


def test_a_failed_synthesis_leaves_no_views_behind(model, xray_png, tmp_path, capsys):
    out = tmp_path / "set"
    (out / "view_0001_az+030.00_el+000.00.png").mkdir(parents=True)  # the second view cannot be written
    code, _out, err = run(capsys, "synthesize", xray_png, "-o", out, "--model", model, "--device", "cpu",
                          "--view", "10,0", "--view", "30,0", "--steps", "1", "--batch", "1")
    assert code == 2 and err.splitlines()[-1].startswith("svdrr: error: ") and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["view_0001_az+030.00_el+000.00.png"]  # only what was there


def test_errors_name_the_input_label_not_the_handed_over_file(model, tmp_path):
    handed = write_image(tmp_path / "handover.nrrd", np.ones((16, 16), np.float32))
    with pytest.raises(ImageError) as err:
        synthesize_views(handed, model, [(30.0, 0.0)], tmp_path / "out", device="cpu", input_label="Film")
    assert str(err.value) == "Film: image is constant (1); nothing to condition on"


def test_worker_failures_are_one_line(tmp_path, model):
    job = worker_job(tmp_path, {"task": "synthesize_views", "xray": str(tmp_path / "nope.png"), "model": str(model),
                                "views": [[30, 0]], "output_dir": str(tmp_path / "out")}).start()
    job.wait(timeout=120)
    assert job.state == FAILED and "nope.png does not exist" in job.error and "\n" not in job.error
    job = worker_job(tmp_path, {"task": "synthesize_views", "xray": str(tmp_path / "x.png"), "model": str(model),
                                "output_dir": str(tmp_path / "out")}).start()
    job.wait(timeout=120)
    assert job.state == FAILED and job.error == "the job has no 'views'"


# -- the Slicer panel's logic on a real scene (slicer-core) -------------------------------------------------------
@pytest.fixture(scope="module")
def slicer_session():
    slicer = pytest.importorskip("slicer", reason="the scene tests need slicer-core (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' module is not slicer-core")
    from SVDRRLogic import mrml, session_synthesis
    return mrml, session_synthesis


def test_worker_result_imports_as_a_sequence_or_as_nodes(slicer_session, worker_run):
    mrml, ss = slicer_session
    job, _events, out = worker_run
    records = manifest_of(out)["views"]
    scene = mrml.new_scene()
    imported = ss.import_synthesis(scene, job.result["synthesis_json"], name="PA DRR novel views")
    sequence = imported.sequence
    assert imported.count == sequence.GetNumberOfDataNodes() == len(records) == 3
    assert sequence.GetName() == "PA DRR novel views (synthetic)"
    assert imported.browser.GetMasterSequenceNode() is sequence
    assert sequence.GetAttribute("SVDRR.Kind") == "Synthesized X-ray"
    for (label, item), record in zip(mrml.orbit_items(sequence), records):
        assert label == f"{record['azimuth']:g}" and "(synthetic)" in item.GetName()
        assert item.GetAttribute("SVDRR.Synthetic") == "true" and item.GetAttribute("SVDRR.Kind") == "Synthesized X-ray"
        assert mrml.geometry_from_node(item) == CArmGeometry.from_dict(record)
        assert json.loads(item.GetAttribute("SVDRR.Metadata"))["seed"] == 5
        assert "synthesized by tiny-svdrr from PA DRR" in item.GetAttribute("SVDRR.Source")

    nodes = ss.import_synthesis(scene, job.result["synthesis_json"], name="View", as_sequence=False).nodes
    assert [n.GetName() for n in nodes] == [f"View az {a:g} el 0 (synthetic)" for a in (-30, 0, 30)]
    for node, record in zip(nodes, records):
        assert mrml.geometry_from_node(node) == CArmGeometry.from_dict(record)
        np.testing.assert_allclose(mrml.xray_from_volume_node(node).array, load_xray(out / record["file"]).array)


def test_panel_job_spec_input_and_views(slicer_session, tmp_path):
    mrml, ss = slicer_session
    scene = mrml.new_scene()
    geom = CArmGeometry.preset("svdrr-lidc", isocenter=ISO, detector=(48, 40), pixel=(7.5, 7.5)).with_view(15, -5)
    drr = mrml.show_drr(scene, structured_image(), geom, name="DRR")
    written = ss.write_xray_input(drr, tmp_path / "xray.nrrd")
    back = load_xray(written)
    np.testing.assert_allclose(back.array, structured_image(), rtol=1e-6)
    assert CArmGeometry.from_dict(back.metadata["geometry"]) == geom    # so the worker knows the source view

    spec = ss.synthesis_job(written, "svdrr-dit-fb-256", ss.target_views(20, 5), tmp_path / "out", steps=7,
                            seed=3, device="cpu", input_label="DRR")
    assert spec == {"task": "synthesize_views", "xray": str(written), "model": "svdrr-dit-fb-256",
                    "views": [[20.0, 5.0]], "output_dir": str(tmp_path / "out"), "steps": 7, "guidance": 3.0,
                    "seed": 3, "device": "cpu", "format": "nrrd", "batch": 4, "input_label": "DRR"}
    assert json.loads(json.dumps(spec)) == spec
    assert ss.target_views(0, 0, "arc:-90:90:45") == "arc:-90:90:45"
    assert ss.target_views(0, 0, " -10,5; 20,-5 ") == [[-10.0, 5.0], [20.0, -5.0]]
    for bad in ("ten,0", "1,2,3", "arc:1:2", "hemisphere:0"):
        with pytest.raises(GeometryError):
            ss.target_views(0, 0, bad)
    with pytest.raises(GeometryError, match="out of range"):
        ss.target_views(0, 300)
    with pytest.raises(ValueError, match="at least 1"):
        ss.synthesis_job(written, "m", "arc:-10:10:10", tmp_path, steps=0)
    ct = mrml.add_ct_volume_node(scene, _small_ct(), volume_rendering=False)
    with pytest.raises(ValueError, match="not a 2D X-ray"):
        ss.write_xray_input(ct, tmp_path / "ct.nrrd")


def _small_ct():
    from SVDRRLogic.images import CTVolume
    return CTVolume(np.full((8, 8, 8), -1000.0, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))


def test_model_status_for_the_panel(slicer_session, model, tmp_path, monkeypatch):
    _mrml, ss = slicer_session
    ready = ss.model_status("svdrr-dit-fb-256", model)           # a chosen folder wins over the catalogue name
    assert ready.available and ready.model == str(model) and not ready.demo
    assert not ss.model_status("svdrr-dit-fb-256", tmp_path / "nothing").available
    partial = Path(shutil.copytree(model, tmp_path / "partial"))
    shutil.rmtree(partial / "cc_projection")
    assert "lacks cc_projection" in ss.model_status(None, partial).message
    for folder in (None, "", "."):                                # an empty path widget: the catalogue model
        status = ss.model_status("svdrr-dit-fb-256", folder)
        assert not status.available and "not in the cache" in status.message
    assert "not an SV-DRR" in ss.model_status("dvg-diffusion").message
    assert not ss.model_status("", None).available


# -- the catalogue's demo flag and `svdrr demo` ------------------------------------------------------------------
def embedded_catalogue(root: Path, model: Path, name="tiny-demo", demo=True) -> Path:
    """A catalogue file in ``root`` whose model ``name`` is embedded (``root/models/name``) as in Resources/."""
    entry = embedded_entry(root, model, name, kind="svdrr", preset="svdrr-lidc",
                           normalization="per-image min-max to [-1, 1]", resolution=32, demo=demo)
    not_cached = {**entry, "source": {"hf": "acme/not-downloaded"}, "verified": False,
                  "files": [{"path": "model_index.json", "sha256": None, "size": None}], "demo": True}
    path = root / "models.json"
    path.write_text(json.dumps({"models": {"not-downloaded-demo": not_cached, name: entry}}))
    return path


def test_catalogue_demo_flag(tmp_path, model):
    cat = weights.Catalogue.load(embedded_catalogue(tmp_path, model))
    assert cat.get("tiny-demo").demo is True and cat.get("not-downloaded-demo").demo is True
    shipped = [e.name for e in weights.Catalogue.load() if e.demo]   # the embedded ones (test_*demo_model*.py)
    assert sorted(shipped) == ["dvg-demo-64", "patch-edm-demo-64", "svdrr-demo-64"]
    bad = json.loads((tmp_path / "models.json").read_text())
    bad["models"]["tiny-demo"]["demo"] = "yes"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(weights.WeightsError, match="'demo' must be true or false"):
        weights.Catalogue.load(tmp_path / "bad.json")
    # an embedded model needs no network: offline mode installs it from the extension into the cache
    folder = weights.resolve("tiny-demo", offline=True, progress=False, catalogue=cat)
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_demo_without_a_demonstration_model_skips_novel_views(tmp_path, model, capsys):
    from SVDRRLogic.demo import NO_DEMO_MODEL, novel_view_step
    catalogue = embedded_catalogue(tmp_path / "res", model, demo=False)   # only a demo model that is not cached
    image = XRayImage(structured_image())
    assert novel_view_step(tmp_path / "out", image, device="cpu", catalogue=catalogue) is None
    assert capsys.readouterr().out == NO_DEMO_MODEL + "\n"
    assert not (tmp_path / "out").exists()


def test_demo_with_an_embedded_demonstration_model(tmp_path, model, capsys, monkeypatch):
    from SVDRRLogic import demo
    from SVDRRLogic.phantoms import chest_phantom
    # a smaller phantom than the demo's (the full demo runs in test_cli): the novel-view step is what is tested here
    monkeypatch.setattr(demo, "chest_phantom",
                        lambda seed: chest_phantom(shape=(48, 96, 96), spacing=(3.7, 3.7, 6.7), seed=seed))
    catalogue = embedded_catalogue(tmp_path / "res", model)
    code, out, err = run(capsys, "demo", "-o", tmp_path / "demo", "--device", "cpu", "--catalogue", catalogue)
    assert code == 0, err
    assert "novel views (tiny-demo, a small demonstration model" in out and "skipping novel views" not in out
    m = manifest_of(tmp_path / "demo" / "novel_views")
    assert m["demo_model"] is True and m["model"]["demo"] is True and m["model"]["name"] == "tiny-demo"
    assert [r["azimuth"] for r in m["views"]] == [-90.0, -45.0, 0.0, 45.0, 90.0]
    assert m["source_view"] == [0.0, 0.0] and m["input"]["geometry"]["azimuth"] == 0.0
    assert all(r["metadata"]["demo_model"] for r in m["views"])
    from PIL import Image
    sheet = np.asarray(Image.open(tmp_path / "demo" / "novel_views_sheet.png"))
    assert sheet.ndim == 2 and sheet.shape[1] > 6 * 192 and sheet.std() > 10
    assert (tmp_path / "demo" / "contact_sheet.png").is_file()
