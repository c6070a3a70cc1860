"""Where the CTs of a dataset come from: a folder of patients (LIDC-IDRI DICOM tree, NIfTI/NRRD/MHA files) or
generated chest phantoms. Each source has a patient id, and loads on demand (rendering loads one CT at a time).

Patient ids: an LIDC-IDRI id (``LIDC-IDRI-0001``) found anywhere in the path wins; otherwise a volume file is named
after its folder when that folder holds only this volume (the authors' ``nii/<patient>/<file>.nii.gz``) or after
its file name, and a DICOM patient after its top-level folder. Discovery is deterministic (sorted), so every
process of a distributed run sees the same list.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from SVDRRLogic.images import CTVolume, ImageError
from SVDRRLogic.io import list_dicom_series, load_ct
from SVDRRLogic.io.common import ITK_SUFFIXES, is_dicom_file, suffix_of

LIDC_ID = re.compile(r"LIDC-IDRI-\d{4}")


@dataclass(frozen=True)
class CTSource:
    """One patient's CT: ``kind`` is "volume" (a file), "dicom" (a folder searched recursively) or "phantom"."""

    patient_id: str
    kind: str
    path: str | None = None
    seed: int | None = None
    phantom_shape: tuple[int, int, int] | None = None
    phantom_spacing: tuple[float, float, float] | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def describe(self) -> dict:
        d = {"kind": self.kind, "path": self.path}
        if self.kind == "phantom":
            d.update(seed=self.seed, shape=list(self.phantom_shape), spacing=list(self.phantom_spacing))
        return d

    def load(self) -> CTVolume:
        if self.kind == "phantom":
            from SVDRRLogic.phantoms import chest_phantom
            return chest_phantom(shape=self.phantom_shape, spacing=self.phantom_spacing, seed=self.seed)
        if self.kind == "volume":
            return load_ct(self.path)
        return load_ct(self.path, series_uid=choose_ct_series(Path(self.path)))


def choose_ct_series(folder: Path) -> str:
    """The CT series of a patient folder that may also hold X-ray series (LIDC-IDRI has CR/DX studies): the CT
    series with the most slices; a folder with no series labelled CT uses its largest series."""
    series = list_dicom_series(folder)
    if not series:
        raise ImageError(f"{folder}: no DICOM image series found")
    ct = [s for s in series if s.modality.upper() == "CT"]
    return (ct or series)[0].uid


def phantom_sources(n: int, seed: int = 0, shape: Sequence[int] = (128, 256, 256),
                    spacing: Sequence[float] = (1.4, 1.4, 2.5)) -> list[CTSource]:
    """``n`` chest phantoms with seeds ``seed .. seed + n - 1``, ids ``phantom-<seed>``."""
    if n < 1:
        raise ValueError("the number of phantoms must be at least 1")
    return [CTSource(f"phantom-{s:04d}", "phantom", seed=s, phantom_shape=tuple(int(v) for v in shape),
                     phantom_spacing=tuple(float(v) for v in spacing)) for s in range(seed, seed + n)]


def discover(ct_dir: str | os.PathLike) -> list[CTSource]:
    """Every patient CT under ``ct_dir`` (module docstring), sorted by patient id; duplicate ids are an error."""
    root = Path(ct_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: CT folder not found")
    volumes, dicom_dirs, loose_dicom = [], set(), False
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        here = Path(folder)
        patient_dir = None if here == root else _dicom_patient_dir(here, root)
        for name in sorted(names):
            path = here / name
            if suffix_of(path) in ITK_SUFFIXES:
                volumes.append(path)
            elif patient_dir is None:
                loose_dicom = loose_dicom or is_dicom_file(path)
            elif patient_dir not in dicom_dirs and is_dicom_file(path):
                dicom_dirs.add(patient_dir)
    sources = [CTSource(_volume_id(v, root, volumes), "volume", str(v)) for v in volumes]
    sources += [CTSource(_folder_id(d), "dicom", str(d)) for d in sorted(dicom_dirs)]
    if loose_dicom:
        sources.append(CTSource(_folder_id(root), "dicom", str(root)))
    ids = [s.patient_id for s in sources]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{root}: several CTs map to the same patient id(s) {dupes[:5]}; give one CT per patient")
    if not sources:
        raise FileNotFoundError(f"{root}: no CT found (DICOM folders, {', '.join(ITK_SUFFIXES)})")
    return sorted(sources, key=lambda s: s.patient_id)


def _dicom_patient_dir(folder: Path, root: Path) -> Path:
    """The patient folder of DICOM files in ``folder``: the outermost folder named like an LIDC-IDRI id (so a
    parent of ``LIDC-IDRI/`` works too), else the top-level folder under ``root``."""
    parts = folder.relative_to(root).parts
    for i, part in enumerate(parts):
        if LIDC_ID.fullmatch(part):
            return root.joinpath(*parts[:i + 1])
    return root / parts[0]


def _volume_id(path: Path, root: Path, volumes: list[Path]) -> str:
    rel = str(path.relative_to(root))
    m = LIDC_ID.search(rel)
    if m:
        return m.group(0)
    if path.parent != root and sum(v.parent == path.parent for v in volumes) == 1:
        return path.parent.name
    name = path.name
    return name[: -len(suffix_of(path))] if suffix_of(path) else name


def _folder_id(folder: Path) -> str:
    m = LIDC_ID.search(folder.name)
    return m.group(0) if m else folder.name
