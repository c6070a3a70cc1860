"""Evaluate an SV-DRR model on a rendered test set (svdrr-method.md section 5).

    python -m training.svdrr.evaluate --model runs/svdrr-256/final-pipeline --data data/lidc-drr-256 --out eval/256
    accelerate launch --num_processes 8 -m training.svdrr.evaluate ...     # test patients split over GPUs

For every test patient the PA view ``0000`` is the input; the model synthesizes the "simple" arc views (the
``arc`` set, the source's own angle excluded: 36 targets for -90:90:5) and the hemisphere views (all but the PA
one, or ``--hemisphere-max`` of them evenly spread). Each synthesized view is compared with the rendered one, both
at the model's resolution and in [0, 1] (the ground truth normalized exactly like the model's input): PSNR (data
range 1), SSIM (Gaussian 11 / 1.5) and LPIPS when the optional ``lpips`` package imports. The trivial baseline
"source-copy" returns the PA input unchanged for every view.

Outputs in ``--out``: ``metrics_per_view.csv`` (one row per patient, view and method), ``metrics_per_angle.csv``
(means over patients per view angle), ``metrics_summary.csv`` and ``metrics.md`` (means per view set and method,
and the arc per azimuth).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import PatientViews, read_png
from .manifest import read_manifest, select_patients
from .metrics import finite_mean, psnr, ssim, try_lpips

log = logging.getLogger("training.svdrr.evaluate")
METHODS = ("svdrr", "source-copy")
FIELDS = ("patient", "set", "view_index", "azimuth", "elevation", "method", "psnr", "ssim", "lpips")


def target_views(patient: PatientViews, sets: Sequence[str], hemisphere_max: int | None) -> list[dict]:
    """The views to synthesize: the arc without the source angle, the hemisphere without the source (evenly
    subsampled to ``hemisphere_max``)."""
    src = patient.view_of(patient.source)
    out = []
    if "arc" in sets:
        out += [v for v in patient.views if v["set"] == "arc"
                and not np.allclose(patient.view_of(v), src, atol=1e-6)]
    if "hemisphere" in sets:
        hemi = list(patient.targets)
        if hemisphere_max is not None and len(hemi) > hemisphere_max:
            keep = np.unique(np.linspace(0, len(hemi) - 1, hemisphere_max).round().astype(int))
            hemi = [hemi[i] for i in keep]
        out += hemi
    return out


def score(pred: torch.Tensor, truth: torch.Tensor, lpips_metric) -> list[tuple[float, float, float | None]]:
    """(PSNR, SSIM, LPIPS or None) per image of (N, R, R) batches in [0, 1]."""
    p, s = psnr(pred, truth).tolist(), ssim(pred, truth).tolist()
    lp = lpips_metric(pred, truth).tolist() if lpips_metric is not None else [None] * len(p)
    return list(zip(p, s, lp))


def evaluate_patient(pipe, patient: PatientViews, sets: Sequence[str], hemisphere_max: int | None, *, steps: int,
                     guidance: float, seed: int, batch_size: int, lpips_metric=None,
                     image_dir: Path | None = None) -> list[dict]:
    r = pipe.resolution
    views = target_views(patient, sets, hemisphere_max)
    if not views:
        return []
    source = read_png(patient.folder / patient.source["file"])
    result = pipe(source, [patient.view_of(v) for v in views], num_inference_steps=steps,
                  guidance_scale=guidance, generator=seed, batch_size=batch_size)
    fake = torch.from_numpy(np.asarray(result.images, dtype=np.float32))
    truth = torch.stack([patient.image(v, r)[0] * 0.5 + 0.5 for v in views])
    copy = (patient.image(patient.source, r)[0] * 0.5 + 0.5).expand_as(truth)
    rows = []
    for method, pred in zip(METHODS, (fake, copy)):
        for v, (p, s, lp) in zip(views, score(pred, truth, lpips_metric)):
            rows.append({"patient": patient.id, "set": v["set"], "view_index": v["index"],
                         "azimuth": round(float(v["azimuth"]), 4), "elevation": round(float(v["elevation"]), 4),
                         "method": method, "psnr": p, "ssim": s, "lpips": lp})
    if image_dir is not None:
        for v, im in zip(views, fake.numpy()):
            path = image_dir / patient.id / v["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)).save(path)
    return rows


def aggregate(rows: list[dict], keys: Sequence[str]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(str(k) if isinstance(k, str) else k
                                                                       for k in kv[0])):
        rec = dict(zip(keys, key))
        for m in ("psnr", "ssim", "lpips"):
            rec[m] = finite_mean(r[m] for r in members)
        rec["n"] = len(members)
        out.append(rec)
    return out


def _fmt(x, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def markdown(summary: list[dict], per_angle: list[dict], info: dict) -> str:
    about = (f"Data `{info['data']}`, split `{info['split']}`, {info['patients']} patients; "
             f"{info['steps']} DPM-Solver steps, guidance {info['guidance']}, seed {info['seed']}. "
             "Images at the model's resolution in [0, 1]; PSNR in dB (data range 1), SSIM Gaussian 11 / 1.5. "
             "`source-copy` = the PA input returned unchanged.")
    lines = [f"# SV-DRR evaluation: {info['model']}", "", about, ""]
    if info.get("lpips_note"):
        lines += [f"> {info['lpips_note']}", ""]
    lines += ["| view set | method | views | PSNR | SSIM | LPIPS |", "|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['set']} | {r['method']} | {r['n']} | {_fmt(r['psnr'], 2)} | {_fmt(r['ssim'], 4)} | "
                     f"{_fmt(r['lpips'], 4)} |")
    arc = [r for r in per_angle if r["set"] == "arc"]
    if arc:
        by_angle: dict[tuple, dict] = defaultdict(dict)
        for r in arc:
            by_angle[(r["azimuth"], r["elevation"])][r["method"]] = r
        header = ("| azimuth | elevation | PSNR svdrr | PSNR source-copy | SSIM svdrr | SSIM source-copy | "
                  "LPIPS svdrr | LPIPS source-copy |")
        lines += ["", "Arc (\"simple\" set), mean over patients per view angle:", "", header,
                  "|---|---|---|---|---|---|---|---|"]
        for (az, el), m in sorted(by_angle.items()):
            cells = [_fmt(m.get(k, {}).get(metric), d) for metric, d in (("psnr", 2), ("ssim", 4), ("lpips", 4))
                     for k in METHODS]
            lines.append(f"| {az:+.1f} | {el:+.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def write_csv(path: Path, rows: list[dict], fields: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if _missing(r.get(k)) else r.get(k)) for k in fields})


def write_reports(out: Path, rows: list[dict], info: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    per_angle = aggregate(rows, ("set", "azimuth", "elevation", "method"))
    summary = aggregate(rows, ("set", "method"))
    write_csv(out / "metrics_per_view.csv", rows, FIELDS)
    write_csv(out / "metrics_per_angle.csv", per_angle, ("set", "azimuth", "elevation", "method", "n", "psnr",
                                                         "ssim", "lpips"))
    write_csv(out / "metrics_summary.csv", summary, ("set", "method", "n", "psnr", "ssim", "lpips"))
    (out / "metrics.md").write_text(markdown(summary, per_angle, info), encoding="utf-8")
    (out / "evaluation.json").write_text(json.dumps({**info, "summary": summary}, indent=1) + "\n")
    return {"summary": summary, "per_angle": per_angle}


def evaluate(model: str | Path, data: str | Path, out: str | Path, *, split: str = "test",
             sets: Sequence[str] = ("arc", "hemisphere"), hemisphere_max: int | None = None,
             patient_ids: Sequence[str] | None = None, max_slice_spacing: float | None = None, steps: int = 20,
             guidance: float = 3.0, seed: int = 0, batch_size: int = 8, device: str | None = None,
             dtype: str = "auto", use_lpips: bool = True, save_images: bool = False, state=None) -> dict | None:
    """Run the evaluation (patients split over the processes of ``state``); the main process writes the reports
    and returns them, the others return None."""
    from SVDRRLogic.pipelines import SVDRRPipeline

    from .dist import partial_state
    state = state or partial_state()
    out, root = Path(out).expanduser(), Path(data).expanduser()
    records = select_patients(read_manifest(root), split, max_slice_spacing, patient_ids)
    if not records:
        raise SystemExit(f"{root}: no patients in split {split!r}")
    device = device or str(state.device)
    pipe = SVDRRPipeline.from_folder(model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    lpips_metric, note = (try_lpips(device) if use_lpips else (None, "LPIPS not requested (--no-lpips)"))
    if note and state.is_main_process:
        log.warning("%s", note)
    parts_dir = out / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with state.split_between_processes(records) as mine:
        for rec in mine:
            patient = PatientViews(root, rec)
            rows += evaluate_patient(pipe, patient, sets, hemisphere_max, steps=steps, guidance=guidance, seed=seed,
                                     batch_size=batch_size, lpips_metric=lpips_metric,
                                     image_dir=out / "images" if save_images else None)
            log.info("[rank %d] %s: %d views", state.process_index, patient.id, len(rows))
    (parts_dir / f"rows-{state.process_index:03d}.json").write_text(json.dumps(rows))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    all_rows = []
    for i in range(state.num_processes):
        all_rows += json.loads((parts_dir / f"rows-{i:03d}.json").read_text())
    info = {"model": str(model), "data": str(root), "split": split, "patients": len(records), "sets": list(sets),
            "hemisphere_max": hemisphere_max, "steps": steps, "guidance": guidance, "seed": seed,
            "resolution": pipe.resolution, "lpips_note": note}
    return write_reports(out, all_rows, info)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.svdrr.evaluate", description="Evaluate an SV-DRR model.")
    ap.add_argument("--model", required=True, help="model folder (authors' layout)")
    ap.add_argument("--data", required=True, help="rendered dataset (training.svdrr.render_dataset)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--sets", default="arc,hemisphere", help="comma-separated: arc, hemisphere")
    ap.add_argument("--hemisphere-max", type=int, default=None, help="evaluate at most N hemisphere views")
    ap.add_argument("--patients", default=None, help="comma-separated patient ids (default: the whole split)")
    ap.add_argument("--max-slice-spacing", type=float, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"))
    ap.add_argument("--no-lpips", action="store_true")
    ap.add_argument("--save-images", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    if not sets or set(sets) - {"arc", "hemisphere"}:
        raise SystemExit("--sets: choose from arc, hemisphere")
    res = evaluate(args.model, args.data, args.out, split=args.split, sets=sets, hemisphere_max=args.hemisphere_max,
                   patient_ids=args.patients.split(",") if args.patients else None,
                   max_slice_spacing=args.max_slice_spacing, steps=args.steps, guidance=args.guidance,
                   seed=args.seed, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                   use_lpips=not args.no_lpips, save_images=args.save_images)
    if res is not None:
        print((Path(args.out) / "metrics.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
