"""One training step of SV-DRR: conditioning exactly as at inference, the authors' conditioning dropout, the IDDPM
loss (svdrr-method.md sections 1.6, 2).

The conditioning comes from the functions the pipeline itself uses (:func:`SVDRRLogic.pipelines.encode_condition`,
:func:`~SVDRRLogic.pipelines.view_tokens`, :func:`~SVDRRLogic.pipelines.denoise`): CLIP image embedding and
*unscaled* ``latent_dist.mode()`` of the PA source, ``latent_dist.sample() * scaling_factor`` of the target, one
token ``cc_projection([embedding, pose])``, the transformer on ``[z_t, z_source]``.
"""
from __future__ import annotations

import torch
from torch import nn

from SVDRRLogic.pipelines import denoise, encode_condition, view_tokens

from .diffusion import LearnedRangeDiffusion


class SVDRRDenoiser(nn.Module):
    """The trained parts, transformer and ``cc_projection``, as one module: one DDP wrapper (gradients of both
    synchronized in one pass), one optimizer with two learning-rate groups, one EMA."""

    def __init__(self, transformer: nn.Module, cc_projection: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.cc_projection = cc_projection

    def forward(self, noisy: torch.Tensor, source_latent: torch.Tensor, embed: torch.Tensor, pose: torch.Tensor,
                timestep: torch.Tensor) -> torch.Tensor:
        tokens = view_tokens(self.cc_projection, embed, pose)
        return denoise(self.transformer, noisy, source_latent, tokens, timestep)


def dropout_masks(batch: int, p: float, device: torch.device | str,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks (B,) of the authors' InstructPix2Pix-style dropout, u ~ U(0, 1) per sample: u < 2p drops the
    CLIP embedding (zeros *before* the projection; the pose is kept), p <= u < 3p drops the source latent. So
    [0, p) drops the embedding only, [p, 2p) both, [2p, 3p) the latent only."""
    u = torch.rand(batch, device=device, generator=generator)
    keep_embed = (u >= 2 * p).float()
    keep_source = 1.0 - ((u >= p) & (u < 3 * p)).float()
    return keep_embed, keep_source


@torch.no_grad()
def encode_pair(vae, image_encoder, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(CLIP embedding, unscaled source latent, scaled target latent x0) of (B, 3, R, R) images in [-1, 1]."""
    embed, source_latent = encode_condition(image_encoder, vae, source)
    x0 = vae.encode(target.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
    return embed.float(), source_latent.float(), x0.float()


def training_losses(denoiser: nn.Module, diffusion: LearnedRangeDiffusion, vae, image_encoder, batch: dict,
                    dropout_prob: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Per-sample ``loss`` (= ``mse`` + ``vb``) for one batch of pairs; ``denoiser`` may be DDP-wrapped."""
    source, target, pose = batch["source"], batch["target"], batch["pose"]
    embed, source_latent, x0 = encode_pair(vae, image_encoder, source, target)
    n, device = x0.shape[0], x0.device
    keep_embed, keep_source = dropout_masks(n, dropout_prob, device, generator)
    embed = embed * keep_embed[:, None]
    source_latent = source_latent * keep_source[:, None, None, None]
    t = diffusion.sample_timesteps(n, device, generator)
    noise = torch.randn(x0.shape, device=device, generator=generator)
    x_t = diffusion.q_sample(x0, t, noise)
    out = denoiser(x_t, source_latent, embed, pose.to(device), t)
    return diffusion.training_losses(out, x0, x_t, noise, t)
