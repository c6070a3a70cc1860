"""Downloads into the cache: from the Hugging Face hub, a plain HTTP(S) address, or a model folder embedded in
``Resources/``. Each file lands first in a staging folder beside the cache, is hashed and checked against the
catalogue's sha256 and size, and only then moves into place by an atomic rename; progress bars go to stderr."""
from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urljoin

from . import WeightsError
from .cache import _CHUNK, _Record, sha256_of
from .catalogue import ModelEntry, ModelFile, check_file_path

logger = logging.getLogger(__package__)  # the logger of SVDRRLogic.weights, as before the split

_COMMIT = re.compile(r"^[0-9a-f]{40}$")

Progress = bool | Callable[[str, int, int | None], None]


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

        from .. import __version__

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
