"""SV-DRR training on the CPU: dataset rendering (layout, manifest, split, resume), the IDDPM VLB term against a
brute-force KL, SSIM/PSNR against hand-computed values, a tiny training run that overfits a few pairs, checkpoint
resume, the exported folder loading with SVDRRPipeline.from_folder, and a tiny evaluation with the baseline rows.
"""
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("accelerate", reason="accelerate is not installed")
pytest.importorskip("yaml", reason="PyYAML is not installed")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # training/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))
TINY = ROOT / "training" / "configs" / "tiny.yaml"

from training.svdrr import render_dataset as rd  # noqa: E402
from training.svdrr.ct_sources import discover  # noqa: E402
from training.svdrr.diffusion import LearnedRangeDiffusion  # noqa: E402
from training.svdrr.manifest import AUTHORS_TEST_IDS, assign_split, read_manifest  # noqa: E402
from training.svdrr.metrics import gaussian_window, psnr, ssim  # noqa: E402
from training.svdrr.objective import dropout_masks  # noqa: E402

PHANTOM_ARGS = ["--phantoms", "3", "--phantom-shape", "40,64,64", "--phantom-spacing", "9,9,8", "--resolution", "32",
                "--hemisphere", "8", "--arc", "-90:90:45"]


# -- dataset rendering --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("drr") / "data"
    assert rd.main([*PHANTOM_ARGS, "--out", str(root)]) == 0
    return root


def test_dataset_layout_and_manifest(dataset):
    manifest = read_manifest(dataset)
    ids = [p["id"] for p in manifest["patients"]]
    assert ids == ["phantom-0000", "phantom-0001", "phantom-0002"] and not manifest["failed"]
    assert sorted(manifest["splits"]["train"] + manifest["splits"]["test"]) == ids
    assert len(manifest["splits"]["test"]) == 1 and "hash fraction" in manifest["split_rule"]
    assert manifest["settings"]["resolution"] == 32 and manifest["settings"]["hu_model"] == "diffdrr"
    for pid in ids:
        views = json.loads((dataset / pid / "views.json").read_text())
        assert len(views["views"]) == 8 + 5 and views["source_index"] == 0
        pa = views["views"][0]
        assert (pa["file"], pa["set"], pa["azimuth"], pa["elevation"]) == ("0000.png", "hemisphere", 0.0, 0.0)
        assert [v["azimuth"] for v in views["views"] if v["set"] == "arc"] == [-90.0, -45.0, 0.0, 45.0, 90.0]
        assert views["geometry"]["detector"] == [32, 32]
        assert views["geometry"]["pixel"] == pytest.approx([358.4 / 32] * 2)
        assert views["geometry"]["sdd"] == 1800.0 and views["geometry"]["sad"] == 1650.0
        for v in views["views"]:
            assert (dataset / pid / v["file"]).is_file()
    from SVDRRLogic.io import load_xray
    xray = load_xray(dataset / "phantom-0000" / "arc" / "az+045.0_el+00.0.png")
    assert xray.array.shape == (32, 32) and xray.array.min() == 0.0 and xray.array.max() == 1.0
    assert xray.pixel_spacing == pytest.approx((11.2, 11.2)) and xray.metadata["synthetic"]
    assert xray.metadata["geometry"]["azimuth"] == 45.0


def test_rendering_resumes_without_redoing_patients(dataset, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished patient was rendered again")
    monkeypatch.setattr(rd, "render_patient", refuse)
    assert rd.main([*PHANTOM_ARGS, "--out", str(dataset)]) == 0


def test_split_uses_the_authors_held_out_patients():
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 1013)]
    split, rule = assign_split(ids)
    assert sorted(i for i, s in split.items() if s == "test") == sorted(AUTHORS_TEST_IDS)
    assert "authors" in rule
    few, _ = assign_split(["LIDC-IDRI-0001", "LIDC-IDRI-0030", "LIDC-IDRI-0002"])
    assert few == {"LIDC-IDRI-0001": "train", "LIDC-IDRI-0002": "train", "LIDC-IDRI-0030": "test"}
    other, _ = assign_split([f"case{i}" for i in range(200)], test_fraction=0.1)
    n_test = sum(s == "test" for s in other.values())
    assert 8 <= n_test <= 35 and other == assign_split(reversed([f"case{i}" for i in range(200)]))[0]


