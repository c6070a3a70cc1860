"""DVG-Diffusion training configuration: defaults (the authors' values where they published them) overlaid by a
YAML/JSON file and by ``--set section.key=value`` overrides, then validated with a one-line error.

The defaults are the ``paper`` run (``../shared/reference/dvg-and-patch-diffusion.md`` C.3, C.6, C.7); the
``vpge``, ``coarse`` and ``vpge_new`` sections are our recipe, since the authors did not release how those
networks were trained (see :mod:`training.dvg.stages`). Merging, file reading and override parsing are
:mod:`training.svdrr.config`'s (unknown keys are errors there too).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from SVDRRLogic.models.dvg import CONFIGS, resolve_config

from ..svdrr.config import apply_overrides, deep_merge, load_file

#: Training order; each stage freezes and builds on the ones before it.
STAGES = ("ct_vqgan", "vpge", "coarse", "vpge_new", "diffusion")

#: Keys every stage has: the schedule and the optimizer (Adam). ``cosine``: null (constant lr) or
#: ``{t_max, eta_min}`` for ``CosineAnnealingLR`` stepped every iteration.
_COMMON = {"steps": 50000, "batch_size": 2, "learning_rate": 1e-4, "betas": [0.9, 0.999], "grad_clip": 1.0,
           "cosine": None}

DEFAULTS: dict[str, Any] = {
    "model": "paper",                 # SVDRRLogic.models.dvg.CONFIGS name, or a DVG configuration mapping
    "seed": 1234,
    "data": {
        "split": "train",             # split of the preprocessed cases (split.json) to train on
        # Keep each case's back-projections and frozen-network latents in RAM after their first use (each process
        # its share of the cases): ~19 MB per 128^3 case, 17 GB for X2CT's 916 on one GPU. Off by default: on a
        # GPU recomputing them costs milliseconds.
        "cache": False,
    },
    "checkpoint": {"every_steps": 4000, "total_limit": 3},
    "logging": {"every_steps": 50},
    "ct_vqgan": dict(
        _COMMON,
        # 200 epochs (the authors' max_epochs, reached before their max_steps 500000) of X2CT's 916 volumes at batch 2.
        steps=91600,
        learning_rate=3e-4,           # the authors' base lr, scaled as below
        scale_lr=True,                # x accumulate (1) x processes / 8 x batch / 4, as train_vqgan.py: 1.875e-5
        betas=[0.5, 0.9],
        crop=None,                    # train on random crops of this side instead of whole volumes (CPU demo)
        l1_weight=4.0,
        perceptual_weight=4.0,        # LPIPS-VGG on one random axial slice (needs the lpips package)
        gan_start=10000,              # step the discriminators start at; null: no GAN losses
        image_gan_weight=1.0,
        video_gan_weight=1.0,
        gan_feat_weight=4.0,
        disc_channels=64,
        disc_layers=3,
    ),
    "vpge": dict(_COMMON, latent_weight=1.0, l1_weight=1.0),
    "coarse": dict(_COMMON),
    "vpge_new": dict(_COMMON, latent_weight=1.0, l1_weight=1.0),
    "diffusion": dict(
        _COMMON,
        steps=500000,
        learning_rate=2e-4,
        grad_clip=None,
        cosine={"t_max": 40000, "eta_min": 1e-10},
        ema={"decay": 0.995, "every": 10, "start": 2000},   # null: no EMA
    ),
}


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults <- file <- overrides, validated; any problem is a one-line ``ValueError``."""
    try:
        from yaml import YAMLError
    except ImportError:               # JSON configs work without PyYAML
        YAMLError = ValueError        # noqa: N806
    try:
        file = load_file(path) if path is not None else {}
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    except (ValueError, YAMLError) as exc:     # YAML / JSON syntax, a file that is not a mapping
        raise ValueError(f"{path}: unreadable config ({str(exc).splitlines()[0]})") from None
    try:
        cfg = apply_overrides(deep_merge(copy.deepcopy(DEFAULTS), file), overrides)
    except KeyError as exc:           # deep_merge's unknown key
        raise ValueError(f"bad DVG training config: {exc.args[0]}") from None
    except ValueError as exc:         # an override that is not section.key=value
        raise ValueError(f"bad DVG training config: {exc}") from None
    validate(cfg)
    return cfg


def model_config(cfg: dict) -> dict:
    """The resolved DVG network configuration the run trains (``SVDRRLogic.models.dvg.resolve_config``)."""
    return resolve_config(cfg["model"])


def _number(value, low: float, high: float = float("inf"), *, low_open: bool = False) -> bool:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok_type and (value > low if low_open else value >= low) and value <= high


