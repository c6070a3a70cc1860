"""Dataset layout and split: ``<root>/manifest.json`` and one ``<root>/<patient>/views.json`` per patient.

Split (svdrr-method.md section 4.1): when the patients carry LIDC-IDRI ids and any of the authors' 16 held-out
patients are present, exactly those present form the test split; otherwise a deterministic fraction: a patient is
in the test split when the hash of its id falls below the fraction (stable as patients are added or removed),
with at least one test patient when there are two or more.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from SVDRRLogic.io.common import atomic_output

MANIFEST, VIEWS = "manifest.json", "views.json"
FORMAT = "svdrr-drr-dataset"

#: ``eval_patients.json`` of xiechun298/SV-DRR: the 16 patients held out from training and used for the tables.
AUTHORS_TEST_IDS = ("LIDC-IDRI-0251", "LIDC-IDRI-0376", "LIDC-IDRI-0813", "LIDC-IDRI-0089", "LIDC-IDRI-0671",
                    "LIDC-IDRI-0978", "LIDC-IDRI-0177", "LIDC-IDRI-0030", "LIDC-IDRI-0907", "LIDC-IDRI-0830",
                    "LIDC-IDRI-0609", "LIDC-IDRI-0755", "LIDC-IDRI-0356", "LIDC-IDRI-0725", "LIDC-IDRI-0952",
                    "LIDC-IDRI-0163")


def _unit_hash(patient_id: str) -> float:
    digest = hashlib.blake2b(patient_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def assign_split(ids: Iterable[str], test_ids: Iterable[str] | None = None,
                 test_fraction: float = 0.1) -> tuple[dict[str, str], str]:
    """({patient id: "train" | "test"}, a sentence saying which rule made the split)."""
    ids = sorted(set(ids))
    if test_ids is not None:
        chosen, rule = set(test_ids) & set(ids), "given test ids"
    elif set(AUTHORS_TEST_IDS) & set(ids):
        chosen, rule = set(AUTHORS_TEST_IDS) & set(ids), "the SV-DRR authors' 16 held-out LIDC-IDRI patients"
    else:
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test fraction must be in [0, 1), got {test_fraction}")
        chosen = {i for i in ids if _unit_hash(i) < test_fraction}
        if not chosen and len(ids) >= 2 and test_fraction > 0:
            chosen = {min(ids, key=_unit_hash)}
        rule = f"deterministic hash fraction {test_fraction:g} of the patient ids"
    return {i: ("test" if i in chosen else "train") for i in ids}, rule


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_output(path, ".json") as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset manifest "
                                "(render one with python -m training.svdrr.render_dataset)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not an SV-DRR DRR dataset manifest")
    return manifest


def read_views(patient_dir: str | Path) -> dict:
    return json.loads((Path(patient_dir) / VIEWS).read_text(encoding="utf-8"))


def select_patients(manifest: dict, split: str | None, max_slice_spacing: float | None = None,
                    ids: Iterable[str] | None = None) -> list[dict]:
    """Rendered patients of ``split`` (None: all), optionally only thin-slice CTs (the authors trained and tested
    on slice spacing <= 2.5 mm) or only the given ids, in manifest order."""
    wanted = set(ids) if ids is not None else None
    out = []
    for p in manifest["patients"]:
        if split is not None and p["split"] != split:
            continue
        if wanted is not None and p["id"] not in wanted:
            continue
        if max_slice_spacing is not None and p.get("slice_spacing") is not None \
                and p["slice_spacing"] > max_slice_spacing:
            continue
        out.append(p)
    return out