def test_discovery_of_nifti_layouts(tmp_path):
    from SVDRRLogic.io import write_ct
    from SVDRRLogic.phantoms import chest_phantom
    ct = chest_phantom(shape=(4, 8, 8), spacing=(40, 40, 45), seed=0)
    (tmp_path / "nii" / "LIDC-IDRI-0007").mkdir(parents=True)
    (tmp_path / "nii" / "case-b").mkdir(parents=True)
    write_ct(tmp_path / "nii" / "LIDC-IDRI-0007" / "ct.nii.gz", ct)
    write_ct(tmp_path / "nii" / "case-b" / "volume.nii.gz", ct)
    write_ct(tmp_path / "loose.nrrd", ct)
    found = {s.patient_id: s.kind for s in discover(tmp_path)}
    assert found == {"LIDC-IDRI-0007": "volume", "case-b": "volume", "loose": "volume"}


# -- the objective ------------------------------------------------------------------------------------------


def brute_force_vlb(x0, x_t, t, eps_hat, v):
    """The VLB term from first principles in float64: schedule by explicit products, q(x_{t-1} | x_t, x0) by
    Bayes' rule, the model's Gaussian from x0_hat and the learned-range variance, and the KL (t > 0) by numerical
    integration of p log(p/q) on a fine grid, or the t = 0 bin probability by integrating the density."""
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)

    def posterior(x0_, xt_, step):
        """Mean and variance of q(x_{step-1} | x_step, x0) by completing the square."""
        prev = abar[step - 1] if step > 0 else 1.0
        if step == 0:
            return x0_, 0.0
        precision = 1.0 / (1.0 - prev) + (1.0 - betas[step]) / betas[step]
        var = 1.0 / precision
        return var * (math.sqrt(prev) * x0_ / (1.0 - prev) + math.sqrt(1.0 - betas[step]) * xt_ / betas[step]), var

    out = []
    for b in range(x0.shape[0]):
        s = int(t[b])
        x0_b, xt_b = x0[b].double().flatten().numpy(), x_t[b].double().flatten().numpy()
        e_b, v_b = eps_hat[b].double().flatten().numpy(), v[b].double().flatten().numpy()
        x0_hat = (xt_b - math.sqrt(1.0 - abar[s]) * e_b) / math.sqrt(abar[s])
        var_clip = posterior(0.0, 0.0, max(s, 1))[1]
        log_var_p = (v_b + 1) / 2 * math.log(betas[s]) + (1 - (v_b + 1) / 2) * math.log(var_clip)
        sd_p = np.exp(0.5 * log_var_p)
        if s > 0:
            mean_q, var_q = posterior(x0_b, xt_b, s)
            mean_p, _ = posterior(x0_hat, xt_b, s)
            sd_q = math.sqrt(var_q)
            grid = mean_q[:, None] + sd_q * np.linspace(-14, 14, 40001)[None, :]
            log_q = -0.5 * ((grid - mean_q[:, None]) / sd_q) ** 2 - math.log(sd_q * math.sqrt(2 * math.pi))
            log_p = -0.5 * ((grid - mean_p[:, None]) / sd_p[:, None]) ** 2 - np.log(sd_p[:, None] *
                                                                                     math.sqrt(2 * math.pi))
            kl = np.trapezoid(np.exp(log_q) * (log_q - log_p), grid, axis=1)
            out.append(kl.mean() / math.log(2))
        else:
            mean_p = x0_hat
            cdf = np.vectorize(lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))))
            hi = np.where(x0_b > 0.999, 1.0, cdf((x0_b + 1 / 255 - mean_p) / sd_p))
            lo = np.where(x0_b < -0.999, 0.0, cdf((x0_b - 1 / 255 - mean_p) / sd_p))
            out.append(-np.log(hi - lo).mean() / math.log(2))
    return np.array(out)


def test_vlb_term_matches_brute_force_kl():
    diffusion = LearnedRangeDiffusion(1000, 1e-4, 0.02)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 7, 120, 500, 999])
    x0 = torch.randn(5, 2, 3, 3, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = diffusion.q_sample(x0, t, noise)
    eps_hat = noise + 0.3 * torch.randn(x0.shape, generator=g)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    ours = diffusion.vlb_bits(x0, x_t, t, eps_hat, v).double().numpy()
    ref = brute_force_vlb(x0, x_t, t, eps_hat, v)
    assert np.all(ref > 0)
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-6)


def test_vlb_decoder_term_at_t0_matches_bin_probability():
    diffusion = LearnedRangeDiffusion()
    g = torch.Generator().manual_seed(1)
    t = torch.zeros(3, dtype=torch.long)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 1.6 - 0.8
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0     # the open-ended edge bins
    noise = torch.randn(x0.shape, generator=g)
    x_t = diffusion.q_sample(x0, t, noise)
    eps_hat = noise + 0.5 * torch.randn(x0.shape, generator=g)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    ours = diffusion.vlb_bits(x0, x_t, t, eps_hat, v).double().numpy()
    # IDDPM evaluates the normal CDF with a tanh approximation (error < 3e-4): agreement to a few per mille
    np.testing.assert_allclose(ours, brute_force_vlb(x0, x_t, t, eps_hat, v), rtol=1e-2)


