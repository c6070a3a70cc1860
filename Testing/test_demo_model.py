"""The embedded demonstration model (``Resources/models/svdrr-demo-64``): it resolves offline through the catalogue
with sha256 verification, loads with ``SVDRRPipeline.from_folder``, and turns a PA DRR of a phantom it never saw
into a 90-degree view closer to the true one than the PA input itself (what training/README.md "Demo model"
measured on the held-out phantoms)."""
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from SVDRRLogic import weights  # noqa: E402
from SVDRRLogic.attenuation import apply_output  # noqa: E402
from SVDRRLogic.geometry import CArmGeometry  # noqa: E402
from SVDRRLogic.phantoms import chest_phantom  # noqa: E402
from SVDRRLogic.renderer import DRRRenderer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "svdrr-demo-64"
RES = 64


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    cat = weights.Catalogue.load()
    entry = cat.get(NAME)
    assert entry.demo and entry.kind == "svdrr" and entry.verified and entry.source.type == "embedded"
    return weights.resolve(NAME, offline=True, progress=False, catalogue=cat,
                           cache_dir=tmp_path_factory.mktemp("svdrr-home"), check=True)


@pytest.fixture(scope="module")
def pipe(demo_folder):
    from SVDRRLogic.pipelines import SVDRRPipeline
    return SVDRRPipeline.from_folder(demo_folder, device="cpu", dtype="fp32")


def drrs(seed: int, views):
    """Display DRRs (R x R in [0, 1]) of a generated phantom that is not in the training set (seeds 100-153), in
    the training data's geometry (training/configs/demo.yaml)."""
    ct = chest_phantom(shape=(64, 128, 128), spacing=(2.8, 2.8, 5.0), seed=seed)
    base = CArmGeometry.preset("svdrr-lidc", isocenter=tuple(ct.center_ras), detector=(RES, RES),
                               pixel=(358.4 / RES, 358.4 / RES))
    renderer = DRRRenderer(ct, device="cpu", hu_model="diffdrr")
    line = renderer.render_tensor([base.with_view(az, el) for az, el in views])
    return apply_output(line, "display").cpu().numpy()


def psnr(a, b):
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_embedded_demo_model_resolves_and_is_small(demo_folder):
    files = [p for p in Path(demo_folder).rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert {p.suffix for p in files} <= {".json", ".safetensors"}
    embedded = ROOT / "Resources" / "models" / NAME
    assert sum(p.stat().st_size for p in embedded.rglob("*") if p.is_file()) <= 15 * 2 ** 20
    entry = json.loads((ROOT / "Resources" / "models.json").read_text())["models"][NAME]
    assert "small demonstration" in entry["description"] and "not for diagnosis" in entry["description"]


def test_demo_model_synthesizes_a_better_lateral_than_the_source(pipe):
    from SVDRRLogic.pipelines import normalize_source
    assert pipe.resolution == RES
    pa, lateral = drrs(7, [(0.0, 0.0), (90.0, 0.0)])
    out = pipe(pa, [(90.0, 0.0)], num_inference_steps=20, guidance_scale=3.0, generator=0).images
    again = pipe(pa, [(90.0, 0.0)], num_inference_steps=20, guidance_scale=3.0, generator=0).images
    assert out.shape == (1, RES, RES) and np.isfinite(out).all()
    np.testing.assert_allclose(out, again, atol=1e-5)
    truth = (normalize_source(lateral, RES)[0, 0].numpy() + 1) / 2      # as training.svdrr.evaluate compares
    source = (normalize_source(pa, RES)[0, 0].numpy() + 1) / 2
    synth = np.clip(out[0], 0, 1)
    assert psnr(synth, truth) > psnr(source, truth) + 1.0
