"""SV-DRR model folders in the authors' layout: write random ones, load any (theirs included) without their code.

The released folders (Hugging Face ``xiechun-tsukuba/svdrr-dit-fb-{256,512,1024}``) hold one subfolder per part,
each with a config and weights: ``transformer/``, ``vae/``, ``image_encoder/``, ``scheduler/``, ``cc_projection/``
(and possibly ``feature_extractor/``, which their download script skips), plus a ``model_index.json`` that names
two classes from their repository (``pipeline_svdrr_DiT.CCProjection``, ``svdrr_transformer_2d.
SvdrrTransformer2DModel``). Loading that index through ``DiffusionPipeline.from_pretrained`` would import those
modules; :func:`load_svdrr` never reads class names from files: each subfolder goes to a fixed class of ours or of
diffusers/transformers, weights come from safetensors only (a ``.bin`` is read with ``torch.load(weights_only=
True)``, which unpickles tensors but no code), and nothing is ever executed from the folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .svdrr import (CCProjection, ModelLoadError, SVDRRComponents, build_svdrr, dpm_solver_from_config,
                    feature_extractor_config, image_processor_class, vae_scale_factor)

log = logging.getLogger(__name__)

#: The authors' model_index.json, as their ``SvdrrDiTPipeline.save_pretrained`` writes it (custom modules named by
#: file, feature extractor and safety checker optional). Written by :func:`create_random`; never interpreted.
AUTHORS_MODEL_INDEX = {
    "_class_name": "SvdrrDiTPipeline",
    "cc_projection": ["pipeline_svdrr_DiT", "CCProjection"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "transformer": ["svdrr_transformer_2d", "SvdrrTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
REQUIRED = ("transformer", "vae", "image_encoder", "cc_projection", "scheduler")
_CONFIG_FILE = {"scheduler": "scheduler_config.json", "feature_extractor": "preprocessor_config.json"}
_BIN_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


def create_random(out_dir: str | os.PathLike, config: str | dict = "tiny", resolution: int | None = None, *,
                  weights: bool = True, seed: int = 0) -> Path:
    """Write a randomly initialized SV-DRR model in the authors' folder layout and return the folder.

    ``weights=False`` writes the configs only (built on the meta device: the paper model at 512 px would be
    ~2.5 GB of float32). The transformer config carries the authors' class name ``SvdrrTransformer2DModel`` and
    ``model_index.json`` their custom-module references, exactly what a loader meets in their folders.
    """
    parts = build_svdrr(config, resolution, empty=not weights, seed=seed)
    return save_svdrr(parts, out_dir, weights=weights)


def save_svdrr(parts: SVDRRComponents, out_dir: str | os.PathLike, *, weights: bool = True) -> Path:
    """Write ``parts`` in the authors' folder layout (what :func:`load_svdrr` reads; used by :func:`create_random`
    and by the training export) and return the folder. Weights are safetensors; ``weights=False`` writes configs.
    """
    import diffusers
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "cc_projection"):
        module = getattr(parts, name)
        if weights:
            module.save_pretrained(out / name, safe_serialization=True)
        else:
            module.save_config(out / name)
    if weights:
        with _quiet_transformers():
            parts.image_encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    else:
        parts.image_encoder.config.save_pretrained(out / "image_encoder")
    parts.feature_extractor.save_pretrained(out / "feature_extractor")
    parts.scheduler.save_pretrained(out / "scheduler")
    cfg_path = out / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "SvdrrTransformer2DModel"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    index = {**AUTHORS_MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def load_svdrr(folder: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> SVDRRComponents:
    """Load an SV-DRR folder (the authors' or ours) into fixed classes, on ``device`` in ``dtype``.

    The VAE stays in float32 when ``dtype`` is float16 and its config asks for upcasting (the SDXL VAE overflows
    in fp16). Errors are one line naming the subfolder and the problem (missing, configs only, pickled weights
    on an old torch, shapes that do not fit together).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"{root}: SV-DRR model folder not found")
    missing = [s for s in REQUIRED if not (root / s).is_dir()]
    if missing:
        raise ModelLoadError(f"{root}: not an SV-DRR model folder, missing subfolder(s) {', '.join(missing)}")
    scheduler_cfg = _read_json(root, "scheduler")
    # caption_channels=None drops PixArt's T5 projection if a config still names it (the authors' inference
    # script sets ``transformer.caption_projection = None`` for the same reason); its weights are then ignored.
    vae_dtype = dtype
    if dtype == torch.float16 and _read_json(root, "vae").get("force_upcast", False):
        vae_dtype = torch.float32
    transformer = _load_diffusers(PixArtTransformer2DModel, root, "transformer", dtype, caption_channels=None)
    vae = _load_diffusers(AutoencoderKL, root, "vae", vae_dtype)
    cc_projection = _load_diffusers(CCProjection, root, "cc_projection", dtype)
    image_encoder = _load_clip(root).to(dtype=dtype)
    if (root / "feature_extractor" / _CONFIG_FILE["feature_extractor"]).is_file():
        feature_extractor = image_processor_class().from_pretrained(root / "feature_extractor")
    else:  # their download script does not fetch it; the pipeline does not need it
        feature_extractor = image_processor_class()(**feature_extractor_config(image_encoder.config.image_size))
    parts = SVDRRComponents(transformer, vae, image_encoder, feature_extractor, cc_projection,
                            dpm_solver_from_config(scheduler_cfg))
    check_compatible(parts, str(root))
    for module in (transformer, image_encoder, cc_projection, vae):
        module.to(device).eval().requires_grad_(False)
    return parts


