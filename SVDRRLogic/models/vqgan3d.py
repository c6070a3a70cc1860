"""The 3-D VQ-GAN autoencoder of DVG-Diffusion (the Medical-Diffusion / TATS design), without its GAN losses.

DVG-Diffusion runs its diffusion in the latent space of this autoencoder (``../shared/reference/
dvg-and-patch-diffusion.md`` section C.3): a 128^3 CT becomes an 8 x 32^3 latent (f = 4) with the paper
configuration (``n_hiddens`` 16, ``downsample`` (4, 4, 4), ``embedding_dim`` 8, ``n_codes`` 16384).

Every parameter and buffer has the name and shape it has in the authors' ``vq_gan_3d/model/vqgan.py`` and
``codebook.py`` (xiexing0916/DVG-Diffusion), so a state dict taken from their checkpoints loads by name once the
training-only parts (``image_discriminator``, ``video_discriminator``, ``perceptual_model``) are left out; see
:mod:`.dvg_convert`. That is why the small wrapper modules exist: their convolutions live one level down
(``....conv.weight``, ``....convt.weight``) and the normalisations sit at index 0 of ``final_block``.

Behaviour that differs from the authors' class, on purpose:

- whether the codebook still needs its first-batch initialisation is read from the ``N`` buffer (all zero until
  then) instead of a Python attribute, so weights loaded from a file are never re-initialised by the first
  training batch, and the state dict keeps exactly the authors' keys;
- :meth:`VQGAN3D.encode` with ``quantize=True`` and :meth:`VQGAN3D.decode` look codes up without touching the
  codebook: only :meth:`VQGAN3D.quantize` (and :meth:`VQGAN3D.forward`) train it;
- ``decode(z, quantize=False)`` decodes a continuous latent; the authors' version read it as code indices;
- the decoder is trainable (the authors' ``Decoder`` freezes itself in ``__init__``; freezing is left to the
  training code).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

#: Laplace smoothing of the EMA cluster sizes (the authors' constant).
EMA_EPS = 1e-7
#: Weight of the commitment term ``MSE(z, sg(e))`` in the authors' codebook.
COMMITMENT_WEIGHT = 0.25
#: Latent vectors per block of the nearest-code search: bounds the distance matrix to 4096 x n_codes floats
#: (256 MiB for 16384 codes) where one block for a whole 32^3 latent would need 2 GiB.
SEARCH_CHUNK = 4096


class VQOutput(NamedTuple):
    """What :meth:`VQGAN3D.quantize` returns (the keys of the authors' codebook output)."""

    embeddings: torch.Tensor
    """Quantised latent (B, C, D, H, W) with the straight-through gradient to the encoder."""
    encodings: torch.Tensor
    """Code index per latent voxel (B, D, H, W), int64."""
    commitment_loss: torch.Tensor
    """``0.25 * MSE(z, sg(codes))``, a scalar."""
    perplexity: torch.Tensor
    """``exp(entropy)`` of the code usage in this batch, a scalar: how many codes are effectively used."""


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm as the authors configure it (eps 1e-6, affine). The group count is ``gcd(groups, channels)`` so
    that reduced test configurations whose channel counts are not multiples of 32 still build; with the paper
    configuration (32, 64 channels) this is exactly 32 groups."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6, affine=True)


def _same_pad(kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> tuple[int, ...]:
    """``F.pad`` widths (last dimension first) that make a stride-s convolution map n to n / s: ``k - s`` voxels
    in all, the odd one at the front, as in the authors' ``SamePadConv3d``."""
    widths: list[int] = []
    for k, s in zip(reversed(kernel), reversed(stride)):
        total = k - s
        widths += [total - total // 2, total // 2]
    return tuple(widths)


class SamePadConv3d(nn.Module):
    """Replicate-padded 3-D convolution whose output size is input size / stride.

    Kept as a wrapper (``self.conv``) only so the weight is named ``<name>.conv.weight`` like the authors'."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        kernel = (kernel_size,) * 3
        self.pad = _same_pad(kernel, stride)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class SamePadConvTranspose3d(nn.Module):
    """Replicate-padded transposed convolution whose output size is input size x stride.

    The input gets the same padding as :class:`SamePadConv3d`, then the transposed convolution crops ``k - 1``
    on each side (its ``padding``), the authors' arrangement: for k 4, s 2 that is (n + 2 - 1) * 2 - 6 + 4 = 2n.
    Named ``<name>.convt.weight`` like theirs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: tuple[int, int, int]):
        super().__init__()
        kernel = (kernel_size,) * 3
        self.pad = _same_pad(kernel, stride)
        self.convt = nn.ConvTranspose3d(in_channels, out_channels, kernel, stride=stride,
                                        padding=tuple(k - 1 for k in kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convt(F.pad(x, self.pad, mode="replicate"))


class ResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` with 3^3 convolutions. The channel count never changes inside
    this network, so the authors' optional shortcut convolution (never built here) and their unused dropout
    (p = 0, no parameters) are left out; the state dict is unaffected."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm1 = _group_norm(channels, norm_groups)
        self.conv1 = SamePadConv3d(channels, channels, 3)
        self.norm2 = _group_norm(channels, norm_groups)
        self.conv2 = SamePadConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _strides(downsample: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """One stride triple per resolution level: a dimension halves while its factor is not yet reached, so
    anisotropic factors such as (4, 4, 2) work like the authors' ``n_times_downsample`` bookkeeping."""
    steps = [int(math.log2(d)) for d in downsample]
    return [tuple(2 if s > level else 1 for s in steps) for level in range(max(steps))]


class Encoder(nn.Module):
    """conv 3^3 (image -> n_hiddens), then per level a stride-2 conv 4^3 doubling the channels and a ResBlock,
    then GroupNorm + SiLU (``final_block``)."""

    def __init__(self, n_hiddens: int, downsample: tuple[int, int, int], image_channels: int, norm_groups: int):
        super().__init__()
        self.conv_first = SamePadConv3d(image_channels, n_hiddens, 3)
        self.conv_blocks = nn.ModuleList()
        channels = n_hiddens
        for stride in _strides(downsample):
            block = nn.Module()
            block.down = SamePadConv3d(channels, 2 * channels, 4, stride)
            block.res = ResBlock(2 * channels, norm_groups)
            self.conv_blocks.append(block)
            channels *= 2
        self.final_block = nn.Sequential(_group_norm(channels, norm_groups), nn.SiLU())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_first(x)
        for block in self.conv_blocks:
            h = block.res(block.down(h))
        return self.final_block(h)


class Decoder(nn.Module):
    """GroupNorm + SiLU (named ``final_block`` by the authors although it comes first), then per level a stride-2
    transposed conv 4^3 and two ResBlocks, then conv 3^3 to the image channels (linear output).

    Channels: the first level keeps the encoder's width, each later one halves it (64 -> 64 -> 32 for the paper
    configuration), mirroring the authors' channel arithmetic."""

    def __init__(self, n_hiddens: int, downsample: tuple[int, int, int], image_channels: int, norm_groups: int):
        super().__init__()
        strides = _strides(downsample)
        channels = n_hiddens * 2 ** len(strides)
        self.final_block = nn.Sequential(_group_norm(channels, norm_groups), nn.SiLU())
        self.conv_blocks = nn.ModuleList()
        for level, stride in enumerate(strides):
            out = n_hiddens * 2 ** (len(strides) - level)
            block = nn.Module()
            block.up = SamePadConvTranspose3d(channels, out, 4, stride)
            block.res1 = ResBlock(out, norm_groups)
            block.res2 = ResBlock(out, norm_groups)
            self.conv_blocks.append(block)
            channels = out
        self.conv_last = SamePadConv3d(channels, image_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.final_block(z)
        for block in self.conv_blocks:
            h = block.res2(block.res1(block.up(h)))
        return self.conv_last(h)


class Codebook(nn.Module):
    """EMA k-means codebook with dead-code restarts (TATS). All state is in buffers (no parameters):
    ``embeddings`` (K, C) the codes, ``N`` (K,) the EMA cluster sizes, ``z_avg`` (K, C) the EMA cluster sums."""

    def __init__(self, n_codes: int, embedding_dim: int, restart_thres: float, ema_decay: float):
        super().__init__()
        self.register_buffer("embeddings", torch.randn(n_codes, embedding_dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())
        self.n_codes = n_codes
        self.restart_thres = restart_thres
        self.ema_decay = ema_decay

    @property
    def initialized(self) -> bool:
        """Whether the codes were set from data. Initialisation sets every ``N`` to 1 and the EMA never brings the
        sum back to 0, so an all-zero ``N`` marks a codebook no batch has seen, in our files and the authors'."""
        return bool(self.N.any())

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the closest code (squared Euclidean distance) for each row of ``flat`` (M, C)."""
        with torch.no_grad():
            codes = self.embeddings
            code_sq = (codes ** 2).sum(dim=1)
            return torch.cat([((rows ** 2).sum(dim=1, keepdim=True) - 2 * rows @ codes.t() + code_sq).argmin(dim=1)
                              for rows in flat.detach().split(SEARCH_CHUNK)])

    def snap(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-code indices (B, D, H, W) and the codes themselves (B, C, D, H, W, exact codebook rows) for a
        latent (B, C, D, H, W)."""
        indices = self.nearest(z.movedim(1, -1).reshape(-1, z.shape[1]))
        codes = self.embeddings[indices].view(*z.shape[:1], *z.shape[2:], z.shape[1]).movedim(-1, 1)
        return indices.view(z.shape[0], *z.shape[2:]), codes

    def _random_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """``n_codes`` rows drawn from the batch's latent vectors, repeated with 0.01 / sqrt(C) noise when the
        batch has fewer vectors than codes: the source of initial and restarted codes."""
        count, dim = flat.shape
        if count < self.n_codes:
            flat = flat.repeat(-(-self.n_codes // count), 1)
            flat = flat + torch.randn_like(flat) * (0.01 / math.sqrt(dim))
        return flat[torch.randperm(flat.shape[0], device=flat.device)[:self.n_codes]]

    @torch.no_grad()
    def initialize(self, flat: torch.Tensor) -> None:
        """Set every code (and its EMA sum) to a random latent vector of this batch, with usage 1."""
        rows = self._random_rows(flat.detach().to(self.embeddings.dtype))
        self.embeddings.copy_(rows)
        self.z_avg.copy_(rows)
        self.N.fill_(1.0)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA k-means step towards the mean of the vectors assigned to each code, then every code whose EMA
        usage ``N`` is below ``restart_thres`` is replaced by a random vector of the batch."""
        flat = flat.detach().to(self.embeddings.dtype)
        counts = torch.bincount(indices, minlength=self.n_codes).to(flat.dtype)
        sums = torch.zeros_like(self.z_avg).index_add_(0, indices, flat)
        decay = self.ema_decay
        self.N.mul_(decay).add_(counts, alpha=1 - decay)
        self.z_avg.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.N.sum()
        smoothed = (self.N + EMA_EPS) / (total + self.n_codes * EMA_EPS) * total
        self.embeddings.copy_(self.z_avg / smoothed.unsqueeze(1))
        dead = self.N < self.restart_thres
        self.embeddings[dead] = self._random_rows(flat)[dead]

    def forward(self, z: torch.Tensor) -> VQOutput:
        flat = z.movedim(1, -1).reshape(-1, z.shape[1])
        if self.training and not self.initialized:
            self.initialize(flat)
        indices, codes = self.snap(z)
        commitment = COMMITMENT_WEIGHT * F.mse_loss(z, codes.detach())
        usage = torch.bincount(indices.flatten(), minlength=self.n_codes).to(z.dtype) / indices.numel()
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        if self.training:
            self.update(flat, indices.flatten())
        return VQOutput(embeddings=(codes - z).detach() + z, encodings=indices, commitment_loss=commitment,
                        perplexity=perplexity)


class VQGAN3D(nn.Module):
    """DVG-Diffusion's CT (and VPGE) autoencoder: encoder, ``pre_vq_conv`` (1^3, to ``embedding_dim``),
    codebook, ``post_vq_conv`` (1^3, back to the encoder width), decoder.

    The diffusion works on the pre-quantisation latent ``encode(x)`` mapped to [-1, 1] by
    :meth:`normalize_latent`; its samples go back through :meth:`denormalize_latent` and ``decode(z)``."""

    def __init__(self, n_hiddens: int = 16, downsample: tuple[int, int, int] = (4, 4, 4), embedding_dim: int = 8,
                 n_codes: int = 16384, image_channels: int = 1, norm_groups: int = 32, restart_thres: float = 1.0,
                 ema_decay: float = 0.99):
        super().__init__()
        downsample = tuple(int(d) for d in downsample)
        if len(downsample) != 3 or any(d < 1 or d & (d - 1) for d in downsample) or max(downsample) < 2:
            raise ValueError(f"downsample {downsample} must be three powers of two, at least one of them > 1")
        self.config = {"n_hiddens": n_hiddens, "downsample": list(downsample), "embedding_dim": embedding_dim,
                       "n_codes": n_codes, "image_channels": image_channels, "norm_groups": norm_groups,
                       "restart_thres": restart_thres, "ema_decay": ema_decay}
        self.downsample = downsample
        self.encoder = Encoder(n_hiddens, downsample, image_channels, norm_groups)
        self.decoder = Decoder(n_hiddens, downsample, image_channels, norm_groups)
        self.pre_vq_conv = SamePadConv3d(self.encoder.out_channels, embedding_dim, 1)
        self.post_vq_conv = SamePadConv3d(embedding_dim, self.encoder.out_channels, 1)
        self.codebook = Codebook(n_codes, embedding_dim, restart_thres, ema_decay)

    def encode(self, x: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Latent (B, embedding_dim, D/f, H/f, W/f) of a volume (B, image_channels, D, H, W) whose sizes are
        multiples of ``downsample``. With ``quantize`` the nearest codes are returned instead (a lookup: no
        codebook update, no gradient; train through :meth:`forward`)."""
        if any(n % f for n, f in zip(x.shape[2:], self.downsample)):
            raise ValueError(f"volume size {tuple(x.shape[2:])} is not a multiple of {self.downsample}")
        z = self.pre_vq_conv(self.encoder(x))
        return self.codebook.snap(z)[1] if quantize else z

    def quantize(self, z: torch.Tensor) -> VQOutput:
        """Vector-quantise a latent; in training mode this also initialises (first batch) and updates the
        codebook."""
        return self.codebook(z)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Volume from a latent. ``quantize`` snaps it to the nearest codes first, as DVG does with diffusion
        samples; without it the continuous latent goes straight to the decoder."""
        if quantize:
            z = self.codebook.snap(z)[1]
        return self.decoder(self.post_vq_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, VQOutput]:
        """Training pass: reconstruction and the quantiser's output (for the commitment loss and perplexity)."""
        vq = self.quantize(self.encode(x))
        return self.decoder(self.post_vq_conv(vq.embeddings)), vq

    def latent_bounds(self) -> tuple[float, float]:
        """Smallest and largest entry of the whole codebook: the scalars DVG uses to scale latents to [-1, 1]."""
        low, high = self.codebook.embeddings.aminmax()
        return float(low), float(high)

    def normalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Map the codebook range to [-1, 1]: ``2 (z - min) / (max - min) - 1``."""
        low, high = self.latent_bounds()
        return (z - low) / (high - low) * 2.0 - 1.0

    def denormalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_latent`."""
        low, high = self.latent_bounds()
        return (z + 1.0) / 2.0 * (high - low) + low
