"""SV-DRR's training objective: IDDPM with epsilon prediction and a learned-range variance.

The authors train with PixArt-Sigma's copy of improved-diffusion (``IDDPM("1000", learn_sigma=True,
pred_sigma=True, snr=False)``, ``training_losses_diffusers``; svdrr-method.md section 2): linear betas from 1e-4 to
0.02 over T = 1000 steps, timesteps uniform in [0, T), and for a model output ``[eps_hat, v]`` (2 x C channels)

    loss = mean((eps_hat - eps)^2)  +  L_vlb(t)

where ``L_vlb`` trains only the variance channels ``v`` (the mean is computed from ``eps_hat.detach()``):

- the model's reverse step is p(x_{t-1} | x_t) = N(mu, sigma^2) with
  ``mu = c1_t x0_hat + c2_t x_t``, ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)`` (the posterior mean
  of q(x_{t-1} | x_t, x0) with x0 replaced by its prediction) and the "learned range" log-variance
  ``log sigma^2 = f log beta_t + (1 - f) log beta~_t``, ``f = (v + 1) / 2``, where beta~_t = beta_t (1 - abar_{t-1}) /
  (1 - abar_t) is the posterior variance (its t = 0 value, 0, replaced by the t = 1 value: "clipped");
- for t > 0, ``L_vlb = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` per element, averaged over the element
  dimensions and expressed in bits (divided by ln 2);
- for t = 0, ``L_vlb = -log p(x0 | x_1)``: the discretized Gaussian likelihood of x0 in bins of width 2/255 (the
  image-coding term of DDPM, kept as the authors have it although x0 is a VAE latent), with IDDPM's tanh
  approximation of the normal CDF; also in bits per element.

Nothing is rescaled (``LossType.MSE``, not ``RESCALED_MSE``): the loss is exactly ``mse + vb`` per sample, averaged
over the batch by the caller. Tables are float64 (numpy) and gathered as float32, like IDDPM's ``_extract_into_tensor``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LN2 = math.log(2.0)


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """IDDPM's "linear" schedule: ``beta_start``..``beta_end`` scaled by 1000 / T so any T spans the same range."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """IDDPM's fast approximation of the standard normal CDF (max. error about 3e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(means, exp(log_scales)^2), bins of width 2/255 centred on x; the outermost bins
    (x < -0.999, x > 0.999) extend to -inf / +inf. Per element, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class LearnedRangeDiffusion:
    """Forward process, posterior and loss of IDDPM (epsilon + learned-range variance) on a linear schedule."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_timesteps = int(num_timesteps)
        betas = linear_betas(self.num_timesteps, beta_start, beta_end)
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.tables = {
            "betas": betas,
            "sqrt_abar": np.sqrt(abar),
            "sqrt_one_minus_abar": np.sqrt(1.0 - abar),
            "sqrt_recip_abar": np.sqrt(1.0 / abar),
            "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": posterior_var,
            "posterior_log_variance_clipped": np.log(np.append(posterior_var[1], posterior_var[1:])),
            "log_betas": np.log(betas),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        }
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps ``t`` (B,), float32, shaped to broadcast against ``like`` (B, ...)."""
        key = (name, str(t.device))
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self.tables[name]).to(t.device)
        return self._cache[key][t].float().view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, device: torch.device | str,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self._at("sqrt_abar", t, x0) * x0 + self._at("sqrt_one_minus_abar", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_log_variance_clipped", t, x_t)

    def p_mean_log_variance(self, eps: torch.Tensor, var_values: torch.Tensor, x_t: torch.Tensor,
                            t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the model's p(x_{t-1} | x_t) (learned range, no clipping of x0_hat)."""
        frac = (var_values + 1.0) / 2.0
        log_var = frac * self._at("log_betas", t, x_t) + (1.0 - frac) * self._at("posterior_log_variance_clipped",
                                                                                   t, x_t)
        x0_hat = self._at("sqrt_recip_abar", t, x_t) * x_t - self._at("sqrt_recipm1_abar", t, x_t) * eps
        mean, _ = self.q_posterior(x0_hat, x_t, t)
        return mean, log_var

    def vlb_bits(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 var_values: torch.Tensor) -> torch.Tensor:
        """The VLB term per sample (B,) in bits per element: KL for t > 0, decoder NLL for t = 0 (module docstring).
        Gradients reach ``eps`` too; the training loss passes ``eps.detach()``."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var = self.p_mean_log_variance(eps, var_values, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / LN2
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_var)) / LN2
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                        t: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "mse", "vb"}``, each (B,): ``model_output`` is (B, 2C, ...) = [eps_hat, v] for x_t (B, C, ...)."""
        channels = x0.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"learned-range variance needs {2 * channels} output channels, "
                             f"got {model_output.shape[1]}")
        out = model_output.float()
        eps, var_values = out[:, :channels], out[:, channels:]
        vb = self.vlb_bits(x0.float(), x_t.float(), t, eps.detach(), var_values)
        mse = mean_flat((eps - noise.float()) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
