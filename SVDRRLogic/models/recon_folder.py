"""Folders of the X-ray-to-CT models: ``config.json`` plus one safetensors file per network, nothing executable.

Layout (written by :func:`save_model_folder`, read by :func:`read_config` and :func:`load_module`)::

    config.json           {"kind": "dvg" | "patch-edm", "format": 1, ...the model's configuration...}
    <part>.safetensors    the state dict of one network (e.g. ct_vqgan, vpge, coarse, denoiser)

The configuration names the networks and their constructor arguments; the loader builds them from our own
classes and fills them with tensors only, checking every key and shape, so a folder can never run code.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .svdrr import ModelLoadError

FORMAT = 1
CONFIG_NAME = "config.json"


def save_model_folder(folder: str | os.PathLike, kind: str, config: dict,
                      modules: dict[str, torch.nn.Module]) -> Path:
    """Write the folder atomically (a sibling temp folder renamed into place) and return it."""
    out = Path(folder).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a model folder is as readable as any new folder
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps({"kind": kind, "format": FORMAT, **config}, indent=2) + "\n")
        for name, module in modules.items():
            state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
            save_file(state, str(tmp / f"{name}.safetensors"))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(folder: str | os.PathLike, kind: str | None = None) -> dict:
    """The folder's configuration; a one-line :class:`ModelLoadError` when it is missing, broken or of the wrong
    kind."""
    path = Path(folder).expanduser() / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path.parent}: not a reconstruction model folder (no {CONFIG_NAME})") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable model configuration ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: not a model configuration of format {FORMAT}")
    if kind is not None and config.get("kind") != kind:
        raise ModelLoadError(f"{path.parent}: a {config.get('kind')!r} model, not {kind!r}")
    return config


def build_from_folder(folder: str | os.PathLike, kind: str, build_empty: Callable[[dict], Any], what: str):
    """``build_empty(config)`` for the folder's configuration (networks on the meta device, to be filled with
    :func:`load_module`); a configuration the builder rejects is one :class:`ModelLoadError` line."""
    cfg = read_config(folder, kind)
    cfg.pop("kind"), cfg.pop("format")
    try:
        return build_empty(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: invalid {what} configuration ({exc})") from None


def load_module(module: torch.nn.Module, folder: str | os.PathLike, name: str) -> torch.nn.Module:
    """Fill ``module`` (materialized on the CPU if it is still on the meta device) from
    ``<folder>/<name>.safetensors``; every key and shape must match."""
    module.to_empty(device="cpu")
    path = Path(folder).expanduser() / f"{name}.safetensors"
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise ModelLoadError(f"{path.parent}: missing weights {path.name}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ModelLoadError(f"{path}: unreadable weights ({str(exc).splitlines()[0]})") from None
    check_state(module, state, str(path))
    module.load_state_dict(state)
    return module


def check_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """A one-line error naming the first missing, unexpected or mis-shaped keys of ``state`` for ``module``."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k} is {found[k]}, expected {expected[k]}" for k in expected
                 if k in found and found[k] != expected[k]]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelLoadError(f"{where}: weights do not fit the configured network: {'; '.join(problems[:3])}{more}")
