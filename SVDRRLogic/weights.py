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

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urljoin, urlsplit

logger = logging.getLogger(__name__)

ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt")
RECORD_NAME = ".svdrr-weights.json"
CATALOGUE_NAME = "models.json"
#: kind -> "module:function" that writes a randomly initialised model of that kind, imported only when used (so
#: listing models works without diffusers). Called as ``function(out_dir, config=..., resolution=...)``.
RANDOM_FACTORIES = {"svdrr": "SVDRRLogic.models:create_random"}

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENTRY_KEYS = {"kind", "description", "source", "verified", "files", "licence", "licence_note", "preset",
               "normalization", "resolution", "note", "options", "demo"}
_REQUIRED_KEYS = {"kind", "source", "verified", "files", "licence", "preset", "normalization"}
_FILE_KEYS = {"path", "sha256", "size", "optional", "url"}
_CHUNK = 1 << 20

Progress = bool | Callable[[str, int, int | None], None]


class WeightsError(RuntimeError):
    """A model that cannot be found, fetched or trusted; the message is one line meant for the user."""


def home(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``SVDRR_HOME``, else ``~/.cache/svdrr``."""
    return Path(cache_dir or os.environ.get("SVDRR_HOME") or "~/.cache/svdrr").expanduser()


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("SVDRR_OFFLINE", "HF_HUB_OFFLINE"))


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
        from .geometry import preset_names
        from .resources import load_json, resources_dir

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


# ------------------------------------------------------------------------------------------------------------ cache
def model_folder(entry: ModelEntry, cache_dir=None) -> Path:
    return home(cache_dir) / "models" / entry.name / entry.source.folder_name


class _Record:
    """``.svdrr-weights.json``: what was downloaded into a cache folder, with the sha256 computed on arrival."""

    def __init__(self, folder: Path):
        self.path = folder / RECORD_NAME
        self.data = {"files": {}, "absent": []}
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict) and isinstance(loaded.get("files"), dict):
                self.data.update(loaded)
        except (OSError, ValueError):
            pass

    @property
    def files(self) -> dict:
        return self.data["files"]

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def sha256_of(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _required_files(entry: ModelEntry) -> tuple[ModelFile, ...]:
    if entry.files is None:
        raise WeightsError(f"model '{entry.name}' has no file list in the catalogue yet ({entry.source.describe()}); "
                           "download and convert it yourself and give its folder path instead")
    return entry.files


def _cached(f: ModelFile, folder: Path, record: _Record, rehash: bool) -> bool:
    """Whether the cache holds ``f`` as recorded (and, with ``rehash``, with the recorded content)."""
    if f.optional and f.path in record.data["absent"]:
        return True
    rec, p = record.files.get(f.path), folder / f.path
    if rec is None or not p.is_file():
        return False
    if f.sha256 is not None and rec.get("sha256") != f.sha256:
        return False  # the catalogue moved on since this file was downloaded
    if p.stat().st_size != rec.get("size"):
        return False
    return not rehash or sha256_of(p)[0] == rec.get("sha256")


def cache_status(entry: ModelEntry, cache_dir=None) -> str:
    """'cached', 'partial (k/n files)', 'not cached' or 'no file list' (cheap: no hashing)."""
    if entry.files is None:
        return "no file list"
    folder = model_folder(entry, cache_dir)
    record = _Record(folder)
    have = sum(_cached(f, folder, record, False) for f in entry.files)
    if have == len(entry.files):
        return "cached"
    return f"partial ({have}/{len(entry.files)} files)" if have else "not cached"


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


def _download(entry: ModelEntry, todo, folder: Path, record: _Record, root: Path, progress: Progress) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    fetch = {"hf": _HubFetcher, "url": _UrlFetcher, "embedded": _EmbeddedFetcher}[entry.source.type](
        entry, staging, progress, root)
    if entry.source.hf and fetch.commit is None and _COMMIT.match(str(record.data.get("commit", ""))):
        fetch.commit = record.data["commit"]  # a branch is pinned at its first download: files never mix commits
    unverified = []
    try:
        for f in todo:
            check_file_path(f.path, entry.name)
            got = fetch(f)
            if got is None:  # an optional file the source does not have
                record.data["absent"] = sorted(set(record.data["absent"]) | {f.path})
                record.save()
                continue
            digest, size = sha256_of(got)
            if f.sha256 is not None and digest != f.sha256:
                raise WeightsError(f"sha256 mismatch for {f.path}: expected {f.sha256} got {digest}"
                                   f" (download from {entry.source.describe()} discarded)")
            if f.size is not None and size != f.size:
                raise WeightsError(f"size mismatch for {f.path}: expected {f.size} bytes got {size}"
                                   f" (download from {entry.source.describe()} discarded)")
            dest = folder / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, dest)
            record.files[f.path] = {"sha256": digest, "size": size, "verified": f.sha256 is not None}
            record.data["absent"] = [p for p in record.data["absent"] if p != f.path]
            record.data.update(name=entry.name, source=entry.source.describe())
            if getattr(fetch, "commit", None):
                record.data["commit"] = fetch.commit
            record.save()
            if f.sha256 is None:
                unverified.append(f.path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if unverified:  # said even when a later file failed: these hashes are recorded all the same
            commit = record.data.get("commit")
            _notice(progress, f"svdrr: the catalogue has no sha256 for {len(unverified)} file(s) of '{entry.name}': "
                              f"recorded the hashes of this download{f' (commit {commit})' if commit else ''} in "
                              f"{record.path} (trust on first use; `svdrr models verify {entry.name}` checks them)")


def _notice(progress: Progress, message: str) -> None:
    if progress is True:
        print(message, file=sys.stderr)
    logger.info(message)


def _bar_class(progress: Progress, label: str):
    """A tqdm class showing ``label`` on stderr (only when ``progress is True``) and feeding a progress callback."""
    from tqdm import tqdm

    class _Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs.update(desc=label, disable=progress is not True, file=sys.stderr)
            kwargs.setdefault("unit", "B")
            kwargs.setdefault("unit_scale", True)
            self._done = kwargs.get("initial", 0) or 0
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            self._done += n or 0
            if callable(progress):
                progress(label, self._done, self.total)
            return super().update(n)

    return _Bar


class _Fetcher:
    def __init__(self, entry: ModelEntry, staging: Path, progress: Progress, root: Path):
        self.entry, self.staging, self.progress, self.root = entry, staging, progress, root
        self.commit = None

    def target(self, f: ModelFile) -> Path:
        p = self.staging / f.path
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


class _EmbeddedFetcher(_Fetcher):
    def __call__(self, f: ModelFile) -> Path | None:
        src = self.root / self.entry.source.embedded / f.path
        if not src.is_file():
            if f.optional:
                return None
            raise WeightsError(f"embedded model '{self.entry.name}' lacks {f.path} in {src.parent} "
                               "(incomplete installation)")
        shutil.copyfile(src, self.target(f))
        return self.target(f)


class _UrlFetcher(_Fetcher):
    def __call__(self, f: ModelFile) -> Path | None:
        from urllib.error import HTTPError, URLError
        from urllib.request import Request, urlopen

        from . import __version__

        url = f.url or urljoin(self.entry.source.url.rstrip("/") + "/", quote(f.path))
        what = f"{f.path} of '{self.entry.name}' from {url}"
        try:
            response = urlopen(Request(url, headers={"User-Agent": f"svdrr/{__version__}"}), timeout=60)
        except HTTPError as exc:
            if exc.code == 404 and f.optional:
                return None
            raise WeightsError(f"cannot download {what}: HTTP {exc.code} {exc.reason}") from None
        except (URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise WeightsError(f"cannot download {what}: {reason} (set SVDRR_OFFLINE=1 to use the cache only)") \
                from None
        dest = self.target(f)
        total = int(response.headers.get("Content-Length") or 0) or f.size
        try:
            with response, open(dest, "wb") as out, _bar_class(self.progress, f.path)(total=total) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except OSError as exc:
            raise WeightsError(f"cannot download {what}: {exc}") from None
        return dest


class _HubFetcher(_Fetcher):
    """Per-file ``hf_hub_download`` into the staging folder, all files from one commit (resolved once)."""

    def __init__(self, *args):
        super().__init__(*args)
        try:
            import huggingface_hub
        except ImportError:
            raise WeightsError(f"downloading '{self.entry.name}' from the Hugging Face hub needs huggingface_hub "
                               "(pip install huggingface_hub), or give the folder path of a copy") from None
        self.hub = huggingface_hub
        self.endpoint = os.environ.get("HF_ENDPOINT") or None
        self.revision = self.entry.source.revision or "main"
        self.commit = self.revision if _COMMIT.match(self.revision) else None
        self.has_tqdm_class = "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters

    def _error(self, exc: Exception, path: str) -> WeightsError:
        names = {c.__name__ for c in type(exc).__mro__}
        where = f"{self.entry.source.hf}@{self.revision}"
        if names & {"RepositoryNotFoundError", "GatedRepoError"}:
            return WeightsError(f"Hugging Face repository {self.entry.source.hf} not found or not accessible")
        if "RevisionNotFoundError" in names:
            return WeightsError(f"revision {self.revision!r} not found in {self.entry.source.hf}")
        if "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names:
            return WeightsError(f"{path} not found in {where} (the catalogue's file list may be out of date)")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        network = any(k in n for n in names for k in ("Connect", "Timeout", "LocalEntryNotFound", "Offline"))
        return WeightsError(f"cannot download {path} of '{self.entry.name}' from {where} "
                            f"({self.endpoint or 'huggingface.co'}): {first}"
                            + (" (set SVDRR_OFFLINE=1 to use the cache only)" if network else ""))

    def _resolve_commit(self) -> str:
        """One HEAD request pins the revision to a commit, so every file comes from the same snapshot."""
        first = next(f for f in self.entry.files if not f.optional).path
        url = self.hub.hf_hub_url(self.entry.source.hf, first, revision=self.revision, endpoint=self.endpoint)
        try:
            commit = self.hub.get_hf_file_metadata(url).commit_hash
        except Exception as exc:  # noqa: BLE001 - every hub or network failure becomes one line
            raise self._error(exc, first) from None
        if not commit:
            raise WeightsError(f"{self.endpoint or 'huggingface.co'} did not say which commit "
                               f"{self.entry.source.hf}@{self.revision} is (no X-Repo-Commit header)")
        return commit

    def __call__(self, f: ModelFile) -> Path | None:
        if self.commit is None:
            self.commit = self._resolve_commit()
        kwargs = {"repo_id": self.entry.source.hf, "filename": f.path, "revision": self.commit,
                  "local_dir": str(self.staging), "endpoint": self.endpoint}
        if self.has_tqdm_class:
            kwargs["tqdm_class"] = _bar_class(self.progress, f.path)
        try:
            got = Path(self.hub.hf_hub_download(**kwargs))
        except Exception as exc:  # noqa: BLE001 - as above
            names = {c.__name__ for c in type(exc).__mro__}
            if f.optional and "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names:
                return None
            raise self._error(exc, f.path) from None
        if got.resolve() != (self.staging / f.path).resolve():
            raise WeightsError(f"huggingface_hub put {f.path} outside the staging folder ({got})")
        return got


# ----------------------------------------------------------------------------------------------------------- verify
@dataclass
class FileCheck:
    path: str
    status: str  # ok | recorded | absent | missing | corrupt | unverifiable
    detail: str = ""


GOOD_STATUSES = ("ok", "recorded", "absent")


@dataclass
class VerifyReport:
    name: str
    folder: Path
    checks: list[FileCheck]

    @property
    def ok(self) -> bool:
        return all(c.status in GOOD_STATUSES for c in self.checks)

    def with_status(self, *statuses: str) -> list[str]:
        return [c.path for c in self.checks if c.status in statuses]

    @property
    def missing(self) -> list[str]:
        return self.with_status("missing")

    @property
    def corrupt(self) -> list[str]:
        return self.with_status("corrupt")

    def lines(self) -> list[str]:
        return [f"{c.status:<13} {c.path}{f'  ({c.detail})' if c.detail else ''}" for c in self.checks]


def verify(name: str, cache_dir=None, *, catalogue=None) -> VerifyReport:
    """Re-hash every cached file of ``name`` against the catalogue's sha256 (or, where the catalogue has none, the
    sha256 recorded at download). Statuses: ok (matches the catalogue), recorded (matches the trust-on-first-use
    record), absent (optional file the source does not have), missing, corrupt, unverifiable (no hash to compare)."""
    entry = _catalogue(catalogue).get(name)
    folder = model_folder(entry, cache_dir)
    record = _Record(folder)
    checks = []
    for f in _required_files(entry):
        p, rec = folder / f.path, record.files.get(f.path) or {}
        if not p.is_file():
            absent = f.optional and f.path in record.data["absent"]
            checks.append(FileCheck(f.path, "absent" if absent else "missing"))
            continue
        digest, _ = sha256_of(p)
        expected = f.sha256 or rec.get("sha256")
        if expected is None:
            checks.append(FileCheck(f.path, "unverifiable", "no sha256 in the catalogue or the download record"))
        elif digest != expected:
            checks.append(FileCheck(f.path, "corrupt", f"sha256 expected {expected} got {digest}"))
        else:
            checks.append(FileCheck(f.path, "ok" if f.sha256 else "recorded",
                                    "" if f.sha256 else "matches the hash recorded at first download"))
    return VerifyReport(entry.name, folder, checks)


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
    if entry.resolution is not None:
        kwargs["resolution"] = entry.resolution
    factory(Path(out_dir), **kwargs)
    return Path(out_dir)


def layout_differences(entry: ModelEntry, folder: str | os.PathLike) -> list[str]:
    """Required catalogue files that ``folder`` lacks (empty when the layouts agree, or without a file list)."""
    return [f.path for f in entry.files or () if not f.optional and not (Path(folder) / f.path).is_file()]
