"""Train SV-DRR (svdrr-method.md section 3) with accelerate: one GPU, many GPUs, many nodes, or the CPU.

    python -m training.svdrr.train --config training/configs/tiny.yaml                  # CPU, about a minute
    accelerate launch -m training.svdrr.train --config training/configs/svdrr-256.yaml  # GPUs per accelerate config
    accelerate launch ... -m training.svdrr.train --config ... --resume latest          # continue a run

Per step: a batch of (PA source, random hemisphere target) pairs per process; frozen VAE and CLIP encode them,
conditioning exactly as at inference (:mod:`.objective`), the authors' dropout, the IDDPM loss (epsilon MSE + the
learned-variance VLB term, :mod:`.diffusion`); AdamW on the transformer (lr) and ``cc_projection`` (10 x lr), warm-up
then constant, gradient clipping, optional EMA. Every ``checkpoint.every_steps`` an accelerate checkpoint
``<output_dir>/checkpoint-<step>`` (models, optimizer, schedule, RNG, EMA); every ``validation.every_steps``
validation panels in ``<output_dir>/validation/step-<step>/``. At the end ``<output_dir>/final-pipeline/`` in the
authors' folder layout (EMA weights when EMA is on), loaded back with ``SVDRRPipeline.from_folder`` for a last
validation. ``train_log.jsonl`` holds the loss curve, ``train_summary.json`` the run's figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import load_config
from .dist import cpu_only
from .manifest import MANIFEST, read_manifest, select_patients

log = logging.getLogger("training.svdrr.train")
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.svdrr.train", description="Train SV-DRR.")
    ap.add_argument("--config", required=True, help="YAML or JSON config (training/configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value, e.g. --set train.max_train_steps=500 (repeatable)")
    ap.add_argument("--output-dir", default=None, help="override checkpoint.output_dir")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    return ap.parse_args(argv)


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not CHECKPOINT.match(path.name) or not path.is_dir():
        raise SystemExit(f"--resume {resume}: not a checkpoint-<step> folder")
    return path


def ensure_dataset(data_cfg: dict, state) -> None:
    """Render the configured phantom dataset into ``data.root`` when it has no manifest (tiny runs), on all
    processes together (each renders its share of the phantoms)."""
    root = Path(data_cfg["root"]).expanduser()
    gen = data_cfg.get("generate")
    if (root / MANIFEST).is_file() or not gen:
        return
    from .ct_sources import phantom_sources
    from .render_dataset import RenderSettings, render_dataset
    arc = gen.get("arc", [-90, 90, 45])
    settings = RenderSettings(resolution=int(gen.get("resolution", 32)), hemisphere=int(gen.get("hemisphere", 8)),
                              arc=tuple(float(a) for a in arc) if arc else None, bits=int(gen.get("bits", 8)))
    sources = phantom_sources(int(gen.get("phantoms", 3)), int(gen.get("seed", 0)), gen.get("shape", (40, 64, 64)),
                              gen.get("spacing", (9.0, 9.0, 8.0)))
    render_dataset(sources, root, settings, state=state, test_fraction=float(gen.get("test_fraction", 0.1)),
                   test_ids=gen.get("test_ids"))
    state.wait_for_everyone()


def flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class Trainer:
    """State of one run; ``run()`` trains to ``train.max_train_steps`` and exports."""

    def __init__(self, cfg: dict, resume: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
        self.cfg = cfg
        t = cfg["train"]
        self.out = Path(cfg["checkpoint"]["output_dir"]).expanduser()
        report = cfg["logging"]["report_to"]
        self.accelerator = Accelerator(
            cpu=cpu_only(), gradient_accumulation_steps=t["gradient_accumulation_steps"],
            mixed_precision=t["mixed_precision"],
            log_with=None if report in (None, "none") else report,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        acc = self.accelerator
        logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                            format=f"%(asctime)s [rank {acc.process_index}] %(levelname)s %(message)s")
        set_seed(t["seed"], device_specific=True)
        if t["allow_tf32"] and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.resume_path = resolve_resume(resume, self.out)
        if resume == "latest" and self.resume_path is None:
            log.info("no checkpoint in %s: starting a new run", self.out)
        self._setup_data()
        self._setup_model()

    # -- setup -------------------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        from .data import PatientViews, SVDRRPairs
        d, t, acc = self.cfg["data"], self.cfg["train"], self.accelerator
        ensure_dataset(d, acc)
        self.root = Path(d["root"]).expanduser()
        manifest = read_manifest(self.root)
        patients = select_patients(manifest, d["split"], d["max_slice_spacing"])
        per_step = t["batch_size"] * acc.num_processes * t["gradient_accumulation_steps"]
        self.dataset = SVDRRPairs(self.root, patients, self.cfg["model"]["resolution"], seed=t["seed"],
                                  samples_per_epoch=max(int(d["samples_per_epoch"] or 0), per_step),
                                  target_sets=tuple(d["target_sets"]))
        v = self.cfg["validation"]
        val = select_patients(manifest, v["split"], d["max_slice_spacing"])[:max(0, int(v["num_patients"]))]
        self.val_patients = [PatientViews(self.root, p) for p in val]
        log.info("data: %d training patients (%d pairs per epoch), %d validation patients, from %s",
                 len(patients), len(self.dataset), len(self.val_patients), self.root)

    def _setup_model(self) -> None:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        from torch.utils.data import DataLoader

        from .diffusion import LearnedRangeDiffusion
        from .model_setup import build_components
        from .objective import SVDRRDenoiser
        cfg, t, acc = self.cfg, self.cfg["train"], self.accelerator
        self.parts, self.origin = build_components(cfg["model"])
        log.info("weights: %s", {k: v for k, v in self.origin.items() if k != "pixart"})
        self.diffusion = LearnedRangeDiffusion(t["num_timesteps"], t["beta_start"], t["beta_end"])
        if t["gradient_checkpointing"]:
            self.parts.transformer.enable_gradient_checkpointing()
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        vae_dtype = torch.float32 if (self.weight_dtype == torch.float16 and self.parts.vae.config.force_upcast) \
            else self.weight_dtype
        for frozen, dtype in ((self.parts.vae, vae_dtype), (self.parts.image_encoder, self.weight_dtype)):
            frozen.to(acc.device)
            if dtype != torch.float32:      # (diffusers warns about any dtype .to(), even a no-op one)
                frozen.to(dtype=dtype)
        denoiser = SVDRRDenoiser(self.parts.transformer, self.parts.cc_projection)
        optimizer = torch.optim.AdamW(
            [{"params": list(self.parts.transformer.parameters()), "lr": t["learning_rate"]},
             {"params": list(self.parts.cc_projection.parameters()),
              "lr": t["learning_rate"] * t["cc_projection_lr_scale"]}],
            betas=(t["adam_beta1"], t["adam_beta2"]), eps=t["adam_epsilon"], weight_decay=t["weight_decay"])
        # The loader's own generator: creating an epoch's iterator must not draw from the global RNG, or a run
        # resumed mid-epoch would see other noise than an uninterrupted one (targets are seeded per item anyway).
        loader = DataLoader(self.dataset, batch_size=t["batch_size"], shuffle=True, drop_last=True,
                            num_workers=int(cfg["data"]["num_workers"]), pin_memory=acc.device.type == "cuda",
                            generator=torch.Generator().manual_seed(t["seed"]))
        # the prepared scheduler steps once per process per optimizer step (accelerate's convention)
        lr_scheduler = get_scheduler(t["lr_scheduler"], optimizer,
                                     num_warmup_steps=t["lr_warmup_steps"] * acc.num_processes,
                                     num_training_steps=t["max_train_steps"] * acc.num_processes)
        self.denoiser, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(
            denoiser, optimizer, loader, lr_scheduler)
        self.ema = None
        if t["use_ema"]:
            self.ema = EMAModel(acc.unwrap_model(self.denoiser).parameters(), decay=t["ema_decay"])
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        self.steps_per_epoch = max(1, len(self.loader) // t["gradient_accumulation_steps"])

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        acc = self.accelerator
        limit = self.cfg["checkpoint"]["total_limit"]
        if acc.is_main_process and limit:
            existing = checkpoints(self.out)
            for _, old in existing[:max(0, len(existing) - int(limit) + 1)]:
                shutil.rmtree(old, ignore_errors=True)
        path = self.out / f"checkpoint-{step}"
        acc.wait_for_everyone()
        acc.save_state(str(path))
        log.info("saved %s", path)
        return path

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self, step: int) -> dict | None:
        """Panels on the main process (the others wait); EMA weights when EMA is on."""
        from .validation import run_validation, training_pipeline
        acc, v = self.accelerator, self.cfg["validation"]
        result = None
        if acc.is_main_process and self.val_patients:
            model = acc.unwrap_model(self.denoiser)
            params = list(model.parameters())
            if self.ema is not None:
                self.ema.store(params)
                self.ema.copy_to(params)
            model.eval()
            try:
                pipe = training_pipeline(self.parts, model.transformer, model.cc_projection)
                result = run_validation(pipe, self.val_patients, self.out / "validation" / f"step-{step:07d}",
                                        num_inference_steps=v["num_inference_steps"],
                                        guidance_scale=v["guidance_scale"], seed=v["seed"])
            finally:
                model.train()
                if self.ema is not None:
                    self.ema.restore(params)
            log.info("validation at step %d: PSNR %.2f dB, SSIM %.3f", step, result["psnr"], result["ssim"])
        acc.wait_for_everyone()
        return result

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        from .objective import training_losses
        acc, t, c, v = self.accelerator, self.cfg["train"], self.cfg["checkpoint"], self.cfg["validation"]
        global_step, resumed_from = 0, None
        if self.resume_path is not None:
            acc.load_state(str(self.resume_path))
            if self.ema is not None:  # the loaded EMA weights come back on the CPU; training steps on acc.device
                self.ema.to(acc.device)
            global_step = int(CHECKPOINT.match(self.resume_path.name).group(1))
            resumed_from = str(self.resume_path)
            log.info("resumed from %s at step %d", self.resume_path, global_step)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "training_config.json").write_text(json.dumps(self.cfg, indent=1) + "\n")
            acc.init_trackers(self.cfg["logging"]["project"], config=flat(self.cfg))
        log_path = self.out / "train_log.jsonl"
        first_epoch = global_step // self.steps_per_epoch
        skip = (global_step % self.steps_per_epoch) * t["gradient_accumulation_steps"]
        window, window_start, started = [], time.perf_counter(), time.perf_counter()
        start_step, first_loss, last_loss = global_step, None, None
        max_steps = t["max_train_steps"]
        epoch = first_epoch
        while global_step < max_steps:
            self.dataset.set_epoch(epoch)
            self.loader.set_epoch(epoch)
            batches = acc.skip_first_batches(self.loader, skip) if (epoch == first_epoch and skip) else self.loader
            for batch in batches:
                with acc.accumulate(self.denoiser):
                    losses = training_losses(self.denoiser, self.diffusion, self.parts.vae, self.parts.image_encoder,
                                             batch, t["conditioning_dropout_prob"])
                    loss = losses["loss"].mean()
                    acc.backward(loss)
                    if acc.sync_gradients and t["max_grad_norm"]:
                        acc.clip_grad_norm_(self.denoiser.parameters(), t["max_grad_norm"])
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window.append(torch.stack([losses[k].detach().mean() for k in ("loss", "mse", "vb")]))
                if not acc.sync_gradients:
                    continue
                global_step += 1
                if self.ema is not None:
                    self.ema.step(acc.unwrap_model(self.denoiser).parameters())
                if global_step % self.cfg["logging"]["every_steps"] == 0 or global_step == max_steps:
                    means = acc.reduce(torch.stack(window).mean(0), reduction="mean").tolist()
                    now = time.perf_counter()
                    record = {"step": global_step, "epoch": epoch, "loss": means[0], "mse": means[1], "vb": means[2],
                              "lr": self.lr_scheduler.get_last_lr()[0],
                              "steps_per_s": len(window) / t["gradient_accumulation_steps"] / (now - window_start)}
                    first_loss = record["loss"] if first_loss is None else first_loss
                    last_loss = record["loss"]
                    window, window_start = [], now
                    if acc.is_main_process:
                        with open(log_path, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(record) + "\n")
                        acc.log({k: v for k, v in record.items() if k != "step"}, step=global_step)
                        log.info("step %d loss %.4f (mse %.4f, vb %.4f) lr %.2e %.2f steps/s", global_step,
                                 *means, record["lr"], record["steps_per_s"])
                if c["every_steps"] and global_step % c["every_steps"] == 0:
                    self.save_checkpoint(global_step)
                    window_start = time.perf_counter()      # steps/s counts training only
                if v["every_steps"] and global_step % v["every_steps"] == 0 and global_step < max_steps:
                    self.validate(global_step)
                    window_start = time.perf_counter()
                if global_step >= max_steps:
                    break
            epoch += 1
            skip = 0
        seconds = time.perf_counter() - started
        if not (c["every_steps"] and global_step % c["every_steps"] == 0) and global_step > start_step:
            self.save_checkpoint(global_step)
        summary = {"global_step": global_step, "start_step": start_step, "resumed_from": resumed_from,
                   "first_logged_loss": first_loss, "last_logged_loss": last_loss, "seconds": round(seconds, 2),
                   "steps_per_s": (global_step - start_step) / seconds if seconds > 0 else None,
                   "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision}
        summary.update(self.finish(global_step))
        acc.end_training()
        return summary

    def finish(self, step: int) -> dict:
        """Export ``final-pipeline/`` (EMA weights when on), reload it with ``from_folder``, validate it."""
        from SVDRRLogic.pipelines import SVDRRPipeline

        from .model_setup import export_model
        from .validation import run_validation
        acc, v = self.accelerator, self.cfg["validation"]
        acc.wait_for_everyone()
        result = {}
        if acc.is_main_process:
            model = acc.unwrap_model(self.denoiser)
            if self.ema is not None:
                self.ema.copy_to(model.parameters())
            for frozen in (self.parts.vae, self.parts.image_encoder):
                if frozen.dtype != torch.float32:
                    frozen.to(dtype=torch.float32)
            final = export_model(self.parts, model.transformer, model.cc_projection, self.out / "final-pipeline")
            result["export"] = str(final)
            log.info("exported %s", final)
            if self.val_patients and v["num_patients"]:
                pipe = SVDRRPipeline.from_folder(final, device=acc.device, dtype="fp32")
                val = run_validation(pipe, self.val_patients, self.out / "validation" / "final",
                                     num_inference_steps=v["num_inference_steps"],
                                     guidance_scale=v["guidance_scale"], seed=v["seed"])
                result["final_validation"] = {"psnr": val["psnr"], "ssim": val["ssim"]}
            (self.out / "train_summary.json").write_text(json.dumps(result, indent=1) + "\n")
        acc.wait_for_everyone()
        return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set) + ([f"checkpoint.output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, resume=args.resume)
    summary = trainer.run()
    if trainer.accelerator.is_main_process:
        (trainer.out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
    return 0 if summary.get("last_logged_loss") is None or math.isfinite(summary["last_logged_loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
