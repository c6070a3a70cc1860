"""SV-DRR model and pipeline: the paper architecture's names and shapes (on the meta device), the tiny model's
training step, the authors' folder layout without running their code, the conditioning wiring, the pose
convention, determinism and batching. All on the CPU in seconds."""
import json
import math
import pickle
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")

from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from SVDRRLogic.geometry import from_svdrr_angles  # noqa: E402
from SVDRRLogic.images import ImageError, XRayImage  # noqa: E402
from SVDRRLogic.models import ModelLoadError, build_svdrr, create_random, load_svdrr  # noqa: E402
from SVDRRLogic.pipelines import SVDRRPipeline, svdrr_relative_pose  # noqa: E402

# -- the relative pose ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, expected", [
    ((90.0, 0.0), (0.0, -1.0, 0.0, 0.0)),                    # dphi = (0 - pi/2) mod 2pi = 3pi/2
    ((-90.0, 0.0), (0.0, 1.0, 0.0, 0.0)),                    # dphi = pi/2
    ((0.0, 30.0), (-math.pi / 6, 0.0, 1.0, 0.0)),            # dtheta = 0 - pi/6
    ((0.0, -20.0), (math.radians(20.0), 0.0, 1.0, 0.0)),
    ((45.0, 10.0), (-math.radians(10.0), -math.sqrt(0.5), math.sqrt(0.5), 0.0)),  # dphi = 7pi/4
    ((0.0, 0.0), (0.0, 0.0, 1.0, 0.0)),
])
def test_relative_pose_from_pa_hand_worked(target, expected):
    assert svdrr_relative_pose((0.0, 0.0), target) == pytest.approx(expected, abs=1e-12)


def test_relative_pose_is_condition_minus_target():
    assert svdrr_relative_pose((30.0, 10.0), (30.0, 10.0)) == pytest.approx((0.0, 0.0, 1.0, 0.0), abs=1e-12)
    d = svdrr_relative_pose((20.0, 5.0), (-10.0, 15.0))   # dtheta = 5 - 15 deg, dphi = 20 - (-10) = 30 deg
    assert d == pytest.approx((math.radians(-10.0), 0.5, math.sqrt(3) / 2, 0.0), abs=1e-12)


@pytest.mark.parametrize("theta, phi", [(0.3, 0.0), (0.0, 0.5), (-0.4, -0.8), (0.785, 5.473), (-0.822, 1.2)])
def test_relative_pose_matches_authors_inference_script(theta, phi):
    """Their test_svdrr_DiT.py: pose [theta, phi, 0] in degrees, negated, then [rad(x), sin rad(y), cos rad(y), z]."""
    x, y = -math.degrees(theta), -math.degrees(phi)
    authors = (math.radians(x), math.sin(math.radians(y)), math.cos(math.radians(y)), 0.0)
    ours = svdrr_relative_pose((0.0, 0.0), from_svdrr_angles(theta, phi))
    assert ours == pytest.approx(authors, abs=1e-9)


# -- the paper architecture (meta device: no memory) --------------------------------------------------------


def pixart_sigma_xl2_shapes(in_channels=8, out_channels=8, depth=28, width=1152):
    """PixArt-Sigma XL/2's transformer state dict, written out by hand (caption_projection removed)."""
    shapes = {"pos_embed.proj.weight": (width, in_channels, 2, 2), "pos_embed.proj.bias": (width,),
              "scale_shift_table": (2, width), "proj_out.weight": (2 * 2 * out_channels, width),
              "proj_out.bias": (2 * 2 * out_channels,),
              "adaln_single.emb.timestep_embedder.linear_1.weight": (width, 256),
              "adaln_single.emb.timestep_embedder.linear_1.bias": (width,),
              "adaln_single.emb.timestep_embedder.linear_2.weight": (width, width),
              "adaln_single.emb.timestep_embedder.linear_2.bias": (width,),
              "adaln_single.linear.weight": (6 * width, width), "adaln_single.linear.bias": (6 * width,)}
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        shapes[b + "scale_shift_table"] = (6, width)
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes[f"{b}{attn}.{proj}.weight"] = (width, width)
                shapes[f"{b}{attn}.{proj}.bias"] = (width,)
        shapes.update({b + "ff.net.0.proj.weight": (4 * width, width), b + "ff.net.0.proj.bias": (4 * width,),
                       b + "ff.net.2.weight": (width, 4 * width), b + "ff.net.2.bias": (width,)})
    return shapes


