"""Model weights: the catalogue (``Resources/models.json``), the cache, and downloads with sha256 verification.

``resolve("svdrr-dit-fb-256")`` gives a local folder, looked for in this order (DESIGN.md section 6):

1. a path to an existing folder is returned as it is;
2. the cache, ``SVDRR_HOME/models/<name>/<revision>`` (``SVDRR_HOME`` defaults to ``~/.cache/svdrr``);
3. a download of the files the cache lacks: from the Hugging Face hub (``huggingface_hub.hf_hub_download``), from
   a plain HTTP(S) address, or from a model folder embedded in ``Resources/``.

Security: only the files the catalogue lists are fetched, and only ``.safetensors``, ``.json`` and ``.txt`` files,
never code or pickles; nothing fetched is executed or unpickled.

Each file lands first in a staging folder beside the cache, is hashed and checked against the catalogue's sha256 and
size, and only then moves into place by an atomic rename, so a failed or corrupt download never leaves a file in the
cache. Where the catalogue has no sha256 yet (``"verified": false``) the hash of the first download is recorded in
the folder's ``.svdrr-weights.json`` (trust on first use), with a notice, and ``verify`` checks against it later.

Offline (``SVDRR_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``offline=True``) only the cache is used, and missing files
are an error that names them. Every error is a :class:`WeightsError` with a one-line message.
"""
from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path


class WeightsError(RuntimeError):
    """A model that cannot be found, fetched or trusted; the message is one line meant for the user."""


# WeightsError is defined above, before the submodules that raise it are imported.
from .cache import (GOOD_STATUSES, RECORD_NAME, FileCheck, VerifyReport, _cached, _Record, _required_files,
                    cache_status, home, model_folder, sha256_of, verify)
from .catalogue import (ALLOWED_SUFFIXES, CATALOGUE_NAME, Catalogue, ModelEntry, ModelFile, Source, _catalogue,
                        check_file_path, layout_differences)
from .download import Progress, _download, logger

#: kind -> "module:function" that writes a randomly initialised model of that kind, imported only when used (so
#: listing models works without diffusers). Called as ``function(out_dir, config=..., resolution=...)``.
RANDOM_FACTORIES = {"svdrr": "SVDRRLogic.models:create_random", "dvg": "SVDRRLogic.models.dvg:create_random",
                    "patch-edm": "SVDRRLogic.models.patch_edm:create_random"}


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("SVDRR_OFFLINE", "HF_HUB_OFFLINE"))


# ---------------------------------------------------------------------------------------------------------- resolve
def resolve(name_or_path: str | os.PathLike, offline: bool | None = None, cache_dir=None, progress: Progress = True,
            *, catalogue=None, check: bool = False) -> Path:
    """A local folder holding the model: an existing folder path as is, else the cache, else a download.

    ``progress``: True for progress bars on stderr, False for silence, or ``callable(file, done_bytes, total)``.
    ``check`` re-hashes every cached file (else the cache is trusted by recorded size) and fetches bad ones again.
    ``catalogue``: a :class:`Catalogue` or the path of a catalogue file (default ``Resources/models.json``).
    """
    given = Path(name_or_path).expanduser()
    if given.is_dir():
        return given
    text = str(name_or_path)
    cat = _catalogue(catalogue)
    if text not in cat.entries and not any(e.source.hf == text for e in cat) and (
            os.sep in text or "/" in text or text.startswith((".", "~"))):
        raise WeightsError(f"no model folder at {text} (and it is not a model of the catalogue)")
    entry = cat.get(text)
    folder = model_folder(entry, cache_dir)
    record = _Record(folder)
    todo = [f for f in _required_files(entry) if not _cached(f, folder, record, check)]
    if not todo:
        return folder
    if is_offline(offline) and entry.source.type != "embedded":  # copying an embedded model needs no network
        missing = [f.path for f in todo if not (folder / f.path).is_file()]
        unsure = [f.path for f in todo if (folder / f.path).is_file()]
        what = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                     f"unverified or damaged {', '.join(unsure)}" if unsure else "") if x)
        raise WeightsError(f"model '{entry.name}' is not in the cache and offline mode is on: {what} in {folder} "
                           f"(run `svdrr models download {entry.name}` online, or give a folder path)")
    _download(entry, todo, folder, record, cat.root, progress)
    return folder


# ---------------------------------------------------------------------------------------------- random models
def create_random(name: str, out_dir: str | os.PathLike, config: str = "tiny", *, catalogue=None) -> Path:
    """Write a randomly initialised model of the kind of catalogue entry ``name`` into ``out_dir``, through the
    kind's factory in :data:`RANDOM_FACTORIES` (imported only now)."""
    entry = _catalogue(catalogue).get(name)
    target = RANDOM_FACTORIES.get(entry.kind)
    if target is None:
        raise WeightsError(f"no random initialiser for models of kind '{entry.kind}' ('{entry.name}') yet")
    module, func = target.split(":")
    try:
        factory = getattr(import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise WeightsError(f"creating a random '{entry.kind}' model needs {target}: {exc}") from None
    kwargs = {"config": config}
    if entry.resolution is not None and entry.kind == "svdrr":  # a 2D model's size is free; a 3D one's is its config
        kwargs["resolution"] = entry.resolution
    factory(Path(out_dir), **kwargs)
    return Path(out_dir)


__all__ = ["ALLOWED_SUFFIXES", "CATALOGUE_NAME", "GOOD_STATUSES", "RANDOM_FACTORIES", "RECORD_NAME", "Catalogue",
           "FileCheck", "ModelEntry", "ModelFile", "Progress", "Source", "VerifyReport", "WeightsError",
           "cache_status", "check_file_path", "create_random", "home", "is_offline", "layout_differences",
           "logger", "model_folder", "resolve", "sha256_of", "verify"]
