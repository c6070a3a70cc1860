"""CTs -> the unit volumes both reconstruction methods train and are tested on, by X2CT-GAN's protocol.

    python -m training.recon.preprocess --source /data/LIDC-IDRI --out data/recon-128 --size 128 \\
        --split-files X2CT/3DGAN/data/train.txt X2CT/3DGAN/data/test.txt --workers 8
    python -m training.recon.preprocess --source phantom:20 --out data/recon-phantoms --size 64

Per case (dvg-and-patch-diffusion.md A.1 and A.3, X2CT-GAN's ``CT2XRAY/ctpro.py``):

1. Body mask: voxels outside it become -1024 HU, which removes the table. X2CT multiplied by body masks whose
   source was never published; here a mask file per case (``--body-mask DIR``) or an automatic one: above
   -500 HU, the largest connected component, holes filled per axial slice (in 3-D the lungs are not holes, the
   trachea connects them to the volume's top face), dilated about 2 mm in-plane to keep the skin.
2. Resampling to 1 mm (trilinear; X2CT used scipy's cubic spline).
3. Crop or pad to a 320 mm cube, padding with air: x and y centred on the CT; in z X2CT keeps the "last 320
   slices" of arrays stored inferior to superior, i.e. the superior 320 mm, when the CT is longer, and pads a
   shorter one evenly (centred); both kept.
4. Linear resize to N^3 (X2CT's ``zoom(order=1)`` to 128^3), sampled at the voxel centres of the cube's N^3
   grid, the :class:`~SVDRRLogic.recon_grid.ReconGrid` the models and the Slicer module use.
5. Unit values ``clip((HU + 1024) / 2500, 0, 1)``.

Steps 2-4 are computed together: a linear resize reads only the two 1 mm planes on either side of each output
voxel centre, so only those planes of the 1 mm cube are sampled (at most 2N of 320 per axis). The result is the
same as building the whole cube, at half the work for N = 128 and a hundredth for N = 32. The array orientation
is X2CT's (the LPS identity: i toward the patient's left, j posterior, k superior) whatever the file's, and the
cube's RAS placement is stored so that a reconstruction can be put back on the patient.

Sources: a folder searched recursively for DICOM series (each CT series is a case; LIDC-IDRI's X-ray series are
skipped) and NIfTI / NRRD / MetaImage files (one case each), or ``phantom:N`` generated chest phantoms.

Output in ``--out``: ``<case>.npy`` (the [k, j, i] unit volume, float16 by default: steps of at most 1.2 HU),
``manifest.json`` (per case: source, original spacing and shape, grid placement, seed) and ``split.json``
(train and test lists: X2CT's 916 / 102 cases when their ``train.txt`` / ``test.txt`` are given, otherwise a
seeded fraction). Errors in the arguments are one line on stderr with exit code 2; a case that fails is listed in
the manifest and makes the exit code 1.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from SVDRRLogic.images import CTVolume, ImageError
from SVDRRLogic.io import ImageWarning, list_dicom_series, load_ct
from SVDRRLogic.io.common import (AIR_HU, ITK_SUFFIXES, atomic_output, first_line, is_dicom_file, read_dicom,
                                  suffix_of)
from SVDRRLogic.recon_grid import FIELD_MM, HU_OFFSET, WINDOW, ReconGrid, hu_to_unit

FORMAT = "svdrr-recon-cases"
MANIFEST, SPLIT = "manifest.json", "split.json"
BODY_HU, BODY_DILATE_MM = -500.0, 2.0
DTYPES = ("float16", "float32")
LIDC_ID = re.compile(r"LIDC-IDRI-\d{4}")
#: The chest phantom's default field of view (di, dj, dk extents in mm): 256 x 256 x 128 voxels of 1.4 x 1.4 x 2.5.
PHANTOM_FIELD_MM = (358.4, 358.4, 320.0)
PHANTOM_SHAPE = (128, 256, 256)
_SAMPLE_POINTS = 1 << 20  # CT samples per interpolation call: bounds the coordinate arrays to ~25 MB


class PreprocessError(ValueError):
    """Unusable input (source, split files, options); the message is one line."""


# -- sources ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseSource:
    """One case to preprocess: ``kind`` is "dicom" (a series in ``path``), "volume" (a file) or "phantom"."""

    case_id: str
    kind: str
    path: str | None = None
    series_uid: str | None = None
    seed: int | None = None
    phantom_shape: tuple[int, int, int] | None = None

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if v is not None and k != "case_id"}

    def load(self) -> CTVolume:
        if self.kind == "phantom":
            from SVDRRLogic.phantoms import chest_phantom
            return chest_phantom(shape=self.phantom_shape, spacing=phantom_spacing(self.phantom_shape),
                                 seed=self.seed)
        return load_ct(self.path, series_uid=self.series_uid)


def phantom_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """(di, dj, dk) that keeps the default phantom field of view at another (nk, nj, ni) shape: the same patient
    at a coarser resolution (fast tests)."""
    nk, nj, ni = (int(n) for n in shape)
    return PHANTOM_FIELD_MM[0] / ni, PHANTOM_FIELD_MM[1] / nj, PHANTOM_FIELD_MM[2] / nk


def phantom_sources(n: int, seed: int = 0, shape: Sequence[int] = PHANTOM_SHAPE) -> list[CaseSource]:
    """``n`` chest phantoms with seeds ``seed .. seed + n - 1``, ids ``phantom-<seed>``."""
    shape = tuple(int(v) for v in shape)
    if n < 1 or len(shape) != 3 or min(shape) < 2:
        raise PreprocessError(f"phantom:N needs N >= 1 and a shape of 3 sizes >= 2, got N={n}, shape {shape}")
    return [CaseSource(f"phantom-{s:04d}", "phantom", seed=s, phantom_shape=shape) for s in range(seed, seed + n)]


def _safe_id(text: str) -> str:
    """A case id usable as a file name on every system."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def _dicom_case(series, root: Path) -> CaseSource:
    """A CT series as a case named ``<patient>.<StudyDate>.<SeriesNumber>``: the LIDC-IDRI id in its path (else the
    PatientID) and the first fields of X2CT's case names (``LIDC-IDRI-0001.20000101.3000566.1``), so that their
    split files match by prefix."""
    folder = Path(os.path.commonpath([str(f) for f in series.files]))
    ds = read_dicom(series.files[0], stop_before_pixels=True)
    found = LIDC_ID.search(str(folder))
    patient = found.group(0) if found else str(ds.get("PatientID", "") or "") or folder.name
    parts = [patient] + [str(ds.get(key, "") or "") for key in ("StudyDate", "SeriesNumber")]
    name = ".".join(p for p in parts if p) if all(parts[1:]) else f"{patient}.{series.uid.rsplit('.', 1)[-1]}"
    return CaseSource(_safe_id(name), "dicom", str(folder), series.uid)


