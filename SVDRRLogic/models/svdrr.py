"""SV-DRR's networks, assembled from stock diffusers/transformers classes so the authors' weights load unchanged.

SV-DRR (Xie et al., MICCAI 2025; github.com/xiechun298/SV-DRR) is Zero-1-to-3 conditioning on a PixArt-Sigma
XL/2 transformer in SDXL-VAE latent space (``../shared/reference/svdrr-method.md`` section 1):

- ``transformer``: :class:`diffusers.PixArtTransformer2DModel` with 8 input channels (noisy latent + source
  latent, concatenated by the caller), 8 output channels (epsilon + IDDPM learned-range variance) and no T5
  ``caption_projection``. The authors' ``SvdrrTransformer2DModel`` is a copy of this class whose only change is a
  ``latents_concat`` argument that concatenates inside ``forward``; its ``__init__`` and therefore its parameter
  names and shapes are PixArt's, so PixArt's own class loads their ``transformer/`` folder.
- ``cc_projection``: :class:`CCProjection`, one ``Linear(projection_dim + 4 -> cross_attention_dim)`` mapping
  [CLIP image embedding, relative pose] to the single cross-attention token.
- ``vae``: :class:`diffusers.AutoencoderKL` (SDXL type), ``image_encoder``:
  :class:`transformers.CLIPVisionModelWithProjection` (ViT-L/14, 224 px), ``feature_extractor``: the CLIP image
  processor config (kept for the folder layout; the pipeline normalizes in torch exactly as the authors did),
  ``scheduler``: :class:`diffusers.DPMSolverMultistepScheduler` (DPM-Solver++).

Three configurations: ``"paper"`` (the released 256/512/1024 models), ``"tiny"`` (seconds on a CPU, for tests)
and ``"demo"`` (the embedded demonstration model, trained on a CPU in about half an hour). Folder I/O
(:func:`create_random`, :func:`load_svdrr`) is in :mod:`.svdrr_folder`.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .seeding import seeded_init

#: Length of the relative pose appended to the CLIP embedding: [d-theta, sin d-phi, cos d-phi, d-radius].
POSE_DIM = 4

#: OpenAI CLIP normalization, hard-coded in the authors' ``CLIP_preprocess`` (training and inference alike).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelLoadError(ValueError):
    """A model folder or configuration that cannot give SV-DRR components (one line: which part, what is wrong)."""


class CCProjection(ModelMixin, ConfigMixin):
    """The pose/image projection of SV-DRR: ``Linear(in_channel -> out_channel)`` on [CLIP embedding, pose].

    Names follow the authors' class (``pipeline_svdrr_DiT.CCProjection``, inherited from zero123-hf): the config
    keys are the singular ``in_channel``/``out_channel`` and the layer is ``self.projection``, so the saved
    weights are ``projection.weight`` (out, in) and ``projection.bias`` (out,). Keeping those names is what lets
    :meth:`from_pretrained` read their ``cc_projection/`` folder without importing their module.
    """

    @register_to_config
    def __init__(self, in_channel: int = 772, out_channel: int = 1152):
        super().__init__()
        self.projection = torch.nn.Linear(in_channel, out_channel)

    def reset_to_identity(self, embed_dim: int) -> None:
        """The authors' initialization: identity on the [embed_dim x embed_dim] block (the CLIP embedding passes
        through unchanged when out >= embed_dim), bias zero; the pose columns keep PyTorch's default init."""
        with torch.no_grad():
            torch.nn.init.eye_(self.projection.weight[:embed_dim, :embed_dim])
            torch.nn.init.zeros_(self.projection.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


# -- configurations ----------------------------------------------------------------------------------------
_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
                  timestep_spacing="linspace", lower_order_final=True)

#: The released models: PixArt-Sigma XL/2 (28 x 16 heads x 72), SDXL VAE, CLIP ViT-L/14. ``base_resolution``
#: fixes the position-embedding scale the authors' training script used: interpolation_scale = R / 512.
PAPER: dict[str, Any] = {
    "base_resolution": 512,
    "transformer": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2,
                        cross_attention_dim=1152, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                        attention_bias=True, dropout=0.0),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, act_fn="silu", scaling_factor=0.13025,
                force_upcast=True),
    "image_encoder": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5),
    "scheduler": _SCHEDULER,
}

#: Same wiring, a few hundred thousand parameters: VAE downsampling 2, 2 transformer layers of 2 x 16.
TINY: dict[str, Any] = {
    "base_resolution": 32,
    "transformer": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, patch_size=2,
                        cross_attention_dim=32, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                        attention_bias=True, dropout=0.0),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=32, act_fn="silu", scaling_factor=0.13025,
                force_upcast=True),
    "image_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5),
    "scheduler": _SCHEDULER,
}

#: The embedded demonstration model (``Resources/models/svdrr-demo-64``, trained by ``training/configs/demo.yaml``
#: on DRRs of generated phantoms): 64 px, VAE downsampling 4 (16 x 16 x 4 latents, trained as an autoencoder of
#: DRRs, ``training.svdrr.train_vae``), 6 transformer layers of 4 x 32 on the 8 x 8 patch grid, and the tiny random
#: CLIP (kept frozen and random: the source latent and the pose carry the information). ``scaling_factor`` is a
#: placeholder; the VAE training sets it to 1 / std of the DRR latents.
DEMO: dict[str, Any] = {
    "base_resolution": 64,
    "transformer": dict(num_layers=6, num_attention_heads=4, attention_head_dim=32, patch_size=2,
                        cross_attention_dim=128, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                        attention_bias=True, dropout=0.0),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                layers_per_block=1, norm_num_groups=16, act_fn="silu", scaling_factor=1.0,
                force_upcast=True),
    "image_encoder": dict(TINY["image_encoder"]),
    "scheduler": _SCHEDULER,
}

