"""Validation images during training: for each validation patient one hemisphere view sampled by
:class:`SVDRRPipeline` from the PA source (DPM-Solver, classifier-free guidance, as the authors validated), saved as
a PNG panel [source | ground truth | synthesized], with PSNR/SSIM of the synthesized view for the log."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from SVDRRLogic.models import SVDRRComponents
from SVDRRLogic.pipelines import SVDRRPipeline

from .data import PatientViews, read_png
from .metrics import psnr, ssim


def pick_target(patient: PatientViews, seed: int, index: int) -> dict:
    """A fixed target per patient (the same one at every validation, so panels are comparable over steps)."""
    rng = np.random.default_rng([seed, index])
    return patient.targets[int(rng.integers(len(patient.targets)))]


def panel(*images: np.ndarray) -> Image.Image:
    """Gray images in [0, 1] of one size side by side, 8-bit."""
    row = np.concatenate([np.clip(im, 0.0, 1.0) for im in images], axis=1)
    return Image.fromarray(np.round(row * 255.0).astype(np.uint8))


@torch.no_grad()
def run_validation(pipe: SVDRRPipeline, patients: list[PatientViews], out_dir: str | Path, *,
                   num_inference_steps: int = 50, guidance_scale: float = 3.0, seed: int = 0) -> dict:
    """Write one panel per patient into ``out_dir``; return ``{"psnr", "ssim", "files"}`` (means over patients)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    r = pipe.resolution
    scores, files = [], []
    for i, patient in enumerate(patients):
        target = pick_target(patient, seed, i)
        source = read_png(patient.folder / patient.source["file"])
        truth = patient.image(target, r)[0].numpy() * 0.5 + 0.5
        result = pipe(source, [patient.view_of(target)], num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=seed)
        fake = result.images[0]
        src = patient.image(patient.source, r)[0].numpy() * 0.5 + 0.5
        az, el = patient.view_of(target)
        path = out / f"{patient.id}_az{az:+06.1f}_el{el:+05.1f}.png"
        panel(src, truth, fake).save(path)
        files.append(str(path))
        f, t = torch.from_numpy(fake)[None], torch.from_numpy(truth)[None]
        scores.append((float(psnr(f, t)[0]), float(ssim(f, t)[0]) if min(fake.shape) >= 11 else float("nan")))
    return {"psnr": float(np.mean([s[0] for s in scores])) if scores else float("nan"),
            "ssim": float(np.mean([s[1] for s in scores])) if scores else float("nan"), "files": files}


def training_pipeline(parts: SVDRRComponents, transformer, cc_projection) -> SVDRRPipeline:
    """A pipeline over the live training modules (no copies): the trained transformer and projection, the frozen
    VAE, CLIP and the DPM-Solver scheduler of ``parts``."""
    live = SVDRRComponents(transformer=transformer, vae=parts.vae, image_encoder=parts.image_encoder,
                           feature_extractor=parts.feature_extractor, cc_projection=cc_projection,
                           scheduler=parts.scheduler)
    return SVDRRPipeline.from_components(live, name="validation")
