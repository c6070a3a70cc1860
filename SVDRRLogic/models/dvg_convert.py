"""Turn the DVG-Diffusion authors' PyTorch checkpoints into safetensors files, without unpickling code.

Their files are pickles: the VQ-GANs are PyTorch-Lightning ``.ckpt`` files (weights under ``"state_dict"``) and
the diffusion milestones are ``model-<n>.pt`` dicts ``{"step", "model", "ema", "scaler"}`` whose ``"model"`` and
``"ema"`` are state dicts of the whole ``GaussianDiffusion`` (``fine_model.*``, ``fit_model.*``, ``vqgan.*``,
``vqgan_bp.*``, ...). A pickle can run arbitrary code, so they are read only with
``torch.load(weights_only=True)``, which rebuilds tensors, containers and plain values and refuses anything else;
no extra classes are allowed. Lightning checkpoints that stored the Hydra/OmegaConf configuration in their
``hyper_parameters`` are therefore refused with instructions to re-save the weights alone where the authors'
environment is installed (loading that configuration would mean trusting their classes).
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .svdrr import ModelLoadError

#: Parts of the authors' VQ-GAN state dict used only for its adversarial/perceptual training; pass as
#: ``exclude`` to keep just the autoencoder that :class:`.vqgan3d.VQGAN3D` holds.
VQGAN_TRAINING_ONLY = ("image_discriminator.", "video_discriminator.", "perceptual_model.")

#: Where each network sits in the authors' ``FineStage`` state dict (milestones ``DVG_Diffusion.pt`` / ``model-N.pt``
#: and ``NewView_Coarse_Model.pt``); their Lightning VQ-GAN files hold one VQ-GAN at the top level instead.
FINESTAGE_PREFIXES = {"ct_vqgan": "vqgan.", "vpge": "vqgan_bp.", "vpge_new": "vqgan_bp025.",
                      "coarse": "fit_model.", "denoiser": "fine_model."}


def read_checkpoint(src_path: str | os.PathLike, *, prefix: str | None = None,
                    exclude: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors of an authors' checkpoint, read without unpickling code, as a state dict.

    The weights are the ``"state_dict"`` of a Lightning checkpoint, or else the whole file, with nested dicts
    flattened to dotted names (so a milestone's EMA denoiser is ``prefix="ema.fine_model."``). Only names starting
    with ``prefix`` are kept, with the prefix (and a ``module.`` left by ``DataParallel``) removed; names starting
    with any of ``exclude`` are dropped, as are values that are not tensors (step counters, scaler settings)."""
    src = Path(src_path).expanduser()
    return _select(_safe_load(src), src, prefix, exclude)


def _select(root, src: Path, prefix: str | None, exclude: Sequence[str]) -> dict[str, torch.Tensor]:
    if isinstance(root, Mapping) and isinstance(root.get("state_dict"), Mapping):
        root = root["state_dict"]
    tensors = dict(_flatten(root, ""))
    chosen = {}
    for name, tensor in tensors.items():
        if prefix and not name.startswith(prefix):
            continue
        name = name[len(prefix):] if prefix else name
        name = name[len("module."):] if name.startswith("module.") else name
        if not name.startswith(tuple(exclude)):
            chosen[name] = tensor
    if not chosen:
        groups = sorted({name.split(".")[0] for name in tensors})
        raise ModelLoadError(f"{src}: no tensors under prefix {prefix!r} (top-level names: {', '.join(groups[:8])})")
    return _separate_storage(chosen)


def read_part(src_path: str | os.PathLike, part: str) -> dict[str, torch.Tensor]:
    """One network's weights from whichever authors' file holds it: a Lightning VQ-GAN checkpoint (the whole
    autoencoder, without its discriminators and perceptual network), a diffusion milestone (its EMA copy, which
    their evaluation samples with) or the coarse model's file (``{"model": FineStage keys}``)."""
    src = Path(src_path).expanduser()
    root = _safe_load(src)
    inner = FINESTAGE_PREFIXES[part]
    if isinstance(root, Mapping) and isinstance(root.get("state_dict"), Mapping):
        return _select(root, src, None, VQGAN_TRAINING_ONLY)
    for outer in ("ema", "model"):
        if isinstance(root, Mapping) and isinstance(root.get(outer), Mapping) and any(
                str(k).startswith(inner) for k in root[outer]):
            return _select(root, src, f"{outer}.{inner}", ())
    return _select(root, src, inner, ())


def convert_dvg_release(out_folder: str | os.PathLike, diffusion: str | os.PathLike, *,
                        ct_vqgan: str | os.PathLike | None = None, vpge: str | os.PathLike | None = None,
                        vpge_new: str | os.PathLike | None = None, coarse: str | os.PathLike | None = None,
                        config: str | dict = "paper") -> Path:
    """A DVG model folder (:func:`~SVDRRLogic.models.dvg.load_dvg` reads it) from the authors' release
    (``xing0916/DVG-Diffusion``): every network comes from the diffusion milestone ``diffusion`` unless its own
    file is given (their CT_VQGAN / VPGE_0_90_VQGAN / VPGE_45_VQGAN ``.ckpt`` and NewView_Coarse_Model.pt). Each
    state dict must fit the configured network key by key and shape by shape; nothing is written otherwise."""
    from .dvg import build_dvg, save_dvg
    from .recon_folder import check_state

    parts = build_dvg(config)
    given = {"ct_vqgan": ct_vqgan, "vpge": vpge, "vpge_new": vpge_new, "coarse": coarse, "denoiser": None}
    for part, module in parts.modules().items():
        src = given[part] or diffusion
        state = read_part(src, part)
        check_state(module, state, f"{src} ({part})")
        module.load_state_dict(state)
    return save_dvg(parts, out_folder)


def _safe_load(src: Path):
    """``torch.load`` restricted to tensors and plain containers; every failure is one ModelLoadError line."""
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"{src}: checkpoint not found") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if not found:   # a refused opcode: not a torch.save file, or a damaged one
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            raise ModelLoadError(f"{src}: unreadable checkpoint ({detail.group(1) if detail else 'not a pickle'})"
                                 ) from None
        raise ModelLoadError(
            f"{src}: the file contains non-tensor objects ({found.group(1)}) that are not loaded for safety; "
            f"re-save only its weights where the authors' code is installed and convert that file: python -c "
            f"\"import torch; c = torch.load('{src.name}', map_location='cpu', weights_only=False); "
            f"torch.save(c.get('state_dict', c), '{src.stem}_weights.pt')\"") from None
    except Exception as exc:  # a damaged or foreign file: zip, EOF or pickle-protocol errors
        raise ModelLoadError(f"{src}: unreadable checkpoint ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0]})") from None


def _flatten(value, name: str):
    """(dotted name, tensor) for every tensor in nested dicts; other values, lists included, are skipped."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, f"{name}.{key}" if name else str(key))


def _separate_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each on its own storage: safetensors refuses tensors that share memory, which a
    pickle keeps (tied weights, views); the first user of a storage keeps it and later ones get a copy."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone(memory_format=torch.contiguous_format) if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    return out
