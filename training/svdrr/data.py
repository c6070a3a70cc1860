"""Training pairs as the authors' ``LidcidriHardFBData`` (svdrr-method.md section 3.3): for each patient the
condition is always the PA view (``0000``), the target a uniformly random hemisphere view other than the PA one
(``target_sets=("hemisphere", "arc")`` adds the arc views, e.g. for a small model evaluated on the arc).

Images go through :func:`SVDRRLogic.pipelines.normalize_source` -- the same min-max, resize and gray-to-RGB the
pipeline applies at inference -- giving (3, R, R) in [-1, 1]. The pose is :func:`~SVDRRLogic.pipelines.
svdrr_relative_pose` (condition minus target), the single convention shared with inference.

The target of item ``i`` in epoch ``e`` is drawn from a generator seeded by (seed, e, i): runs are reproducible,
workers need no shared state, and every epoch gives each patient a new target. An epoch has
``max(patients, samples_per_epoch)`` items (item i is patient i mod n).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from SVDRRLogic.pipelines import normalize_source, svdrr_relative_pose

from .manifest import read_views


def read_png(path: str | Path) -> np.ndarray:
    """A gray PNG (8 or 16 bit) as float32 in [0, 1] by its bit depth (our DRRs are display-normalized)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return (arr / 255.0).astype(np.float32)
    top = 65535.0 if arr.dtype == np.uint16 or arr.max() > 255 else 255.0
    return (arr.astype(np.float32) / top).astype(np.float32)


class PatientViews:
    """One rendered patient: its folder, source view and target views (from ``views.json``)."""

    def __init__(self, root: Path, record: dict, target_sets: Sequence[str] = ("hemisphere",)):
        self.id = record["id"]
        self.folder = Path(root) / record["folder"]
        views = read_views(self.folder)
        self.views = views["views"]
        self.source = self.views[views.get("source_index", 0)]
        self.targets = [v for v in self.views
                        if v["set"] in target_sets and v["file"] != self.source["file"]
                        and (v["set"] != "arc" or self.view_of(v) != self.view_of(self.source))]
        if not self.targets:
            raise ValueError(f"{self.folder}: no {'/'.join(target_sets)} target views besides the source")

    def view_of(self, view: dict) -> tuple[float, float]:
        return float(view["azimuth"]), float(view["elevation"])

    def image(self, view: dict, resolution: int) -> torch.Tensor:
        """(3, R, R) in [-1, 1], exactly as the pipeline normalizes its input."""
        return normalize_source(read_png(self.folder / view["file"]), resolution)[0]


class SVDRRPairs(Dataset):
    """(PA source, random hemisphere target) pairs: dicts with ``source`` and ``target`` (3, R, R) in [-1, 1],
    ``pose`` (4,) and the ``patient`` id / ``target_index`` for logging."""

    def __init__(self, root: str | Path, patients: Sequence[dict], resolution: int, seed: int = 0,
                 samples_per_epoch: int | None = None, target_sets: Sequence[str] = ("hemisphere",)):
        if not patients:
            raise ValueError(f"{root}: no training patients selected")
        self.patients = [PatientViews(Path(root), p, tuple(target_sets)) for p in patients]
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.length = max(len(self.patients), int(samples_per_epoch or 0))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        patient = self.patients[index % len(self.patients)]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        target = patient.targets[int(rng.integers(len(patient.targets)))]
        pose = svdrr_relative_pose(patient.view_of(patient.source), patient.view_of(target))
        return {"source": patient.image(patient.source, self.resolution),
                "target": patient.image(target, self.resolution),
                "pose": torch.tensor(pose, dtype=torch.float32),
                "patient": patient.id, "target_index": int(target["index"])}
