"""Analytic ellipsoid phantoms: exact line integrals, partial-volume voxelization, and a rim mask for accuracy tests.

A projector can only be checked against numbers it did not compute itself. A phantom made of uniform ellipsoids
whose values add up (the Shepp-Logan construction) has a closed-form integral along any segment: the chord of the
segment inside each ellipsoid times its attenuation. Voxelizing the same ellipsoids with enough supersampling gives
the volume the projector sees, so ``project(voxelize(E)) ~ line_integrals(E)`` is a test with a known answer,
except within a voxel or so of an ellipsoid's silhouette, which :func:`rays_away_from_rim` excludes.

All coordinates are patient RAS millimetres; attenuation values are in 1/mm, so integrals are dimensionless.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..images import CTVolume

# Kak & Slaney, Principles of Computerized Tomographic Imaging (1988), Table 3.2 with the published errata:
# centre (x, y, z), semi-axes (A, B, C), rotation of the A axis about z from +x (degrees), and the grey level in
# the original table and in Yu, Ye & Wang's higher-contrast variant (SPIE 5535, 2004). Units: half the phantom box.
_SHEPP_LOGAN_3D = (
    ((0.0, 0.0, 0.0), (0.69, 0.92, 0.9), 0.0, 2.0, 1.0),
    ((0.0, 0.0, 0.0), (0.6624, 0.874, 0.88), 0.0, -0.98, -0.8),
    ((-0.22, 0.0, -0.25), (0.41, 0.16, 0.21), 108.0, -0.02, -0.2),
    ((0.22, 0.0, -0.25), (0.31, 0.11, 0.22), 72.0, -0.02, -0.2),
    ((0.0, 0.35, -0.25), (0.21, 0.25, 0.5), 0.0, 0.02, 0.2),
    ((0.0, 0.1, -0.25), (0.046, 0.046, 0.046), 0.0, 0.02, 0.2),
    ((-0.08, -0.65, -0.25), (0.046, 0.023, 0.02), 0.0, 0.01, 0.1),
    ((0.06, -0.65, -0.25), (0.046, 0.023, 0.02), 90.0, 0.01, 0.1),
    ((0.06, -0.105, 0.625), (0.056, 0.04, 0.1), 90.0, 0.02, 0.2),
    ((0.0, 0.1, 0.625), (0.056, 0.056, 0.1), 0.0, -0.02, -0.2),
)

# Voxels evaluated per block when supersampling boundary voxels: bounds the (block, s^3, 3) float64 temporary.
_SUPERSAMPLE_BLOCK = 8192
# Voxels per slab when classifying voxel centres: bounds the per-slab float64 temporaries to a few tens of MB.
_SLAB_VOXELS = 1 << 21


@dataclass(eq=False)
class Ellipsoid:
    """A uniform ellipsoid whose ``value`` (attenuation, 1/mm) adds to whatever else covers a point.

    ``center`` is in RAS mm and ``semi_axes`` are the half-lengths in mm along the ellipsoid's own axes.
    ``rotation`` is either a 3x3 matrix whose columns are those axes in RAS, or an angle in degrees of the first
    axis from +x about +z (S), the convention of the Shepp-Logan tables; it is stored as the 3x3 matrix.
    """

    center: Sequence[float]
    semi_axes: Sequence[float]
    value: float
    rotation: float | np.ndarray = 0.0

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=np.float64).reshape(3)
        self.semi_axes = np.asarray(self.semi_axes, dtype=np.float64).reshape(3)
        self.value = float(self.value)
        if np.ndim(self.rotation) == 0:
            a = np.radians(float(self.rotation))
            self.rotation = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        self.rotation = np.asarray(self.rotation, dtype=np.float64)
        if self.rotation.shape != (3, 3) or not np.allclose(self.rotation.T @ self.rotation, np.eye(3), atol=1e-6):
            raise ValueError("ellipsoid rotation must be an angle in degrees or an orthonormal 3x3 matrix")
        if not (np.all(np.isfinite(self.semi_axes)) and self.semi_axes.min() > 0):
            raise ValueError(f"ellipsoid semi-axes must be positive, got {self.semi_axes.tolist()}")

    @property
    def to_unit_sphere(self) -> np.ndarray:
        """M with ``M @ (p - center)`` in the frame where this ellipsoid is the unit ball (|q| <= 1 inside)."""
        return (self.rotation / self.semi_axes).T

    @property
    def volume(self) -> float:
        return float(4.0 / 3.0 * np.pi * np.prod(self.semi_axes))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Tight axis-aligned RAS bounding box (low corner, high corner) of the rotated ellipsoid."""
        half = np.sqrt(((self.rotation * self.semi_axes) ** 2).sum(axis=1))
        return self.center - half, self.center + half

    def radius(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Normalized radius |M (p - center)| at RAS points given as broadcastable coordinate arrays (1 on the surface).

        Taking x, y, z separately lets callers pass 1D axis vectors shaped to broadcast, so a grid never has to be
        materialized as (..., 3) points.
        """
        m, c = self.to_unit_sphere, self.center
        total = 0.0
        for row in m:
            q = row[0] * (x - c[0]) + row[1] * (y - c[1]) + row[2] * (z - c[2])
            total = total + q * q
        return np.sqrt(total)


def shepp_logan_3d(scale_mm: float = 100.0, mu_scale: float = 0.02, contrast: str = "modified",
                   center: Sequence[float] = (0.0, 0.0, 0.0)) -> list[Ellipsoid]:
    """The 3D Shepp-Logan head phantom of Kak & Slaney as ellipsoids in RAS mm (x -> R, y -> A, z -> S).

    ``scale_mm`` is the length of one table unit (the outer ellipsoid is 2 x (0.69, 0.92, 0.9) units across).
    ``contrast`` picks the grey levels: ``"modified"`` (Yu-Ye-Wang, skull 1, brain 0.2, features visible) or
    ``"kak-slaney"`` (skull 2, brain 1.02, the original low-contrast levels). Grey levels are multiplied by
    ``mu_scale`` (1/mm), so with the defaults the skull is 0.02/mm and the brain 0.004/mm; with
    ``"kak-slaney"`` the skull is 0.04/mm and brain 0.0204/mm, close to real bone and water. Either way every
    point's summed value is non-negative.
    """
    column = {"kak-slaney": 3, "modified": 4}.get(contrast)
    if column is None:
        raise ValueError(f"contrast must be 'modified' or 'kak-slaney', not {contrast!r}")
    offset = np.asarray(center, dtype=np.float64)
    return [Ellipsoid(center=offset + scale_mm * np.asarray(row[0]), semi_axes=scale_mm * np.asarray(row[1]),
                      value=mu_scale * row[column], rotation=row[2]) for row in _SHEPP_LOGAN_3D]


def single_ellipsoid(semi_axes: Sequence[float] = (60.0, 45.0, 70.0), mu: float = 0.02,
                     center: Sequence[float] = (0.0, 0.0, 0.0), rotation: float | np.ndarray = 0.0) -> list[Ellipsoid]:
    """One water-like ellipsoid (a phantom with no internal edges, the simplest accuracy test), as a list."""
    return [Ellipsoid(center=center, semi_axes=semi_axes, value=mu, rotation=rotation)]


def _rays(origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Flatten broadcastable (..., 3) origins and directions to (N, 3) float64, remembering the leading shape."""
    o, d = np.broadcast_arrays(np.asarray(origins, dtype=np.float64), np.asarray(directions, dtype=np.float64))
    if o.shape[-1] != 3:
        raise ValueError(f"ray origins and directions must end in 3 coordinates, got shape {o.shape}")
    return o.reshape(-1, 3), d.reshape(-1, 3), o.shape[:-1]


def _chord(e: Ellipsoid, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each line ``o + t d`` meets ``e``: (t at closest approach, half-chord in t, closest normalized radius).

    Solved about the closest approach to the centre in the unit-ball frame instead of with the textbook
    discriminant, whose two large terms nearly cancel when the source is far from the ellipsoid. The half-chord
    is 0 where the line misses; zero-length directions miss everything.
    """
    m = e.to_unit_sphere
    oq = (o - e.center) @ m.T
    dq = d @ m.T
    dd = np.einsum("ij,ij->i", dq, dq)
    ok = dd > 0
    dd_safe = np.where(ok, dd, 1.0)
    tc = -np.einsum("ij,ij->i", oq, dq) / dd_safe
    closest = oq + tc[:, None] * dq
    r2 = np.einsum("ij,ij->i", closest, closest)
    half = np.where(ok, np.sqrt(np.clip(1.0 - r2, 0.0, None) / dd_safe), 0.0)
    return tc, half, np.sqrt(r2)


def line_integrals(ellipsoids: Sequence[Ellipsoid], origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Exact integral of the phantom along each segment ``origin + t * direction``, t in [0, 1] (float64).

    Each ellipsoid contributes ``value * |direction| * length([t0, t1] intersected with [0, 1])``. Origins and
    directions broadcast against each other; the result has their leading shape (e.g. (N,) for
    ``CArmGeometry.rays()``; reshape to ``geometry.shape`` for an image).
    """
    o, d, lead = _rays(origins, directions)
    length = np.linalg.norm(d, axis=1)
    total = np.zeros(len(o))
    for e in ellipsoids:
        tc, half, _ = _chord(e, o, d)
        inside = np.clip(np.minimum(tc + half, 1.0) - np.maximum(tc - half, 0.0), 0.0, None)
        total += e.value * inside * length
    return total.reshape(lead)


def rays_away_from_rim(ellipsoids: Sequence[Ellipsoid], origins: np.ndarray, directions: np.ndarray,
                       margin_mm: float = 2.0) -> np.ndarray:
    """True for rays that cross the phantom and stay at least ``margin_mm`` from every ellipsoid's silhouette.

    Near a silhouette the integral changes as fast as sqrt(offset), so sampling and partial-volume errors of a
    voxelized phantom concentrate there; accuracy tests compare projector and analytic values on the other rays.

    Criterion (sound, somewhat conservative): along a line the smallest normalized radius r = min |M (p - c)| is
    1/min(semi_axes)-Lipschitz in the line's lateral position, so if |r - 1| >= margin / min(semi_axes) every
    parallel line within ``margin_mm`` crosses the ellipsoid if and only if this one does. A ray passes when that
    holds for every ellipsoid, at least one is crossed, and each crossed ellipsoid lies wholly within the segment
    (source and detector outside it), so the chord is never clipped by the segment ends.
    """
    o, d, lead = _rays(origins, directions)
    keep = np.ones(len(o), dtype=bool)
    crosses = np.zeros(len(o), dtype=bool)
    for e in ellipsoids:
        tc, half, r = _chord(e, o, d)
        band = margin_mm / e.semi_axes.min()
        hit = (r <= 1.0 - band) & (half > 0) & (tc - half > 0.0) & (tc + half < 1.0)
        keep &= hit | (r >= 1.0 + band)
        crosses |= hit
    return (keep & crosses).reshape(lead)


def centered_ijk_to_ras(shape: Sequence[int], spacing: Sequence[float],
                        center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Axis-aligned IJK-to-RAS (i -> R, j -> A, k -> S) for ``shape = (nk, nj, ni)``, ``spacing = (di, dj, dk)``
    with the volume's centre at ``center``."""
    nk, nj, ni = shape
    m = np.diag([*map(float, spacing), 1.0])
    m[:3, 3] = np.asarray(center, dtype=np.float64) - m[:3, :3] @ (np.array([ni, nj, nk]) - 1) / 2
    return m


def voxelize(ellipsoids: Sequence[Ellipsoid], shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0),
             center: Sequence[float] = (0.0, 0.0, 0.0), *, ijk_to_ras: np.ndarray | None = None,
             supersample: int = 4) -> CTVolume:
    """Partial-volume voxelization: each voxel holds the mean of the phantom over ``supersample**3`` sub-samples.

    ``shape`` is (nk, nj, ni). The grid is ``ijk_to_ras`` when given (any affine, e.g. LPS-stored), otherwise
    axis-aligned with ``spacing = (di, dj, dk)`` and its centre at ``center``. Result: ``CTVolume(units="mu")``.

    Only voxels that can straddle an ellipsoid's surface are supersampled. In the unit-ball frame a voxel is
    the parallelepiped centre + G delta, delta in [-1/2, 1/2]^3; the radius moves by at most ``reach`` = the
    largest |G delta| over the 8 corners, so a voxel whose centre radius is below 1 - reach is wholly inside
    and one above 1 + reach wholly outside. That makes the result equal to supersampling every voxel, at the
    cost of a thin shell of voxels per ellipsoid; work is further limited to each ellipsoid's bounding box and
    done in slabs of slices so memory stays bounded for 256^3 and beyond.

    Accuracy: s sub-samples per axis place a surface facing a grid axis to within 1/(2s) voxel, so sums along
    an axis can be off by ~2 % (0.3 % typically) at 2 mm voxels and s = 4; raise ``supersample`` for tighter
    ground truth (cost grows only with the boundary shell).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three sizes (nk, nj, ni) of at least 2, got {shape}")
    s = int(supersample)
    if s < 1:
        raise ValueError(f"supersample must be at least 1, got {supersample}")
    affine = centered_ijk_to_ras(shape, spacing, center) if ijk_to_ras is None else np.asarray(ijk_to_ras, float)
    linear, origin = affine[:3, :3], affine[:3, 3]
    to_ijk = np.linalg.inv(linear)
    n_ijk = np.array(shape[::-1])

    steps = (np.arange(s) + 0.5) / s - 0.5
    sub = np.array(list(itertools.product(steps, repeat=3)))  # (s^3, 3) offsets in (i, j, k) voxel units
    corners = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))

    out = np.zeros(shape)
    for e in ellipsoids:
        g_lin = e.to_unit_sphere @ linear  # (i, j, k) -> unit-ball frame
        g_off = e.to_unit_sphere @ (origin - e.center)
        reach = np.linalg.norm(corners @ g_lin.T, axis=1).max() * (1 + 1e-9)
        sub_q = sub @ g_lin.T

        lo, hi = e.bounds()
        box = np.array(list(itertools.product(*zip(lo, hi))))
        ijk = (box - origin) @ to_ijk.T
        first = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, n_ijk)
        last = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 2, 0, n_ijk)
        if np.any(last <= first):
            continue
        i = np.arange(first[0], last[0])[None, None, :]
        j = np.arange(first[1], last[1])[None, :, None]
        slab = max(1, _SLAB_VOXELS // (i.size * j.size))
        for k0 in range(first[2], last[2], slab):
            k = np.arange(k0, min(k0 + slab, last[2]))[:, None, None]
            q = [g_off[a] + g_lin[a, 0] * i + g_lin[a, 1] * j + g_lin[a, 2] * k for a in range(3)]
            r = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
            frac = (r <= 1.0 - reach).astype(np.float64)
            edge = np.nonzero((r > 1.0 - reach) & (r <= 1.0 + reach))
            if edge[0].size:
                centres = np.stack([qa[edge] for qa in q], axis=1)
                frac[edge] = np.concatenate([
                    (((block[:, None, :] + sub_q[None]) ** 2).sum(axis=2) <= 1.0).mean(axis=1)
                    for block in np.split(centres, range(_SUPERSAMPLE_BLOCK, len(centres), _SUPERSAMPLE_BLOCK))])
            out[k0:k0 + k.shape[0], first[1]:last[1], first[0]:last[0]] += e.value * frac
    return CTVolume(out.astype(np.float32), affine, units="mu",
                    metadata={"phantom": "ellipsoids", "supersample": s}, source="<analytic phantom>")