def _check_stage(name: str, s: dict, problems: list[str]) -> None:
    if not (isinstance(s["steps"], int) and s["steps"] >= 1 and isinstance(s["batch_size"], int)
            and s["batch_size"] >= 1):
        problems.append(f"{name}.steps and {name}.batch_size must be integers >= 1")
    if not _number(s["learning_rate"], 0.0, low_open=True):
        problems.append(f"{name}.learning_rate must be a number > 0 (YAML reads 1e-4 as text: write 1.0e-4)")
    betas = s["betas"]
    if not (isinstance(betas, list) and len(betas) == 2 and all(_number(b, 0.0, 1.0) and b < 1 for b in betas)):
        problems.append(f"{name}.betas must be two numbers in [0, 1)")
    if s["grad_clip"] is not None and not _number(s["grad_clip"], 0.0, low_open=True):
        problems.append(f"{name}.grad_clip must be null or > 0")
    cos = s["cosine"]
    if cos is not None and not (isinstance(cos, dict) and set(cos) == {"t_max", "eta_min"}
                                and isinstance(cos["t_max"], int) and cos["t_max"] >= 1
                                and _number(cos["eta_min"], 0.0)):
        problems.append(f"{name}.cosine must be null or {{t_max: integer >= 1, eta_min: >= 0}}")
    for key in ("l1_weight", "latent_weight", "perceptual_weight", "image_gan_weight", "video_gan_weight",
                "gan_feat_weight"):
        if key in s and not _number(s[key], 0.0):
            problems.append(f"{name}.{key} must be a number >= 0")


def validate(cfg: dict) -> None:
    problems: list[str] = []
    if not isinstance(cfg["model"], (str, dict)):
        raise ValueError(f"bad DVG training config: model must be one of {', '.join(CONFIGS)} or a mapping")
    if isinstance(cfg["model"], dict):
        missing = [k for k in CONFIGS["paper"] if k not in cfg["model"]]
        if missing:
            raise ValueError(f"bad DVG training config: model: no {', '.join(map(repr, missing))} entry")
    try:
        model = model_config(cfg)
    except KeyError as exc:
        raise ValueError(f"bad DVG training config: model: no {exc.args[0]!r} entry") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad DVG training config: model: {exc}") from None
    if not model["input_views"] or not set(model["input_views"]) <= {1, 2}:
        problems.append("model.input_views must list 1 and/or 2 X-rays")
    if any(model[part] != model["ct_vqgan"] for part in ("vpge", "vpge_new")):
        problems.append("model: vpge and vpge_new must have the ct_vqgan configuration (they start as copies of "
                        "the CT VQ-GAN and encode into its latent space)")
    for name in STAGES:
        _check_stage(name, cfg[name], problems)
    vq = cfg["ct_vqgan"]
    factor = model["ct_vqgan"]["downsample"][0]
    if vq["crop"] is not None and not (isinstance(vq["crop"], int) and vq["crop"] % factor == 0
                                       and 0 < vq["crop"] <= model["grid"]):
        problems.append(f"ct_vqgan.crop must be null or a multiple of {factor} up to the grid ({model['grid']})")
    if vq["gan_start"] is not None and not (isinstance(vq["gan_start"], int) and vq["gan_start"] >= 0):
        problems.append("ct_vqgan.gan_start must be null or an integer >= 0")
    if not (isinstance(vq["disc_channels"], int) and vq["disc_channels"] >= 1 and isinstance(vq["disc_layers"], int)
            and vq["disc_layers"] >= 1):
        problems.append("ct_vqgan.disc_channels and ct_vqgan.disc_layers must be integers >= 1")
    ema = cfg["diffusion"]["ema"]
    if ema is not None and not (isinstance(ema, dict) and set(ema) == {"decay", "every", "start"}
                                and _number(ema["decay"], 0.0, 1.0, low_open=True) and ema["decay"] < 1
                                and isinstance(ema["every"], int) and ema["every"] >= 1
                                and isinstance(ema["start"], int) and ema["start"] >= 0):
        problems.append("diffusion.ema must be null or {decay: in (0, 1), every: integer >= 1, start: integer >= 0}")
    c = cfg["checkpoint"]
    if not (isinstance(c["every_steps"], int) and c["every_steps"] >= 0 and isinstance(c["total_limit"], int)
            and c["total_limit"] >= 1):
        problems.append("checkpoint.every_steps must be an integer >= 0 (0: only at the end) and "
                        "checkpoint.total_limit >= 1")
    if not (isinstance(cfg["logging"]["every_steps"], int) and cfg["logging"]["every_steps"] >= 1):
        problems.append("logging.every_steps must be an integer >= 1")
    if not isinstance(cfg["seed"], int) or not isinstance(cfg["data"]["cache"], bool):
        problems.append("seed must be an integer and data.cache true or false")
    if problems:
        raise ValueError("bad DVG training config: " + "; ".join(problems))


def config_name(cfg: dict) -> str:
    """The DVG architecture's name when it is one of ``CONFIGS``, else "custom"."""
    return cfg["model"] if isinstance(cfg["model"], str) and cfg["model"] in CONFIGS else "custom"