def check_compatible(parts: SVDRRComponents, where: str = "model") -> None:
    """The shape contract between the parts; a mismatch means parts of different models were mixed."""
    t, v = parts.transformer.config, parts.vae.config
    latent = v.latent_channels
    problems = []
    if t.in_channels != 2 * latent:
        problems.append(f"transformer in_channels {t.in_channels} != 2 x VAE latent_channels {latent}")
    if t.out_channels not in (latent, 2 * latent):
        problems.append(f"transformer out_channels {t.out_channels} is neither {latent} nor {2 * latent}")
    want_in = parts.image_encoder.config.projection_dim + 4
    if parts.cc_projection.config.in_channel != want_in:
        problems.append(f"cc_projection in_channel {parts.cc_projection.config.in_channel} != CLIP "
                        f"projection_dim + 4 = {want_in}")
    width = t.cross_attention_dim or t.num_attention_heads * t.attention_head_dim
    if parts.cc_projection.config.out_channel != width:
        problems.append(f"cc_projection out_channel {parts.cc_projection.config.out_channel} != transformer "
                        f"cross_attention_dim {width}")
    if problems:
        raise ModelLoadError(f"{where}: incompatible SV-DRR parts: " + "; ".join(problems))


# -- helpers -----------------------------------------------------------------------------------------------
def _read_json(root: Path, sub: str) -> dict:
    path = root / sub / _CONFIG_FILE.get(sub, "config.json")
    if not path.is_file():
        raise ModelLoadError(f"{root}: {sub}/{path.name} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable config ({exc})") from None