@pytest.fixture(scope="module")
def paper():
    return build_svdrr("paper", 512, empty=True)


def shapes_of(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_paper_transformer_is_pixart_sigma_xl2_with_8_channels(paper):
    assert shapes_of(paper.transformer) == pixart_sigma_xl2_shapes()
    assert paper.transformer.caption_projection is None
    assert all(p.device.type == "meta" for p in paper.transformer.parameters())
    cfg = paper.transformer.config
    assert (cfg.sample_size, cfg.interpolation_scale, cfg.use_additional_conditions) == (64, 1.0, False)
    assert sum(p.numel() for p in paper.transformer.parameters()) == 604_826_528


def test_paper_projection_vae_and_clip(paper):
    assert shapes_of(paper.cc_projection) == {"projection.weight": (1152, 772), "projection.bias": (1152,)}
    assert dict(paper.cc_projection.config)["in_channel"] == 772
    assert paper.vae.config.latent_channels == 4 and paper.vae.config.scaling_factor == 0.13025
    assert sum(p.numel() for p in paper.vae.parameters()) == 83_653_863            # the SD/SDXL VAE
    enc = paper.image_encoder.config
    assert (enc.hidden_size, enc.num_hidden_layers, enc.patch_size, enc.image_size, enc.projection_dim) == (
        1024, 24, 14, 224, 768)
    assert shapes_of(paper.image_encoder)["visual_projection.weight"] == (768, 1024)


@pytest.mark.parametrize("resolution, grid, scale", [(256, 32, 0.5), (1024, 128, 2.0)])
def test_paper_resolutions_scale_position_embeddings(resolution, grid, scale):
    t = build_svdrr("paper", resolution, empty=True).transformer
    assert (t.config.sample_size, t.config.interpolation_scale) == (grid, scale)


# -- the tiny model ------------------------------------------------------------------------------------------


def test_tiny_training_step_gives_finite_gradients():
    parts = build_svdrr("tiny", 32, seed=0)
    eye = parts.cc_projection.projection.weight[:16, :16]
    assert torch.equal(eye, torch.eye(16)) and not parts.cc_projection.projection.bias.any()
    parts.transformer.train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        sf = parts.vae.config.scaling_factor
        target = parts.vae.encode(x).latent_dist.sample() * sf
        source = parts.vae.encode(x.flip(-1)).latent_dist.mode()
        embed = parts.image_encoder(pixel_values=torch.rand(2, 3, 32, 32)).image_embeds
    noise = torch.randn_like(target)
    t = torch.tensor([10, 900])
    noisy = parts.scheduler.add_noise(target, noise, t)
    token = parts.cc_projection(torch.cat([embed, torch.tensor([[0.1, 0.0, 1.0, 0.0]] * 2)], -1))[:, None]
    out = parts.transformer(torch.cat([noisy, source], 1), encoder_hidden_states=token, timestep=t,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert out.shape == (2, 8, 16, 16)
    torch.nn.functional.mse_loss(out[:, :4], noise).backward()
    for module in (parts.transformer, parts.cc_projection):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


# -- the authors' folder layout -----------------------------------------------------------------------------

TRAP = "import pathlib; pathlib.Path({marker!r}).write_text('imported')\nraise RuntimeError('custom code ran')\n"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = create_random(tmp_path_factory.mktemp("svdrr") / "tiny", "tiny", 32, seed=0)
    for module in ("pipeline_svdrr_DiT", "svdrr_transformer_2d"):   # what model_index.json points at
        (folder / f"{module}.py").write_text(TRAP.format(marker=str(folder / f"{module}.ran")))
    return folder


def test_folder_has_the_authors_layout(tiny_folder):
    for sub, files in {"transformer": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model."
                       "safetensors", "cc_projection": "diffusion_pytorch_model.safetensors",
                       "image_encoder": "model.safetensors", "scheduler": "scheduler_config.json",
                       "feature_extractor": "preprocessor_config.json"}.items():
        assert (tiny_folder / sub / files).is_file(), sub
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["cc_projection"] == ["pipeline_svdrr_DiT", "CCProjection"]
    assert index["transformer"] == ["svdrr_transformer_2d", "SvdrrTransformer2DModel"]
    cfg = json.loads((tiny_folder / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "SvdrrTransformer2DModel" and cfg["caption_channels"] is None


def test_load_never_imports_the_folder_code(tiny_folder, monkeypatch):
    monkeypatch.syspath_prepend(str(tiny_folder))      # as if run from their repository root
    monkeypatch.chdir(tiny_folder)
    parts = load_svdrr(tiny_folder)
    assert not list(tiny_folder.glob("*.ran"))
    assert "pipeline_svdrr_DiT" not in sys.modules and "svdrr_transformer_2d" not in sys.modules
    fresh = build_svdrr("tiny", 32, seed=0)
    for name in ("transformer", "vae", "image_encoder", "cc_projection"):
        a, b = getattr(parts, name).state_dict(), getattr(fresh, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert isinstance(parts.scheduler, DPMSolverMultistepScheduler)
    assert parts.scheduler.config.algorithm_type == "dpmsolver++" and parts.resolution == 32


def copy_folder(src, dst):
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.py", "*.ran"))
    return dst


def test_load_errors_are_one_line(tiny_folder, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_svdrr(tmp_path / "nowhere")
    broken = copy_folder(tiny_folder, tmp_path / "no_vae")
    import shutil
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="missing subfolder.*vae"):
        load_svdrr(broken)
    configs_only = create_random(tmp_path / "configs", "tiny", 32, weights=False)
    with pytest.raises(ModelLoadError, match="no weights") as err:
        load_svdrr(configs_only)
    assert "\n" not in str(err.value)
    wrong = copy_folder(tiny_folder, tmp_path / "wrong")
    from safetensors.torch import save_file
    save_file({"projection.weight": torch.zeros(32, 30), "projection.bias": torch.zeros(32)},
              str(wrong / "cc_projection" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"wrong shape, projection.weight is \[32, 30\]"):
        load_svdrr(wrong)


def test_pickled_weights_load_only_as_tensors(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "bin")
    cc = folder / "cc_projection"
    state = load_svdrr(tiny_folder).cc_projection.state_dict()
    (cc / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, cc / "diffusion_pytorch_model.bin")
    loaded = load_svdrr(folder).cc_projection.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(cc / "diffusion_pytorch_model.bin", "wb") as fh:
        pickle.dump({"projection.weight": Evil()}, fh, protocol=2)
    with pytest.raises(ModelLoadError, match="refused or unreadable"):
        load_svdrr(folder)
    assert not marker.exists()


def test_ddpm_scheduler_config_becomes_dpm_solver(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "ddpm")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "variance_type": "fixed_small",
        "clip_sample": False}))
    sched = load_svdrr(folder).scheduler
    assert isinstance(sched, DPMSolverMultistepScheduler)
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.variance_type is None


# -- the pipeline ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    p = SVDRRPipeline.from_folder(tiny_folder, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def xray():
    r, c = np.mgrid[0:40, 0:36]
    return XRayImage(np.sin(r / 5.0) + np.cos(c / 7.0) + 0.01 * r, pixel_spacing=(0.7, 0.7))


VIEWS = [(0.0, 0.0), (30.0, 0.0), (-45.0, 20.0)]


def test_pipeline_outputs_and_metadata(pipe, xray):
    out = pipe(xray, VIEWS, num_inference_steps=4, generator=7)
    assert out.images.shape == (3, 32, 32) and out.images.dtype == np.float32
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    meta = out.metadata[2]
    assert (meta["azimuth"], meta["elevation"], meta["steps"], meta["seed"]) == (-45.0, 20.0, 4, 7)
    assert meta["synthetic"] is True and meta["model"] == "tiny" and meta["guidance_scale"] == 3.0
    assert meta["relative_pose"] == list(svdrr_relative_pose((0, 0), (-45.0, 20.0)))
    latents = pipe(xray, VIEWS[:1], num_inference_steps=2, generator=7, output_type="latent").images
    assert tuple(latents.shape) == (1, 4, 16, 16)


def test_pipeline_is_deterministic_and_batch_invariant(pipe, xray):
    run = dict(num_inference_steps=5, generator=3)
    batched = pipe(xray, VIEWS, batch_size=3, **run).images
    assert np.array_equal(batched, pipe(xray, VIEWS, batch_size=3, **run).images)
    assert np.array_equal(batched, pipe(xray, VIEWS, generator=torch.Generator().manual_seed(3),
                                        num_inference_steps=5, batch_size=3).images)
    singles = np.stack([pipe(xray, [v], **run).images[0] for v in VIEWS])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    other = pipe(xray, VIEWS, batch_size=3, num_inference_steps=5, generator=4).images
    assert np.abs(other - batched).max() > 1e-3


def test_guidance_changes_the_result(pipe, xray):
    guided = pipe(xray, VIEWS[1:2], num_inference_steps=5, generator=1, guidance_scale=3.0).images
    plain = pipe(xray, VIEWS[1:2], num_inference_steps=5, generator=1, guidance_scale=1.0).images
    assert np.abs(guided - plain).max() > 1e-3


def test_conditioning_wiring(pipe, xray):
    """Per step: [z_t, z_src] on channels; unconditional half = zero token and zero source latent; the source
    latent is the VAE mode, unscaled; the token is cc_projection([CLIP embedding, relative pose])."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].clone(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True)
    try:
        pipe(xray, [(90.0, 0.0)], num_inference_steps=2, generator=0, guidance_scale=2.0)
    finally:
        hook.remove()
    assert len(seen) == 2
    hidden, tokens = seen[0]
    assert hidden.shape == (2, 8, 16, 16) and tokens.shape == (2, 1, 32)
    embed, source = pipe.encode_source(xray, torch.device("cpu"))
    x = torch.from_numpy(np.asarray(xray.array, dtype=np.float64))
    x = ((x - x.min()) / (x.max() - x.min())).float()[None, None]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True) * 2 - 1
    mode = pipe.vae.encode(x.clamp(-1, 1).expand(1, 3, 32, 32)).latent_dist.mode()
    torch.testing.assert_close(source, mode)
    assert not hidden[0, 4:].any() and not tokens[0].any()
    torch.testing.assert_close(hidden[1, 4:], source[0])
    torch.testing.assert_close(hidden[0, :4], hidden[1, :4])
    pose = torch.tensor([svdrr_relative_pose((0.0, 0.0), (90.0, 0.0))])
    want = pipe.cc_projection(torch.cat([embed, pose], -1))
    torch.testing.assert_close(tokens[1], want, atol=1e-5, rtol=1e-5)


def test_progress_callback(pipe, xray):
    calls = []
    pipe(xray, VIEWS, num_inference_steps=3, generator=0, batch_size=2, callback=lambda *a: calls.append(a))
    assert calls == [(1, 6, 0), (2, 6, 0), (3, 6, 0), (4, 6, 2), (5, 6, 2), (6, 6, 2)]


def test_bad_inputs(pipe, xray):
    with pytest.raises(ImageError, match="constant"):
        pipe(np.ones((20, 20)), VIEWS[:1], num_inference_steps=1)
    with pytest.raises(ValueError, match="views"):
        pipe(xray, [], num_inference_steps=1)
    with pytest.raises(ValueError, match="views"):
        pipe(xray, [(float("nan"), 0.0)], num_inference_steps=1)
    with pytest.warns(UserWarning, match="PA"):
        pipe(xray, VIEWS[:1], num_inference_steps=1, source_view=(10.0, 0.0))


def test_precision_and_memory_options(pipe, tiny_folder, xray):
    run = dict(num_inference_steps=3, generator=5)
    reference = pipe(xray, VIEWS[:2], **run).images
    pipe.enable_attention_slicing()
    try:
        np.testing.assert_allclose(pipe(xray, VIEWS[:2], **run).images, reference, atol=1e-5)
    finally:
        pipe.disable_attention_slicing()
    half = load_svdrr(tiny_folder, "cpu", torch.float16)      # the SDXL VAE overflows in fp16: kept in fp32
    assert half.transformer.dtype == torch.float16 and half.vae.dtype == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        SVDRRPipeline.from_folder(tiny_folder, device="cpu", dtype="fp16")
    bf16 = SVDRRPipeline.from_folder(tiny_folder, device="cpu", dtype="bf16")
    bf16.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(bf16(xray, VIEWS[:2], **run).images, reference, atol=0.05)


def test_mixed_parts_are_rejected():
    from SVDRRLogic.models import CCProjection, check_compatible
    parts = build_svdrr("tiny", 32)
    parts.cc_projection = CCProjection(in_channel=24, out_channel=32)
    with pytest.raises(ModelLoadError, match="cc_projection in_channel 24 != CLIP projection_dim"):
        check_compatible(parts)
