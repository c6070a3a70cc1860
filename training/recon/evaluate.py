"""Score any X-ray-to-CT method on preprocessed cases the way DVG-Diffusion was evaluated, next to a baseline.

    python -m training.recon.evaluate --cases data/recon-128 --method backprojection --out eval/bp
    python -m training.recon.evaluate --cases data/recon-128 --method NAME --model PATH --device cuda --lpips

For each case of the split (``split.json`` of :mod:`training.recon.preprocess`) the X-rays are rendered from the
ground-truth unit volume exactly as DVG-Diffusion renders its inputs (dvg-and-patch-diffusion.md C.2): our
projector in the XraySyn cone beam of the case's :class:`~SVDRRLogic.recon_grid.ReconGrid`, the frontal view
(theta_x = -pi/2) alone ("single") or with the lateral one (theta_x = 0, "biplanar"), each min-max normalised to
[0, 1]. The method reconstructs a unit volume from them, scored by :func:`SVDRRLogic.volume_metrics.evaluate_volume`
in every PSNR convention, SSIM and optionally LPIPS.

A method is a callable ``reconstruct(xrays, views, grid) -> unit volume [k, j, i]`` of ``grid.shape`` (``views``:
(azimuth, elevation) in degrees, one per X-ray). :data:`METHODS` maps a name to ``factory(model_path, device)``
returning one, which is how the command line finds a method. The baseline ``backprojection`` needs no model;
without ``--no-baseline`` it is evaluated beside any other method so that every table shows it.

Output in ``--out``: ``metrics.md`` (mean +- sample standard deviation per method, and the published DVG-Diffusion
numbers, whose PSNR and LPIPS conventions are unknown) and ``metrics.json`` (the same with every case's row).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from SVDRRLogic.images import ImageError
from SVDRRLogic.io.common import atomic_output
from SVDRRLogic.recon_grid import XRAYSYN_FRONTAL, XRAYSYN_LATERAL, ReconGrid, hu_to_unit, xraysyn_view
from SVDRRLogic.recon_grid import backprojection_baseline as recon_baseline
from SVDRRLogic.volume_metrics import (LPIPS_REDUCTIONS, METRIC_LABELS, PSNR_ZERO_MSE_DB, LPIPSUnavailable,
                                       evaluate_volume, load_lpips)

from .preprocess import FORMAT, MANIFEST, SPLIT

Reconstruct = Callable[[list, list, ReconGrid], np.ndarray]

#: DVG-Diffusion's input views (``generate_numbers``): the frontal view, plus the lateral one for two X-rays.
VIEW_SETS = {"single": (XRAYSYN_FRONTAL,), "biplanar": (XRAYSYN_FRONTAL, XRAYSYN_LATERAL)}

#: Published DVG-Diffusion results on X2CT's 102 LIDC-IDRI test volumes; the PSNR peak and the LPIPS reduction
#: behind them are unknown (most likely slice-wise PSNR and LPIPS summed over 128 slices).
PUBLISHED = (
    {"method": "DVG-Diffusion (paper)", "views": "single", "cases": 102, "psnr": 22.54, "ssim": 0.541,
     "lpips": 36.79},
    {"method": "DVG-Diffusion (paper)", "views": "biplanar", "cases": 102, "psnr": 26.84, "ssim": 0.679,
     "lpips": 27.35},
)


class EvaluationError(ValueError):
    """Unusable cases folder or method output; the message is one line."""


def dvg_views(views: str) -> list[tuple[float, float]]:
    """(azimuth, elevation) of DVG-Diffusion's "single" or "biplanar" input views."""
    if views not in VIEW_SETS:
        raise EvaluationError(f"views must be one of {sorted(VIEW_SETS)}, got {views!r}")
    return [xraysyn_view(theta) for theta in VIEW_SETS[views]]


def render_xrays(volume: np.ndarray, grid: ReconGrid, views: Sequence[tuple[float, float]],
                 device: str = "cpu") -> list[np.ndarray]:
    """DRRs (N, N) of a unit volume on ``grid`` at ``views``, each min-max normalised to [0, 1] as DVG does."""
    import torch

    vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(device)
    drrs = grid.project(vol, [grid.geometry(*v) for v in views]).double().cpu().numpy()
    out = []
    for drr in drrs:
        lo, hi = float(drr.min()), float(drr.max())
        if not hi > lo:
            raise EvaluationError("a DRR of the ground truth is constant: the volume is empty in the field of view")
        out.append(((drr - lo) / (hi - lo)).astype(np.float32))
    return out


def backprojection_baseline(xrays: Sequence[np.ndarray], views: Sequence[tuple[float, float]],
                            grid: ReconGrid) -> np.ndarray:
    """The plain reconstruction every method must beat, as the engine's demo computes it
    (:func:`SVDRRLogic.recon_grid.backprojection_baseline`): each X-ray spread back along its rays
    (``grid.back_project(..., spread=True)``), averaged over the views, min-max scaled to [0, 1].

    The min-max scaling needs no training data and is deliberately naive: the X-rays are themselves min-max
    normalised, so no absolute intensity survives to be restored.
    """
    return recon_baseline(grid, list(xrays), [grid.geometry(*v) for v in views])