def _weights_kind(root: Path, sub: str) -> str:
    """'safetensors' (single or sharded), 'bin' (a pickle only), or raise when there are no weights at all."""
    _read_json(root, sub)
    names = {p.name for p in (root / sub).iterdir()}
    if any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        return "safetensors"
    if any(n in names for n in _BIN_NAMES):
        return "bin"
    raise ModelLoadError(f"{root}: {sub}/ has a config but no weights (*.safetensors)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_transformers():
    """No tqdm bars from transformers while loading/saving: worker stderr lines become log events."""
    from transformers.utils import logging as tlog
    enabled = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            tlog.enable_progress_bar()


def _safetensors_shapes(directory: Path) -> dict[str, tuple]:
    """Tensor names and shapes from the safetensors headers, without reading the tensors."""
    from safetensors import safe_open
    shapes: dict[str, tuple] = {}
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
            raise ModelLoadError(f"{path}: damaged weights file ({_first_line(exc)})") from None
    return shapes


def _check_keys(expected: dict[str, tuple], found: dict[str, tuple], where: str, ignore: tuple = ()) -> None:
    """Missing tensors and wrong shapes are errors (a loader would leave random weights or fail deep inside);
    extra tensors (e.g. an old ``position_ids`` buffer, a dropped ``caption_projection``) are only logged."""
    missing = [k for k in expected if k not in found]
    wrong = [f"{k} is {list(found[k])} in the file, {list(expected[k])} in the config"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if wrong:
        raise ModelLoadError(f"{where}: wrong shape, {wrong[0]}" + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1
                                                                  else ""))
    if missing:
        raise ModelLoadError(f"{where}: {len(missing)} tensor(s) missing from the weights, e.g. {missing[0]}")
    extra = [k for k in found if k not in expected and not k.startswith(ignore)]
    if extra:
        log.warning("%s: ignoring %d unexpected tensor(s), e.g. %s", where, len(extra), extra[0])


def _expected_shapes(build) -> dict[str, tuple]:
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _load_diffusers(cls, root: Path, sub: str, dtype: torch.dtype, **overrides):
    kind = _weights_kind(root, sub)
    config = {**_read_json(root, sub), **overrides}
    try:
        expected = _expected_shapes(lambda: cls.from_config(config))
    except Exception as exc:
        raise ModelLoadError(f"{root}: {sub}/config.json does not describe a {cls.__name__}: "
                             f"{_first_line(exc)}") from exc
    ignore = ("caption_projection.",) if cls is PixArtTransformer2DModel else ()
    if kind == "bin":
        return _load_pickled_state(cls.from_config(config), root, sub, expected, ignore).to(dtype=dtype)
    _check_keys(expected, _safetensors_shapes(root / sub), f"{root}/{sub}", ignore)
    try:
        return cls.from_pretrained(root, subfolder=sub, use_safetensors=True, local_files_only=True,
                                   torch_dtype=dtype, **overrides)
    except Exception as exc:  # diffusers reports problems with multi-line messages
        raise ModelLoadError(f"{root}: cannot load {sub}/ as {cls.__name__}: {_first_line(exc)}") from exc


def _load_clip(root: Path) -> CLIPVisionModelWithProjection:
    sub = "image_encoder"
    kind = _weights_kind(root, sub)
    try:
        config = CLIPVisionConfig.from_pretrained(root / sub)
        expected = _expected_shapes(lambda: CLIPVisionModelWithProjection(config))
    except Exception as exc:
        raise ModelLoadError(f"{root}: {sub}/config.json is not a CLIP vision config: {_first_line(exc)}") from exc
    if kind == "bin":
        return _load_pickled_state(CLIPVisionModelWithProjection(config), root, sub, expected)
    _check_keys(expected, _safetensors_shapes(root / sub), f"{root}/{sub}")
    try:
        with _quiet_transformers():
            return CLIPVisionModelWithProjection.from_pretrained(root / sub, use_safetensors=True,
                                                                 local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"{root}: cannot load {sub}/ as CLIPVisionModelWithProjection: "
                             f"{_first_line(exc)}") from exc


def _load_pickled_state(model: Any, root: Path, sub: str, expected: dict, ignore: tuple = ()) -> Any:
    """Weights from a ``.bin`` through ``torch.load(weights_only=True)``: only tensors and plain containers are
    unpickled, so a malicious file cannot run code. Needs torch >= 2.6 (CVE-2025-32434 broke weights_only
    before); on older torch we refuse rather than trust the pickle."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    path = next(root / sub / n for n in _BIN_NAMES if (root / sub / n).is_file())
    if (major, minor) < (2, 6):
        raise ModelLoadError(f"{path}: pickled weights need torch >= 2.6 to be read safely; convert them to "
                             "safetensors or upgrade torch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: refused or unreadable ({_first_line(exc)})") from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: not a state dict")
    _check_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, f"{root}/{sub}", ignore)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model


__all__ = ["AUTHORS_MODEL_INDEX", "check_compatible", "create_random", "load_svdrr", "save_svdrr",
           "vae_scale_factor"]
