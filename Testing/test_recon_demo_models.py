"""The embedded demonstration reconstruction models (``Resources/models/dvg-demo-64``, ``patch-edm-demo-64``): they
resolve offline through the catalogue with sha256 verification, stay small, say plainly what they are, and
reconstruct a phantom they never saw (training used seeds 100-139) closer to the truth than the plain
back-projection baseline; ``svdrr demo``'s reconstruction step runs with them."""
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("monai")

from SVDRRLogic import weights  # noqa: E402
from SVDRRLogic.phantoms import chest_phantom  # noqa: E402
from SVDRRLogic.reconstruct import DEFAULT_MODELS, load_pipeline  # noqa: E402
from SVDRRLogic.recon_grid import ReconGrid, backprojection_baseline, hu_to_unit  # noqa: E402
from SVDRRLogic.volume_metrics import psnr_3d, ssim_slices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VIEWS = [(0.0, 0.0), (90.0, 0.0)]
#: Fewer sampling steps than the models' defaults keep the test short; the margins hold with them too.
STEPS = {"dvg": 25, "patch-edm": 6}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(DEFAULT_MODELS))
def demo(request, tmp_path_factory):
    method, name = request.param, DEFAULT_MODELS[request.param]
    cat = weights.Catalogue.load()
    entry = cat.get(name)
    assert entry.demo and entry.kind == method and entry.verified and entry.source.type == "embedded"
    folder = weights.resolve(name, offline=True, progress=False, catalogue=cat,
                             cache_dir=tmp_path_factory.mktemp("svdrr-home"), check=True)
    pipe, _ = load_pipeline(folder, method, device="cpu", dtype="fp32", progress=False)
    return method, name, pipe


@pytest.fixture(scope="module")
def phantom():
    ct = chest_phantom(shape=(96, 128, 128), spacing=(2.8, 2.8, 3.4), seed=3)
    grid = ReconGrid(64, tuple(ct.center_ras))
    truth = grid.sample_ct(ct)
    geoms = [grid.geometry(*v) for v in VIEWS]
    return grid, truth, geoms, grid.project(torch.from_numpy(truth), geoms)


def test_embedded_models_are_small_and_say_what_they_are():
    entries = json.loads((ROOT / "Resources" / "models.json").read_text())["models"]
    for name in DEFAULT_MODELS.values():
        folder = ROOT / "Resources" / "models" / name
        assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 15 * 2 ** 20
        assert {p.suffix for p in folder.rglob("*") if p.is_file()} <= {".json", ".safetensors"}
        text = entries[name]["description"]
        assert "small demonstration model" in text and "not for diagnosis" in text


def test_demo_model_beats_the_back_projection_baseline(demo, phantom):
    """Both models from two X-rays; DVG also from one (the patch EDM demo model does not beat the baseline from
    a single X-ray: training/README.md)."""
    method, _name, pipe = demo
    grid, truth, geoms, images = phantom
    for count in ((2, 1) if method == "dvg" else (2,)):
        out = pipe(list(images[:count].numpy()), VIEWS[:count], center_ras=grid.center_ras,
                   num_inference_steps=STEPS[method], generator=0)
        unit = hu_to_unit(out.ct.array_hu)
        baseline = backprojection_baseline(grid, images[:count], geoms[:count])
        assert psnr_3d(unit, truth) > psnr_3d(baseline, truth) + 3.0, count
        assert ssim_slices(unit, truth) > ssim_slices(baseline, truth) + 0.1, count


def test_demo_reconstruction_step(tmp_path, monkeypatch):
    from SVDRRLogic import demo as demo_module
    monkeypatch.setenv("SVDRR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(demo_module, "RECON_STEPS", STEPS)
    lines = []
    ct = chest_phantom(shape=(96, 128, 128), spacing=(2.8, 2.8, 3.4), seed=0)
    results = demo_module.reconstruction_step(tmp_path, ct, device="cpu", say=lines.append)
    assert {"DVG-Diffusion biplanar", "DVG-Diffusion single view", "3D patch EDM biplanar",
            "back-projection 64^3"} <= set(results)
    assert (tmp_path / "reconstruction_sheet.png").exists()
    assert json.loads((tmp_path / "reconstruction" / "metrics.json").read_text()) == results
    baseline = results["back-projection 64^3"]["psnr_3d"]
    assert all(results[k]["psnr_3d"] > baseline for k in ("DVG-Diffusion biplanar", "DVG-Diffusion single view",
                                                          "3D patch EDM biplanar"))
    assert any("not for diagnosis" in line for line in lines)
