"""3D patch EDM (Yoon et al.): the preconditioning and the loss against hand-computed values, the Heun sampler
against analytic denoisers, slab coordinates and reassembly, the pipeline end to end on a tiny random model
(geometry, determinism, view channels, refusals), and a tiny training run that overfits one phantom, resumes,
and exports a folder the pipeline and the evaluation factory load. All on the CPU in seconds."""
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("monai", reason="monai is not installed")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # training/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))

from SVDRRLogic.images import ImageError, XRayImage  # noqa: E402
from SVDRRLogic.models.patch_edm import (CONFIGS, EDMDenoiser, SlabDenoiser, assemble_slabs,  # noqa: E402
                                         build_patch_edm, create_random, edm_loss, heun_sample, karras_sigmas,
                                         load_patch_edm, parameter_count, resolve_config, sample_sigmas,
                                         slab_coordinates, slab_starts, slab_weights, split_slabs)
from SVDRRLogic.models.svdrr import ModelLoadError  # noqa: E402
from SVDRRLogic.pipelines.patch_edm import PatchEDMReconstructionPipeline, view_channels  # noqa: E402
from SVDRRLogic.recon_grid import ReconGrid, hu_to_unit  # noqa: E402

TINY_CONFIG = ROOT / "training" / "configs" / "patch-edm-tiny.yaml"
FRONTAL, LATERAL = (0.0, 0.0), (90.0, 0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(torch.nn.Module):
    """A stand-in U-Net that records its input and noise label and returns a constant F."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.value, self.calls = value, []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return torch.full_like(x[:, :1], self.value)


# -- preconditioning, loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma, c_skip, c_out, c_in", [
    (0.5, 0.5, 0.3535534, 1.4142136),                       # sigma = sigma_data
    (2.0, 0.25 / 4.25, 1.0 / math.sqrt(4.25), 1.0 / math.sqrt(4.25)),
])
def test_preconditioning_coefficients(sigma, c_skip, c_out, c_in):
    unet = Recorder(value=1.0)
    den = EDMDenoiser(unet, resolve_config("tiny"))
    x = torch.full((1, 1, 2, 3, 3), 2.0)
    cond = torch.stack([torch.full((2, 3, 3), 0.25), torch.full((2, 3, 3), 0.75)])[None]
    coord = torch.tensor([-1.0, 1.0]).view(1, 1, 2, 1, 1)
    d = den(x, sigma, cond, coord)
    assert torch.allclose(d, torch.full_like(x, c_skip * 2.0 + c_out * 1.0), atol=1e-6)
    inputs, t = unet.calls[0]
    assert inputs.shape == (1, 4, 2, 3, 3)
    assert torch.allclose(inputs[:, 0], torch.full((1, 2, 3, 3), 2.0 * c_in), atol=1e-6)
    assert torch.equal(inputs[:, 1:3], cond)                 # the views are not scaled by c_in
    assert torch.equal(inputs[0, 3, :, 0, 0], torch.tensor([-1.0, 1.0])) and inputs[0, 3].std(dim=(1, 2)).max() == 0
    assert t.shape == (1,) and t.item() == pytest.approx(math.log(sigma) / 4, abs=1e-6)


def test_loss_weight_and_perfect_denoiser():
    x0 = torch.rand((2, 1, 4, 5, 5), generator=torch.Generator().manual_seed(0))
    cond, coord = torch.zeros((2, 2, 4, 5, 5)), torch.zeros((2, 1, 4, 1, 1))
    sigma = torch.tensor([0.5, 2.0])
    assert edm_loss(lambda x, s, c, p: x0, x0, cond, coord).item() == 0.0
    zero = edm_loss(lambda x, s, c, p: torch.zeros_like(x), x0, cond, coord, sigma=sigma)
    weights = [(0.25 + 0.25) / (0.5 * 0.5) ** 2, (4.0 + 0.25) / (2.0 * 0.5) ** 2]   # 8 and 4.25
    expected = sum(w * x0[i].square().mean().item() for i, w in enumerate(weights)) / 2
    assert zero.item() == pytest.approx(expected, rel=1e-6)
    # a denoiser that returns its noisy input: lambda sigma^2 E[n^2] = (sigma^2 + sd^2) / sd^2 = 2 at sigma = sd
    big = torch.zeros((1, 1, 40, 40, 40))
    ident = edm_loss(lambda x, s, c, p: x, big, cond[:1], coord[:1], sigma=torch.tensor([0.5]),
                     generator=torch.Generator().manual_seed(1))
    assert ident.item() == pytest.approx(2.0, rel=0.02)


def test_training_sigmas_are_log_normal():
    ln = sample_sigmas(40000, -1.2, 1.2, torch.Generator().manual_seed(0)).log()
    assert ln.mean().item() == pytest.approx(-1.2, abs=0.03) and ln.std().item() == pytest.approx(1.2, abs=0.03)


# -- sampler -------------------------------------------------------------------------------------------------------


def test_karras_sigma_grid():
    s = karras_sigmas(CONFIGS["tiny"], 18)
    assert len(s) == 19 and s[-1] == 0 and s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    i, n = 7, 18                # EDM eq. 5: (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho
    edm = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(edm, rel=1e-6)


def test_heun_returns_a_point_mass_exactly():
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma)
        return torch.full_like(x, 0.3)
    out = heun_sample(denoiser, torch.randn(4, 1, 3, 3, 3, generator=torch.Generator().manual_seed(0)),
                      karras_sigmas(CONFIGS["tiny"], 18))
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-9)
    assert len(calls) == 2 * 18 - 1                          # no correction on the last step (to sigma 0)


def test_heun_solves_the_probability_flow_of_a_gaussian():
    """Data N(mu, s^2): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the ODE maps sigma_max z to
    mu + (sigma_max z - mu) s / sqrt(s^2 + sigma_max^2); Heun converges to it at second order."""
    mu, s = 0.2, 0.1
    z = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    exact = mu + (80.0 * z.double() - mu) * s / math.sqrt(s * s + 80.0 ** 2)
    errors = {}
    for steps in (18, 40):
        out = heun_sample(lambda x, sig: mu + s * s / (s * s + sig * sig) * (x - mu), z,
                          karras_sigmas(CONFIGS["tiny"], steps))
        errors[steps] = (out - exact).abs().max().item()
    assert errors[40] < 0.01 and errors[40] < errors[18] / 4
    assert out.mean().item() == pytest.approx(mu, abs=0.003) and out.std().item() == pytest.approx(s, rel=0.03)


# -- slabs ---------------------------------------------------------------------------------------------------------


def test_slab_coordinates_are_global():
    full = slab_coordinates(0, 16, 16)
    assert torch.allclose(full, torch.linspace(-1, 1, 16)) and full.dtype == torch.float32
    for start in range(9):
        assert torch.equal(slab_coordinates(start, 8, 16), full[start:start + 8])


def test_split_and_assemble_is_lossless():
    assert slab_starts(16, 8, 2) == [0, 6, 8] and slab_starts(16, 16, 4) == [0] and slab_starts(17, 8, 0) == [0, 8, 9]
    w0, w1 = slab_weights(0, 8, 16, 2), slab_weights(6, 8, 16, 2)
    assert w0[0] == 1 and w0[-2:].tolist() == [0.75, 0.25] and w1[:2].tolist() == [0.25, 0.75]
    assert (w0[-2:] + w1[:2]).tolist() == [1.0, 1.0]           # exact overlaps cross-fade
    volume = torch.randn((1, 2, 16, 5, 4), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for thickness, overlap in ((6, 2), (8, 3), (5, 0), (16, 0)):
        slabs = split_slabs(volume, thickness, overlap)
        assert all(s.shape[2] == min(thickness, 16) for _, s in slabs)
        assert torch.allclose(assemble_slabs(slabs, 16, overlap), volume, atol=1e-12)


def pointwise(x, sigma, cond, coord):
    """A denoiser without a receptive field: slab-wise evaluation must equal whole-volume evaluation."""
    return 0.5 * x + cond.sum(1, keepdim=True) + coord * sigma


def test_slab_denoiser_matches_the_whole_volume_and_survives_out_of_memory():
    rng = torch.Generator().manual_seed(0)
    cond = torch.rand((1, 2, 16, 4, 4), dtype=torch.float64, generator=rng)
    x = torch.randn((1, 1, 16, 4, 4), dtype=torch.float64, generator=rng)
    whole = SlabDenoiser(pointwise, cond, 16)(x, 0.7)
    assert torch.equal(whole, pointwise(x, 0.7, cond, slab_coordinates(0, 16, 16).view(1, 1, 16, 1, 1)))
    assert torch.allclose(SlabDenoiser(pointwise, cond, 8, 2)(x, 0.7), whole, atol=1e-12)

    def small_only(x, sigma, cond, coord):
        if x.shape[2] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return pointwise(x, sigma, cond, coord)
    slabs = SlabDenoiser(small_only, cond, 16, 2)
    assert torch.allclose(slabs(x, 0.7), whole, atol=1e-12) and slabs.thickness == 4
    with pytest.raises(torch.cuda.OutOfMemoryError):
        SlabDenoiser(small_only, cond, 16, 8)(x, 0.7)


# -- model folders -------------------------------------------------------------------------------------------------


def test_paper_size_and_configuration_checks():
    assert parameter_count("paper") == 9_826_913             # vs 10.33 M for the authors' SongUNet3D
    cfg = resolve_config("paper")
    assert cfg["unet"]["attention_levels"] == [False, False, False, True] and cfg["grid"] == 128
    assert cfg["views"] == [[0.0, 0.0], [90.0, 0.0]] and cfg["num_inference_steps"] == 500
    with pytest.raises(ValueError, match="multiples of 2"):
        resolve_config({**CONFIGS["tiny"], "patch_slices": 5})
    with pytest.raises(ValueError, match="view_dropout"):
        resolve_config({**CONFIGS["tiny"], "views": [[0.0, 0.0]], "view_dropout": 0.5})


def test_model_folder_round_trip(tmp_path):
    folder = create_random(tmp_path / "m", "tiny", seed=3)
    assert json.loads((folder / "config.json").read_text())["kind"] == "patch-edm"
    loaded = load_patch_edm(folder)
    original = build_patch_edm("tiny", seed=3)
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config == resolve_config("tiny") and not loaded.training
    (folder / "config.json").write_text(json.dumps({"kind": "dvg", "format": 1}))
    with pytest.raises(ModelLoadError, match="not 'patch-edm'"):
        load_patch_edm(folder)


# -- pipeline ------------------------------------------------------------------------------------------------------


def drr_inputs(grid: ReconGrid, unit: np.ndarray, views) -> list[XRayImage]:
    """DRRs of a unit volume at ``views``, carrying their geometry as our renderer's images do."""
    geoms = [grid.geometry(*v) for v in views]
    images = grid.project(torch.from_numpy(unit), geoms).numpy()
    return [XRayImage(a, pixel_spacing=g.pixel[::-1], ijk_to_ras=g.detector_ijk_to_ras,
                      metadata={"geometry": g.to_dict()}, source=f"drr {v}") for a, g, v in zip(images, geoms, views)]


@pytest.fixture(scope="module")
def phantom():
    from SVDRRLogic.phantoms import chest_phantom
    grid = ReconGrid(16, (5.0, -10.0, 20.0))
    ct = chest_phantom((32, 32, 32), (11.0, 11.0, 10.0), seed=2)
    ct.ijk_to_ras[:3, 3] += np.array(grid.center_ras)
    return grid, grid.sample_ct(ct)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return create_random(tmp_path_factory.mktemp("pe") / "tiny")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_folder):
    return PatchEDMReconstructionPipeline.from_folder(tiny_folder, "cpu")