def test_loss_is_mse_plus_vb_and_vb_trains_only_the_variance():
    diffusion = LearnedRangeDiffusion()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 2, 2, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 3, 300, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    out = torch.randn(4, 8, 2, 2, generator=g, requires_grad=True)
    terms = diffusion.training_losses(out, x0, x_t, noise, t)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    assert torch.allclose(terms["mse"], ((out[:, :4] - noise) ** 2).mean(dim=(1, 2, 3)))
    terms["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0


def test_schedule_is_iddpm_linear():
    d = LearnedRangeDiffusion()
    assert d.tables["betas"][0] == pytest.approx(1e-4) and d.tables["betas"][-1] == pytest.approx(0.02)
    assert np.all(np.diff(d.tables["betas"]) > 0) and len(d.tables["betas"]) == 1000
    # the learned-range endpoints: log beta_t and the clipped posterior log-variance (t = 0 takes t = 1's value)
    assert d.tables["posterior_log_variance_clipped"][0] == d.tables["posterior_log_variance_clipped"][1]


def test_conditioning_dropout_fractions():
    g = torch.Generator().manual_seed(0)
    keep_embed, keep_source = dropout_masks(200000, 0.05, "cpu", g)
    drop_e, drop_s = keep_embed == 0, keep_source == 0
    assert drop_e.float().mean().item() == pytest.approx(0.10, abs=0.003)
    assert drop_s.float().mean().item() == pytest.approx(0.10, abs=0.003)
    assert (drop_e & drop_s).float().mean().item() == pytest.approx(0.05, abs=0.003)


# -- metrics --------------------------------------------------------------------------------------------------


def test_psnr_and_ssim_against_hand_computed_values():
    a, b = torch.full((1, 16, 16), 0.2), torch.full((1, 16, 16), 0.6)
    assert psnr(torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.1)).item() == pytest.approx(20.0, abs=1e-4)
    # constant images: no variance, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) = 0.2401 / 0.4001
    assert ssim(a, b).item() == pytest.approx(0.2401 / 0.4001, abs=1e-6)
    assert ssim(b, b).item() == pytest.approx(1.0, abs=1e-6)
    # one 11 x 11 window, written out: Gaussian weights, weighted means, variances and covariance
    rng = np.random.default_rng(0)
    x, y = rng.random((11, 11)), rng.random((11, 11))
    y = 0.6 * x + 0.4 * y
    r = np.arange(11) - 5.0
    w1 = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w1, w1) / np.outer(w1, w1).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    hand = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None]).item() == pytest.approx(hand, abs=1e-6)
    assert gaussian_window().sum().item() == pytest.approx(1.0)


# -- training, resume, export, evaluation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(dataset, tmp_path_factory):
    from training.svdrr.config import load_config
    from training.svdrr.train import Trainer
    out = tmp_path_factory.mktemp("run") / "tiny"
    # 72 pairs per epoch = 9 steps: checkpoints at 100 and 120 fall mid-epoch, so resuming skips batches
    overrides = [f"data.root={dataset}", f"checkpoint.output_dir={out}", "data.generate=null",
                 "data.samples_per_epoch=72", "train.max_train_steps=120", "checkpoint.every_steps=50",
                 "validation.every_steps=50", "validation.num_inference_steps=4", "logging.every_steps=10"]
    # One thread: the tiny model gains little from two, and OpenMP threads spinning on a busy machine can make
    # a step ten times slower. Losses are identical either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = Trainer(load_config(TINY, overrides)).run()
        # the same run again from its step-100 checkpoint, into another folder: must reach the same weights
        replay = Trainer(load_config(TINY, overrides + [f"checkpoint.output_dir={out.parent / 'replay'}",
                                                       "validation.num_patients=0"]),
                         resume=str(out / "checkpoint-100")).run()
        second = Trainer(load_config(TINY, overrides + ["train.max_train_steps=140"]), resume="latest").run()
    finally:
        torch.set_num_threads(threads)
    return out, first, second, replay


