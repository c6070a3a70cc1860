"""Image metrics for novel-view evaluation: PSNR, SSIM (Gaussian window), and LPIPS when its package is installed.

Images are (B, H, W) or (B, 1, H, W) float tensors in [0, 1] (data range 1).

SSIM follows Wang et al. (2004) as in their reference code: an 11 x 11 Gaussian window with sigma 1.5 (normalized
to sum 1), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with L = 1, local statistics over the *valid* window positions
only (no padding), and the mean of the SSIM map. Local variances use the biased (weighted) estimate
``E_w[x^2] - E_w[x]^2``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
PSNR_MAX_DB = 100.0


def _as_b1hw(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected gray images (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
    return x.double()


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (B,) in dB; identical images give ``PSNR_MAX_DB`` instead of inf."""
    p, t = _as_b1hw(pred), _as_b1hw(target)
    mse = ((p - t) ** 2).mean(dim=(1, 2, 3))
    value = 10.0 * torch.log10(data_range ** 2 / mse.clamp(min=1e-300))
    return value.clamp(max=PSNR_MAX_DB).float()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(size, size) Gaussian weights summing to 1, centred on the middle pixel."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(r ** 2) / (2.0 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Structural similarity per image (B,), mean over the valid-window SSIM map (module docstring)."""
    x, y = _as_b1hw(pred), _as_b1hw(target)
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM window {window} is larger than the images {tuple(x.shape[-2:])}")
    w = gaussian_window(window, sigma).to(x.device)[None, None]
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    var_x = F.conv2d(x * x, w) - mu_x ** 2
    var_y = F.conv2d(y * y, w) - mu_y ** 2
    cov = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).float()


class LPIPSUnavailable(RuntimeError):
    """The optional ``lpips`` package (and the torchvision it needs) is not installed."""


class LPIPS:
    """LPIPS distance (AlexNet, the package's default) of gray images in [0, 1], repeated to RGB and mapped to
    [-1, 1]. Constructing it raises :class:`LPIPSUnavailable` with instructions when ``lpips`` cannot be imported."""

    def __init__(self, device: torch.device | str = "cpu", net: str = "alex"):
        try:
            import lpips
        except ImportError as exc:
            raise LPIPSUnavailable(
                f"LPIPS skipped: the optional 'lpips' package cannot be imported ({exc}). Install it with "
                "'pip install lpips' (it needs torchvision; pip install -e '.[eval]' on a GPU server)") from None
        self.model = lpips.LPIPS(net=net, verbose=False).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = _as_b1hw(pred).float().to(self.device).repeat(1, 3, 1, 1) * 2.0 - 1.0
        t = _as_b1hw(target).float().to(self.device).repeat(1, 3, 1, 1) * 2.0 - 1.0
        return self.model(p, t).flatten().cpu()


def try_lpips(device: torch.device | str = "cpu") -> tuple[LPIPS | None, str | None]:
    """(LPIPS metric, None) or (None, the reason it is unavailable)."""
    try:
        return LPIPS(device), None
    except LPIPSUnavailable as exc:
        return None, str(exc)


def finite_mean(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")
