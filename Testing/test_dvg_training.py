"""DVG-Diffusion training (training/dvg): the tiny configuration on one 16^3 phantom. Every stage overfits it, the
training inputs equal what the pipeline computes, resuming continues the step count and reproduces an
uninterrupted run bit for bit, the exported folder loads and reconstructs, and bad configs or run folders are
one-line errors. About 30 s on a CPU, one thread."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("accelerate", reason="accelerate is not installed")
pytest.importorskip("yaml", reason="PyYAML is not installed")
pytest.importorskip("monai", reason="MONAI is not installed")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # training/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))

from training.dvg import export as dvg_export  # noqa: E402
from training.dvg import train as dvg_train  # noqa: E402
from training.dvg.config import STAGES  # noqa: E402
from training.dvg.data import batch_indices  # noqa: E402

TINY = str(ROOT / "training" / "configs" / "dvg-tiny.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cases(folder: Path, count: int = 1) -> Path:
    """Chest phantoms preprocessed onto the tiny model's 16^3 grid, all in the train split."""
    from training.recon.preprocess import phantom_sources, preprocess
    preprocess(phantom_sources(count, 0, (32, 48, 48)), folder, 16, dtype="float32", test_fraction=0.0)
    return folder


def train(cases, out, *args):
    return dvg_train.main(["--config", TINY, "--cases", str(cases), "--out", str(out), *args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvg")
    cases = make_cases(root / "cases")
    out = root / "run"
    assert train(cases, out, "--stage", "all") == 0
    # the uninterrupted diffusion stage at its end, before a test extends it
    shutil.copytree(out, root / "straight")
    return cases, out, root


def _summary(out, stage):
    return json.loads((out / stage / "done.json").read_text())


def test_every_stage_overfits_one_phantom_and_writes_its_weights(run):
    _, out, _ = run
    files = {"ct_vqgan": ["ct_vqgan"], "vpge": ["vpge"], "coarse": ["coarse"], "vpge_new": ["vpge_new"],
             "diffusion": ["denoiser", "denoiser_ema"]}
    for stage in STAGES:
        s = _summary(out, stage)
        assert s["start_step"] == 0 and s["last_logged_loss"] < 0.7 * s["first_logged_loss"], s
        records = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(10, s["step"] + 1, 10))
        assert all(np.isfinite(r["loss"]) and r["seconds_per_step"] > 0 for r in records)
        assert all((out / stage / f"{name}.safetensors").is_file() for name in files[stage])
        # total_limit 2: the two newest checkpoints, the last one at the end
        assert [p.name for p in sorted((out / stage).glob("checkpoint-*"), key=lambda p: int(p.name[11:]))] == \
            [f"checkpoint-{s['step'] - 20}", f"checkpoint-{s['step']}"]
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["model"] == "tiny" and run_info["config_name"] == "dvg-tiny"


def test_all_skips_finished_stages(run, capsys):
    cases, out, _ = run
    assert train(cases, out, "--stage", "all") == 0
    assert capsys.readouterr().out == ""          # no stage ran, so no summaries


def test_resume_continues_and_matches_an_uninterrupted_run(run):
    from safetensors.torch import load_file
    cases, out, root = run
    # continue the finished diffusion stage (60 steps) to 80
    assert train(cases, out, "--stage", "diffusion", "--resume", "--set", "diffusion.steps=80") == 0
    s = _summary(out, "diffusion")
    assert (s["start_step"], s["step"]) == (60, 80)
    steps = [json.loads(line)["step"] for line in (out / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40, 50, 60, 70, 80]
    # replay steps 41..60 from checkpoint-40: weights, optimizer, EMA and data order are all restored
    replay = root / "replay"
    shutil.copytree(root / "straight", replay)
    shutil.rmtree(replay / "diffusion" / "checkpoint-60")
    (replay / "diffusion" / "done.json").unlink()
    assert train(cases, replay, "--stage", "diffusion", "--resume") == 0
    assert _summary(replay, "diffusion")["start_step"] == 40
    for name in ("denoiser", "denoiser_ema"):
        a = load_file(str(root / "straight" / "diffusion" / f"{name}.safetensors"))
        b = load_file(str(replay / "diffusion" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_export_loads_in_the_pipeline_and_reconstructs(run):
    from SVDRRLogic.pipelines.dvg import DVGReconstructionPipeline
    from SVDRRLogic.recon_grid import XRAYSYN_FRONTAL, XRAYSYN_LATERAL, ReconGrid, xraysyn_view
    from training.recon.evaluate import METHODS
    cases, _, root = run
    model = root / "model"
    assert dvg_export.main(["--run", str(root / "straight"), "--out", str(model), "--ema"]) == 0
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["kind"] == "dvg" and cfg["training"]["config"] == "dvg-tiny" and cfg["training"]["ema"]
    assert cfg["training"]["steps"]["diffusion"] == 60
    pipe = DVGReconstructionPipeline.from_folder(model, device="cpu")
    grid = ReconGrid(16, (5.0, -10.0, 20.0))
    views = [xraysyn_view(XRAYSYN_FRONTAL), xraysyn_view(XRAYSYN_LATERAL)]
    ct = torch.from_numpy(np.load(cases / "phantom-0000.npy"))
    drrs = grid.project(ct, [grid.geometry(*v) for v in views]).numpy()
    out = pipe(list(drrs), views, center_ras=grid.center_ras, num_inference_steps=3, generator=0)
    assert out.ct.shape == (16, 16, 16) and np.isfinite(out.ct.array_hu).all()
    unit = METHODS["dvg"](str(model), "cpu")(list(drrs[:1]), views[:1], grid)
    assert unit.shape == (16, 16, 16) and 0.0 <= unit.min() and unit.max() <= 1.0
    # the model has memorized its one phantom: far closer to it than an empty volume is
    assert np.abs(unit - ct.numpy()).mean() < 0.5 * np.abs(ct.numpy()).mean()


def test_training_inputs_are_the_pipelines(tmp_path):
    """V_bp, z_in and z_new as the stages read them equal the pipeline's own intermediate values (random
    networks: the derivation is checked, not the training)."""
    from SVDRRLogic.models.dvg import build_dvg
    from SVDRRLogic.pipelines.dvg import DVGReconstructionPipeline, xraysyn_back_project
    from training.dvg.data import Cases, Conditioner
    cases = Cases(make_cases(tmp_path / "cases"), "train", 16)
    parts = build_dvg("tiny", seed=3)
    pipe = DVGReconstructionPipeline.from_components(parts)
    cond = Conditioner(cases, parts.config, torch.device("cpu"), cache=True)
    cond.nets.update(parts.modules())
    captured = []
    pipe.denoiser.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    for count in (1, 2):
        views = [(g.azimuth, g.elevation) for g in cond.views[count]]
        drrs = cond.grid.project(cases.volume(0), cond.views[count]).numpy()
        prep = pipe.prepare(list(drrs), views, None, 0)
        assert torch.equal(cond.back_projection(0, count)[0],
                           xraysyn_back_project(prep.grid, prep.images, prep.views))
        captured.clear()
        out = pipe(list(drrs), views, num_inference_steps=1, generator=0)
        c = parts.config["ct_vqgan"]["embedding_dim"]
        assert torch.equal(captured[0][0, :c], cond.z_in(0, count))
        assert torch.equal(captured[0][0, c:2 * c], cond.z_new(0, count))
        image = torch.from_numpy(out.intermediates["new_view"].array)[None]
        assert torch.allclose(cond.new_view_back_projection(0, count)[0],
                              xraysyn_back_project(prep.grid, image, [cond.new_view[count]]))


def test_gan_losses_train_both_discriminators(run, tmp_path):
    """The adversarial branch (2-D + 3-D PatchGAN, hinge, feature matching) from step 0, a few steps."""
    from safetensors.torch import load_file
    cases, _, _ = run
    out = tmp_path / "gan"
    assert train(cases, out, "--stage", "ct_vqgan", "--set", "ct_vqgan.steps=4", "--set", "ct_vqgan.gan_start=0",
                 "--set", "ct_vqgan.disc_channels=8", "--set", "logging.every_steps=2") == 0
    record = json.loads((out / "ct_vqgan" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["discriminator"] > 0 and record["feature_matching"] > 0 and record["gan"] != 0
    disc = load_file(str(out / "ct_vqgan" / "checkpoint-4" / "model_1.safetensors"))
    assert any(k.startswith("image.") for k in disc) and any(k.startswith("volume.") for k in disc)


def test_perceptual_loss_without_lpips_is_a_one_line_error(run, tmp_path, capsys, monkeypatch):
    cases, _, _ = run
    monkeypatch.setitem(sys.modules, "lpips", None)        # as on a machine without the package
    assert train(cases, tmp_path / "p", "--stage", "ct_vqgan", "--set", "ct_vqgan.perceptual_weight=4.0") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lpips" in err


@pytest.mark.parametrize("args, message", [
    (["--set", "ct_vqgan.foo=1"], "unknown configuration key 'ct_vqgan.foo'"),
    (["--set", "diffusion.steps=0"], "diffusion.steps and diffusion.batch_size must be integers >= 1"),
    (["--set", "coarse.learning_rate=1e-4"], "write 1.0e-4"),
    (["--set", "model=huge"], "unknown DVG configuration 'huge'"),
    (["--set", "diffusion.ema={decay: 2}"], "diffusion.ema must be null"),
    (["--stage", "everything"], "invalid choice"),
])
def test_config_errors_are_one_line(args, message, tmp_path, capsys):
    stage = [] if "--stage" in args else ["--stage", "ct_vqgan"]
    assert train(tmp_path / "cases", tmp_path / "run", *stage, *args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_run_folder_errors_are_one_line(run, tmp_path, capsys):
    cases, out, _ = run
    checks = [
        (train(cases, tmp_path / "new", "--stage", "coarse"), "needs the finished stage(s) ct_vqgan, vpge"),
        (train(cases, out, "--stage", "diffusion", "--set", "diffusion.steps=500"), "pass --resume"),
        (train(cases, out, "--stage", "all", "--set", "model=demo"), "another network configuration"),
        (train(tmp_path / "nowhere", tmp_path / "x", "--stage", "ct_vqgan"), "not a preprocessed case folder"),
        (dvg_export.main(["--run", str(tmp_path / "new"), "--out", str(tmp_path / "m")]), "not finished"),
    ]
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == len(checks)
    for (rc, message), err in zip(checks, errors):
        assert rc == 2 and message in err, err


def test_batches_cover_every_case_once_per_epoch():
    """Each process of a multi-GPU run walks through its own share of the cases, once per epoch."""
    world, batch, n = 3, 2, 12
    for rank in range(world):
        for first in (0, 2):
            epoch = [i for step in range(first, first + 2) for i in batch_indices(0, step, rank, world, batch, n)]
            assert sorted(epoch) == list(range(rank, n, world))
    assert batch_indices(0, 5, 1, world, batch, n) == batch_indices(0, 5, 1, world, batch, n)
    assert sorted(batch_indices(0, 0, 2, world, 2, 2)) == [0, 1]        # fewer cases than processes: all share all