def test_tiny_training_overfits_and_checkpoints(tiny_run):
    out, first, _, _ = tiny_run
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log]
    assert steps[:12] == list(range(10, 121, 10))
    assert all(math.isfinite(r["loss"]) for r in log)
    assert first["global_step"] == 120
    assert first["last_logged_loss"] < 0.5 * first["first_logged_loss"], first
    assert (out / "checkpoint-100" / "model.safetensors").is_file()
    assert list((out / "validation" / "step-0000100").glob("*.png"))
    assert list((out / "validation" / "final").glob("*.png"))


def test_resume_continues_the_step_count(tiny_run):
    out, _, second, _ = tiny_run
    assert second["start_step"] == 120 and second["global_step"] == 140
    assert second["resumed_from"].endswith("checkpoint-120")
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps[-2:] == [130, 140]
    assert (out / "checkpoint-140").is_dir()


def test_resumed_training_is_bit_identical_to_uninterrupted(tiny_run):
    """Model, optimizer, schedule, RNG and data order are all restored: resuming at step 100 (mid-epoch) and
    training to 120 gives exactly the weights of the uninterrupted run at 120."""
    from safetensors.torch import load_file
    out, _, _, replay = tiny_run
    assert replay["start_step"] == 100 and replay["global_step"] == 120
    straight = load_file(str(out / "checkpoint-120" / "model.safetensors"))
    resumed = load_file(str(out.parent / "replay" / "checkpoint-120" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_exported_folder_loads_and_samples(tiny_run, dataset):
    from SVDRRLogic.pipelines import SVDRRPipeline
    from training.svdrr.data import read_png
    out, _, second, _ = tiny_run
    final = out / "final-pipeline"
    assert second["export"] == str(final)
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "SvdrrDiTPipeline"
    pipe = SVDRRPipeline.from_folder(final, device="cpu")
    source = read_png(dataset / "phantom-0000" / "0000.png")
    result = pipe(source, [(30.0, 0.0), (-45.0, 10.0)], num_inference_steps=3, generator=0)
    assert result.images.shape == (2, 32, 32) and np.isfinite(result.images).all()
    assert 0.0 <= result.images.min() and result.images.max() <= 1.0


def test_training_inputs_match_the_pipeline_conditioning(dataset):
    """The dataset's images and the training encoder give exactly what the pipeline computes from the PNG."""
    from SVDRRLogic.models import build_svdrr
    from SVDRRLogic.pipelines import SVDRRPipeline
    from training.svdrr.data import SVDRRPairs, read_png
    from training.svdrr.manifest import select_patients
    from training.svdrr.objective import encode_pair
    pairs = SVDRRPairs(dataset, select_patients(read_manifest(dataset), "train"), 32)
    item = pairs[0]
    pipe = SVDRRPipeline.from_components(build_svdrr("tiny", 32))
    source_png = read_png(pairs.patients[0].folder / "0000.png")
    embed, latent = pipe.encode_source(source_png, torch.device("cpu"))
    embed2, latent2, _ = encode_pair(pipe.vae, pipe.image_encoder, item["source"][None], item["target"][None])
    assert torch.allclose(embed, embed2, atol=1e-6) and torch.allclose(latent, latent2, atol=1e-6)


def test_tiny_evaluation_writes_tables_with_baseline(tiny_run, dataset, tmp_path):
    from training.svdrr.evaluate import evaluate
    out, _, _, _ = tiny_run
    report = evaluate(out / "final-pipeline", dataset, tmp_path / "eval", steps=3, hemisphere_max=3, device="cpu")
    md = (tmp_path / "eval" / "metrics.md").read_text()
    for row in ("| arc | svdrr | 4 |", "| arc | source-copy | 4 |", "| hemisphere | svdrr | 3 |",
                "| hemisphere | source-copy | 3 |"):
        assert row in md
    with open(tmp_path / "eval" / "metrics_per_view.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (4 + 3)
    assert all(math.isfinite(float(r["psnr"])) and -1 <= float(r["ssim"]) <= 1 for r in rows)
    summary = {(r["set"], r["method"]): r for r in report["summary"]}
    assert all(math.isfinite(summary[k]["psnr"]) for k in summary)
    with open(tmp_path / "eval" / "metrics_per_angle.csv") as fh:
        angles = {(r["azimuth"], r["method"]) for r in csv.DictReader(fh) if r["set"] == "arc"}
    assert angles == {(f"{a:.1f}", m) for a in (-90, -45, 45, 90) for m in ("svdrr", "source-copy")}


# -- weights of a stage and the configs -------------------------------------------------------------------------


def test_init_from_a_lower_resolution_stage(tmp_path):
    from SVDRRLogic.models import create_random, load_svdrr
    from training.svdrr.model_setup import build_components
    low = create_random(tmp_path / "low", "tiny", 32, seed=3)
    parts, origin = build_components({"architecture": "tiny", "resolution": 64, "init_from": str(low), "seed": 0})
    before = load_svdrr(low)
    assert parts.resolution == 64 and parts.transformer.config.sample_size == 32
    assert parts.transformer.config.interpolation_scale == pytest.approx(2 * before.transformer.config.
                                                                         interpolation_scale)
    for name, tensor in before.transformer.state_dict().items():
        assert torch.equal(parts.transformer.state_dict()[name], tensor), name
    assert torch.equal(parts.cc_projection.projection.weight, before.cc_projection.projection.weight)
    assert origin["transformer"] == str(low) and parts.transformer.training
    assert all(p.requires_grad for p in parts.transformer.parameters())
    assert not any(p.requires_grad for p in parts.vae.parameters())


def test_pixart_init_copies_weights_and_zeroes_the_source_channels(tmp_path):
    """A PixArt-Sigma-shaped transformer (4 input channels, 8 outputs, a T5 caption projection) as the base."""
    from diffusers import PixArtTransformer2DModel

    from SVDRRLogic.models import component_configs
    from training.svdrr.model_setup import build_components
    cfg = dict(component_configs("tiny", 32)["transformer"], in_channels=4, caption_channels=24)
    torch.manual_seed(5)
    pixart = PixArtTransformer2DModel(**cfg)
    pixart.save_pretrained(tmp_path / "pixart" / "transformer")
    parts, origin = build_components({"architecture": "tiny", "resolution": 32, "pixart": str(tmp_path / "pixart"),
                                      "seed": 0})
    ours, theirs = parts.transformer.state_dict(), pixart.state_dict()
    w = ours["pos_embed.proj.weight"]
    assert w.shape[1] == 8 and torch.equal(w[:, :4], theirs["pos_embed.proj.weight"]) and not w[:, 4:].any()
    copied = [k for k in theirs if k in ours and k != "pos_embed.proj.weight"]
    assert copied and all(torch.equal(ours[k], theirs[k]) for k in copied)
    assert any(s.startswith("caption_projection") for s in origin["pixart"]["skipped"])
    assert origin["pixart"]["missing"] == []


@pytest.mark.parametrize("name, resolution, batch, lr, steps", [
    ("svdrr-256", 256, 64, 5e-6, 200000), ("svdrr-512", 512, 32, 3e-6, 100000),
    ("svdrr-1024", 1024, 8, 1e-6, 100000)])
def test_paper_configs_carry_the_papers_hyper_parameters(name, resolution, batch, lr, steps):
    from training.svdrr.config import load_config
    cfg = load_config(ROOT / "training" / "configs" / f"{name}.yaml")
    t = cfg["train"]
    assert cfg["model"]["architecture"] == "paper" and cfg["model"]["resolution"] == resolution
    assert (t["batch_size"], t["learning_rate"], t["max_train_steps"]) == (batch, lr, steps)
    assert (t["lr_warmup_steps"], t["lr_scheduler"], t["cc_projection_lr_scale"]) == (1000, "constant_with_warmup",
                                                                                      10.0)
    assert (t["adam_beta1"], t["adam_beta2"], t["weight_decay"], t["max_grad_norm"]) == (0.9, 0.999, 1e-2, 1.0)
    assert t["conditioning_dropout_prob"] == 0.05
    assert (cfg["model"]["pixart"] is not None) == (resolution == 256)
    assert (cfg["model"]["init_from"] is not None) == (resolution > 256)


def test_config_rejects_unknown_keys():
    from training.svdrr.config import load_config
    with pytest.raises(KeyError, match="train.learnig_rate"):
        load_config(TINY, ["train.learnig_rate=1"])


@pytest.mark.parametrize("kind", ["svdrr", "dvg", "patch-edm"])
def test_building_a_network_leaves_the_callers_random_state_alone(kind):
    """Training seeds each rank before it builds the network: a builder that reseeded the process (CPU or CUDA)
    would hand every GPU the same noise and timesteps."""
    from SVDRRLogic.models import build_svdrr
    from SVDRRLogic.models.dvg import build_dvg
    from SVDRRLogic.models.patch_edm import build_patch_edm

    build = {"svdrr": lambda: build_svdrr("tiny", seed=5).transformer,
             "dvg": lambda: build_dvg("tiny", seed=5).denoiser, "patch-edm": lambda: build_patch_edm("tiny", seed=5)}
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = next(build[kind]().parameters()).detach().clone()
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(7)  # another caller state: the same seed still gives the same weights
    assert torch.equal(next(build[kind]().parameters()), first)
