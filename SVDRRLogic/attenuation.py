"""HU to linear attenuation, and the output intensity transforms (DESIGN.md section 4).

Two models, because they serve different users: ``physical`` gives true line integrals in mu*mm for a
monoenergetic beam (what Beer-Lambert transmission needs), and ``diffdrr`` reproduces the density mapping the
LIDC-IDRI-DRR training data of SV-DRR was rendered with, so the released SV-DRR weights see data of their kind.
"""
from __future__ import annotations

import numpy as np
import torch

HU_MODELS = ("physical", "diffdrr")
OUTPUTS = ("line-integral", "transmission", "display")

#: Linear attenuation of water at an effective energy of about 70 keV, in 1/mm (NIST XCOM: 0.193 cm^2/g).
MU_WATER_PER_MM = 0.0193


def hu_to_mu(hu: np.ndarray, model: str = "physical", mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """Attenuation volume (float32) from HU.

    ``physical``: mu = mu_water * (1 + HU/1000), clipped at 0 so air and padding add nothing.
    ``diffdrr``: DiffDRR's ``transform_hu_to_density`` with its default bone multiplier 1: air (HU <= -800) is
    lifted to the smallest soft-tissue HU, then the volume is min-max scaled to [0, 1]; its values are unitless
    densities, integrated per mm like attenuation.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if model == "physical":
        return np.clip(mu_water * (1.0 + hu / 1000.0), 0.0, None).astype(np.float32)
    if model == "diffdrr":
        soft = hu[(hu > -800) & (hu <= 350)]
        floor = float(soft.min()) if soft.size else -800.0
        dens = np.where(hu <= -800, floor, hu)
        lo, hi = float(dens.min()), float(dens.max())
        return ((dens - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)
    raise ValueError(f"unknown HU model {model!r}; choose one of {', '.join(HU_MODELS)}")


def apply_output(line_integral: torch.Tensor, output: str = "line-integral") -> torch.Tensor:
    """Map line integrals [..., rows, cols] to the requested output.

    ``transmission`` is Beer-Lambert I/I0 = exp(-integral); ``display`` is per-image min-max to [0, 1] with bone
    bright, the normalization SV-DRR's training PNGs were saved with.
    """
    if output == "line-integral":
        return line_integral
    if output == "transmission":
        return torch.exp(-line_integral)
    if output == "display":
        flat = line_integral.flatten(-2)
        lo = flat.min(-1).values[..., None, None]
        hi = flat.max(-1).values[..., None, None]
        return (line_integral - lo) / torch.clamp(hi - lo, min=1e-12)
    raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
