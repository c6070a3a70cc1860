"""Converting the DVG-Diffusion authors' checkpoints into a model folder, on checkpoint files these tests write in
the authors' formats (a Lightning VQ-GAN ``.ckpt`` and a diffusion milestone ``{"step", "model", "ema",
"scaler"}``), with tiny networks: tensors arrive intact under our names, pickled objects are refused, and a
mismatch leaves nothing behind."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="diffusers is not installed")

from SVDRRLogic.cli import main  # noqa: E402
from SVDRRLogic.models.dvg import CONFIGS, build_dvg, load_dvg  # noqa: E402
from SVDRRLogic.models.dvg_convert import (FINESTAGE_PREFIXES, convert_dvg_release, read_checkpoint,  # noqa: E402
                                           read_part)
from SVDRRLogic.models.svdrr import ModelLoadError  # noqa: E402


class Opaque:
    """Stands for a non-tensor object in a pickle (e.g. an OmegaConf config in Lightning hyper-parameters)."""


def finestage_state(parts, ema_offset=0.0) -> dict:
    """The authors' FineStage state dict: every network under its attribute name, plus schedule buffers."""
    state = {"betas": torch.linspace(0, 1, 10), "perceptual_model.scaling_layer.shift": torch.zeros(1, 3, 1, 1)}
    for part, module in parts.modules().items():
        for key, value in module.state_dict().items():
            state[FINESTAGE_PREFIXES[part] + key] = value + ema_offset if value.is_floating_point() else value
    return state


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A milestone whose EMA copy differs from its live weights, and a separate Lightning VPGE checkpoint."""
    folder = tmp_path_factory.mktemp("release")
    parts, vpge = build_dvg("tiny", seed=1), build_dvg("tiny", seed=2).vpge
    torch.save({"step": 7, "scaler": {"scale": 65536.0}, "model": finestage_state(parts, 1.0),
                "ema": finestage_state(parts)}, folder / "DVG_Diffusion.pt")
    lightning = dict(vpge.state_dict())
    lightning["image_discriminator.model0.0.weight"] = torch.zeros(8, 1, 4, 4)
    torch.save({"state_dict": lightning, "epoch": 3, "global_step": 10}, folder / "VPGE_0_90_VQGAN.ckpt")
    return folder, parts, vpge


def test_release_converts_into_a_loadable_folder(release, tmp_path):
    folder, parts, vpge = release
    out = convert_dvg_release(tmp_path / "dvg", folder / "DVG_Diffusion.pt", vpge=folder / "VPGE_0_90_VQGAN.ckpt",
                              config="tiny")
    loaded = load_dvg(out)
    expected = {**parts.modules(), "vpge": vpge}
    for part, module in loaded.modules().items():
        for key, value in expected[part].state_dict().items():
            assert torch.equal(module.state_dict()[key], value), (part, key)   # the EMA copy, not the live one


def test_cli_converts_the_release(release, tmp_path, capsys):
    folder, _parts, _vpge = release
    assert main(["models", "convert-dvg", str(folder / "DVG_Diffusion.pt"), "--config", "tiny",
                 "-o", str(tmp_path / "dvg")]) == 0
    assert (tmp_path / "dvg" / "denoiser.safetensors").exists()
    assert main(["models", "convert-dvg", str(folder / "DVG_Diffusion.pt"), "-o", str(tmp_path / "paper")]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and len(err.strip().splitlines()) == 1     # tiny weights, paper networks
    assert not (tmp_path / "paper").exists()


def test_coarse_file_and_dataparallel_names(tmp_path):
    coarse = build_dvg("tiny", seed=3).coarse
    path = tmp_path / "NewView_Coarse_Model.pt"
    torch.save({"model": {f"fit_model.module.{k}": v for k, v in coarse.state_dict().items()}}, path)
    state = read_part(path, "coarse")
    assert state.keys() == coarse.state_dict().keys()


def test_prefix_selection_and_shared_storage(tmp_path):
    shared = torch.arange(12.0).reshape(3, 4)
    ckpt = tmp_path / "model-5.pt"
    torch.save({"step": 5, "ema": {"fine_model.w": shared, "fine_model.tied": shared, "fine_model.row": shared[1],
                                   "fine_model.t": shared.T, "vqgan.codebook.N": torch.ones(3)}}, ckpt)
    state = read_checkpoint(ckpt, prefix="ema.fine_model.")
    assert {k: tuple(v.shape) for k, v in state.items()} == {"w": (3, 4), "tied": (3, 4), "row": (4,), "t": (4, 3)}
    pointers = {v.untyped_storage().data_ptr() for v in state.values()}
    assert len(pointers) == 4 and all(v.is_contiguous() for v in state.values())   # what safetensors needs
    assert torch.equal(state["t"], shared.T) and torch.equal(state["row"], shared[1])
    with pytest.raises(ModelLoadError, match="no tensors under prefix 'ema.nothing.'.*ema"):
        read_checkpoint(ckpt, prefix="ema.nothing.")


def test_checkpoints_with_objects_or_damage_are_refused(tmp_path):
    ckpt = tmp_path / "vq_gan.ckpt"
    torch.save({"state_dict": build_dvg("tiny").vpge.state_dict(), "hyper_parameters": {"cfg": Opaque()}}, ckpt)
    with pytest.raises(ModelLoadError, match=r"non-tensor objects \(.*Opaque\).*re-save") as info:
        read_checkpoint(ckpt)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="not found"):
        read_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="unreadable checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ModelLoadError, match="non-tensor"):
        convert_dvg_release(tmp_path / "out", ckpt, config="tiny")
    assert not (tmp_path / "out").exists()
    assert CONFIGS["tiny"]["grid"] == 16
