"""Novel X-ray views from one X-ray with SV-DRR, in our C-arm convention (DESIGN.md sections 3-5).

The denoising loop reproduces the authors' ``SvdrrDiTPipeline`` and ``train_svdrr_DiT.py``
(``../shared/reference/svdrr-method.md`` sections 1.4-1.6, 2):

- the input is min-max normalized to [-1, 1] per image (their PNGs were min-max 8-bit, read back through
  ``Normalize(0.5, 0.5)``) and resized to the model resolution;
- the CLIP image embedding (bicubic resize with ``align_corners=True``, OpenAI mean/std, as their
  ``CLIP_preprocess``) and the relative pose give one cross-attention token through ``cc_projection``;
- the source latent is ``vae.encode(x).latent_dist.mode()`` *unscaled*, concatenated to the noisy latent;
- classifier-free guidance: the unconditional branch has a zero token (after the projection) and a zero source
  latent; ``eps = eps_u + s (eps_c - eps_u)`` on the first ``latent_channels`` outputs (the rest is the IDDPM
  learned variance, unused by the sampler);
- DPM-Solver++ multistep, 20 steps by default; decode with ``z / scaling_factor``, average the RGB channels.

Randomness is per view: the initial noise of a view comes from a CPU generator seeded with a hash of (seed,
azimuth, elevation), so a view starts from the same noise whether it is generated alone, in a batch, or in a
longer orbit, on any device (results then agree to float rounding, about 1e-5, across batch sizes).
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

from ..images import ImageError, XRayImage
from ..models.svdrr import CLIP_MEAN, CLIP_STD, SVDRRComponents, vae_scale_factor

#: The only source view the released models were trained with (SV-DRR samples pairs with view 0000 = PA).
PA_VIEW = (0.0, 0.0)


def svdrr_relative_pose(source_view: Sequence[float], target_view: Sequence[float]) -> tuple[float, float, float,
                                                                                                float]:
    """SV-DRR's conditioning pose ``(d-theta [rad], sin d-phi, cos d-phi, 0)`` for going from ``source_view`` to
    ``target_view``, both ``(azimuth, elevation)`` in degrees in our convention.

    This is the single place where our convention meets the model's. Their LIDC-IDRI-DRR angles map to ours as
    azimuth = phi, elevation = theta (:func:`SVDRRLogic.geometry.from_svdrr_angles`), and their training pairs
    (``dataset.py`` ``get_T``) use *condition minus target*: d-theta = theta_c - theta_t, d-phi = (phi_c - phi_t)
    mod 2 pi; d-radius is always 0. Their ``test_svdrr_DiT.py`` gets the same numbers by negating the target's
    (theta, phi) for a PA source.
    """
    (az_s, el_s), (az_t, el_t) = (tuple(map(float, source_view)), tuple(map(float, target_view)))
    dtheta = math.radians(el_s) - math.radians(el_t)
    dphi = (math.radians(az_s) - math.radians(az_t)) % (2.0 * math.pi)
    return dtheta, math.sin(dphi), math.cos(dphi), 0.0


def view_seed(seed: int, view: Sequence[float]) -> int:
    """Seed of one view's initial noise: a hash of the run's seed and the view (rounded to 1e-6 degree)."""
    text = f"svdrr:{int(seed)}:{float(view[0]):.6f}:{float(view[1]):.6f}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2 ** 63 - 1)


def normalize_source(image: XRayImage | np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """The model input ``(1, 3, R, R)`` float32 in [-1, 1]: per-image min-max (as their 8-bit PNGs), bilinear
    antialiased resize to R x R (their ``transforms.Resize((R, R))``, aspect ratio not kept), gray to RGB.

    ``image`` is bone bright (a line-integral DRR, or a real X-ray as :func:`~SVDRRLogic.io.load_xray` returns it,
    MONOCHROME1 already inverted); a colour array is turned into luminance first, as their ``convert("L")``.
    """
    source = getattr(image, "source", "<input>")
    arr = image.array if isinstance(image, XRayImage) else image
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114])
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise ImageError(f"{source}: SV-DRR needs a 2D X-ray, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ImageError(f"{source}: image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        raise ImageError(f"{source}: image is constant ({lo:g}); nothing to condition on")
    x = torch.from_numpy(((arr - lo) / (hi - lo)).astype(np.float32))[None, None]
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0).expand(1, 3, resolution, resolution).contiguous()


def clip_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """The authors' ``CLIP_preprocess``: [-1, 1] -> bicubic ``size`` x ``size`` (align_corners, no antialias, as
    kornia's resize) -> [0, 1] -> OpenAI mean/std."""
    x = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=True)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x + 1.0) / 2.0 - mean) / std