def _backprojection_factory(model_path: str | None, device: str) -> Reconstruct:
    """The baseline has no model and is cheap enough for the CPU whatever ``device`` says."""
    return backprojection_baseline


def model_factory(method: str) -> Callable[[str | None, str], Reconstruct]:
    """The factory of a model method ("dvg", "patch-edm"): the product's own loading and inference path
    (:func:`SVDRRLogic.reconstruct.load_pipeline`) in float32, the model's default number of steps, seed 0 so
    repeated evaluations agree, the CT returned as unit values on ``grid`` (resampled when the model reconstructs
    into another cube)."""
    def factory(model_path: str | None, device: str) -> Reconstruct:
        from SVDRRLogic.reconstruct import load_pipeline
        if not model_path:
            raise SystemExit(f"--method {method} needs --model MODEL_DIR")
        pipe, _choice = load_pipeline(model_path, method, device=device, dtype="fp32", progress=False)

        def reconstruct(xrays: Sequence[np.ndarray], views: Sequence[tuple[float, float]],
                        grid: ReconGrid) -> np.ndarray:
            ct = pipe(list(xrays), list(views), center_ras=grid.center_ras, generator=0).ct
            if grid == ReconGrid(pipe.grid_size, grid.center_ras):
                return hu_to_unit(ct.array_hu)
            return grid.sample_ct(ct)
        return reconstruct
    return factory


#: name -> factory(model_path, device) returning a ``reconstruct`` callable.
METHODS: dict[str, Callable[[str | None, str], Reconstruct]] = {
    "backprojection": _backprojection_factory, "dvg": model_factory("dvg"), "patch-edm": model_factory("patch-edm")}


# -- cases -----------------------------------------------------------------------------------------------------
def load_cases(cases_dir: str | os.PathLike, split: str = "test") -> list[dict]:
    """Manifest entries of the cases in ``split`` ("all" for every case), in split-file order."""
    root = Path(cases_dir).expanduser()
    if not (root / MANIFEST).is_file() or not (root / SPLIT).is_file():
        raise EvaluationError(f"{root}: no {MANIFEST} / {SPLIT} (make cases with python -m training.recon.preprocess)")
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise EvaluationError(f"{root / MANIFEST}: not a reconstruction cases manifest")
    entries = {c["id"]: c for c in manifest["cases"]}
    if split == "all":
        ids = list(entries)
    else:
        splits = json.loads((root / SPLIT).read_text(encoding="utf-8"))
        if not isinstance(splits.get(split), list):
            raise EvaluationError(f"{root / SPLIT}: no split named {split!r}")
        ids = splits[split]
    if not ids:
        raise EvaluationError(f"{root}: the {split!r} split holds no case")
    return [entries[i] for i in ids]


def case_volume(cases_dir: str | os.PathLike, entry: dict, size: int | None = None) -> tuple[np.ndarray, ReconGrid]:
    """(ground-truth unit volume, its grid); ``size`` resizes it linearly over the same cube (the last step of the
    preprocessing, applied to the stored grid), e.g. to evaluate a 64^3 method on 128^3 cases."""
    from scipy.ndimage import zoom

    g = entry["grid"]
    volume = np.load(Path(cases_dir).expanduser() / entry["file"]).astype(np.float32)
    if size is not None and int(size) != g["size"]:
        volume = zoom(volume, int(size) / g["size"], order=1, grid_mode=True, mode="nearest")
    return volume, ReconGrid(size=volume.shape[0], center_ras=g["center_ras"], field_mm=g["field_mm"])


# -- evaluation ------------------------------------------------------------------------------------------------
def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """{metric: {"mean", "std" (sample; None for one case), "n"}} over the per-case rows."""
    keys = [k for k in rows[0] if k != "id"]
    out = {}
    for k in keys:
        values = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                  "n": len(values)}
    return out


def evaluate(reconstruct: Reconstruct, cases_dir: str | os.PathLike, split: str = "test", views: str = "biplanar",
             size: int | None = None, lpips: bool = False, limit: int | None = None, progress: bool = True, *,
             method: str = "custom", lpips_reduction: str = "sum", device: str = "cpu") -> dict:
    """Reconstruct and score every case of ``split`` (module docstring): {"method", "views", "split", "size",
    "n_cases", "lpips_reduction", "cases": per-case rows (metrics and reconstruction seconds), "summary"}."""
    view_list = dvg_views(views)
    if limit is not None and limit < 1:
        raise EvaluationError(f"limit must be at least 1, got {limit}")
    if lpips:
        if lpips_reduction not in LPIPS_REDUCTIONS:
            raise EvaluationError(f"LPIPS reduction must be one of {LPIPS_REDUCTIONS}, got {lpips_reduction!r}")
        load_lpips(str(device))
    entries = load_cases(cases_dir, split)[:limit]
    rows, grid = [], None
    for n, entry in enumerate(entries, 1):
        truth, grid = case_volume(cases_dir, entry, size)
        xrays = render_xrays(truth, grid, view_list, device)
        t0 = time.perf_counter()
        pred = np.asarray(reconstruct(xrays, list(view_list), grid))
        seconds = time.perf_counter() - t0
        if pred.shape != grid.shape:
            raise EvaluationError(f"{method} returned a volume of shape {pred.shape} for the {grid.shape} grid")
        row = {"id": entry["id"], **evaluate_volume(pred, truth, lpips=lpips, lpips_reduction=lpips_reduction,
                                                    device=device), "seconds": seconds}
        rows.append(row)
        if progress:
            print(f"[{n}/{len(entries)}] {entry['id']}: PSNR-slices {row['psnr_slices']:.2f} dB, "
                  f"SSIM {row['ssim_slices']:.3f} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return {"method": method, "views": views, "split": split, "size": grid.size, "n_cases": len(rows),
            "lpips_reduction": lpips_reduction if lpips else None, "cases": rows, "summary": summarize(rows)}


