"""CT from one or two X-rays with DVG-Diffusion, in our C-arm convention.

The steps follow the authors' ``FineStage`` (``../shared/reference/dvg-and-patch-diffusion.md`` C.1, C.6):

1. back-project the input X-rays (each min-max normalized to [0, 1]) onto the 320 mm grid with their own views
   and sum them: V_bp; encode with the input VPGE (unquantized): z_in;
2. G_z maps z_in to an initial CT latent, decoded (with quantization) by the CT VQ-GAN: the initial CT;
3. project the initial CT at the extra view (45 degrees for two inputs, 90 for one), back-project that image
   (not re-normalized, as the authors do) and encode it with the second VPGE: z_new;
4. 100-step ancestral DDPM with x0 prediction on [z_in, z_new, z_t], static clipping to [-1, 1];
5. denormalize, quantize and decode; clip to [0, 1]; values under 0.04 (100 HU above -1024) become air.

``new_view="svdrr"`` replaces step 3's image by a view synthesized by an SV-DRR pipeline from the frontal X-ray
(an experiment the paper did not try), scaled to the coarse projection's maximum so it has the magnitudes the
encoder was trained on; ``new_view="none"`` feeds a zero z_new (ablation).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..images import ImageError, XRayImage
from ..recon_grid import ReconGrid, fit_xray
from .reconstruction import (PreparedInput, Progress, ReconstructionOutput, ReconstructionPipeline, noise)
from .svdrr import resolve_dtype

NEW_VIEW_MODES = ("coarse", "svdrr", "none")


def xraysyn_project(grid: ReconGrid, volume: torch.Tensor, views) -> torch.Tensor:
    """Forward projection in XraySyn's units: line integral in voxel lengths, divided by 10."""
    return grid.project(volume, views) / (10.0 * grid.spacing)


def xraysyn_back_project(grid: ReconGrid, images: torch.Tensor, views) -> torch.Tensor:
    """Back-projection in XraySyn's units (x 10, voxel lengths), summed over the views: a [k, j, i] volume."""
    return grid.back_project(images, views).sum(0) * (10.0 / grid.spacing)


