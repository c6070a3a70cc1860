"""The cache of model weights: its folders (``SVDRR_HOME/models/<name>/<revision>``), the sha256 record file
``.svdrr-weights.json`` of each folder, the cheap :func:`cache_status` and the re-hashing :func:`verify`."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import WeightsError
from .catalogue import ModelEntry, ModelFile, _catalogue

RECORD_NAME = ".svdrr-weights.json"
_CHUNK = 1 << 20


def home(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``SVDRR_HOME``, else ``~/.cache/svdrr``."""
    return Path(cache_dir or os.environ.get("SVDRR_HOME") or "~/.cache/svdrr").expanduser()


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