def recording_pipe(folder) -> tuple[PatchEDMReconstructionPipeline, Recorder]:
    """A pipeline whose U-Net is a :class:`Recorder` (F = 0), to see what the network is fed."""
    pipe = PatchEDMReconstructionPipeline.from_folder(folder, "cpu")
    pipe.denoiser.unet = Recorder(value=0.0)
    return pipe, pipe.denoiser.unet


def test_pipeline_end_to_end(tiny_pipe, phantom):
    grid, unit = phantom
    xrays = drr_inputs(grid, unit, [FRONTAL, LATERAL])
    fractions = []
    out = tiny_pipe(xrays, [FRONTAL, LATERAL], generator=7, num_inference_steps=3,
                    callback=lambda f, m: fractions.append(f))
    ct = out.ct
    assert ct.array_hu.shape == (16, 16, 16) and ct.units == "hu" and ct.metadata["synthetic"]
    assert np.allclose(ct.ijk_to_ras, grid.ijk_to_ras)           # centred on the X-rays' isocenter
    assert -1024.0 <= ct.array_hu.min() and ct.array_hu.max() <= 1476.0
    meta = ct.metadata
    assert (meta["method"], meta["seed"], meta["steps"], meta["slab_slices"]) == ("patch-edm", 7, 3, 16)
    assert meta["view_channels"] == [0, 1] and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert [x.metadata["kind"] for x in out.inputs] == ["model input"] * 2
    again = tiny_pipe(xrays, [FRONTAL, LATERAL], generator=torch.Generator().manual_seed(7), num_inference_steps=3)
    assert np.array_equal(again.ct.array_hu, ct.array_hu)
    other = tiny_pipe(xrays, [FRONTAL, LATERAL], generator=8, num_inference_steps=3, keep_intermediates=False)
    assert not np.array_equal(other.ct.array_hu, ct.array_hu) and other.intermediates == {}
    # the spread back-projections, as unit values on the grid
    images = torch.from_numpy(np.stack([x.array for x in out.inputs]))
    spread = grid.back_project(images, [grid.geometry(*v) for v in (FRONTAL, LATERAL)], spread=True).numpy()
    for i in range(2):
        bp = out.intermediates[f"back_projection_{i}"]
        assert bp.metadata["quantity"] == "spread back-projection" and bp.metadata["model_channel"] == i
        assert np.allclose(hu_to_unit(bp.array_hu), spread[i], atol=1e-4)


