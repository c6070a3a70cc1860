"""Training slabs for the 3D patch EDM model from the preprocessed cases of :mod:`training.recon.preprocess`
(``<case>.npy`` unit volumes [k, j, i] on an N^3 grid, ``manifest.json``, ``split.json``).

Per case, once (then kept in RAM as float16, half the memory of float32 at steps of at most 2.5 HU): the X-rays
the model will be given, as DRRs of the unit volume at the model's views (``grid.project``), each min-max
normalized to [0, 1] as the pipeline normalizes its inputs, spread back along their rays
(``grid.back_project(spread=True)``): one condition volume per view. The authors replicated parallel sums of the
volume along their axes; this is the cone-beam form of it, in the geometry the pipeline uses at inference.

A batch holds random slabs of ``patch_slices`` along k (any start, both ends included), the same slabs of the
condition volumes, and the global coordinate of each slice. Example ``b`` of step ``s`` on process ``r`` comes
from a generator seeded by (seed, s, r, b): a resumed run sees what an uninterrupted one would, without a data
loader's state. Each process keeps only its share of the cases (case ``i`` goes to process ``i mod world``),
so the RAM cache does not grow with the number of GPUs; with fewer cases than processes all share all cases.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from SVDRRLogic.models.patch_edm import slab_coordinates
from SVDRRLogic.recon_grid import ReconGrid
from training.recon.preprocess import MANIFEST, SPLIT

log = logging.getLogger("training.patch_edm.data")


def read_cases(root: str | Path, split: str) -> tuple[list[Path], int]:
    """(the ``.npy`` files of ``split``'s cases, the grid size) of a preprocessed folder."""
    root = Path(root).expanduser()
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        splits = json.loads((root / SPLIT).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SystemExit(f"{root}: not a preprocessed case folder ({Path(exc.filename).name} missing; "
                         f"make one with python -m training.recon.preprocess)") from None
    if split not in splits:
        raise SystemExit(f"{root}/{SPLIT}: no split {split!r} (has {', '.join(k for k in splits if k != 'rule')})")
    wanted = set(splits[split])
    files = [root / c["file"] for c in manifest["cases"] if c["id"] in wanted]
    if not files:
        raise SystemExit(f"{root}: no cases in split {split!r}")
    return files, int(manifest["size"])


def condition_volumes(grid: ReconGrid, unit: torch.Tensor, views: list) -> torch.Tensor:
    """(V, N, N, N): the DRR of ``unit`` at each view, min-max normalized to [0, 1], spread back along its rays."""
    images = grid.project(unit, views)
    lo = images.amin(dim=(1, 2), keepdim=True)
    hi = images.amax(dim=(1, 2), keepdim=True)
    images = (images - lo) / (hi - lo).clamp_min(1e-12)
    return grid.back_project(images, views, spread=True)


class SlabBatches:
    """Random training slabs of one process's share of the cases (see the module docstring)."""

    def __init__(self, root: str | Path, split: str, config: dict, *, seed: int = 0, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu"):
        files, size = read_cases(root, split)
        if size != config["grid"]:
            raise SystemExit(f"{root}: cases on a {size}^3 grid, the model works on {config['grid']}^3 "
                             f"(preprocess with --size {config['grid']})")
        self.files = files[rank::world] if len(files) >= world else files
        self.grid = ReconGrid(size)
        self.views = [self.grid.geometry(az, el) for az, el in config["views"]]
        self.thickness, self.dropout = int(config["patch_slices"]), float(config["view_dropout"])
        self.seed, self.rank, self.device = int(seed), int(rank), torch.device(device)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        log.info("data: %d cases of %s on process %d (%d in split %r)", len(self.files), root, rank, len(files),
                 split)

    def case(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(volume (N, N, N), conditions (V, N, N, N)), float16 on the CPU, computed on first use."""
        if index not in self.cache:
            unit = torch.from_numpy(np.load(self.files[index]).astype(np.float32)).to(self.device)
            cond = condition_volumes(self.grid, unit, self.views)
            self.cache[index] = (unit.half().cpu(), cond.half().cpu())
        return self.cache[index]

    def batch(self, step: int, size: int) -> dict[str, torch.Tensor]:
        """``x0`` (B, 1, T, N, N), ``cond`` (B, V, T, N, N), ``coord`` (B, 1, T, 1, 1), float32 on the device."""
        x0, cond, coord = [], [], []
        n, t = self.grid.size, self.thickness
        for b in range(size):
            rng = np.random.default_rng([self.seed, int(step), self.rank, b])
            volume, views = self.case(int(rng.integers(len(self.files))))
            start = int(rng.integers(0, n - t + 1))
            c = views[:, start:start + t].float()
            if self.dropout and rng.random() < self.dropout:
                c[int(rng.integers(c.shape[0]))] = 0.0
            x0.append(volume[None, start:start + t].float())
            cond.append(c)
            coord.append(slab_coordinates(start, t, n).view(1, t, 1, 1))
        return {k: torch.stack(v).to(self.device) for k, v in (("x0", x0), ("cond", cond), ("coord", coord))}
