"""Phantoms: analytic ellipsoids with exact line integrals (projector ground truth) and a procedural chest CT
(demos and pipeline tests without patient data)."""
from .analytic import (Ellipsoid, centered_ijk_to_ras, line_integrals, rays_away_from_rim, shepp_logan_3d,
                       single_ellipsoid, voxelize)
from .chest import LABELS as CHEST_LABELS
from .chest import chest_ijk_to_ras, chest_phantom

__all__ = ["CHEST_LABELS", "Ellipsoid", "centered_ijk_to_ras", "chest_ijk_to_ras", "chest_phantom", "line_integrals",
           "rays_away_from_rim", "shepp_logan_3d", "single_ellipsoid", "voxelize"]