def test_pipeline_feeds_slabs_with_global_coordinates(tiny_folder, phantom):
    grid, unit = phantom
    xrays = drr_inputs(grid, unit, [LATERAL, FRONTAL])             # order of the inputs does not matter
    pipe, recorder = recording_pipe(tiny_folder)
    out = pipe(xrays, [LATERAL, FRONTAL], generator=0, patch_slices=7)
    meta = out.ct.metadata
    assert (meta["slab_slices"], meta["view_channels"], meta["steps"]) == (8, [1, 0], 12)
    assert len(recorder.calls) == 3 * (2 * 12 - 1)
    first = recorder.calls[:3]                                     # slabs 0, 6, 8 of the first evaluation
    frontal = hu_to_unit(out.intermediates["back_projection_1"].array_hu)
    full = slab_coordinates(0, 16, 16)
    for (inputs, t), start in zip(first, (0, 6, 8)):
        assert inputs.shape == (1, 4, 8, 16, 16) and t.item() == pytest.approx(math.log(80.0) / 4)
        assert np.allclose(inputs[0, 1].numpy(), frontal[start:start + 8], atol=1e-4)
        assert torch.equal(inputs[0, 3, :, 0, 0], full[start:start + 8])


def test_single_xray_needs_view_dropout(tiny_pipe, phantom, tmp_path):
    grid, unit = phantom
    lateral = drr_inputs(grid, unit, [LATERAL])
    with pytest.raises(ImageError, match="no view dropout"):
        tiny_pipe(lateral, [LATERAL], generator=0)
    pipe, recorder = recording_pipe(create_random(tmp_path / "dropout", {**CONFIGS["tiny"], "view_dropout": 0.5}))
    out = pipe(lateral, [LATERAL], generator=0, num_inference_steps=1)
    assert out.ct.metadata["view_channels"] == [1] and list(out.intermediates) == ["back_projection_0"]
    inputs = recorder.calls[0][0]
    assert inputs[0, 1].abs().max() == 0 and inputs[0, 2].abs().max() > 0.5