def discover(root: str | os.PathLike, workers: int = 1) -> tuple[list[CaseSource], list[dict]]:
    """(cases under ``root`` sorted by id, series skipped because they are not CT). Headers are read in
    ``workers`` processes, one top-level folder each (a whole LIDC-IDRI tree holds ~250,000 files)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PreprocessError(f"{root}: source folder not found (give a folder of CTs or phantom:N)")
    volumes = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        volumes += [Path(folder, n) for n in sorted(names) if suffix_of(Path(n)) in ITK_SUFFIXES]
    top_files = [p for p in sorted(root.iterdir()) if p.is_file()]
    units = [root] if any(is_dicom_file(p) for p in top_files) else sorted(p for p in root.iterdir() if p.is_dir())
    cases, skipped = [], []
    for series_list in _imap(list_dicom_series, units, workers):
        for s in series_list:
            if s.modality.upper() != "CT" or s.n_slices < 2:
                skipped.append({"series_uid": s.uid, "path": str(s.files[0].parent),
                                "reason": f"{s.modality or 'unknown'} modality with {s.n_slices} image(s), not a CT"})
            else:
                cases.append(_dicom_case(s, root))
    stems = Counter(_stem(v) for v in volumes)
    cases += [CaseSource(_safe_id(_stem(v) if stems[_stem(v)] == 1 else
                                  str(v.relative_to(root))[: -len(suffix_of(v))]), "volume", str(v))
              for v in volumes]
    return _unique(cases), skipped


def _stem(path: Path) -> str:
    return path.name[: -len(suffix_of(path))]


def _unique(cases: list[CaseSource]) -> list[CaseSource]:
    """Cases sorted by id; DICOM series that share an id get their series UID's last field appended, and any
    other clash is an error (two files would overwrite each other's output)."""
    counts = Counter(c.case_id for c in cases if c.kind == "dicom")
    cases = [CaseSource(f"{c.case_id}.{c.series_uid.rsplit('.', 1)[-1]}", c.kind, c.path, c.series_uid)
             if c.kind == "dicom" and counts[c.case_id] > 1 else c for c in cases]
    clash = sorted(i for i, n in Counter(c.case_id for c in cases).items() if n > 1)
    if clash:
        raise PreprocessError(f"several CTs map to the case id(s) {clash[:5]}; rename or separate them")
    return sorted(cases, key=lambda c: c.case_id)


def parse_source(text: str, seed: int = 0, phantom_shape: Sequence[int] = PHANTOM_SHAPE,
                 workers: int = 1) -> tuple[list[CaseSource], list[dict]]:
    """``phantom:N`` or a folder (:func:`discover`)."""
    if text.startswith("phantom:"):
        count = text.split(":", 1)[1]
        if not count.isdigit():
            raise PreprocessError(f"--source {text!r}: expected phantom:N with N a positive integer")
        return phantom_sources(int(count), seed, phantom_shape), []
    cases, skipped = discover(text, workers)
    if not cases:
        raise PreprocessError(f"{text}: no CT found (DICOM CT series, {', '.join(ITK_SUFFIXES)})")
    return cases, skipped


# -- body mask -------------------------------------------------------------------------------------------------
def axial_axis(ct: CTVolume) -> int:
    """The array axis (of ``[k, j, i]``) that runs most along the patient's superior direction."""
    directions = ct.ijk_to_ras[:3, :3] / ct.spacing
    return 2 - int(np.argmax(np.abs(directions[2])))


def auto_body_mask(ct: CTVolume) -> np.ndarray:
    """The patient's body (module docstring, step 1) as a boolean array of the CT's shape."""
    from scipy import ndimage

    labels, n = ndimage.label(ct.array_hu > BODY_HU)
    if n == 0:
        raise ImageError(f"{ct.source}: nothing above {BODY_HU:g} HU, no body to mask")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    del labels
    axis = axial_axis(ct)
    slices = np.moveaxis(body, axis, 0)
    for s in range(slices.shape[0]):
        slices[s] = ndimage.binary_fill_holes(slices[s])
    in_plane = min(float(ct.spacing[::-1][a]) for a in range(3) if a != axis)
    cross = np.expand_dims(ndimage.generate_binary_structure(2, 1), axis)
    return ndimage.binary_dilation(body, structure=cross, iterations=max(1, round(BODY_DILATE_MM / in_plane)))


def find_mask_file(folder: Path, case_id: str) -> Path:
    """The mask of ``case_id`` in ``folder``: named like the case, or starting with it followed by "_" or "."
    (X2CT's ``<case>_outMultiLabelMask.mhd``)."""
    found = [p for p in sorted(folder.iterdir()) if suffix_of(p) in ITK_SUFFIXES
             and (_stem(p) == case_id or _stem(p).startswith((case_id + "_", case_id + ".")))]
    if len(found) != 1:
        raise ImageError(f"{folder}: {'no' if not found else len(found)} body mask file(s) for case {case_id}")
    return found[0]


def mask_from_file(ct: CTVolume, path: Path) -> np.ndarray:
    """A mask file (non-zero = body) on the CT's voxels, nearest-neighbour resampled through both files' world
    placement when its grid differs."""
    from scipy.ndimage import affine_transform

    with warnings.catch_warnings():  # labels, not HU: load_ct's doubt about the values is expected here
        warnings.simplefilter("ignore", ImageWarning)
        mask = load_ct(path)
    body = mask.array_hu > 0
    if mask.shape == ct.shape and np.allclose(mask.ijk_to_ras, ct.ijk_to_ras, atol=1e-3):
        return body
    ct_to_mask = np.linalg.inv(mask.ijk_to_ras) @ ct.ijk_to_ras     # (i, j, k) -> (i, j, k); arrays are [k, j, i]
    return affine_transform(body.astype(np.uint8), ct_to_mask[2::-1, 2::-1], offset=ct_to_mask[2::-1, 3],
                            output_shape=ct.shape, order=0, mode="constant", cval=0).astype(bool)


# -- resampling ------------------------------------------------------------------------------------------------
def cube_center(ct: CTVolume, field_mm: int = int(FIELD_MM)) -> tuple[np.ndarray, str]:
    """(RAS centre of the cube, "superior" or "centred"): x and y centred on the CT; in z the cube's top 1 mm
    slice sits on the CT's most superior voxel centre when the CT is at least ``field_mm`` long (X2CT's 1 mm slice
    count, rounded), otherwise the cube is centred on it."""
    k, j, i = ct.shape
    ijk = np.array([[a, b, c, 1.0] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)]).T
    top = float((ct.ijk_to_ras @ ijk)[2].max())
    center = np.array(ct.center_ras, dtype=np.float64)
    if round(float(np.ptp(ct.corners_ras()[:, 2]))) >= field_mm:
        center[2] = top - (field_mm - 1) / 2.0
        return center, "superior"
    return center, "centred"


