"""DVG-Diffusion's factorised 3-D U-Net, written so that the authors' checkpoints load by parameter name.

DVG-Diffusion (Xie et al.; github.com/xiexing0916/DVG-Diffusion, ``ddpm/new_unet3d.py``) reuses the video-diffusion
U-Net of Medical Diffusion with the depth axis (dim 2 of ``(B, C, D, H, W)``) in the role of video time
(``../shared/reference/dvg-and-patch-diffusion.md`` sections C.4 and C.5). It is used twice:

- G_z, the new-view network (``fit_model``): ``Unet3D(**PAPER_CONFIGS["g_z"])``, 35.7 M parameters;
- g_theta, the dual-view conditioned x0-denoiser (``fine_model``): ``Unet3D(**PAPER_CONFIGS["denoiser"])``,
  134.5 M parameters, input = channel concat [z_in | z_new | z_t] of 8 channels each.

Everything spatial is 2-D per depth slice (kernels ``(1, k, k)``, down/up-sampling stride ``(1, 2, 2)``), and
depth is mixed only by attention along depth, so depth is never down-sampled and any depth works.

The module tree deliberately mirrors the authors' one (``Residual -> PreNorm -> reshaping wrapper -> Attention``,
``nn.Sequential`` indices in ``time_mlp`` and ``final_conv``, five-slot ``ModuleList`` per level), because that
tree *is* the state-dict key layout of their released ``DVG_Diffusion.pt`` / ``NewView_Coarse_Model.pt``. The
rotary frequencies are a persistent buffer ``...rotary_emb.freqs`` in every temporal attention, as the
``rotary-embedding-torch==0.1.5`` they pinned registered them, so strict loading finds those keys too. The
conditioning and classifier-free-guidance options of the original are absent: DVG builds both networks without
them, and then the original registers no extra tensors (no ``null_cond_emb``).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

#: The two DVG-Diffusion networks (``train/train_ddpm.py`` with ``config/model/ddpm.yaml``).
PAPER_CONFIGS = {
    "g_z": {"dim": 64, "dim_mults": (1, 2, 4, 8), "channels": 8, "out_dim": 8},
    "denoiser": {"dim": 128, "dim_mults": (1, 2, 4, 8), "channels": 24, "out_dim": 8},
}

#: Head width of the per-slice spatial attentions. The original passes only ``heads`` to them, so they keep
#: their own default of 32 whatever ``attn_dim_head`` says; reproducing that keeps the weight shapes right.
SPATIAL_DIM_HEAD = 32

#: The rotary embedding rotates at most this many features of each head (``RotaryEmbedding(min(32, dim_head))``).
ROTARY_MAX_DIM = 32

#: T5 relative-position buckets along depth; the original sets ``max_distance=32`` for the depth bias.
REL_POS_BUCKETS = 32
REL_POS_MAX_DISTANCE = 32


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal embedding of the diffusion step, [sin | cos] with periods up to 10000."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        steps = torch.arange(half, device=time.device, dtype=time.dtype)
        rates = torch.exp(steps * (-math.log(10000.0) / (half - 1)))
        angles = time[:, None] * rates[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding along a sequence, rotating interleaved feature pairs (x0, x1), (x2, x3), ...

    ``freqs`` is a persistent buffer because the authors' library version stored it in the state dict; one
    instance is shared by all temporal attentions, so its key appears once per attention, as in theirs.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", 1.0 / 10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        """Rotate ``t`` (..., n, d) by position along n; features past the rotary width pass through."""
        positions = torch.arange(t.shape[-2], device=t.device, dtype=self.freqs.dtype)
        angles = (positions[:, None] * self.freqs[None, :]).repeat_interleave(2, dim=-1).to(t.dtype)
        width = angles.shape[-1]
        head, tail = t[..., :width], t[..., width:]
        pairs = head.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return torch.cat((head * angles.cos() + turned * angles.sin(), tail), dim=-1)


class RelativePositionBias(nn.Module):
    """T5 bucketed relative-position bias, one learned scalar per (bucket, head), added to attention logits.

    Half of the buckets are for keys after the query; within each half, offsets below a quarter of the buckets
    get exact buckets and larger ones share logarithmically spaced buckets up to ``max_distance``.
    """

    def __init__(self, heads: int, num_buckets: int = REL_POS_BUCKETS, max_distance: int = REL_POS_MAX_DISTANCE):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def bucket(self, offset: torch.Tensor) -> torch.Tensor:
        """Bucket index of ``offset`` = query position - key position (integer tensor)."""
        half = self.num_buckets // 2
        exact = half // 2
        distance = offset.abs()
        # Clamping keeps log() finite for the small offsets, which the where() below discards anyway.
        far = exact + (torch.log(distance.clamp(min=exact).float() / exact)
                       / math.log(self.max_distance / exact) * (half - exact)).long()
        far = far.clamp(max=half - 1)
        return (offset < 0).long() * half + torch.where(distance < exact, distance, far)

    def forward(self, n: int, device: torch.device) -> torch.Tensor:
        """Bias of shape (heads, n, n) for a sequence of length n."""
        positions = torch.arange(n, device=device)
        buckets = self.bucket(positions[:, None] - positions[None, :])
        return self.relative_attention_bias(buckets).permute(2, 0, 1)


class Attention(nn.Module):
    """Multi-head softmax attention over the token axis of (batch, tokens, dim), optionally with rotary
    positions on queries and keys and an additive (heads, n, n) logit bias."""

    def __init__(self, dim: int, heads: int, dim_head: int, rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        self.heads = heads
        self.rotary_emb = rotary_emb
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        # The projection's output is laid out [q | k | v], each as (head, feature).
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb.rotate(q), self.rotary_emb.rotate(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=pos_bias)
        return self.to_out(out.transpose(1, 2).flatten(2))


class DepthAttention(nn.Module):
    """Applies ``fn`` along depth independently at every (h, w) position: the "temporal" attention."""

    def __init__(self, fn: Attention):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        out = self.fn(x.permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c), pos_bias=pos_bias)
        return out.reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)


class SliceAttention(nn.Module):
    """Applies ``fn`` among all pixels of each depth slice: the full spatial attention of the middle block."""

    def __init__(self, fn: Attention):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        out = self.fn(x.permute(0, 2, 3, 4, 1).reshape(b * d, h * w, c))
        return out.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)


class SpatialLinearAttention(nn.Module):
    """Linear (softmax-kernel) attention among the pixels of each depth slice; cost linear in H*W, which is why
    it can run at every level including the full-resolution one."""

    def __init__(self, dim: int, heads: int, dim_head: int = SPATIAL_DIM_HEAD):
        super().__init__()
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Conv2d(dim, 3 * heads * dim_head, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * d, c, h, w)
        q, k, v = self.to_qkv(slices).reshape(b * d, 3, self.heads, -1, h * w).unbind(1)
        q = q.softmax(dim=-2) * self.scale          # over features
        k = k.softmax(dim=-1)                       # over pixels
        context = k @ v.transpose(-1, -2)           # (slices, heads, key feature, value feature)
        out = (context.transpose(-1, -2) @ q).reshape(b * d, -1, h, w)
        return self.to_out(out).reshape(b, d, c, h, w).transpose(1, 2)


class ChannelLayerNorm(nn.Module):
    """Layer norm over channels at every voxel with a learned gain only (no bias), as in the original."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.gamma


