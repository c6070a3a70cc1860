"""Train DVG-Diffusion stage by stage with accelerate: one GPU, many GPUs, many nodes, or the CPU.

    python -m training.dvg.train --config training/configs/dvg-demo.yaml --cases data/recon-64 \\
        --out training/runs/dvg-demo --stage all
    accelerate launch --multi_gpu --num_processes 8 -m training.dvg.train \\
        --config training/configs/dvg-paper.yaml --cases data/recon-128 --out runs/dvg --stage ct_vqgan
    ... --stage ct_vqgan --resume            # continue from the stage's newest checkpoint

Stages in order (:mod:`.stages`): ``ct_vqgan``, ``vpge``, ``coarse``, ``vpge_new``, ``diffusion``; ``all`` runs
them in order and skips the finished ones. Each stage loads the earlier stages' weights frozen and writes into
``RUN_DIR/<stage>/``:

- ``checkpoint-<step>/``: accelerate state (trained modules, optimizers, RNG) plus the lr schedules and the EMA;
  the newest ``checkpoint.total_limit`` are kept;
- ``metrics.jsonl``: every ``logging.every_steps`` the mean of each loss term over those steps (and over the
  processes), the lr and the seconds per step;
- at the end ``<part>.safetensors`` (state dicts of our classes, loadable with
  ``SVDRRLogic.models.recon_folder.load_module``; ``denoiser_ema`` too when EMA is on) and ``done.json``.

``RUN_DIR/run.json`` records the config file, the cases and the network configuration; a later stage or resume
with another network configuration is refused. Every problem with the config, the cases or the run folder is one
line on stderr and exit code 2. ``--set section.key=value`` overrides config values (YAML-parsed).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from SVDRRLogic.models.recon_folder import load_module
from SVDRRLogic.models.svdrr import ModelLoadError

from ..svdrr.dist import cpu_only, partial_state
from ..svdrr.train import checkpoints
from .config import STAGES, config_name, load_config, model_config
from .data import Cases, Conditioner, DataError, batch_indices, step_generator
from .stages import STAGE_CLASSES, StageError

log = logging.getLogger("training.dvg.train")
RUN_FILE, DONE_FILE, METRICS_FILE = "run.json", "done.json", "metrics.jsonl"


class TrainingError(RuntimeError):
    """A run that cannot start or continue as asked (one line)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one-line exceptions, reported like every other problem of the command."""

    def error(self, message: str):
        raise TrainingError(message)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = OneLineParser(prog="python -m training.dvg.train", description="Train DVG-Diffusion, one stage at a time.")
    ap.add_argument("--config", required=True, help="YAML or JSON config (training/configs/dvg-*.yaml)")
    ap.add_argument("--cases", required=True, help="preprocessed cases (python -m training.recon.preprocess)")
    ap.add_argument("--out", required=True, help="run folder: one sub-folder per stage")
    ap.add_argument("--stage", required=True, choices=(*STAGES, "all"))
    ap.add_argument("--resume", action="store_true", help="continue a stage from its newest checkpoint")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value, e.g. --set diffusion.steps=1000 (repeatable)")
    return ap.parse_args(argv)


def finished_step(stage_dir: Path) -> int | None:
    """The step a finished stage ended at (its ``done.json``), else None."""
    done = stage_dir / DONE_FILE
    return json.loads(done.read_text(encoding="utf-8"))["step"] if done.is_file() else None


def record_run(run_dir: Path, cfg: dict, config_path: str, cases: str) -> None:
    """Write ``run.json`` on first use (the main process); afterwards check that the network configuration is
    unchanged."""
    path = run_dir / RUN_FILE
    run = {"config": config_path, "config_name": Path(config_path).stem, "model": config_name(cfg),
           "model_config": model_config(cfg), "cases": cases}
    state = partial_state()
    exists = path.is_file()
    state.wait_for_everyone()           # every process has looked before the main one writes
    if exists:
        old = json.loads(path.read_text(encoding="utf-8"))
        if old["model_config"] != run["model_config"]:
            raise TrainingError(f"{run_dir} was trained with another network configuration ({old['model']} from "
                                f"{old['config']}); use another --out")
    elif state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    state.wait_for_everyone()


class StageRun:
    """One stage of one run: setup, resume, the loop, checkpoints, the final weights."""

    def __init__(self, name: str, cfg: dict, cases_dir: str, run_dir: Path, resume: bool):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from SVDRRLogic.models.dvg import build_dvg
        self.name, self.cfg = name, cfg
        self.dir = run_dir / name
        self.sc = cfg[name]
        missing = [s for s in STAGE_CLASSES[name].needs if finished_step(run_dir / s) is None]
        if missing:
            raise TrainingError(f"stage {name} needs the finished stage(s) {', '.join(missing)} in {run_dir}")
        found = checkpoints(self.dir)
        if found and not resume:
            raise TrainingError(f"{self.dir} has checkpoints up to step {found[-1][0]}: pass --resume to continue, "
                                f"or delete the folder to start the stage again")
        self.resume_from = found[-1] if (found and resume) else None
        self.acc = acc = Accelerator(cpu=cpu_only())
        log.setLevel(logging.INFO if acc.is_main_process else logging.WARNING)
        parts = build_dvg(model_config(cfg), seed=cfg["seed"])
        for part in STAGE_CLASSES[name].needs:
            load_module(getattr(parts, part), run_dir / part, part)
        set_seed(cfg["seed"], device_specific=True)
        cases = Cases(cases_dir, cfg["data"]["split"], parts.config["grid"])
        self.n_cases = len(cases)
        cond = Conditioner(cases, parts.config, acc.device, cfg["data"]["cache"])
        self.stage = STAGE_CLASSES[name](cfg, parts, cond, acc)
        self.stage.setup()
        for obj in self.stage.schedulers + ([self.stage.ema] if self.stage.ema else []):
            acc.register_for_checkpointing(obj)

    def _lr(self) -> float:
        return self.stage.opt.param_groups[0]["lr"]

    def save_checkpoint(self, step: int) -> None:
        acc = self.acc
        acc.wait_for_everyone()
        acc.save_state(str(self.dir / f"checkpoint-{step}"))
        if acc.is_main_process:
            for _, old in checkpoints(self.dir)[:-self.cfg["checkpoint"]["total_limit"]]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("%s: saved checkpoint-%d", self.name, step)

    def run(self) -> dict:
        acc, sc = self.acc, self.sc
        metrics = self.dir / METRICS_FILE
        step = 0
        if self.resume_from is not None:
            step, path = self.resume_from
            acc.load_state(str(path))
            log.info("%s: resumed from %s", self.name, path)
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / DONE_FILE).unlink(missing_ok=True)        # unfinished again until the new end
            kept = [line for line in (metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else [])
                    if json.loads(line)["step"] <= step]      # records past the checkpoint are redone
            metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        start, every = step, self.cfg["logging"]["every_steps"]
        window, first, last = [], None, None
        started = window_start = time.perf_counter()
        log.info("%s: steps %d..%d, batch %d per process x %d process(es), %d cases, lr %.3g", self.name, step + 1,
                 sc["steps"], sc["batch_size"], acc.num_processes, self.n_cases, self._lr())
        while step < sc["steps"]:
            indices = batch_indices(self.cfg["seed"], step, acc.process_index, acc.num_processes, sc["batch_size"],
                                    self.n_cases)
            gen = step_generator(self.cfg["seed"], self.name, acc.process_index, step)
            losses = self.stage.train_step(indices, gen, step)
            lr = self._lr()
            for sched in self.stage.schedulers:
                sched.step()
            step += 1
            if self.stage.ema is not None:
                self.stage.ema.update(step)
            window.append(torch.stack(list(losses.values())))
            if step % every == 0 or step == sc["steps"]:
                means = acc.reduce(torch.stack(window).mean(0), reduction="mean").tolist()
                now = time.perf_counter()
                record = {"step": step, **dict(zip(losses, means)), "lr": lr,
                          "seconds_per_step": round((now - window_start) / len(window), 4)}
                first = record["loss"] if first is None else first
                last = record["loss"]
                window, window_start = [], now
                if acc.is_main_process:
                    with open(metrics, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(record) + "\n")
                log.info("%s step %d: %s", self.name, step,
                         " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"))
            if self.cfg["checkpoint"]["every_steps"] and step % self.cfg["checkpoint"]["every_steps"] == 0 \
                    and step < sc["steps"]:
                self.save_checkpoint(step)
                window_start = time.perf_counter()
        seconds = time.perf_counter() - started
        if step > start:
            self.save_checkpoint(step)
        summary = {"stage": self.name, "step": step, "start_step": start, "first_logged_loss": first,
                   "last_logged_loss": last, "seconds": round(seconds, 2),
                   "seconds_per_step": round(seconds / (step - start), 4) if step > start else None,
                   "processes": acc.num_processes}
        acc.wait_for_everyone()
        if acc.is_main_process:
            from safetensors.torch import save_file
            for part, state in self.stage.outputs().items():
                save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                          str(self.dir / f"{part}.safetensors"))
            (self.dir / DONE_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        acc.wait_for_everyone()
        return summary


def train(cfg: dict, config_path: str, cases: str, run_dir: str | Path, stage: str, resume: bool) -> list[dict]:
    """Run ``stage`` (or all unfinished ones in order); returns a summary per stage run."""
    run_dir = Path(run_dir).expanduser()
    record_run(run_dir, cfg, config_path, cases)
    summaries = []
    for name in (STAGES if stage == "all" else (stage,)):
        done = finished_step(run_dir / name)
        if done is not None and done >= cfg[name]["steps"]:
            log.info("%s: finished at step %d, skipped (delete %s to train it again)", name, done, run_dir / name)
            continue
        if done is not None and not resume:
            raise TrainingError(f"{run_dir / name} finished at step {done}: pass --resume to continue to step "
                                f"{cfg[name]['steps']}")
        summaries.append(StageRun(name, cfg, cases, run_dir, resume).run())
    return summaries


def _fail(exc: Exception) -> int:
    print(f"python -m training.dvg.train: error: {str(exc).splitlines()[0]}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        args = parse_args(argv)
        cfg = load_config(args.config, args.set)
    except (TrainingError, ValueError) as exc:      # arguments, config file and values
        return _fail(exc)
    try:
        summaries = train(cfg, args.config, args.cases, args.out, args.stage, args.resume)
    except (TrainingError, StageError, DataError, ModelLoadError) as exc:
        return _fail(exc)
    if partial_state().is_main_process:
        for s in summaries:
            print(json.dumps(s))
    return 0 if all(s["last_logged_loss"] is None or math.isfinite(s["last_logged_loss"]) for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