CONFIGS = {"paper": PAPER, "tiny": TINY, "demo": DEMO}
DEFAULT_RESOLUTION = {"paper": 512, "tiny": 32, "demo": 64}


def resolve_config(config: str | dict) -> dict:
    """A named configuration ("paper", "tiny", "demo") or a dict with the same four parts, as a deep copy."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ModelLoadError(f"unknown SV-DRR configuration {config!r}; choose one of {sorted(CONFIGS)}")
        return copy.deepcopy(CONFIGS[config])
    missing = {"transformer", "vae", "image_encoder"} - set(config)
    if missing:
        raise ModelLoadError(f"an SV-DRR configuration needs {sorted(missing)}")
    return copy.deepcopy(dict(config))


def vae_scale_factor(vae_config: dict | Any) -> int:
    """Pixels per latent pixel: 2 ** (number of VAE blocks - 1), as diffusers computes it."""
    blocks = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(blocks) - 1)


def component_configs(config: str | dict, resolution: int) -> dict[str, dict]:
    """Keyword arguments of every component for images of ``resolution`` pixels (square)."""
    cfg = resolve_config(config)
    factor = vae_scale_factor(cfg["vae"])
    t = dict(cfg["transformer"])
    step = factor * t["patch_size"]
    if resolution < step or resolution % step:
        raise ModelLoadError(f"resolution {resolution} must be a positive multiple of {step} "
                             f"(VAE factor {factor} x patch {t['patch_size']})")
    latent = cfg["vae"]["latent_channels"]
    t.update(in_channels=2 * latent, out_channels=2 * latent, caption_channels=None,
             sample_size=resolution // factor, use_additional_conditions=False,
             interpolation_scale=resolution / cfg.get("base_resolution", 512))
    vae = dict(cfg["vae"], sample_size=resolution)
    enc = dict(cfg["image_encoder"])
    cc = dict(in_channel=enc["projection_dim"] + POSE_DIM,
              out_channel=t["cross_attention_dim"] or t["num_attention_heads"] * t["attention_head_dim"])
    return {"transformer": t, "vae": vae, "image_encoder": enc, "cc_projection": cc,
            "feature_extractor": feature_extractor_config(enc["image_size"]),
            "scheduler": dict(cfg.get("scheduler", _SCHEDULER))}


def feature_extractor_config(image_size: int) -> dict:
    """CLIP image-processor settings for ``image_size`` (bicubic, centre crop, OpenAI mean/std)."""
    return dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                do_center_crop=True, do_normalize=True, do_resize=True, resample=3,
                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


@dataclass
class SVDRRComponents:
    """The six parts of an SV-DRR model, named as in the authors' folder and pipeline."""

    transformer: PixArtTransformer2DModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: Any
    cc_projection: CCProjection
    scheduler: DPMSolverMultistepScheduler

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("vae", "image_encoder", "feature_extractor", "transformer",
                                              "scheduler", "cc_projection")}

    @property
    def resolution(self) -> int:
        """The image size the transformer was configured for (latent grid x VAE factor)."""
        return int(self.transformer.config.sample_size) * vae_scale_factor(self.vae.config)


def image_processor_class():
    """CLIP's image processor class without the torchvision backend (transformers >= 5 has a PIL variant;
    older versions only the one class). We never run it: it only carries the authors' ``feature_extractor``."""
    try:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


def build_svdrr(config: str | dict = "tiny", resolution: int | None = None, *, empty: bool = False,
                seed: int | None = 0) -> SVDRRComponents:
    """Randomly initialized components (``empty=True``: parameters on the 'meta' device, no memory, for
    inspecting names and shapes of the 2.5 GB paper model). ``cc_projection`` gets the authors' identity init.
    ``seed`` makes the random weights reproducible without touching the global RNG state."""
    name = config if isinstance(config, str) else "custom"
    resolution = resolution or DEFAULT_RESOLUTION.get(name, 512)
    parts = component_configs(config, resolution)
    if empty:
        from accelerate import init_empty_weights
        ctx = init_empty_weights()
    else:
        ctx = contextlib.nullcontext()
    with seeded_init(seed), ctx:
        transformer = PixArtTransformer2DModel(**parts["transformer"])
        vae = AutoencoderKL(**parts["vae"])
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**parts["image_encoder"]))
        cc_projection = CCProjection(**parts["cc_projection"])
        if not empty:
            cc_projection.reset_to_identity(min(parts["image_encoder"]["projection_dim"],
                                                parts["cc_projection"]["out_channel"]))
    feature_extractor = image_processor_class()(**parts["feature_extractor"])
    scheduler = DPMSolverMultistepScheduler(**parts["scheduler"])
    for m in (transformer, vae, image_encoder, cc_projection):
        m.eval()
    return SVDRRComponents(transformer, vae, image_encoder, feature_extractor, cc_projection, scheduler)


def dpm_solver_from_config(config: dict) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order multistep) on the training noise schedule found in any diffusers scheduler config.

    The authors' own ``final-pipeline`` saves a DDPMScheduler config and their released folders reportedly a
    DPMSolverMultistepScheduler one; either way only the beta schedule, the number of training steps and the
    prediction type are taken. ``variance_type`` is cleared because the pipeline already drops the learned-
    variance channels (a DDPM ``fixed_small``/``learned_range`` value would make the solver slice the output).
    """
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ModelLoadError(f"scheduler prediction_type {prediction!r}: SV-DRR predicts 'epsilon'")
    keep = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                                "timestep_spacing", "steps_offset") if k in cfg}
    return DPMSolverMultistepScheduler(**{**_SCHEDULER, **keep, "algorithm_type": "dpmsolver++",
                                          "variance_type": None, "prediction_type": "epsilon"})