# -- conditioning, shared by the pipeline and the training loop (training/svdrr) so both build the same inputs ---
def encode_condition(image_encoder, vae, x: torch.Tensor,
                     scale_source_latent: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP image embedding (B, P), source latent (B, C, h, w)) of source images ``x`` (B, 3, R, R) in [-1, 1].

    The latent is ``vae.encode(x).latent_dist.mode()`` *unscaled*, as the authors' training fed it (see
    :attr:`SVDRRPipeline.scale_source_latent` for the one variant that scales it)."""
    embed = image_encoder(pixel_values=clip_input(x, image_encoder.config.image_size).to(image_encoder.dtype))
    latent = vae.encode(x.to(vae.dtype)).latent_dist.mode()
    if scale_source_latent:
        latent = latent * vae.config.scaling_factor
    return embed.image_embeds, latent


def view_tokens(cc_projection, embed: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
    """``cc_projection([CLIP embedding, pose])`` as a one-token sequence (B, 1, D); an embedding of one row is
    shared by all ``poses`` (B, 4)."""
    dtype = cc_projection.dtype
    x = torch.cat([embed.to(dtype).expand(poses.shape[0], -1), poses.to(embed.device, dtype)], dim=-1)
    return cc_projection(x)[:, None, :]


def denoise(transformer, latents: torch.Tensor, source_latent: torch.Tensor, tokens: torch.Tensor,
            timestep: torch.Tensor) -> torch.Tensor:
    """The transformer on ``[noisy latent, source latent]`` (channel concatenation) with the view token as the
    cross-attention sequence; returns all output channels (epsilon, then the learned-variance values)."""
    dtype = transformer.dtype
    model_in = torch.cat([latents, source_latent.to(latents.dtype)], dim=1).to(dtype)
    return transformer(model_in, encoder_hidden_states=tokens.to(dtype), timestep=timestep,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


@dataclass
class SVDRROutput:
    """Synthesized views: ``images`` (views, R, R) in [0, 1] (bone bright, display-normalized like a DRR PNG,
    or latents with ``output_type="latent"``) and one metadata dict per view."""

    images: np.ndarray | torch.Tensor
    metadata: list[dict[str, Any]] = field(default_factory=list)


class SVDRRPipeline(DiffusionPipeline):
    """SV-DRR novel-view synthesis: one X-ray (PA) in, any number of C-arm views out."""

    model_cpu_offload_seq = "image_encoder->cc_projection->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["feature_extractor"]

    #: The authors' training feeds the source latent unscaled; one later version of their pipeline
    #: (commit 713a254a) multiplies it by the VAE scaling factor at inference. Kept switchable for checks
    #: against the released weights; the default follows training.
    scale_source_latent = False

    def __init__(self, vae, image_encoder, feature_extractor, transformer, scheduler, cc_projection):
        super().__init__()
        self.register_modules(vae=vae, image_encoder=image_encoder, feature_extractor=feature_extractor,
                              transformer=transformer, scheduler=scheduler, cc_projection=cc_projection)
        self.model_name = "svdrr"

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_components(cls, parts: SVDRRComponents, name: str = "svdrr") -> "SVDRRPipeline":
        pipe = cls(**parts.as_dict())
        pipe.model_name = name
        return pipe

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device = "auto",
                    dtype: str | torch.dtype = "auto", *, name: str | None = None,
                    attention_slicing: bool = False, vae_tiling: bool | None = None) -> "SVDRRPipeline":
        """Load a model folder (see :func:`~SVDRRLogic.models.load_svdrr`). ``device="auto"``: CUDA when present;
        ``dtype="auto"``: float16 on CUDA (as the authors ran it), float32 on CPU; also "fp16", "bf16", "fp32".
        VAE tiling is on by default from 1024 px; attention slicing is off (PyTorch's fused attention already
        avoids the 4096 x 4096 matrices; slicing helps only where it is unavailable)."""
        from ..models.svdrr_folder import load_svdrr
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        dtype = resolve_dtype(dtype, device)
        parts = load_svdrr(folder, device=device, dtype=dtype)
        pipe = cls.from_components(parts, name or os.path.basename(os.path.normpath(str(folder))))
        if attention_slicing:
            pipe.enable_attention_slicing()
        if vae_tiling if vae_tiling is not None else parts.resolution >= 1024:
            pipe.enable_vae_tiling()
        return pipe

    # -- memory options ----------------------------------------------------------------------------------
    def enable_attention_slicing(self, slice_size: int | str | None = "auto") -> None:
        """Compute attention a few heads at a time (``"auto"``: half the heads) to bound memory."""
        heads = self.transformer.config.num_attention_heads
        size = max(1, heads // 2) if slice_size in ("auto", None) else (1 if slice_size == "max" else int(slice_size))
        self.transformer.set_attn_processor(SlicedAttnProcessor(size))

    def disable_attention_slicing(self) -> None:
        self.transformer.set_attn_processor(AttnProcessor2_0())

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    @property
    def resolution(self) -> int:
        return int(self.transformer.config.sample_size) * vae_scale_factor(self.vae.config)

    # -- conditioning ------------------------------------------------------------------------------------
    def encode_source(self, image, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP image embedding (1, P), source latent (1, C, h, w)) of the input X-ray."""
        x = normalize_source(image, self.resolution).to(device)
        return encode_condition(self.image_encoder, self.vae, x, self.scale_source_latent)

    def view_tokens(self, embed: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
        """``cc_projection([CLIP embedding, pose])`` as a one-token sequence (B, 1, D)."""
        return view_tokens(self.cc_projection, embed, poses)

    # -- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, image: XRayImage | np.ndarray | torch.Tensor, views: Sequence[Sequence[float]],
                 num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 generator: torch.Generator | int | None = None, batch_size: int = 4, output_type: str = "np",
                 callback: Callable[[int, int, int], None] | None = None,
                 source_view: Sequence[float] = PA_VIEW) -> SVDRROutput:
        """Synthesize ``views`` ((azimuth, elevation) in degrees, our convention) of the patient in ``image``.

        ``image`` is the X-ray taken at ``source_view`` (the released models know only PA, (0, 0)); bone bright.
        ``generator``: an int seed or a ``torch.Generator`` (only its initial seed is used, see :func:`view_seed`);
        None draws a seed from torch's global RNG. Views go through the transformer ``batch_size`` at a time
        (x2 with guidance). ``callback(step, total, view_index)`` runs after every denoising step, ``step`` counted
        over the whole call (1..total) and ``view_index`` the first view of the current batch; raise from it to
        stop. ``output_type``: "np" (float32 array), "pt" (CPU tensor) or "latent".
        """
        views = [tuple(float(a) for a in v) for v in views]
        if not views or any(len(v) != 2 or not all(map(math.isfinite, v)) for v in views):
            raise ValueError("views must be a non-empty list of finite (azimuth, elevation) pairs in degrees")
        if num_inference_steps < 1 or batch_size < 1:
            raise ValueError("num_inference_steps and batch_size must be at least 1")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', not {output_type!r}")
        if tuple(map(float, source_view)) != PA_VIEW:
            warnings.warn("SV-DRR was trained only with a PA (0, 0) source view; other sources are extrapolation",
                          stacklevel=2)
        seed = seed_of(generator)
        device = self._execution_device
        guided = guidance_scale > 1.0
        channels = self.vae.config.latent_channels
        embed, source_latent = self.encode_source(image, device)
        pose_list = [svdrr_relative_pose(source_view, v) for v in views]
        poses = torch.tensor(pose_list, dtype=torch.float32)
        batches = [range(i, min(i + batch_size, len(views))) for i in range(0, len(views), batch_size)]
        total, done, results = len(batches) * num_inference_steps, 0, []
        with self.progress_bar(total=total) as bar:
            for idx in batches:
                n = len(idx)
                tokens = self.view_tokens(embed, poses[idx.start:idx.stop])
                src = source_latent.expand(n, -1, -1, -1)
                if guided:
                    tokens = torch.cat([torch.zeros_like(tokens), tokens])
                    src = torch.cat([torch.zeros_like(src), src])
                latents = torch.cat([_noise(view_seed(seed, views[i]), source_latent.shape[1:]) for i in idx])
                latents = latents.to(device) * self.scheduler.init_noise_sigma
                self.scheduler.set_timesteps(num_inference_steps, device=device)
                for t in self.scheduler.timesteps:
                    z = torch.cat([latents, latents]) if guided else latents
                    z = self.scheduler.scale_model_input(z, t)
                    out = denoise(self.transformer, z, src, tokens, t.expand(z.shape[0]))
                    eps = out[:, :channels].float()
                    if guided:
                        eps_u, eps_c = eps.chunk(2)
                        eps = eps_u + guidance_scale * (eps_c - eps_u)
                    latents = self.scheduler.step(eps, t, latents, return_dict=False)[0]
                    done += 1
                    bar.update()
                    if callback is not None:
                        callback(done, total, idx.start)
                results.append(latents if output_type == "latent" else self.decode(latents))
        images = torch.cat(results).cpu()
        meta = [self._metadata(v, p, seed, num_inference_steps, guidance_scale, source_view)
                for v, p in zip(views, pose_list)]
        return SVDRROutput(images.numpy() if output_type == "np" else images, meta)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, R, R) float32 in [0, 1]: ``vae.decode(z / scaling_factor)``, mean of RGB."""
        z = latents / self.vae.config.scaling_factor
        rgb = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return ((rgb.mean(dim=1) + 1.0) / 2.0).clamp(0.0, 1.0)

    def _metadata(self, view, pose, seed, steps, guidance, source_view) -> dict[str, Any]:
        return {"azimuth": view[0], "elevation": view[1], "source_view": [float(a) for a in source_view],
                "relative_pose": [float(p) for p in pose], "steps": int(steps), "guidance_scale": float(guidance),
                "seed": int(seed), "noise_seed": view_seed(seed, view), "model": self.model_name,
                "resolution": self.resolution, "scheduler": "DPMSolverMultistepScheduler (dpmsolver++)",
                "kind": "SV-DRR", "synthetic": True}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" -> float16 on CUDA, float32 elsewhere; "fp16"/"bf16"/"fp32" or a torch dtype. Half precision on
    the CPU is refused for fp16 (slow and partly unsupported), bf16 is allowed."""
    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    resolved = names.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be auto, fp16, bf16 or fp32, not {dtype!r}")
    if resolved == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU; use fp32 or bf16")
    return resolved


def seed_of(generator: torch.Generator | int | None) -> int:
    """The int seed of ``generator`` (its initial seed for a ``torch.Generator``; a fresh one for None)."""
    if generator is None:
        return int(torch.randint(0, 2 ** 62, (1,)).item())
    if isinstance(generator, torch.Generator):
        return int(generator.initial_seed())
    return int(generator)


def _noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    return torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
