"""``svdrr bench-recon``: time and peak memory of one CT reconstruction per method and model size.

Each row reconstructs the generated chest phantom from its frontal and lateral DRRs with a randomly initialized
model of the chosen configuration (the paper's sizes, or ``demo``/``tiny``), written to a temporary folder and
loaded through the product's own path, so what is timed is exactly what ``svdrr reconstruct`` runs. Random weights
cost the same as trained ones. ``steps`` below the model's default are timed and then extrapolated linearly to
the full step count (loading and the fixed stages are timed once; the per-step cost is the difference between
two step counts), because a paper-size run on a CPU takes many minutes per volume.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from .bench import PeakMemory
from .phantoms import chest_phantom
from .recon_grid import ReconGrid
from .renderer import describe_device, resolve_device

#: Method -> (factory module, default steps attribute in the model's configuration).
FACTORIES = {"dvg": ("SVDRRLogic.models.dvg", "timesteps"), "patch-edm": ("SVDRRLogic.models.patch_edm",
                                                                          "num_inference_steps")}


def bench_one(method: str, config: str, device: torch.device, steps: int | None, log: TextIO) -> dict:
    """One row: seconds for a whole volume (measured or extrapolated) and the peak memory."""
    from importlib import import_module

    from .reconstruct import load_pipeline
    module, steps_key = FACTORIES[method]
    with tempfile.TemporaryDirectory() as tmp:
        folder = import_module(module).create_random(Path(tmp) / f"{method}-{config}", config)
        started = time.perf_counter()
        pipe, _ = load_pipeline(folder, method, device=str(device), dtype="fp32", progress=False)
        load_s = time.perf_counter() - started
    cfg = pipe.model_config
    full = int(cfg[steps_key])
    counts = sorted({min(full, steps or full), min(full, 2 * (steps or full))})
    ct = chest_phantom(shape=(96, 128, 128), spacing=(2.8, 2.8, 3.4), seed=0)
    grid = ReconGrid(pipe.grid_size, tuple(ct.center_ras))
    views = [(0.0, 0.0), (90.0, 0.0)]
    images = grid.project(torch.from_numpy(grid.sample_ct(ct)), [grid.geometry(*v) for v in views]).numpy()
    timings, peak = [], float("nan")
    for count in counts:
        print(f"bench-recon: {method} {config} on {describe_device(device)}, {count} of {full} steps", file=log)
        with PeakMemory(device) as mem:
            t = time.perf_counter()
            pipe(list(images), views, num_inference_steps=count, generator=0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.append(time.perf_counter() - t)
        peak = np.nanmax([peak, mem.peak_mib])
    per_step = (timings[-1] - timings[0]) / (counts[-1] - counts[0]) if len(counts) > 1 else 0.0
    if per_step <= 0.0:  # one step count, or timing noise on a model so small that steps cost next to nothing
        per_step = timings[-1] / counts[-1]
    fixed = max(0.0, timings[0] - per_step * counts[0])
    params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                 for p in m.parameters())
    return dict(method=method, config=config, device=describe_device(device), grid=pipe.grid_size,
                params_m=params / 1e6, steps=full, measured_steps=counts, load_s=load_s,
                seconds=fixed + per_step * full, s_per_step=per_step, peak_mib=float(peak))


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<10}{'config':<8}{'device':<26}{'grid':>5}{'params M':>10}{'steps':>7}{'s/step':>9}"
             f"{'s/volume':>10}{'peak MiB':>10}  measured"]
    for r in rows:
        lines.append(f"{r['method']:<10}{r['config']:<8}{r['device'][:25]:<26}{r['grid']:>5}{r['params_m']:>10.1f}"
                     f"{r['steps']:>7}{r['s_per_step']:>9.3f}{r['seconds']:>10.1f}{r['peak_mib']:>10.0f}  "
                     f"{'/'.join(map(str, r['measured_steps']))} steps")
    return "\n".join(lines)


def run_bench_recon(methods=("dvg", "patch-edm"), configs=("tiny",), device: str = "auto", steps: int | None = None,
                    log: TextIO = sys.stderr) -> dict:
    """Rows for every method x configuration on ``device``; ``steps`` (timed, then extrapolated) defaults to all."""
    dev = resolve_device(device)
    rows = [bench_one(m, c, dev, steps, log) for m in methods for c in configs]
    return {"rows": rows, "table": format_table(rows)}