class DVGReconstructionPipeline(ReconstructionPipeline):
    """DVG-Diffusion: one or two X-rays (frontal, lateral) in, a CT in HU on the model's grid out."""

    method = "dvg"
    model_cpu_offload_seq = "vpge->coarse->ct_vqgan->vpge_new->denoiser"

    def __init__(self, ct_vqgan, vpge, vpge_new, coarse, denoiser, scheduler):
        super().__init__()
        self.register_modules(ct_vqgan=ct_vqgan, vpge=vpge, vpge_new=vpge_new, coarse=coarse, denoiser=denoiser,
                              scheduler=scheduler)
        self.model_config: dict = {}
        self.model_name = "dvg"

    @classmethod
    def from_components(cls, parts, name: str = "dvg") -> "DVGReconstructionPipeline":
        pipe = cls(parts.ct_vqgan, parts.vpge, parts.vpge_new, parts.coarse, parts.denoiser, parts.scheduler)
        pipe.model_config, pipe.model_name = parts.config, name
        return pipe

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device = "auto",
                    dtype: str | torch.dtype = "auto", *, name: str | None = None) -> "DVGReconstructionPipeline":
        """Load a model folder (:func:`~SVDRRLogic.models.dvg.load_dvg`); ``dtype`` applies to the two U-Nets."""
        from ..models.dvg import load_dvg
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        parts = load_dvg(folder, device, resolve_dtype(dtype, device))
        return cls.from_components(parts, name or os.path.basename(os.path.normpath(str(folder))))

    @property
    def grid_size(self) -> int:
        return int(self.model_config["grid"])

    @property
    def unet_dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @torch.no_grad()
    def __call__(self, xrays: Sequence[XRayImage | np.ndarray], views: Sequence[Sequence[float]], *,
                 center_ras: Sequence[float] | None = None, num_inference_steps: int | None = None,
                 generator: torch.Generator | int | None = None, new_view: str = "coarse",
                 svdrr_pipeline=None, callback: Progress | None = None) -> ReconstructionOutput:
        """Reconstruct a CT from ``xrays`` taken at ``views`` ((azimuth, elevation) degrees, our convention).

        ``center_ras``: where the reconstructed cube is centred (default: the isocenter stored with the first
        X-ray, else the origin). ``num_inference_steps``: DDPM steps (default: all the model was trained with).
        ``generator``: an int seed or a ``torch.Generator`` (its initial seed). ``callback(fraction, message)``.
        """
        if new_view not in NEW_VIEW_MODES:
            raise ValueError(f"new_view must be one of {', '.join(NEW_VIEW_MODES)}, not {new_view!r}")
        if new_view == "svdrr" and svdrr_pipeline is None:
            raise ValueError("new_view='svdrr' needs an SV-DRR pipeline (svdrr_pipeline=...)")
        cfg = self.model_config
        steps = int(num_inference_steps or cfg["timesteps"])
        if not 1 <= steps <= cfg["timesteps"]:
            raise ValueError(f"num_inference_steps must be 1..{cfg['timesteps']}, not {steps}")
        report = callback or (lambda _f, _m: None)
        prep = self.prepare(xrays, views, center_ras, generator)
        if len(prep.views) not in cfg["input_views"]:
            raise ImageError(f"model {self.model_name} was trained with {' or '.join(map(str, cfg['input_views']))}"
                             f" X-ray(s), got {len(prep.views)}")
        grid, dev = prep.grid, self.device
        report(0.0, "encoding the X-rays")
        bp = xraysyn_back_project(grid, prep.images, prep.views)
        z_in = self.vpge.encode(bp[None, None].float(), quantize=False)
        z_init = self.coarse(z_in.to(self.unet_dtype), torch.zeros(1, device=dev)).float()
        initial = self.ct_vqgan.decode(z_init, quantize=True)[0, 0].clamp(0.0, 1.0)
        report(0.05, "synthesizing the extra view")
        new_geom, new_img, z_new = self._new_view(prep, initial, new_view, svdrr_pipeline)

        self.scheduler.set_timesteps(steps, device=dev)
        z = noise(prep.seed, z_in.shape, dev)
        rng = torch.Generator("cpu").manual_seed(prep.seed + 1)
        cond = torch.cat([z_in, z_new], dim=1)
        for n, t in enumerate(self.scheduler.timesteps):
            x0 = self.denoiser(torch.cat([cond, z], 1).to(self.unet_dtype), t.expand(1).to(dev)).float()
            z = self.scheduler.step(x0, t, z, generator=rng).prev_sample
            report(0.1 + 0.85 * (n + 1) / steps, f"denoising step {n + 1}/{steps}")
        unit = self.ct_vqgan.decode(self.ct_vqgan.denormalize_latent(z), quantize=True)[0, 0].clamp(0.0, 1.0)
        unit = torch.where(unit < cfg["air_threshold"], torch.zeros_like(unit), unit)
        report(1.0, "done")
        ct = self.finish(unit, prep, f"{self.model_name} reconstruction", model=self.model_name, steps=steps,
                         new_view=new_view, new_view_azimuth=new_geom.azimuth)
        inter = {"back_projection": grid.to_ct(_unit_range(bp), "back-projection (normalized)",
                                               quantity="back-projection of the inputs, min-max to [0, 1]"),
                 "initial_ct": prep.grid.to_ct(initial.cpu().numpy(), "initial CT (G_z)"),
                 "new_view": XRayImage(new_img.cpu().numpy(), pixel_spacing=new_geom.pixel[::-1],
                                       ijk_to_ras=new_geom.detector_ijk_to_ras, source="synthesized extra view",
                                       metadata={"geometry": new_geom.to_dict(), "synthetic": True,
                                                 "kind": f"extra view ({new_view})"})}
        return ReconstructionOutput(ct=ct, inputs=prep.inputs, intermediates=inter, metadata=ct.metadata)

    def _new_view(self, prep: PreparedInput, initial: torch.Tensor, mode: str, svdrr_pipeline):
        grid = prep.grid
        geom = grid.geometry(float(self.model_config["new_view_azimuth"][str(len(prep.views))]), 0.0)
        image = xraysyn_project(grid, initial, [geom])
        if mode == "svdrr":
            frontal = prep.inputs[0]
            synth = svdrr_pipeline(frontal, [(geom.azimuth, geom.elevation)],
                                   source_view=(prep.views[0].azimuth, prep.views[0].elevation),
                                   generator=prep.seed).images[0]
            fitted = fit_xray(XRayImage(synth), geom)  # same square field as its input: a plain resize
            image = torch.from_numpy(fitted)[None].to(self.device) * image.amax()
        z_new = self.vpge_new.encode(xraysyn_back_project(grid, image, [geom])[None, None], quantize=False)
        if mode == "none":
            z_new = torch.zeros_like(z_new)
        return geom, image[0], z_new


def _unit_range(volume: torch.Tensor) -> np.ndarray:
    v = volume.float().cpu().numpy()
    return (v - v.min()) / max(float(v.max() - v.min()), 1e-12)
