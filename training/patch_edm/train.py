"""Train the 3D patch EDM model with accelerate: the CPU, one GPU, many GPUs, many nodes.

    python -m training.patch_edm.train --config training/configs/patch-edm-tiny.yaml --cases DIR --out RUN_DIR
    accelerate launch -m training.patch_edm.train --config training/configs/patch-edm-paper.yaml \\
        --cases data/recon-128 --out runs/patch-edm-128 [--resume]

The authors' recipe (dvg-and-patch-diffusion.md E.4): per step a batch of random slabs per process
(:mod:`.data`), EDM's loss (:func:`~SVDRRLogic.models.patch_edm.edm_loss`, mean reduction), Adam, a linear
learning-rate warm-up then constant, non-finite gradients zeroed (as their ``nan_to_num``; not under fp16, whose
loss scaler must see the overflows), an EMA of the weights with a half-life in steps that ramps up with the run
(half-life = min(ema_halflife_steps, ema_rampup_ratio x step), their ramp-up). Checkpoints
``RUN_DIR/checkpoint-<step>`` are accelerate states (model, optimizer, schedule, RNG, EMA); ``--resume`` continues
from the latest (or a given one). At the end the EMA weights are exported to ``RUN_DIR/final-model``, a model
folder that ``PatchEDMReconstructionPipeline.from_folder`` loads; resuming a finished run with the same
``max_train_steps`` only re-exports. ``train_log.jsonl`` holds the loss curve, ``train_summary.json`` the figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from SVDRRLogic.models.patch_edm import CONFIGS, build_patch_edm, edm_loss, resolve_config, save_patch_edm
from training.svdrr.config import apply_overrides, deep_merge, load_file
from training.svdrr.dist import cpu_only
from training.svdrr.train import CHECKPOINT, checkpoints, resolve_resume

from .data import SlabBatches

log = logging.getLogger("training.patch_edm.train")
FINAL = "final-model"
#: Model keys a config may override on its preset (None: the preset's value).
MODEL_KEYS = ("unet", "grid", "patch_slices", "views", "view_dropout", "num_inference_steps", "sigma_data",
              "sigma_min", "sigma_max", "rho", "p_mean", "p_std")

DEFAULTS: dict = {
    "model": {"preset": "tiny", "seed": 0, **{k: None for k in MODEL_KEYS}},
    "data": {"cases": None, "split": "train"},
    "train": {
        "batch_size": 1,              # per process; the authors: 1 on one GPU
        "learning_rate": 2e-4, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
        "lr_warmup_steps": 0,
        "max_train_steps": 1000,
        "ema_halflife_steps": 1000, "ema_rampup_ratio": 0.05,
        "mixed_precision": None,      # None: as accelerate launch / config says; "no", "fp16", "bf16"
        "allow_tf32": False,          # the authors disabled TF32
        "seed": 100,
    },
    "checkpoint": {"output_dir": None, "every_steps": 1000, "total_limit": 3},
    "logging": {"every_steps": 10, "report_to": "none", "project": "patch-edm"},
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults <- file <- ``section.key=value`` overrides; unknown keys are errors."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = deep_merge(cfg, load_file(path))
    cfg = apply_overrides(cfg, overrides)
    problems = [f"{k} is required" for k in ("data.cases", "checkpoint.output_dir")
                if cfg[k.split(".")[0]][k.split(".")[1]] is None]
    if cfg["model"]["preset"] not in CONFIGS:
        problems.append(f"model.preset must be one of {', '.join(CONFIGS)}")
    if cfg["train"]["batch_size"] < 1 or cfg["train"]["max_train_steps"] < 1:
        problems.append("train.batch_size and train.max_train_steps must be >= 1")
    if problems:
        raise ValueError("bad training config: " + "; ".join(problems))
    return cfg


def model_config(model: dict) -> dict:
    """The preset with the config's non-null model keys on top, checked."""
    preset = copy.deepcopy(CONFIGS[model["preset"]])
    preset.update({k: model[k] for k in MODEL_KEYS if model[k] is not None})
    return resolve_config(preset)


