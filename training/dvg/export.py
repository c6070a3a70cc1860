"""A finished training run -> a DVG model folder that ``DVGReconstructionPipeline.from_folder`` loads.

    python -m training.dvg.export --run training/runs/dvg-demo --out models/dvg-demo [--ema]

Takes each stage's final weights (``RUN_DIR/<stage>/<part>.safetensors``; with ``--ema`` the denoiser's EMA
weights), checks them against the run's network configuration and writes the folder with
:func:`~SVDRRLogic.models.dvg.save_dvg`. The folder's ``config.json`` also records, under ``training``, the config
file the run was trained with, its network configuration's name, each stage's step count and whether the EMA
weights were taken; loaders ignore that entry.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from SVDRRLogic.models.dvg import build_dvg, save_dvg
from SVDRRLogic.models.recon_folder import load_module
from SVDRRLogic.models.svdrr import ModelLoadError

from .config import STAGES
from .train import RUN_FILE, OneLineParser, TrainingError, finished_step

#: Model part -> the stage that trains it.
PART_STAGE = {"ct_vqgan": "ct_vqgan", "vpge": "vpge", "coarse": "coarse", "vpge_new": "vpge_new",
              "denoiser": "diffusion"}


def export(run_dir: str | Path, out: str | Path, ema: bool = False) -> Path:
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / RUN_FILE).is_file():
        raise TrainingError(f"{run_dir}: not a DVG training run (no {RUN_FILE})")
    run = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    steps = {s: finished_step(run_dir / s) for s in STAGES}
    unfinished = [s for s, n in steps.items() if n is None]
    if unfinished:
        raise TrainingError(f"{run_dir}: stage(s) {', '.join(unfinished)} not finished")
    parts = build_dvg(run["model_config"])
    for part, stage in PART_STAGE.items():
        name = "denoiser_ema" if (ema and part == "denoiser") else part
        if not (run_dir / stage / f"{name}.safetensors").is_file():
            raise TrainingError(f"{run_dir / stage}: no {name}.safetensors (was EMA off in this run?)")
        load_module(getattr(parts, part), run_dir / stage, name)
    parts.config["training"] = {"config": run["config_name"], "config_file": run["config"], "model": run["model"],
                                "steps": steps, "ema": ema}
    return save_dvg(parts, out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m training.dvg.export", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="training run folder (training.dvg.train --out)")
    ap.add_argument("--out", required=True, help="model folder to write (replaced if it exists)")
    ap.add_argument("--ema", action="store_true", help="the denoiser's EMA weights")
    try:
        args = ap.parse_args(argv)
        folder = export(args.run, args.out, args.ema)
    except (TrainingError, ModelLoadError) as exc:
        print(f"{ap.prog}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