def _linear_plan(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(planes to sample, position of the lower and upper plane of each output sample among them, weight of the
    upper one) of a linear resize from ``n_in`` to ``n_out`` voxel centres over the same extent, clamped at the
    ends: ``scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest")``."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
    lo = np.minimum(np.floor(x).astype(np.int64), n_in - 2)
    planes = np.unique(np.concatenate([lo, lo + 1]))
    return planes, np.searchsorted(planes, lo), np.searchsorted(planes, lo + 1), (x - lo).astype(np.float32)


def _sample(hu: np.ndarray, cube_to_ct: np.ndarray, ks: np.ndarray, js: np.ndarray, is_: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``hu`` at the 1 mm cube points ``ks x js x is_`` (air outside the CT)."""
    from scipy.ndimage import map_coordinates

    r, t = cube_to_ct[:3, :3], cube_to_ct[:3, 3]
    out = np.empty((len(ks), len(js), len(is_)), dtype=np.float32)
    step = max(1, _SAMPLE_POINTS // (len(js) * len(is_)))
    ii, jj = is_[None, None, :].astype(np.float64), js[None, :, None].astype(np.float64)
    for s in range(0, len(ks), step):
        kk = ks[s:s + step, None, None].astype(np.float64)
        coords = np.stack([r[a, 0] * ii + r[a, 1] * jj + r[a, 2] * kk + t[a] for a in (2, 1, 0)])
        out[s:s + step] = map_coordinates(hu, coords, order=1, mode="constant", cval=AIR_HU, output=np.float32)
    return out


def to_unit_grid(ct: CTVolume, size: int = 128, field_mm: int = int(FIELD_MM)) -> tuple[np.ndarray, ReconGrid, str]:
    """(unit volume [k, j, i] of ``size``^3, its grid, the z placement): steps 2 to 5 of the module docstring."""
    if ct.units != "hu":
        raise ImageError(f"{ct.source}: the reconstruction protocol needs a CT in HU, not {ct.units}")
    center, placement = cube_center(ct, field_mm)
    grid = ReconGrid(size=size, center_ras=center, field_mm=field_mm)
    cube = ReconGrid(size=field_mm, center_ras=center, field_mm=field_mm)
    planes, lo, hi, w = _linear_plan(field_mm, size)
    hu = _sample(ct.array_hu, np.linalg.inv(ct.ijk_to_ras) @ cube.ijk_to_ras, planes, planes, planes)
    for axis in range(3):
        wa = np.expand_dims(w, tuple(a for a in range(3) if a != axis))
        hu = np.take(hu, lo, axis=axis) * (1.0 - wa) + np.take(hu, hi, axis=axis) * wa
    return hu_to_unit(hu), grid, placement


# -- one case --------------------------------------------------------------------------------------------------
def preprocess_case(source: CaseSource, out: Path, size: int, dtype: str = "float16",
                    body_mask: str = "auto") -> dict:
    """Write ``<out>/<case>.npy`` and return the case's manifest entry (``body_mask``: "auto", "none" or a folder
    of mask files). The entry's ``spacing`` is the CT's (di, dj, dk) in mm and ``shape`` its (nk, nj, ni)."""
    t0 = time.perf_counter()
    ct = source.load()
    if body_mask != "none":
        mask = auto_body_mask(ct) if body_mask == "auto" else mask_from_file(ct, find_mask_file(Path(body_mask),
                                                                                                source.case_id))
        ct = CTVolume(np.where(mask, ct.array_hu, AIR_HU), ct.ijk_to_ras, metadata=ct.metadata, source=ct.source)
    unit, grid, placement = to_unit_grid(ct, size)
    name = f"{source.case_id}.npy"
    with atomic_output(out / name, ".npy") as tmp:
        np.save(tmp, unit.astype(dtype))
    return {"id": source.case_id, "file": name, "source": source.describe(), "seed": source.seed,
            "spacing": [round(float(s), 6) for s in ct.spacing], "shape": list(ct.shape),
            "grid": {"size": grid.size, "center_ras": list(grid.center_ras), "field_mm": grid.field_mm},
            "z_placement": placement, "body_mask": body_mask if body_mask in ("auto", "none") else "file",
            "seconds": round(time.perf_counter() - t0, 2)}


def _run_case(source: CaseSource, **kwargs) -> dict:
    """:func:`preprocess_case`, with a failure turned into an entry: one bad CT must not stop the others."""
    try:
        return preprocess_case(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- reported in the manifest, the run goes on
        return {"id": source.case_id, "source": source.describe(), "error": first_line(exc)}


def _imap(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """``map`` in order, in ``workers`` processes when there is more than one item to share."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
        yield from pool.map(fn, items)


# -- split -----------------------------------------------------------------------------------------------------
def read_list(path: str | os.PathLike) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PreprocessError(f"{p}: split file not found")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def match_entries(entries: Iterable[str], ids: Iterable[str]) -> dict[str, str]:
    """{split-file entry: case id}. An entry matches the case with the same id, else the one whose id it extends
    after a "." (X2CT's ``LIDC-IDRI-0001.20000101.3000566.1`` for our ``LIDC-IDRI-0001.20000101.3000566``), else
    the only case of its LIDC-IDRI patient when the entry is that patient's only entry. A case claimed by several
    entries matches none of them."""
    entries, ids = list(entries), sorted(set(ids))
    id_set = set(ids)
    cases_of = defaultdict(list)
    for i in ids:
        found = LIDC_ID.search(i)
        if found:
            cases_of[found.group(0)].append(i)
    entries_of = Counter(m.group(0) for m in map(LIDC_ID.search, entries) if m)
    matched = {}
    for e in entries:
        prefixed = [i for i in ids if e.startswith(i + ".")]
        patient = LIDC_ID.search(e)
        if e in id_set:
            matched[e] = e
        elif len(prefixed) == 1:
            matched[e] = prefixed[0]
        elif patient and entries_of[patient.group(0)] == 1 and len(cases_of[patient.group(0)]) == 1:
            matched[e] = cases_of[patient.group(0)][0]
    claims = Counter(matched.values())
    return {e: i for e, i in matched.items() if claims[i] == 1}


def _seeded_hash(seed: int, case_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{case_id}".encode(), digest_size=8).digest(), "little")


def assign_split(ids: Iterable[str], lists: tuple[list[str], list[str]] | None = None,
                 test_fraction: float = 0.1, seed: int = 0) -> dict:
    """The split file's content: {"rule", "train", "test", "unlisted", "missing"}.

    With ``lists`` (the train and test entries of split files) cases go where their entry is (:func:`match_entries`);
    cases in no list are "unlisted", entries without a case "missing". Otherwise the test split is the
    ``round(test_fraction * n)`` cases (at least one when there are two or more) with the smallest seeded hash
    of their id: the same split for the same cases and seed, on any machine.
    """
    ids = sorted(set(ids))
    if lists is not None:
        where = {}
        missing = []
        for name, entries in zip(("train", "test"), lists):
            matched = match_entries(entries, ids)
            missing += [e for e in entries if e not in matched]
            where.update({i: name for i in matched.values()})
        return {"rule": f"split files: {len(lists[0])} train and {len(lists[1])} test entries",
                "train": sorted(i for i in ids if where.get(i) == "train"),
                "test": sorted(i for i in ids if where.get(i) == "test"),
                "unlisted": [i for i in ids if i not in where], "missing": missing}
    if not 0.0 <= test_fraction < 1.0:
        raise PreprocessError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    n_test = round(test_fraction * len(ids))
    if test_fraction > 0 and len(ids) >= 2:
        n_test = min(max(n_test, 1), len(ids) - 1)
    test = set(sorted(ids, key=lambda i: _seeded_hash(seed, i))[:n_test])
    return {"rule": f"seeded fraction {test_fraction:g} (seed {seed})", "train": [i for i in ids if i not in test],
            "test": sorted(test), "unlisted": [], "missing": []}


# -- the whole set ---------------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    with atomic_output(path, ".json") as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def preprocess(sources: Sequence[CaseSource], out: str | os.PathLike, size: int = 128, *, dtype: str = "float16",
               body_mask: str = "auto", split_lists: tuple[list[str], list[str]] | None = None,
               test_fraction: float = 0.1, seed: int = 0, workers: int = 1, skipped: Sequence[dict] = (),
               source_text: str = "", progress: bool = False) -> dict:
    """Preprocess every case into ``out``, then write ``manifest.json`` and ``split.json``; returns the manifest."""
    if int(size) < 4:
        raise PreprocessError(f"--size must be at least 4, got {size}")
    if dtype not in DTYPES:
        raise PreprocessError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if body_mask not in ("auto", "none") and not Path(body_mask).is_dir():
        raise PreprocessError(f"--body-mask {body_mask}: expected auto, none or a folder of mask files")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    run = functools.partial(_run_case, out=out, size=int(size), dtype=dtype, body_mask=body_mask)
    cases, failed = [], []
    for n, entry in enumerate(_imap(run, list(sources), workers), 1):
        (failed if "error" in entry else cases).append(entry)
        if progress:
            status = entry.get("error") or f"{entry['seconds']:.1f} s"
            print(f"[{n}/{len(sources)}] {entry['id']}: {status}", file=sys.stderr, flush=True)
    split = assign_split([c["id"] for c in cases], split_lists, test_fraction, seed)
    where = {i: name for name in ("train", "test", "unlisted") for i in split[name]}
    for c in cases:
        c["split"] = where[c["id"]]
    manifest = {"format": FORMAT, "version": 1, "source": source_text, "size": int(size), "field_mm": FIELD_MM,
                "spacing_mm": FIELD_MM / int(size), "dtype": dtype, "body_mask": body_mask,
                "unit": f"clip((HU + {HU_OFFSET:g}) / {WINDOW:g}, 0, 1)", "seed": seed, "split_rule": split["rule"],
                "cases": cases, "failed": failed, "skipped": list(skipped)}
    _write_json(out / SPLIT, split)
    _write_json(out / MANIFEST, manifest)
    return manifest


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise PreprocessError(message)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise PreprocessError(f"--phantom-shape {text!r}: expected NK,NJ,NI")
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    ap = _Parser(prog="python -m training.recon.preprocess", description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True, help="folder of CTs (DICOM tree, NIfTI/NRRD/MHA) or phantom:N")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--size", type=int, default=128, help="voxels per side of the 320 mm cube (default 128)")
    ap.add_argument("--dtype", default="float16", help="float16 (default) or float32")
    ap.add_argument("--body-mask", default="auto", help="auto (default), none, or a folder of per-case mask files")
    ap.add_argument("--split-files", nargs=2, metavar=("TRAIN", "TEST"), help="X2CT's train.txt and test.txt")
    ap.add_argument("--test-fraction", type=float, default=0.1, help="without split files (default 0.1)")
    ap.add_argument("--seed", type=int, default=0, help="first phantom seed and split seed (default 0)")
    ap.add_argument("--phantom-shape", default=",".join(map(str, PHANTOM_SHAPE)), help="NK,NJ,NI of phantoms")
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N cases (sorted ids)")
    prog = ap.prog
    try:
        args = ap.parse_args(argv)
        if args.limit is not None and args.limit < 1:
            raise PreprocessError(f"--limit must be at least 1, got {args.limit}")
        lists = tuple(read_list(p) for p in args.split_files) if args.split_files else None
        sources, skipped = parse_source(args.source, args.seed, _shape(args.phantom_shape), args.workers)
        manifest = preprocess(sources[:args.limit], args.out, args.size, dtype=args.dtype, body_mask=args.body_mask,
                              split_lists=lists, test_fraction=args.test_fraction, seed=args.seed,
                              workers=args.workers, skipped=skipped, source_text=args.source, progress=True)
    except (PreprocessError, ImageError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    split = json.loads((Path(args.out).expanduser() / SPLIT).read_text(encoding="utf-8"))
    print(f"{args.out}: {len(manifest['cases'])} cases (train {len(split['train'])}, test {len(split['test'])}, "
          f"unlisted {len(split['unlisted'])}), {len(manifest['failed'])} failed, {len(skipped)} non-CT series "
          f"skipped; split: {split['rule']}")
    return 1 if manifest["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
