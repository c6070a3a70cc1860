"""The five training stages of DVG-Diffusion, each training one network with the earlier ones frozen.

``ct_vqgan`` and ``diffusion`` are the authors' recipes (``../shared/reference/dvg-and-patch-diffusion.md`` C.3 and
C.5-C.7). How the two view-parameter-guided encoders (VPGE) and the new-view network G_z were trained was never
released (C.3, C.4); ``vpge``, ``coarse`` and ``vpge_new`` are our recipe, chosen so that every network is trained
on exactly what it receives at inference (:mod:`.data`):

``ct_vqgan``
    The CT autoencoder on unit volumes: 4 L1 + commitment (0.25 MSE to the codes, inside the codebook, with its
    EMA k-means update and dead-code restarts) + 4 LPIPS-VGG on one random axial slice per volume (the slices go
    in as [0, 1], unscaled, as the authors feed them) and, from step 10000, hinge GAN losses of a 2-D (slice) and
    a 3-D (volume) PatchGAN discriminator, weight 1 each, plus 4 x feature matching (L1 between the
    discriminators' intermediate features of the reconstruction and of the CT, each layer weighted
    4 / (layers + 1)). Adam (0.5, 0.9) for both the autoencoder and the discriminators, gradients clipped at 1.
    ``crop`` trains on random cubes instead of whole volumes (a CPU budget; GroupNorm then sees crop statistics).
``vpge`` (ours)
    Reading H2 of the reference: E_bp is trained into the frozen CT VQ-GAN's latent space, so z_in is already an
    estimate of the CT latent and ``D_ct(E_bp(V_bp))`` approximates the CT. The VPGE starts as a copy of the
    trained CT VQ-GAN (its decoder and codebook stay D_ct's, so the saved VPGE is an autoencoder from V_bp to
    the CT); only its encoding path (encoder + pre_vq_conv, all the pipeline uses) is trained on
    ``latent_weight x MSE(E_bp(V_bp), E_ct(CT)) + l1_weight x L1(D_ct(E_bp(V_bp)), CT)``, the decoder reading
    the straight-through quantized latent (the forward value of ``decode(quantize=True)``). The latent term gives
    z_in a definite target; the L1 term weighs latent errors by what they change in the decoded CT. V_bp is the
    pipeline's: per-view min-max normalized DRRs of the unit CT, back-projected and summed. With input_views
    [1, 2] each sample draws its X-ray count at random, so one encoder serves both.
``coarse`` (G_z, ours)
    The factorized U-Net called with t = 0 (as the pipeline calls it), from z_in to the raw CT latent (the
    pipeline decodes its output directly): latent MSE.
``vpge_new`` (ours)
    As ``vpge``, on the back-projection of the frozen coarse CT's projection at the extra view (not
    re-normalized: the pipeline's ``_new_view``), starting from the trained input VPGE.
``diffusion``
    g_theta on ``[z_in, z_new, z_t]``: x0 prediction with MSE to the CT latent normalized by the codebook's range,
    ``z_t = scheduler.add_noise(z_0, noise, t)`` with the model's cosine schedule, t uniform over all steps.
    Adam 2e-4, ``CosineAnnealingLR(T_max 40000, eta_min 1e-10)`` stepped every iteration, no clipping, EMA 0.995
    every 10 steps from step 2000 (a plain copy before).

Every stage's trainable part is one module whose ``forward`` computes what it is trained on, so DDP (accelerate,
several processes) sees one forward per backward; frozen networks are not wrapped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from SVDRRLogic.models.dvg import DVGComponents
from SVDRRLogic.models.vqgan3d import VQGAN3D

from .data import Conditioner


class StageError(RuntimeError):
    """A stage that cannot run as configured (one line)."""


def freeze(module: nn.Module, device: torch.device) -> nn.Module:
    return module.to(device).eval().requires_grad_(False)


class LatentEncoder(nn.Module):
    """A VQ-GAN's encoding path (encoder, then pre_vq_conv): ``encode(x, quantize=False)``, as one module."""

    def __init__(self, vq: VQGAN3D):
        super().__init__()
        self.encoder, self.pre_vq_conv = vq.encoder, vq.pre_vq_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_vq_conv(self.encoder(x))


