"""How close a reconstructed CT is to the true one: the X2CT-GAN / DVG-Diffusion metrics on unit volumes.

Volumes are ``[k, j, i]`` arrays of the models' unit values in [0, 1] (:func:`~SVDRRLogic.recon_grid.hu_to_unit`:
HU + 1024 over 2500). Published X-ray-to-CT numbers are not comparable without knowing the convention, so every
variant is computed and labelled (dvg-and-patch-diffusion.md A.3 and C.9):

- PSNR on the unit scale with peak 1, either over the whole volume (``psnr_3d``) or per 2-D slice, averaged over the
  slices of each orientation and then over the three orientations (``psnr_slices``, X2CT's "PSNR-avg");
- the same two on X2CT's test scale: values times 2500 cast to integers (X2CT's ``astype(np.int32)``, which
  truncates) with peak 4095, i.e. about 20 log10(4095 / 2500) = +4.29 dB over the unit-scale numbers;
- SSIM per slice with the slices of one orientation as channels, exactly as scikit-image's
  ``structural_similarity(data_range=1, channel_axis=...)`` (7 x 7 uniform window, K1 0.01, K2 0.03, sample
  covariance, mean over the window positions that fit inside the slice), averaged over the three orientations;
- LPIPS (VGG, v0.1) per slice, summed over the slices of an orientation as DVG-Diffusion's code does (or averaged),
  then averaged over the three orientations; it needs the optional ``lpips`` package.

Identical volumes (or slices) have no finite PSNR. X2CT's code scores a zero error as 100 dB; that value is kept
(:data:`PSNR_ZERO_MSE_DB`) so tables stay finite. Slice-wise PSNR on the unit scale skips the slices where both
volumes agree exactly instead (typically padding air that any model reproduces), because counting them at 100 dB
would reward a volume for its empty slices; the X2CT variant keeps X2CT's 100 dB per such slice so that it stays
comparable with the numbers produced by their code.
"""
from __future__ import annotations

import functools
import math

import numpy as np

#: X2CT-GAN's PSNR for a zero mean squared error (their ``metrics_np``).
PSNR_ZERO_MSE_DB = 100.0
#: X2CT-GAN de-normalises unit values to [0, 2500] and takes 4095 as the peak.
X2CT_WINDOW, X2CT_PEAK = 2500.0, 4095.0
X2CT_OFFSET_DB = 20.0 * math.log10(X2CT_PEAK / X2CT_WINDOW)
SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03
LPIPS_REDUCTIONS = ("sum", "mean")

#: Table headings of the keys :func:`evaluate_volume` returns.
METRIC_LABELS = {
    "psnr_3d": "PSNR-3D [0,1] (dB)",
    "psnr_slices": "PSNR-slices [0,1] (dB)",
    "psnr_3d_x2ct4095": "PSNR-3D X2CT 4095 (dB)",
    "psnr_slices_x2ct4095": "PSNR-slices X2CT 4095 (dB)",
    "ssim_slices": "SSIM-slices",
    "lpips_slices_sum": "LPIPS (sum over slices)",
    "lpips_slices_mean": "LPIPS (mean over slices)",
}


class LPIPSUnavailable(RuntimeError):
    """The optional ``lpips`` package (which needs torchvision) cannot be imported."""


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both volumes as float64, after checking they are finite 3-D arrays of the same shape."""
    p, r = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if p.ndim != 3 or p.shape != r.shape:
        raise ValueError(f"volume metrics need two 3-D volumes of the same shape, got {p.shape} and {r.shape}")
    if not (np.isfinite(p).all() and np.isfinite(r).all()):
        raise ValueError("volume metrics need finite values (the volumes contain NaN or infinity)")
    return p, r


def _psnr_of_mse(mse: np.ndarray, peak: float) -> np.ndarray:
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(peak ** 2 / np.where(mse > 0, mse, 1.0))
    return np.where(mse > 0, db, PSNR_ZERO_MSE_DB)


def psnr_3d(pred: np.ndarray, ref: np.ndarray, peak: float = 1.0) -> float:
    """PSNR of the whole volume's mean squared error (dB); identical volumes give :data:`PSNR_ZERO_MSE_DB`."""
    p, r = _pair(pred, ref)
    return float(_psnr_of_mse(np.mean((p - r) ** 2), peak))


def psnr_slices(pred: np.ndarray, ref: np.ndarray, peak: float = 1.0, identical: str = "skip") -> float:
    """PSNR per 2-D slice, averaged over the slices of each orientation, then over the three orientations (dB).

    ``identical="skip"`` leaves out slices with zero error (module docstring); ``"x2ct"`` scores them 100 dB as
    X2CT's code does. Identical volumes give :data:`PSNR_ZERO_MSE_DB` either way.
    """
    if identical not in ("skip", "x2ct"):
        raise ValueError(f"identical must be 'skip' or 'x2ct', got {identical!r}")
    p, r = _pair(pred, ref)
    se = (p - r) ** 2
    means = []
    for axis in range(3):
        mse = se.mean(axis=tuple(a for a in range(3) if a != axis))
        if identical == "skip":
            mse = mse[mse > 0]
        if mse.size:
            means.append(float(_psnr_of_mse(mse, peak).mean()))
    return float(np.mean(means)) if means else PSNR_ZERO_MSE_DB


def to_x2ct_scale(unit: np.ndarray) -> np.ndarray:
    """Unit values as X2CT's test code sees them: clipped to [0, 1], times 2500, cast to int32 (truncation)."""
    return (np.clip(np.asarray(unit, dtype=np.float64), 0.0, 1.0) * X2CT_WINDOW).astype(np.int32)