# -- tables ----------------------------------------------------------------------------------------------------
def _cell(stats: dict | None, digits: int) -> str:
    if stats is None:
        return "-"
    std = "" if stats["std"] is None else f" ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}{std}"


def _finite(value):
    """JSON has no infinity or NaN: such numbers become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_table(results: dict | Sequence[dict], path_md: str | os.PathLike, path_json: str | os.PathLike) -> None:
    """``results`` (one :func:`evaluate` result or several) as a markdown table with the published DVG-Diffusion
    rows below it, and as JSON with every case's row."""
    results = [results] if isinstance(results, dict) else list(results)
    keys = [k for k in METRIC_LABELS if any(k in r["summary"] for r in results)]
    header = ["Method", "Views", "Cases", *(METRIC_LABELS[k] for k in keys), "s / case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["method"], r["views"], str(r["n_cases"])]
        cells += [_cell(r["summary"].get(k), 3 if k.startswith("ssim") else 2) for k in keys]
        cells.append(f"{r['summary']['seconds']['mean']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    sizes = sorted({r["size"] for r in results})
    splits = sorted({r["split"] for r in results})
    notes = (f"Grid {', '.join(f'{s}^3' for s in sizes)} over 320 mm, split {', '.join(splits)}; mean ± sample "
             "standard deviation over cases. PSNR [0,1]: unit volumes, peak 1; X2CT 4095: values x 2500 cast to "
             f"integers, peak 4095 (+4.29 dB). Identical volumes score {PSNR_ZERO_MSE_DB:g} dB; slice-wise PSNR on "
             "[0,1] skips slices without error.")
    published = ("Published (conventions unknown: slice-wise PSNR with peak 1 or 4095; LPIPS most likely summed "
                 "over 128 slices):")
    lines += ["", notes, "", published, "", "| Method | Views | Cases | PSNR (dB) | SSIM | LPIPS |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {p['method']} | {p['views']} | {p['cases']} | {p['psnr']:.2f} | {p['ssim']:.3f} | "
              f"{p['lpips']:.2f} |" for p in PUBLISHED]
    with atomic_output(Path(path_md).expanduser(), ".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with atomic_output(Path(path_json).expanduser(), ".json") as tmp:
        tmp.write_text(json.dumps(_finite({"results": results, "published": list(PUBLISHED)}), indent=1,
                                  allow_nan=False) + "\n", encoding="utf-8")


# -- command line ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise EvaluationError(message)


def main(argv: Sequence[str] | None = None) -> int:
    ap = _Parser(prog="python -m training.recon.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", required=True, help="folder made by python -m training.recon.preprocess")
    ap.add_argument("--method", required=True, choices=sorted(METHODS))
    ap.add_argument("--out", required=True, help="folder for metrics.md and metrics.json")
    ap.add_argument("--views", default="biplanar", choices=sorted(VIEW_SETS))
    ap.add_argument("--model", default=None, help="the method's model (not needed by backprojection)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--split", default="test", help="a split of split.json, or all (default test)")
    ap.add_argument("--size", type=int, default=None, help="resize the cases to SIZE^3 (default: as stored)")
    ap.add_argument("--lpips", action="store_true", help="also LPIPS (needs pip install 'svdrr[eval]')")
    ap.add_argument("--lpips-reduction", default="sum", choices=LPIPS_REDUCTIONS)
    ap.add_argument("--limit", type=int, default=None, help="only the first N cases of the split")
    ap.add_argument("--no-baseline", action="store_true", help="do not add the backprojection baseline")
    prog = ap.prog
    try:
        args = ap.parse_args(argv)
        out = Path(args.out).expanduser()
        methods = [args.method] + ([] if args.no_baseline or args.method == "backprojection" else ["backprojection"])
        options = {"split": args.split, "views": args.views, "size": args.size, "lpips": args.lpips,
                   "limit": args.limit, "lpips_reduction": args.lpips_reduction, "device": args.device}
        results = [evaluate(METHODS[m](args.model, args.device), args.cases, method=m, **options) for m in methods]
        out.mkdir(parents=True, exist_ok=True)
        write_table(results, out / "metrics.md", out / "metrics.json")
    except (EvaluationError, ImageError, LPIPSUnavailable) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print((out / "metrics.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