class PreNorm(nn.Module):
    """Channel layer norm before ``fn``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class Residual(nn.Module):
    """``x + fn(x)``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(x, **kwargs) + x


class Block(nn.Module):
    """(1, 3, 3) convolution, GroupNorm, optional FiLM ``x * (scale + 1) + shift``, SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = nn.Conv3d(dim, dim_out, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks plus a (1x1x1-projected when the width changes) skip; the time embedding, when given a width,
    sets the FiLM scale and shift of the first Block."""

    def __init__(self, dim: int, dim_out: int, groups: int, time_emb_dim: int | None = None):
        super().__init__()
        self.mlp = (nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, 2 * dim_out))
                    if time_emb_dim is not None else None)
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        scale_shift = None
        if self.mlp is not None:
            scale_shift = self.mlp(time_emb)[:, :, None, None, None].chunk(2, dim=1)
        return self.block2(self.block1(x, scale_shift)) + self.res_conv(x)


def _downsample(dim: int) -> nn.Conv3d:
    """Halve H and W, keep depth."""
    return nn.Conv3d(dim, dim, (1, 4, 4), (1, 2, 2), (0, 1, 1))


def _upsample(dim: int) -> nn.ConvTranspose3d:
    """Double H and W, keep depth."""
    return nn.ConvTranspose3d(dim, dim, (1, 4, 4), (1, 2, 2), (0, 1, 1))


