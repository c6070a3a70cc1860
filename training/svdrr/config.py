"""Training configuration: defaults (the authors' ``train_svdrr_DiT.py`` settings, svdrr-method.md section 3.2)
overlaid by a YAML/JSON file and by ``--set section.key=value`` overrides (values parsed as YAML).

Relative paths in a config file are relative to the current directory (run from the repository root), except
``~`` which is expanded.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "model": {
        "architecture": "paper",      # SVDRRLogic.models.CONFIGS name ("paper", "tiny") or a dict of the four parts
        "resolution": 256,
        "init_from": None,            # SV-DRR model folder (authors' layout) of the previous stage: all weights
        "pixart": None,               # local PixArt-Sigma diffusers folder (transformer/, vae/): stage-1 init
        "vae_from": None,             # AutoencoderKL folder (or a folder with vae/); default: init_from, pixart
        "image_encoder_from": None,   # CLIPVisionModelWithProjection folder (or a folder with image_encoder/)
        "seed": 0,                    # random initialization of what is built from scratch
    },
    "data": {
        "root": None,                 # rendered dataset (training.svdrr.render_dataset)
        "split": "train",
        "max_slice_spacing": None,    # the authors train on thin-slice CTs only (<= 2.5 mm)
        "samples_per_epoch": None,    # default: the number of patients (one random target each, as the authors)
        "target_sets": ["hemisphere"],  # view sets the random targets come from (the authors: hemisphere only)
        "num_workers": 4,
        "generate": None,             # phantom runs: {phantoms, seed, shape, spacing, resolution, hemisphere, arc,
                                      # test_ids | test_fraction} rendered into root when it has no manifest yet
    },
    "train": {
        "batch_size": 64,             # per process (GPU)
        "gradient_accumulation_steps": 1,
        "learning_rate": 5e-6,
        "cc_projection_lr_scale": 10.0,
        "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 1e-2,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 1000,
        "max_train_steps": 200000,
        "max_grad_norm": 1.0,
        "conditioning_dropout_prob": 0.05,
        "mixed_precision": None,      # None: as accelerate launch / config says; "no", "fp16", "bf16"
        "gradient_checkpointing": False,
        "allow_tf32": True,
        "use_ema": False, "ema_decay": 0.9999,
        "seed": 42,
        "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
    },
    "checkpoint": {
        "output_dir": None,
        "every_steps": 1000,
        "total_limit": 20,
    },
    "validation": {
        "every_steps": 1000,          # 0: never during training (still once at the end unless num_patients is 0)
        "split": "test",
        "num_patients": 16,
        "num_inference_steps": 50,
        "guidance_scale": 3.0,
        "seed": 0,
    },
    "logging": {
        "report_to": "none",          # accelerate trackers: "tensorboard", "wandb", "all", "none"
        "every_steps": 10,
        "project": "svdrr",
    },
}


def deep_merge(base: dict, extra: dict, where: str = "") -> dict:
    """``base`` updated recursively by ``extra``; an unknown key is an error (typos must not pass silently),
    except inside free-form values (``data.generate``, a dict ``model.architecture``)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        path = f"{where}{key}"
        if key not in out:
            raise KeyError(f"unknown configuration key {path!r}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = deep_merge(out[key], value, path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_file(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text)
    try:
        import yaml
    except ImportError:
        raise SystemExit(f"{path}: reading YAML configs needs PyYAML (pip install pyyaml), or use a .json config") \
            from None
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r}: expected section.key=value")
    try:
        import yaml
        value = yaml.safe_load(raw)
    except ImportError:
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults <- file <- overrides, validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = deep_merge(cfg, load_file(path))
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """``cfg`` with each ``section.key=value`` merged in (unknown keys are KeyErrors, as in :func:`deep_merge`)."""
    for item in overrides:
        keys, value = parse_override(item)
        patch: dict = {}
        node = patch
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        cfg = deep_merge(cfg, patch)
    return cfg


def validate(cfg: dict) -> None:
    t = cfg["train"]
    problems = []
    if cfg["data"]["root"] is None:
        problems.append("data.root is required")
    if cfg["checkpoint"]["output_dir"] is None:
        problems.append("checkpoint.output_dir is required")
    if t["batch_size"] < 1 or t["max_train_steps"] < 1 or t["gradient_accumulation_steps"] < 1:
        problems.append("train.batch_size, max_train_steps and gradient_accumulation_steps must be >= 1")
    if not 0.0 <= t["conditioning_dropout_prob"] <= 1.0 / 3.0:
        problems.append("train.conditioning_dropout_prob must be in [0, 1/3]")
    if t["mixed_precision"] not in (None, "no", "fp16", "bf16"):
        problems.append("train.mixed_precision must be null, no, fp16 or bf16")
    if cfg["model"]["init_from"] and cfg["model"]["pixart"]:
        problems.append("model.init_from and model.pixart are exclusive (a later stage starts from the earlier one)")
    if problems:
        raise ValueError("bad training config: " + "; ".join(problems))