class Discriminators(nn.Module):
    """The 2-D (slice) and 3-D (volume) PatchGAN discriminators (MONAI's ``PatchDiscriminator``: a stride-2
    convolution, ``layers - 1`` more stride-2 and one stride-1 convolution with BatchNorm and LeakyReLU 0.2, a
    final one-channel convolution; kernel 4 and padding 2 as the authors' ``NLayerDiscriminator``).

    ``forward`` is their weighted hinge loss on (real, fake) pairs: the discriminator step's one forward."""

    def __init__(self, channels: int, layers: int, image_weight: float, video_weight: float):
        super().__init__()
        from monai.networks.nets import PatchDiscriminator
        self.image = PatchDiscriminator(spatial_dims=2, channels=channels, in_channels=1, num_layers_d=layers,
                                        padding=2)
        self.volume = PatchDiscriminator(spatial_dims=3, channels=channels, in_channels=1, num_layers_d=layers,
                                         padding=2)
        self.image_weight, self.video_weight = image_weight, video_weight

    @staticmethod
    def hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())

    def forward(self, real_frames: torch.Tensor, fake_frames: torch.Tensor, real_volume: torch.Tensor,
                fake_volume: torch.Tensor) -> torch.Tensor:
        image = self.hinge(self.image(real_frames)[-1], self.image(fake_frames)[-1])
        volume = self.hinge(self.volume(real_volume)[-1], self.volume(fake_volume)[-1])
        return self.image_weight * image + self.video_weight * volume


def load_lpips(device: torch.device) -> nn.Module:
    """LPIPS-VGG (v0.1 weights, the authors' perceptual model), imported only when a run asks for it: the
    ``lpips`` package needs torchvision, which GPU servers have and this project does not require."""
    try:
        import lpips
    except ImportError:
        raise StageError("ct_vqgan.perceptual_weight > 0 needs the lpips package (pip install lpips, which needs "
                         "torchvision); set it to 0 to train without the perceptual loss") from None
    return freeze(lpips.LPIPS(net="vgg", verbose=False), device)