class Unet3D(nn.Module):
    """The DVG-Diffusion / video-diffusion U-Net: ``forward(x (B, channels, D, H, W), time (B,))`` ->
    ``(B, out_dim, D, H, W)``.

    Levels have widths ``dim * dim_mults``; each level is two time-conditioned ResnetBlocks, residual linear
    attention per slice and residual attention along depth, then an H/W down-sampling (not after the last
    level). H and W must be divisible by ``2 ** (len(dim_mults) - 1)``; depth is free.

    ``attn_dim_head`` sets the head width of the depth attentions only; the spatial ones use
    :data:`SPATIAL_DIM_HEAD` as in the original. ``self.config`` holds the constructor arguments (JSON types)
    so that ``Unet3D(**model.config)`` rebuilds the same network.
    """

    def __init__(self, dim: int, dim_mults=(1, 2, 4, 8), channels: int = 8, out_dim: int | None = None,
                 init_kernel_size: int = 3, attn_heads: int = 8, attn_dim_head: int = 32, resnet_groups: int = 8):
        super().__init__()
        if init_kernel_size % 2 != 1:
            raise ValueError(f"init_kernel_size must be odd, got {init_kernel_size}")
        out_dim = channels if out_dim is None else out_dim
        self.config = {"dim": dim, "dim_mults": list(dim_mults), "channels": channels, "out_dim": out_dim,
                       "init_kernel_size": init_kernel_size, "attn_heads": attn_heads,
                       "attn_dim_head": attn_dim_head, "resnet_groups": resnet_groups}
        self.channels = channels
        self.num_levels = len(dim_mults)

        rotary_emb = RotaryEmbedding(min(ROTARY_MAX_DIM, attn_dim_head))

        def depth_attn(width):
            return Residual(PreNorm(width, DepthAttention(Attention(width, attn_heads, attn_dim_head, rotary_emb))))

        def slice_linear_attn(width):
            return Residual(PreNorm(width, SpatialLinearAttention(width, attn_heads)))

        time_dim = 4 * dim

        def block(width_in, width_out):
            return ResnetBlock(width_in, width_out, resnet_groups, time_emb_dim=time_dim)

        self.time_rel_pos_bias = RelativePositionBias(attn_heads)
        pad = init_kernel_size // 2
        self.init_conv = nn.Conv3d(channels, dim, (1, init_kernel_size, init_kernel_size), padding=(0, pad, pad))
        self.init_temporal_attn = depth_attn(dim)
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))

        widths = [dim, *(dim * m for m in dim_mults)]
        pairs = list(itertools.pairwise(widths))
        self.downs = nn.ModuleList(
            nn.ModuleList([block(w_in, w_out), block(w_out, w_out), slice_linear_attn(w_out), depth_attn(w_out),
                           _downsample(w_out) if level < self.num_levels - 1 else nn.Identity()])
            for level, (w_in, w_out) in enumerate(pairs))
        # Registered before the middle, as in the original, so that state-dict keys come in the same order.
        self.ups = nn.ModuleList(
            nn.ModuleList([block(2 * w_out, w_in), block(w_in, w_in), slice_linear_attn(w_in), depth_attn(w_in),
                           _upsample(w_in) if level < self.num_levels - 1 else nn.Identity()])
            for level, (w_in, w_out) in enumerate(reversed(pairs)))

        mid = widths[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_spatial_attn = Residual(PreNorm(mid, SliceAttention(Attention(mid, attn_heads, SPATIAL_DIM_HEAD))))
        self.mid_temporal_attn = depth_attn(mid)
        self.mid_block2 = block(mid, mid)

        self.final_conv = nn.Sequential(ResnetBlock(2 * dim, dim, resnet_groups), nn.Conv3d(dim, out_dim, 1))

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.num_levels - 1)
        if x.ndim != 5 or x.shape[1] != self.channels or x.shape[3] % factor or x.shape[4] % factor:
            raise ValueError(f"expected x of shape (B, {self.channels}, D, H, W) with H and W divisible by "
                             f"{factor}, got {tuple(x.shape)}")
        if time.shape != (x.shape[0],):
            raise ValueError(f"expected time of shape ({x.shape[0]},), got {tuple(time.shape)}")

        pos_bias = self.time_rel_pos_bias(x.shape[2], device=x.device).to(x.dtype)
        x = self.init_conv(x)
        init_skip = x
        x = self.init_temporal_attn(x, pos_bias=pos_bias)
        t = self.time_mlp(time.to(x.dtype))  # integer steps become the network's float type

        skips = []
        for block1, block2, slice_attn, depth_attn, downsample in self.downs:
            x = depth_attn(slice_attn(block2(block1(x, t), t)), pos_bias=pos_bias)
            skips.append(x)
            x = downsample(x)

        x = self.mid_block1(x, t)
        x = self.mid_temporal_attn(self.mid_spatial_attn(x), pos_bias=pos_bias)
        x = self.mid_block2(x, t)

        for block1, block2, slice_attn, depth_attn, upsample in self.ups:
            x = block2(block1(torch.cat((x, skips.pop()), dim=1), t), t)
            x = upsample(depth_attn(slice_attn(x), pos_bias=pos_bias))

        return self.final_conv(torch.cat((x, init_skip), dim=1))
