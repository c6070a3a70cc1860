"""What the training stages read per case, derived exactly as :class:`~SVDRRLogic.pipelines.dvg.
DVGReconstructionPipeline` derives it at inference, so that every frozen network sees in training what it will see
in use.

- :class:`Cases`: the unit CT volumes ``[k, j, i]`` in [0, 1] written by :mod:`training.recon.preprocess`
  (``<case>.npy``, ``manifest.json``, ``split.json``), memory-mapped: processes on one node share the page cache.
- :class:`Conditioner`: per case and input count (1: frontal; 2: frontal + lateral, XraySyn's -pi/2 and 0), the
  back-projection V_bp of the DRRs (rendered with the grid's projector, each fitted and min-max normalized by
  :func:`~SVDRRLogic.recon_grid.fit_xray` as the pipeline fits its inputs), and the latents and new-view
  back-projection computed with the frozen earlier stages. Everything is computed one case at a time (batch 1,
  as the pipeline runs) and, with ``data.cache``, kept in RAM after first use: a 64^3 projection costs 0.1-0.5 s
  on a CPU, a training step of the latent stages much less. Frozen networks are in eval mode and deterministic,
  so a cached value is the value a recomputation would give.
- :func:`batch_indices` and :func:`step_generator`: the cases and the random draws of a step are functions of
  (seed, stage, process, step) only, so a resumed run draws exactly what an uninterrupted one would have;
  each process keeps to its own share of the cases.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from SVDRRLogic.pipelines.dvg import xraysyn_back_project, xraysyn_project
from SVDRRLogic.recon_grid import XRAYSYN_FRONTAL, XRAYSYN_LATERAL, ReconGrid, fit_xray, xraysyn_view

from ..recon.preprocess import FORMAT, MANIFEST, SPLIT

#: The input views by X-ray count, in XraySyn's angles (the authors' ``generate_numbers``).
INPUT_THETAS = {1: (XRAYSYN_FRONTAL,), 2: (XRAYSYN_FRONTAL, XRAYSYN_LATERAL)}


class DataError(ValueError):
    """Unusable training data (one line)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path.parent}: not a preprocessed case folder (no {path.name}; make one with "
                        f"python -m training.recon.preprocess)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


class Cases:
    """The unit volumes of one split of a preprocessed folder, on a grid of ``size``^3."""

    def __init__(self, root: str | Path, split: str, size: int):
        root = Path(root).expanduser()
        manifest, splits = _read_json(root / MANIFEST), _read_json(root / SPLIT)
        if manifest.get("format") != FORMAT:
            raise DataError(f"{root / MANIFEST}: not a manifest of training.recon.preprocess")
        if manifest.get("size") != size:
            raise DataError(f"{root}: cases on a {manifest.get('size')}^3 grid, the model needs {size}^3")
        files = {c["id"]: c["file"] for c in manifest.get("cases", [])}
        ids = splits.get(split)
        if not ids:
            raise DataError(f"{root}: no cases in split {split!r} of {SPLIT}")
        missing = [i for i in ids if i not in files or not (root / files[i]).is_file()]
        if missing:
            raise DataError(f"{root}: {len(missing)} case(s) of split {split!r} have no volume, e.g. {missing[0]}")
        self.ids = list(ids)
        self._arrays = [np.load(root / files[i], mmap_mode="r") for i in self.ids]
        for i, a in zip(self.ids, self._arrays):
            if a.shape != (size,) * 3:
                raise DataError(f"{root / files[i]}: shape {a.shape}, expected {(size,) * 3}")

    def __len__(self) -> int:
        return len(self.ids)

    def volume(self, index: int) -> torch.Tensor:
        """Case ``index`` as float32 (N, N, N)."""
        return torch.from_numpy(np.array(self._arrays[index], dtype=np.float32))


class Conditioner:
    """Per-case inputs and targets of the stages (module docstring). ``nets`` holds the frozen networks by part
    name; a stage puts there the ones it builds on before asking for what depends on them."""

    def __init__(self, cases: Cases, model_cfg: dict, device: torch.device, cache: bool):
        self.cases, self.device = cases, device
        self.grid = ReconGrid(int(model_cfg["grid"]))
        self.views = {n: [self.grid.geometry(*xraysyn_view(theta)) for theta in INPUT_THETAS[n]]
                      for n in model_cfg["input_views"]}
        self.new_view = {n: self.grid.geometry(float(model_cfg["new_view_azimuth"][str(n)]), 0.0)
                         for n in model_cfg["input_views"]}
        self.nets: dict[str, torch.nn.Module] = {}
        self._cache: dict | None = {} if cache else None

    def _memo(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._cache is None:
            return compute()
        if key not in self._cache:
            self._cache[key] = compute().cpu()
        return self._cache[key].to(self.device)

    def ct(self, index: int) -> torch.Tensor:
        """The unit CT (1, N, N, N)."""
        return self.cases.volume(index)[None].to(self.device)

    def back_projection(self, index: int, count: int) -> torch.Tensor:
        """V_bp (1, N, N, N) of the ``count`` input DRRs, as the pipeline computes it from the same images."""
        def compute():
            views = self.views[count]
            images = self.grid.project(self.ct(index)[0], views)
            fitted = np.stack([fit_xray(img.cpu().numpy(), g) for img, g in zip(images, views)])
            return xraysyn_back_project(self.grid, torch.from_numpy(fitted).to(self.device), views)[None]
        return self._memo(("bp", index, count), compute)

    @torch.no_grad()
    def ct_latent(self, index: int) -> torch.Tensor:
        """The frozen CT VQ-GAN's unquantized latent (C, L, L, L) of the case, unnormalized."""
        return self._memo(("z_ct", index), lambda: self.nets["ct_vqgan"].encode(self.ct(index)[None])[0])

    @torch.no_grad()
    def z_in(self, index: int, count: int) -> torch.Tensor:
        """The frozen input VPGE's latent (C, L, L, L) of V_bp."""
        return self._memo(("z_in", index, count),
                          lambda: self.nets["vpge"].encode(self.back_projection(index, count)[None])[0])

    @torch.no_grad()
    def new_view_back_projection(self, index: int, count: int) -> torch.Tensor:
        """(1, N, N, N): G_z's initial CT decoded with quantization, clamped to [0, 1], projected at the extra view
        and back-projected without re-normalization: the pipeline's ``_new_view`` in its default mode."""
        def compute():
            z_in = self.z_in(index, count)[None]
            z_init = self.nets["coarse"](z_in, torch.zeros(1, device=self.device)).float()
            initial = self.nets["ct_vqgan"].decode(z_init, quantize=True)[0, 0].clamp(0.0, 1.0)
            geom = self.new_view[count]
            image = xraysyn_project(self.grid, initial, [geom])
            return xraysyn_back_project(self.grid, image, [geom])[None]
        return self._memo(("bp_new", index, count), compute)

    @torch.no_grad()
    def z_new(self, index: int, count: int) -> torch.Tensor:
        """The frozen new-view VPGE's latent (C, L, L, L)."""
        return self._memo(("z_new", index, count),
                          lambda: self.nets["vpge_new"].encode(self.new_view_back_projection(index, count)[None])[0])


def _seed(*parts) -> int:
    """A 64-bit seed from the parts' text (stable across processes and Python runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def step_generator(seed: int, stage: str, rank: int, step: int) -> torch.Generator:
    """The CPU generator of one process's random draws (views, crops, slices, timesteps, noise) at ``step``."""
    return torch.Generator().manual_seed(_seed(seed, stage, rank, step))


def batch_indices(seed: int, step: int, rank: int, world: int, batch: int, n_cases: int) -> list[int]:
    """The cases of process ``rank`` at ``step``. Each process trains on its own share of the cases (case ``i``
    goes to process ``i mod world``; all share all when there are fewer cases than processes), so its RAM cache
    holds only that share, and walks through one seeded permutation of it per epoch."""
    share = list(range(rank, n_cases, world)) if n_cases >= world else list(range(n_cases))
    out = []
    for slot in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(slot, len(share))
        order = torch.randperm(len(share), generator=torch.Generator().manual_seed(_seed(seed, rank, epoch)))
        out.append(share[int(order[pos])])
    return out