class EMA:
    """Exponential moving average of a module's parameters with a half-life in optimizer steps, ramped up as the
    authors' (half-life = min(halflife, rampup x step)); saved in accelerate checkpoints through its state dict."""

    def __init__(self, module: torch.nn.Module, halflife: float, rampup: float | None):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.halflife, self.rampup = float(halflife), rampup

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        halflife = self.halflife if self.rampup is None else min(self.halflife, step * self.rampup)
        beta = 0.5 ** (1.0 / max(halflife, 1e-8))
        for avg, p in zip(self.module.parameters(), module.parameters()):
            avg.lerp_(p.detach().to(avg.dtype), 1.0 - beta)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def train(cfg: dict, resume: str | None = None) -> dict:
    """Train to ``train.max_train_steps`` (from a checkpoint when resuming), export, return the summary."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    t, c, lg = cfg["train"], cfg["checkpoint"], cfg["logging"]
    out = Path(c["output_dir"]).expanduser()
    acc = Accelerator(cpu=cpu_only(), mixed_precision=t["mixed_precision"],
                      log_with=None if lg["report_to"] in (None, "none") else lg["report_to"],
                      project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                        format=f"%(asctime)s [rank {acc.process_index}] %(levelname)s %(message)s")
    set_seed(t["seed"], device_specific=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(t["allow_tf32"])
    mcfg = model_config(cfg["model"])
    data = SlabBatches(cfg["data"]["cases"], cfg["data"]["split"], mcfg, seed=t["seed"], rank=acc.process_index,
                       world=acc.num_processes, device=acc.device)
    denoiser = build_patch_edm(mcfg, seed=cfg["model"]["seed"])
    log.info("model: %s preset, %.2f M parameters", cfg["model"]["preset"],
             sum(p.numel() for p in denoiser.parameters()) / 1e6)
    ema = EMA(denoiser, t["ema_halflife_steps"], t["ema_rampup_ratio"])
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=t["learning_rate"], betas=(t["adam_beta1"],
                                 t["adam_beta2"]), eps=t["adam_epsilon"])
    # the prepared scheduler steps once per process per optimizer step (accelerate's convention)
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=t["lr_warmup_steps"] *
                             acc.num_processes)
    denoiser, optimizer, schedule = acc.prepare(denoiser, optimizer, schedule)
    ema.module.to(acc.device)
    acc.register_for_checkpointing(ema)

    step, resumed_from = 0, None
    path = resolve_resume(resume, out)
    if path is not None:
        acc.load_state(str(path))
        step, resumed_from = int(CHECKPOINT.match(path.name).group(1)), str(path)
        log.info("resumed from %s at step %d", path, step)
    elif resume == "latest":
        log.info("no checkpoint in %s: starting a new run", out)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "training_config.json").write_text(json.dumps({**cfg, "model_config": mcfg}, indent=1) + "\n")
        acc.init_trackers(lg["project"])
    loss_args = {k: mcfg[k] for k in ("sigma_data", "p_mean", "p_std")}
    start, window, first, last = step, [], None, None
    started = tick = time.perf_counter()
    while step < t["max_train_steps"]:
        batch = data.batch(step, t["batch_size"])
        loss = edm_loss(denoiser, batch["x0"], batch["cond"], batch["coord"], **loss_args)
        acc.backward(loss)
        if acc.mixed_precision != "fp16":
            for p in denoiser.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ema.update(acc.unwrap_model(denoiser), step)
        window.append(loss.detach())
        if step % lg["every_steps"] == 0 or step == t["max_train_steps"]:
            mean = acc.reduce(torch.stack(window).mean(), reduction="mean").item()
            now = time.perf_counter()
            record = {"step": step, "loss": mean, "lr": schedule.get_last_lr()[0],
                      "steps_per_s": len(window) / (now - tick)}
            first = mean if first is None else first
            last, window, tick = mean, [], now
            if acc.is_main_process:
                with open(out / "train_log.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
                log.info("step %d loss %.4f lr %.2e %.2f steps/s", step, mean, record["lr"], record["steps_per_s"])
        if c["every_steps"] and step % c["every_steps"] == 0:
            save_checkpoint(acc, out, step, c["total_limit"])
            tick = time.perf_counter()          # steps/s counts training only
    seconds = time.perf_counter() - started
    if step > start and not (c["every_steps"] and step % c["every_steps"] == 0):
        save_checkpoint(acc, out, step, c["total_limit"])
    summary = {"global_step": step, "start_step": start, "resumed_from": resumed_from, "first_logged_loss": first,
               "last_logged_loss": last, "seconds": round(seconds, 2),
               "steps_per_s": (step - start) / seconds if step > start and seconds > 0 else None,
               "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision}
    acc.wait_for_everyone()
    if acc.is_main_process:
        summary["export"] = str(save_patch_edm(ema.module, out / FINAL))
        log.info("exported the EMA weights to %s", summary["export"])
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    acc.end_training()
    return summary


def save_checkpoint(acc, out: Path, step: int, limit: int | None) -> Path:
    """``out/checkpoint-<step>``, the oldest removed beyond ``limit``."""
    if acc.is_main_process and limit:
        existing = checkpoints(out)
        for _, old in existing[:max(0, len(existing) - int(limit) + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    path = out / f"checkpoint-{step}"
    acc.wait_for_everyone()
    acc.save_state(str(path))
    log.info("saved %s", path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.patch_edm.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML or JSON config (training/configs/patch-edm-*.yaml)")
    ap.add_argument("--cases", help="preprocessed cases (python -m training.recon.preprocess); data.cases")
    ap.add_argument("--out", help="run folder for checkpoints, logs and the final model; checkpoint.output_dir")
    ap.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                    help="continue from the latest checkpoint in --out, or from the one given")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value, e.g. --set train.max_train_steps=500 (repeatable)")
    args = ap.parse_args(argv)
    overrides = list(args.set)
    overrides += [f"data.cases={args.cases}"] if args.cases else []
    overrides += [f"checkpoint.output_dir={args.out}"] if args.out else []
    try:
        cfg = load_config(args.config, overrides)
    except (KeyError, ValueError) as exc:
        ap.error(str(exc))
    summary = train(cfg, resume=args.resume)
    if "export" in summary:             # the main process
        print(json.dumps(summary, indent=1))
    return 0 if summary["last_logged_loss"] is None or math.isfinite(summary["last_logged_loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