def test_view_channels_follow_the_beam_line():
    trained = [FRONTAL, LATERAL]
    assert view_channels([(180.0, 0.0), (-90.0, 0.0)], trained) == [0, 1]   # AP and left lateral
    assert view_channels([(90.0, 5.0), (3.0, -4.0)], trained) == [1, 0]
    with pytest.raises(ImageError, match="same model view"):
        view_channels([(0.0, 0.0), (10.0, 0.0)], trained)
    with pytest.warns(UserWarning, match="extrapolation"):
        view_channels([(40.0, 0.0)], trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        view_channels([(15.0, 0.0)], trained)


# -- training ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from training.recon.preprocess import phantom_sources, preprocess
    root = tmp_path_factory.mktemp("cases") / "recon-16"
    preprocess(phantom_sources(1, 0, (32, 32, 32)), root, size=16)
    return root


def test_slab_batches(cases):
    from training.patch_edm.data import SlabBatches
    cfg = {**resolve_config("tiny"), "view_dropout": 0.5}
    data = SlabBatches(cases, "train", cfg, seed=1)
    batch = data.batch(3, 6)
    assert batch["x0"].shape == (6, 1, 8, 16, 16) and batch["cond"].shape == (6, 2, 8, 16, 16)
    assert batch["coord"].shape == (6, 1, 8, 1, 1) and batch["x0"].dtype == torch.float32
    assert torch.equal(data.batch(3, 6)["cond"], batch["cond"])         # seeded by step
    volume, cond = data.case(0)
    for b in range(6):                                                   # each slab at its global coordinates
        start = round((batch["coord"][b, 0, 0, 0, 0].item() + 1) / 2 * 15)
        assert torch.equal(batch["x0"][b, 0], volume[start:start + 8].float())
        assert torch.equal(batch["coord"][b, 0, :, 0, 0], slab_coordinates(start, 8, 16))
    dropped = [b for b in range(6) if batch["cond"][b].flatten(1).amax(1).min() == 0]
    assert 0 < len(dropped) < 6                                          # one view zeroed, at random
    assert 0.0 <= cond.min() and cond.max() <= 1.0
    with pytest.raises(SystemExit, match="--size 64"):
        SlabBatches(cases, "train", resolve_config("demo"))


def test_tiny_training_overfits_resumes_and_exports(cases, tmp_path, phantom):
    from training.recon.evaluate import METHODS
    from training.patch_edm.train import main
    run = tmp_path / "run"
    args = ["--config", str(TINY_CONFIG), "--cases", str(cases), "--out", str(run),
            "--set", "logging.every_steps=15", "--set", "checkpoint.every_steps=75"]
    assert main([*args, "--set", "train.max_train_steps=150"]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 150 and summary["last_logged_loss"] < 0.6 * summary["first_logged_loss"]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-150", "checkpoint-75"]
    assert main([*args, "--set", "train.max_train_steps=160", "--resume"]) == 0
    resumed = json.loads((run / "train_summary.json").read_text())
    assert (resumed["start_step"], resumed["global_step"]) == (150, 160)
    assert resumed["resumed_from"].endswith("checkpoint-150")
    pipe = PatchEDMReconstructionPipeline.from_folder(run / "final-model", "cpu")
    assert pipe.model_config == resolve_config("tiny")
    grid, unit = phantom
    reconstruct = METHODS["patch-edm"](str(run / "final-model"), "cpu")
    volume = reconstruct([x.array for x in drr_inputs(grid, unit, [FRONTAL, LATERAL])], [FRONTAL, LATERAL], grid)
    assert volume.shape == (16, 16, 16) and 0.0 <= volume.min() and volume.max() <= 1.0
    coarse = ReconGrid(8, grid.center_ras)
    assert reconstruct(drr_inputs(grid, unit, [FRONTAL, LATERAL]), [FRONTAL, LATERAL], coarse).shape == (8, 8, 8)