class EMA:
    """The authors' EMA of the denoiser's parameters: every ``every`` steps ``decay x ema + (1 - decay) x
    weights``, a plain copy before step ``start`` (their ``step_ema``). Checkpointed through accelerate."""

    def __init__(self, model: nn.Module, decay: float, every: int, start: int):
        self.model, self.decay, self.every, self.start = model, decay, every, start
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.every:
            return
        for k, p in self.model.named_parameters():
            if step < self.start:
                self.shadow[k].copy_(p)
            else:
                self.shadow[k].lerp_(p, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            v.copy_(state[k])

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged parameters (buffers as the model's)."""
        return {**self.model.state_dict(), **self.shadow}


class Stage:
    """One stage: ``setup`` builds (and accelerate-prepares) what it trains, ``train_step`` does one optimizer step
    and returns its losses, ``outputs`` gives the state dicts to save as ``<name>.safetensors``."""

    name = ""
    #: Earlier stages whose networks this one loads, frozen (their part names equal the stage names).
    needs: tuple[str, ...] = ()

    def __init__(self, cfg: dict, parts: DVGComponents, cond: Conditioner, accelerator):
        self.cfg, self.parts, self.cond, self.acc = cfg[self.name], parts, cond, accelerator
        self.input_views = list(parts.config["input_views"])
        self.schedulers: list = []
        self.ema: EMA | None = None
        for part in self.needs:
            cond.nets[part] = freeze(getattr(parts, part), accelerator.device)

    def setup(self) -> None:
        raise NotImplementedError

    def train_step(self, indices: list[int], gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def outputs(self) -> dict[str, dict[str, torch.Tensor]]:
        return {self.name: getattr(self.parts, self.name).state_dict()}

    def optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        """Adam with the stage's lr and betas, and its cosine schedule when configured (stepped every iteration
        by the training loop, not by accelerate, which would step it once per process)."""
        opt = torch.optim.Adam(params, lr=lr or self.cfg["learning_rate"], betas=tuple(self.cfg["betas"]))
        if self.cfg["cosine"]:
            self.schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=self.cfg["cosine"]["t_max"], eta_min=self.cfg["cosine"]["eta_min"]))
        return opt

    def update(self, loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.acc.backward(loss)
        if self.cfg["grad_clip"]:
            self.acc.clip_grad_norm_(model.parameters(), self.cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)

    def counts(self, gen: torch.Generator, n: int) -> list[int]:
        """A random X-ray count (one of the model's input_views) per sample."""
        return [self.input_views[int(k)] for k in torch.randint(len(self.input_views), (n,), generator=gen)]

    def stack(self, fn, *args_per_sample) -> torch.Tensor:
        """``fn`` applied sample by sample (values are derived and cached one case at a time), as a batch."""
        return torch.stack([fn(*a) for a in zip(*args_per_sample)])


class CTVQGANStage(Stage):
    name = "ct_vqgan"

    def setup(self) -> None:
        c, acc = self.cfg, self.acc
        lr = c["learning_rate"]
        if c["scale_lr"]:      # train_vqgan.py: accumulate x (gpus / 8) x (batch / 4) x base lr; no accumulation here
            lr *= acc.num_processes / 8.0 * c["batch_size"] / 4.0
        vq = self.parts.ct_vqgan.train()
        self.model, self.opt = acc.prepare(vq, self.optimizer(vq.parameters(), lr))
        self.disc = self.opt_d = self.lpips = None
        if c["gan_start"] is not None:
            disc = Discriminators(c["disc_channels"], c["disc_layers"], c["image_gan_weight"], c["video_gan_weight"])
            self.disc, self.opt_d = acc.prepare(disc, self.optimizer(disc.parameters(), lr))
        if c["perceptual_weight"] > 0:
            self.lpips = load_lpips(acc.device)

    def _batch(self, indices: list[int], gen: torch.Generator) -> torch.Tensor:
        """(B, 1, n, n, n): whole volumes, or random cubes of side ``crop``."""
        crop = self.cfg["crop"]
        vols = [self.cond.ct(i) for i in indices]
        if crop:
            size = vols[0].shape[-1]
            corners = torch.randint(size - crop + 1, (len(vols), 3), generator=gen).tolist()
            vols = [v[:, k:k + crop, j:j + crop, i:i + crop] for v, (k, j, i) in zip(vols, corners)]
        return torch.stack(vols)

    def train_step(self, indices, gen, step):
        c = self.cfg
        x = self._batch(indices, gen)
        recon, vq = self.model(x)
        l1 = F.l1_loss(recon, x)
        zero = torch.zeros((), device=x.device)
        perceptual = gan = feat = d_loss = zero
        # one random axial slice per volume, for the perceptual and 2-D GAN losses
        k = torch.randint(x.shape[2], (x.shape[0],), generator=gen).tolist()
        frames, frames_rec = (torch.stack([v[:, s] for v, s in zip(vol, k)]) for vol in (x, recon))
        if self.lpips is not None:
            perceptual = self.lpips(frames_rec.expand(-1, 3, -1, -1), frames.expand(-1, 3, -1, -1)).mean()
        adversarial = self.disc is not None and step >= c["gan_start"]
        if adversarial:
            disc = self.acc.unwrap_model(self.disc).requires_grad_(False)
            gan, feat = self._generator_terms(disc, frames, frames_rec, x, recon)
        loss = (c["l1_weight"] * l1 + vq.commitment_loss + c["perceptual_weight"] * perceptual + gan
                + c["gan_feat_weight"] * feat)
        self.update(loss, self.model, self.opt)
        if adversarial:
            disc.requires_grad_(True)
            d_loss = self.disc(frames, frames_rec.detach(), x, recon.detach())
            self.update(d_loss, self.disc, self.opt_d)
        return {"loss": loss.detach(), "l1": l1.detach(), "commitment": vq.commitment_loss.detach(),
                "perceptual": perceptual.detach(), "gan": gan.detach(), "feature_matching": feat.detach(),
                "discriminator": d_loss.detach(), "perplexity": vq.perplexity.detach()}

    def _generator_terms(self, disc: Discriminators, frames, frames_rec, x, recon):
        """(hinge generator loss, feature-matching L1) with the discriminators' weights fixed."""
        c = self.cfg
        fake_img, fake_vol = disc.image(frames_rec), disc.volume(recon)
        gan = -c["image_gan_weight"] * fake_img[-1].mean() - c["video_gan_weight"] * fake_vol[-1].mean()
        with torch.no_grad():
            real_img, real_vol = disc.image(frames), disc.volume(x)
        layer_weight = 4.0 / (c["disc_layers"] + 1)
        feat = torch.zeros((), device=x.device)
        for weight, fake, real in ((c["image_gan_weight"], fake_img, real_img),
                                   (c["video_gan_weight"], fake_vol, real_vol)):
            if weight > 0:
                feat = feat + sum(layer_weight * F.l1_loss(f, r) for f, r in zip(fake[:-1], real[:-1]))
        return gan, feat


class VPGEStage(Stage):
    name = "vpge"
    needs = ("ct_vqgan",)
    #: the part the encoder starts from
    start_from = "ct_vqgan"

    def source(self, index: int, count: int) -> torch.Tensor:
        return self.cond.back_projection(index, count)

    def setup(self) -> None:
        vq: VQGAN3D = getattr(self.parts, self.name)
        vq.load_state_dict(getattr(self.parts, self.start_from).state_dict())
        encoder = LatentEncoder(vq).train()
        self.model, self.opt = self.acc.prepare(encoder, self.optimizer(encoder.parameters()))

    def train_step(self, indices, gen, step):
        c, cond = self.cfg, self.cond
        counts = self.counts(gen, len(indices))
        z = self.model(self.stack(self.source, indices, counts))
        target = self.stack(cond.ct_latent, indices)
        latent = F.mse_loss(z, target)
        l1 = torch.zeros((), device=z.device)
        if c["l1_weight"] > 0:
            ct_vq = cond.nets["ct_vqgan"]
            quantized = z + (ct_vq.codebook.snap(z)[1] - z).detach()
            l1 = F.l1_loss(ct_vq.decoder(ct_vq.post_vq_conv(quantized)), self.stack(cond.ct, indices))
        loss = c["latent_weight"] * latent + c["l1_weight"] * l1
        self.update(loss, self.model, self.opt)
        return {"loss": loss.detach(), "latent_mse": latent.detach(), "l1": l1.detach()}


class CoarseStage(Stage):
    name = "coarse"
    needs = ("ct_vqgan", "vpge")

    def setup(self) -> None:
        net = self.parts.coarse.train()
        self.model, self.opt = self.acc.prepare(net, self.optimizer(net.parameters()))

    def train_step(self, indices, gen, step):
        counts = self.counts(gen, len(indices))
        z_in = self.stack(self.cond.z_in, indices, counts)
        pred = self.model(z_in, torch.zeros(len(indices), device=z_in.device))
        loss = F.mse_loss(pred, self.stack(self.cond.ct_latent, indices))
        self.update(loss, self.model, self.opt)
        return {"loss": loss.detach()}


class VPGENewStage(VPGEStage):
    name = "vpge_new"
    needs = ("ct_vqgan", "vpge", "coarse")
    start_from = "vpge"

    def source(self, index: int, count: int) -> torch.Tensor:
        return self.cond.new_view_back_projection(index, count)


class DiffusionStage(Stage):
    name = "diffusion"
    needs = ("ct_vqgan", "vpge", "coarse", "vpge_new")

    def setup(self) -> None:
        net = self.parts.denoiser.train()
        self.model, self.opt = self.acc.prepare(net, self.optimizer(net.parameters()))
        ema = self.cfg["ema"]
        if ema:
            self.ema = EMA(self.parts.denoiser, ema["decay"], ema["every"], ema["start"])

    def train_step(self, indices, gen, step):
        cond, ct_vq = self.cond, self.cond.nets["ct_vqgan"]
        counts = self.counts(gen, len(indices))
        z0 = ct_vq.normalize_latent(self.stack(cond.ct_latent, indices))
        z_in, z_new = self.stack(cond.z_in, indices, counts), self.stack(cond.z_new, indices, counts)
        t = torch.randint(self.parts.scheduler.config.num_train_timesteps, (len(indices),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen).to(z0.device)
        t = t.to(z0.device)
        z_t = self.parts.scheduler.add_noise(z0, noise, t)
        loss = F.mse_loss(self.model(torch.cat([z_in, z_new, z_t], dim=1), t), z0)
        self.update(loss, self.model, self.opt)
        return {"loss": loss.detach()}

    def outputs(self):
        out = {"denoiser": self.parts.denoiser.state_dict()}
        if self.ema is not None:
            out["denoiser_ema"] = self.ema.weights()
        return out


STAGE_CLASSES = {cls.name: cls for cls in (CTVQGANStage, VPGEStage, CoarseStage, VPGENewStage, DiffusionStage)}
