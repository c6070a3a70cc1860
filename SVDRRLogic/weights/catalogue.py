"""The model catalogue (``Resources/models.json``): entries, their sources and files, all validated on load.

Security: only ``.safetensors``, ``.json`` and ``.txt`` files at plain relative paths are accepted
(:func:`check_file_path`), never code or pickles.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from . import WeightsError

ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt")
CATALOGUE_NAME = "models.json"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENTRY_KEYS = {"kind", "description", "source", "verified", "files", "licence", "licence_note", "preset",
               "normalization", "resolution", "note", "options", "demo"}
_REQUIRED_KEYS = {"kind", "source", "verified", "files", "licence", "preset", "normalization"}
_FILE_KEYS = {"path", "sha256", "size", "optional", "url"}


def check_file_path(path: str, model: str = "?") -> str:
    """Refuse anything but a plain relative path to a .safetensors, .json or .txt file."""
    p = PurePosixPath(path)
    if (not path or "\\" in path or ":" in path or p.is_absolute()
            or any(part in ("", ".", "..") or part.startswith(".") for part in path.split("/"))):
        raise WeightsError(f"refusing file {path!r} of model '{model}': not a plain relative path")
    if p.suffix.lower() not in ALLOWED_SUFFIXES:
        raise WeightsError(f"refusing file {path!r} of model '{model}': only {', '.join(ALLOWED_SUFFIXES)} files "
                           "are fetched, never code or pickles")
    return path


# --------------------------------------------------------------------------------------------------------- catalogue
@dataclass(frozen=True)
class ModelFile:
    path: str
    sha256: str | None = None
    size: int | None = None
    optional: bool = False
    url: str | None = None


@dataclass(frozen=True)
class Source:
    hf: str | None = None
    revision: str | None = None
    url: str | None = None
    embedded: str | None = None

    @property
    def type(self) -> str:
        return "hf" if self.hf else "url" if self.url else "embedded"

    @property
    def folder_name(self) -> str:
        """The cache sub-folder of this source: the hub revision, else the given revision, else the source type."""
        rev = self.revision or ("main" if self.hf else self.type)
        return rev.replace("/", "--")

    def describe(self) -> str:
        if self.hf:
            return f"hf:{self.hf}@{self.revision or 'main'}"
        return self.url if self.url else f"embedded:{self.embedded}"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    source: Source
    files: tuple[ModelFile, ...] | None
    verified: bool
    licence: str | None
    preset: str
    normalization: str
    resolution: int | None = None
    description: str = ""
    licence_note: str = ""
    note: str = ""
    options: dict = field(default_factory=dict)
    #: A small demonstration model (``"demo": true``): ``svdrr demo`` uses it, and its outputs say so.
    demo: bool = False

    @classmethod
    def from_dict(cls, name: str, d: dict, presets: set[str] | None = None) -> ModelEntry:
        def bad(msg):
            return WeightsError(f"model catalogue: model '{name}': {msg}")

        if not isinstance(d, dict):
            raise bad("entry is not an object")
        if not _NAME.match(name):
            raise bad("names may hold letters, digits, '.', '_' and '-' only")
        unknown = sorted(k for k in set(d) - _ENTRY_KEYS if not k.startswith("_"))
        if unknown:
            raise bad(f"unknown key(s) {', '.join(unknown)}")
        missing = sorted(_REQUIRED_KEYS - set(d))
        if missing:
            raise bad(f"missing key(s) {', '.join(missing)}")
        if not isinstance(d["kind"], str) or not _NAME.match(d["kind"]):
            raise bad(f"bad kind {d['kind']!r}")
        if presets is not None and d["preset"] not in presets:
            raise bad(f"preset {d['preset']!r} is not a geometry preset ({', '.join(sorted(presets))})")
        res = d.get("resolution")
        if res is not None and (not isinstance(res, int) or isinstance(res, bool) or res <= 0):
            raise bad(f"bad resolution {res!r}")
        if not isinstance(d["verified"], bool):
            raise bad("'verified' must be true or false")
        if not isinstance(d.get("demo", False), bool):
            raise bad("'demo' must be true or false")
        source = _source(d["source"], bad)
        files = None if d["files"] is None else _files(d["files"], name, d["verified"], source, bad)
        if source.embedded and (files is None or not d["verified"]):
            raise bad("an embedded model needs its file list with sha256 and size (\"verified\": true)")
        return cls(name=name, kind=d["kind"], source=source, files=files, verified=d["verified"],
                   licence=d["licence"], preset=d["preset"], normalization=d["normalization"], resolution=res,
                   description=d.get("description", ""), licence_note=d.get("licence_note", ""),
                   note=d.get("note", ""), options=dict(d.get("options") or {}), demo=d.get("demo", False))


def _source(s, bad) -> Source:
    if not isinstance(s, dict) or len({"hf", "url", "embedded"} & set(s)) != 1:
        raise bad("source must have exactly one of 'hf', 'url', 'embedded'")
    unknown = set(s) - {"hf", "url", "embedded", "revision"}
    if unknown:
        raise bad(f"unknown source key(s) {', '.join(sorted(unknown))}")
    src = Source(hf=s.get("hf"), revision=s.get("revision"), url=s.get("url"), embedded=s.get("embedded"))
    if src.hf is not None and not re.match(r"^[\w.-]+/[\w.-]+$", str(src.hf)):
        raise bad(f"bad Hugging Face repo id {src.hf!r}")
    if src.url is not None and urlsplit(str(src.url)).scheme not in ("http", "https"):
        raise bad(f"source url must be http(s), got {src.url!r}")
    if src.embedded is not None:
        parts = str(src.embedded).split("/")
        if not parts[0] == "models" or len(parts) != 2 or not _NAME.match(parts[1]):
            raise bad(f"embedded source must be 'models/<name>', got {src.embedded!r}")
    if src.revision is not None and (not isinstance(src.revision, str) or ".." in src.revision
                                     or not re.match(r"^[\w./-]+$", src.revision)):
        raise bad(f"bad revision {src.revision!r}")
    return src


def _files(items, name, verified, source, bad) -> tuple[ModelFile, ...]:
    if not isinstance(items, list) or not items:
        raise bad("'files' must be a non-empty list, or null while unknown")
    out, seen = [], set()
    for item in items:
        if not isinstance(item, dict) or "path" not in item:
            raise bad("each file needs a 'path'")
        unknown = set(item) - _FILE_KEYS
        if unknown:
            raise bad(f"file {item['path']!r}: unknown key(s) {', '.join(sorted(unknown))}")
        path = check_file_path(str(item["path"]), name)
        if path in seen:
            raise bad(f"file {path!r} is listed twice")
        seen.add(path)
        sha, size = item.get("sha256"), item.get("size")
        if sha is not None and not _SHA256.match(str(sha)):
            raise bad(f"file {path!r}: sha256 must be 64 lower-case hex digits")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise bad(f"file {path!r}: bad size {size!r}")
        if verified and (sha is None or size is None):
            raise bad(f"file {path!r}: a verified entry needs sha256 and size for every file")
        url = item.get("url")
        if url is not None and (source.url is None or urlsplit(str(url)).scheme not in ("http", "https")):
            raise bad(f"file {path!r}: a per-file url needs a url source and http(s)")
        out.append(ModelFile(path=path, sha256=sha, size=size, optional=bool(item.get("optional", False)), url=url))
    if all(f.optional for f in out):
        raise bad("at least one file must be required")
    return tuple(out)


class Catalogue:
    """The models of ``Resources/models.json`` (or of a given file), every entry validated on load."""

    def __init__(self, entries: dict[str, ModelEntry], root: Path, origin: str):
        self.entries = entries
        self.root = Path(root)  # embedded sources are relative to the catalogue's folder
        self.origin = origin

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Catalogue:
        from ..geometry import preset_names
        from ..resources import load_json, resources_dir

        if path is None:
            root = resources_dir()
            data = load_json(CATALOGUE_NAME)
            origin = str(root / CATALOGUE_NAME)
        else:
            path = Path(path)
            root, origin = path.parent, str(path)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise WeightsError(f"cannot read model catalogue {path}: {exc}") from None
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            raise WeightsError(f"model catalogue {origin} has no 'models' object")
        presets = set(preset_names())
        return cls({n: ModelEntry.from_dict(n, d, presets) for n, d in models.items()}, root, origin)

    def names(self) -> list[str]:
        return list(self.entries)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    def get(self, name: str) -> ModelEntry:
        """The entry named ``name`` (or whose Hugging Face repo id is ``name``)."""
        if name in self.entries:
            return self.entries[name]
        for e in self.entries.values():
            if e.source.hf and e.source.hf == name:
                return e
        raise WeightsError(f"unknown model '{name}' (known: {', '.join(self.entries) or 'none'}; "
                           "or give the path of a model folder)")

    __getitem__ = get


def _catalogue(catalogue) -> Catalogue:
    if isinstance(catalogue, Catalogue):
        return catalogue
    return Catalogue.load(catalogue)


def layout_differences(entry: ModelEntry, folder: str | os.PathLike) -> list[str]:
    """Required catalogue files that ``folder`` lacks (empty when the layouts agree, or without a file list)."""
    return [f.path for f in entry.files or () if not f.optional and not (Path(folder) / f.path).is_file()]