def x2ct_psnr_3d(pred: np.ndarray, ref: np.ndarray) -> float:
    """X2CT-convention volume PSNR: :func:`to_x2ct_scale` values with peak 4095 (about +4.29 dB)."""
    return psnr_3d(to_x2ct_scale(pred), to_x2ct_scale(ref), peak=X2CT_PEAK)


def x2ct_psnr_slices(pred: np.ndarray, ref: np.ndarray) -> float:
    """X2CT-convention slice PSNR ("PSNR-avg"): :func:`to_x2ct_scale` values, peak 4095, 100 dB for a slice with
    zero error."""
    return psnr_slices(to_x2ct_scale(pred), to_x2ct_scale(ref), peak=X2CT_PEAK, identical="x2ct")


def _ssim_orientation(p: np.ndarray, r: np.ndarray, axis: int) -> float:
    """Mean SSIM of the slices across ``axis``: 2-D windows only, never mixing neighbouring slices."""
    from scipy.ndimage import uniform_filter

    size = [SSIM_WINDOW] * 3
    size[axis] = 1

    def local_mean(x: np.ndarray) -> np.ndarray:
        return uniform_filter(x, size=size)

    cov_norm = SSIM_WINDOW ** 2 / (SSIM_WINDOW ** 2 - 1.0)
    mu_p, mu_r = local_mean(p), local_mean(r)
    var_p = cov_norm * (local_mean(p * p) - mu_p * mu_p)
    var_r = cov_norm * (local_mean(r * r) - mu_r * mu_r)
    cov = cov_norm * (local_mean(p * r) - mu_p * mu_r)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu_p * mu_r + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_r ** 2 + c1) * (var_p + var_r + c2))
    pad = (SSIM_WINDOW - 1) // 2
    valid = tuple(slice(None) if a == axis else slice(pad, ssim_map.shape[a] - pad) for a in range(3))
    return float(ssim_map[valid].mean())


def ssim_slices(pred: np.ndarray, ref: np.ndarray) -> float:
    """Slice-wise SSIM with data range 1, averaged over the three orientations (module docstring)."""
    p, r = _pair(pred, ref)
    if min(p.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs volumes of at least {SSIM_WINDOW} voxels per side, got {p.shape}")
    return float(np.mean([_ssim_orientation(p, r, axis) for axis in range(3)]))


@functools.lru_cache(maxsize=2)
def load_lpips(device: str = "cpu"):
    """The VGG LPIPS network (v0.1 weights), loaded once per device: a test set evaluates hundreds of volumes, and
    an evaluation calls this first to fail before its first reconstruction rather than after it."""
    try:
        import lpips
    except ImportError as exc:
        raise LPIPSUnavailable(f"LPIPS needs the optional 'lpips' package, which cannot be imported ({exc}); "
                               "install it with pip install 'svdrr[eval]' (it needs torchvision)") from None
    return lpips.LPIPS(net="vgg", version="0.1", verbose=False).to(device).eval()


def lpips_slices(pred: np.ndarray, ref: np.ndarray, reduction: str = "sum", device: str = "cpu",
                 batch: int = 32) -> float:
    """LPIPS (VGG v0.1) of every 2-D slice, summed (DVG-Diffusion's code, hence the default) or averaged over the
    slices of each orientation, then averaged over the three orientations.

    Slices are mapped from [0, 1] to the [-1, 1] LPIPS expects and repeated to 3 channels (DVG's code passed its
    [0, 1] volumes with ``normalize=False``; whether they rescaled first is unknown); ``batch`` slices go through
    the network at once. Raises :class:`LPIPSUnavailable` when ``lpips`` is not installed.
    """
    import torch

    if reduction not in LPIPS_REDUCTIONS:
        raise ValueError(f"LPIPS reduction must be one of {LPIPS_REDUCTIONS}, got {reduction!r}")
    p, r = _pair(pred, ref)
    model = load_lpips(str(device))
    per_orientation = []
    for axis in range(3):
        ps, rs = np.moveaxis(p, axis, 0), np.moveaxis(r, axis, 0)
        values = []
        with torch.no_grad():
            for s in range(0, ps.shape[0], batch):
                a, b = (torch.from_numpy(np.ascontiguousarray(x[s:s + batch], dtype=np.float32))[:, None]
                        .repeat(1, 3, 1, 1).mul(2.0).sub(1.0).to(device) for x in (ps, rs))
                values.append(model(a, b).reshape(-1).double().cpu())
        d = torch.cat(values)
        per_orientation.append(float(d.sum() if reduction == "sum" else d.mean()))
    return float(np.mean(per_orientation))


def evaluate_volume(pred: np.ndarray, ref: np.ndarray, lpips: bool = False, lpips_reduction: str = "sum",
                    device: str = "cpu") -> dict[str, float]:
    """Every metric of the module under its :data:`METRIC_LABELS` key.

    The prediction is clipped to [0, 1] first, as X2CT's test code clips model outputs (the reference is clipped
    too, a no-op for a proper unit volume). LPIPS is added as ``lpips_slices_<reduction>`` when asked for.
    """
    p, r = (np.clip(v, 0.0, 1.0) for v in _pair(pred, ref))
    out = {
        "psnr_3d": psnr_3d(p, r),
        "psnr_slices": psnr_slices(p, r),
        "psnr_3d_x2ct4095": x2ct_psnr_3d(p, r),
        "psnr_slices_x2ct4095": x2ct_psnr_slices(p, r),
        "ssim_slices": ssim_slices(p, r),
    }
    if lpips:
        out[f"lpips_slices_{lpips_reduction}"] = lpips_slices(p, r, reduction=lpips_reduction, device=device)
    return out
