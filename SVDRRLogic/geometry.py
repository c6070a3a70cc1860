"""C-arm geometry: the one place where the project's view convention is defined (DESIGN.md section 3).

World coordinates are patient RAS in mm. A view is a C-arm pose given by the DICOM positioner angles:
``azimuth`` (Positioner Primary Angle, LAO +) rotates about +z (superior), ``elevation`` (Positioner Secondary
Angle, cranial +) about +x; (0, 0) is the posterior-anterior beam. With R = Rz(azimuth) . Rx(elevation):

- source direction ``s = R (0,-1,0)``, source ``S = iso + SAD s``, detector centre ``D = iso - (SDD - SAD) s``;
- detector column axis ``u = R (-1,0,0)``, row axis ``v = R (0,0,-1)``, so a (0, 0) image shows the patient's
  right on the left and the head at the top, like a PA chest film (DICOM Patient Orientation ``L\\F``);
- pixel (col i, row j) sits at ``D + (i-(W-1)/2) du u + (j-(H-1)/2) dv v``; arrays are indexed ``[row, col]``.

SV-DRR's LIDC-IDRI-DRR views are DiffDRR poses ``euler_angles`` ZXY ``[phi, theta, 0]`` (radians) with the
translation ``[0, -1650, 0]`` and ``orientation="PA"``; :func:`from_svdrr_angles` converts them to ours.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

from .resources import load_json


class GeometryError(ValueError):
    """A geometry that cannot describe a real C-arm (the message says which parameter and why)."""


def rotation(azimuth: float, elevation: float) -> np.ndarray:
    """R = Rz(azimuth) . Rx(elevation), angles in degrees, right-handed about the RAS axes."""
    a, e = math.radians(azimuth), math.radians(elevation)
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(e), -math.sin(e)], [0.0, math.sin(e), math.cos(e)]])
    return rz @ rx


@dataclass(frozen=True)
class CArmGeometry:
    """One C-arm view. ``detector`` is (columns W, rows H) in pixels and ``pixel`` is (du, dv) in mm."""

    azimuth: float = 0.0
    elevation: float = 0.0
    sad: float = 1650.0
    sdd: float = 1800.0
    detector: tuple[int, int] = (512, 512)
    pixel: tuple[float, float] = (0.7, 0.7)
    isocenter: tuple[float, float, float] = (0.0, 0.0, 0.0)
    preset_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        obj = object.__setattr__
        obj(self, "azimuth", float(self.azimuth))
        obj(self, "elevation", float(self.elevation))
        obj(self, "sad", float(self.sad))
        obj(self, "sdd", float(self.sdd))
        obj(self, "isocenter", tuple(float(x) for x in np.asarray(self.isocenter).reshape(-1)))
        obj(self, "pixel", tuple(float(x) for x in self.pixel))
        obj(self, "detector", tuple(self.detector))
        self._validate()

    def _validate(self) -> None:
        numbers = [self.azimuth, self.elevation, self.sad, self.sdd, *self.pixel, *self.isocenter]
        if not all(math.isfinite(x) for x in numbers):
            raise GeometryError("geometry values must be finite numbers")
        if len(self.isocenter) != 3:
            raise GeometryError(f"isocenter must have 3 coordinates (R, A, S), got {len(self.isocenter)}")
        if not (-360.0 <= self.azimuth <= 360.0 and -180.0 <= self.elevation <= 180.0):
            raise GeometryError(f"angles out of range: azimuth {self.azimuth} (-360..360), "
                                f"elevation {self.elevation} (-180..180) degrees")
        if not 10.0 <= self.sad <= 10000.0:
            raise GeometryError(f"source-to-isocenter distance {self.sad} mm is absurd (expected 10-10000 mm)")
        if not self.sad < self.sdd <= 20000.0:
            raise GeometryError(f"source-to-detector distance {self.sdd} mm must exceed SAD {self.sad} mm "
                                "and be at most 20000 mm")
        if len(self.detector) != 2 or any(int(n) != n or not 1 <= n <= 8192 for n in self.detector):
            raise GeometryError(f"detector size must be two whole numbers of pixels in 1-8192, got {self.detector}")
        if len(self.pixel) != 2 or not all(1e-3 <= p <= 100.0 for p in self.pixel):
            raise GeometryError(f"detector pixel size {self.pixel} mm is absurd (expected 0.001-100 mm)")

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, isocenter: Sequence[float] | None = None, **overrides) -> "CArmGeometry":
        """A geometry from ``Resources/presets/geometry.json``; keyword arguments override any field."""
        presets = preset_names()
        if name not in presets:
            raise GeometryError(f"unknown geometry preset {name!r}; choose one of {', '.join(presets)}")
        p = load_json("presets", "geometry.json")[name]
        values = dict(sad=p["sad"], sdd=p["sdd"], detector=tuple(p["detector"]), pixel=tuple(p["pixel"]))
        if isocenter is not None:
            values["isocenter"] = tuple(isocenter)
        values.update(overrides)
        return cls(preset_name=name, **values)

    def with_view(self, azimuth: float, elevation: float = 0.0) -> "CArmGeometry":
        return replace(self, azimuth=azimuth, elevation=elevation)

    def replace(self, **changes) -> "CArmGeometry":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Everything needed to reproduce or use this view, JSON-ready (``views.json``, MRML attributes)."""
        d = asdict(self)
        d.update(detector=list(self.detector), pixel=list(self.pixel), isocenter=list(self.isocenter),
                 source=self.source.tolist(), detector_center=self.detector_center.tolist(),
                 projection_matrix=self.projection_matrix.tolist(),
                 detector_ijk_to_ras=self.detector_ijk_to_ras.tolist())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CArmGeometry":
        keys = ("azimuth", "elevation", "sad", "sdd", "detector", "pixel", "isocenter", "preset_name")
        return cls(**{k: (tuple(d[k]) if isinstance(d[k], list) else d[k]) for k in keys if k in d})

    # -- derived geometry -----------------------------------------------------------------------------------
    @property
    def rotation(self) -> np.ndarray:
        return rotation(self.azimuth, self.elevation)

    @property
    def source_direction(self) -> np.ndarray:
        """Unit vector from the isocenter towards the source."""
        return self.rotation @ np.array([0.0, -1.0, 0.0])

    @property
    def source(self) -> np.ndarray:
        return np.asarray(self.isocenter) + self.sad * self.source_direction

    @property
    def detector_center(self) -> np.ndarray:
        return np.asarray(self.isocenter) - (self.sdd - self.sad) * self.source_direction

    @property
    def u(self) -> np.ndarray:
        """Detector column axis (direction of increasing column index)."""
        return self.rotation @ np.array([-1.0, 0.0, 0.0])

    @property
    def v(self) -> np.ndarray:
        """Detector row axis (direction of increasing row index)."""
        return self.rotation @ np.array([0.0, 0.0, -1.0])

    @property
    def shape(self) -> tuple[int, int]:
        """Image array shape (rows, cols)."""
        return int(self.detector[1]), int(self.detector[0])

    @property
    def detector_ijk_to_ras(self) -> np.ndarray:
        """4x4 placing image voxel (col i, row j, k) on the detector; k runs along u x v, i.e. towards the source."""
        w, h = self.detector
        du, dv = self.pixel
        m = np.eye(4)
        m[:3, 0] = self.u * du
        m[:3, 1] = self.v * dv
        m[:3, 2] = np.cross(self.u, self.v)
        m[:3, 3] = self.detector_center - (w - 1) / 2 * du * self.u - (h - 1) / 2 * dv * self.v
        return m

    def pixel_centers(self) -> np.ndarray:
        """RAS position of every pixel centre, shape (rows, cols, 3)."""
        w, h = self.detector
        m = self.detector_ijk_to_ras
        jj, ii = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        return m[:3, 3] + ii[..., None] * m[:3, 0] + jj[..., None] * m[:3, 1]

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Ray origins (the source) and unnormalized directions to each pixel centre, both (rows*cols, 3).

        A ray point is ``origin + t * direction`` with t in [0, 1] between source and detector.
        """
        targets = self.pixel_centers().reshape(-1, 3)
        origins = np.broadcast_to(self.source, targets.shape)
        return origins, targets - self.source

    @property
    def intrinsics(self) -> np.ndarray:
        w, h = self.detector
        du, dv = self.pixel
        return np.array([[self.sdd / du, 0.0, (w - 1) / 2], [0.0, self.sdd / dv, (h - 1) / 2], [0.0, 0.0, 1.0]])

    @property
    def projection_matrix(self) -> np.ndarray:
        """3x4 matrix P with ``P @ (r, a, s, 1) ~ (col, row, 1)``: pinhole at the source, looking along -s."""
        rc = np.stack([self.u, self.v, -self.source_direction])
        return self.intrinsics @ np.hstack([rc, (-rc @ self.source)[:, None]])

    def project(self, points_ras: np.ndarray) -> np.ndarray:
        """Pixel coordinates (col, row) of RAS points, shape (..., 2)."""
        pts = np.asarray(points_ras, dtype=np.float64)
        h = np.concatenate([pts, np.ones(pts.shape[:-1] + (1,))], axis=-1) @ self.projection_matrix.T
        return h[..., :2] / h[..., 2:3]

    def positioner_angles_from_source(self, source_ras: Sequence[float]) -> tuple[float, float]:
        """Angles that put the source on the ray from the isocenter through ``source_ras`` (dragging the source)."""
        d = np.asarray(source_ras, dtype=np.float64) - np.asarray(self.isocenter)
        n = np.linalg.norm(d)
        if n < 1e-6:
            raise GeometryError("the source cannot sit on the isocenter")
        d /= n
        elevation = math.degrees(math.asin(max(-1.0, min(1.0, -d[2]))))
        azimuth = math.degrees(math.atan2(d[0], -d[1]))
        return azimuth, elevation


def preset_names() -> list[str]:
    return [k for k in load_json("presets", "geometry.json") if not k.startswith("_")]


def from_svdrr_angles(theta: float, phi: float) -> tuple[float, float]:
    """(azimuth, elevation) in degrees of the LIDC-IDRI-DRR view stored as (theta, phi) radians in SV-DRR's
    ``camera_views.json`` (rendered by ``scripts/create_drr_img.py`` as DiffDRR ZXY Euler ``[phi, theta, 0]``,
    radians, translation ``[0, -1650, 0]``, volume read with ``orientation="PA"`` and centred on its centre).

    The mapping is the identity up to units and order: azimuth = phi and elevation = theta, both converted from
    radians to degrees, same signs, with the azimuth wrapped into (-180, 180]. Phi turns the C-arm about the
    patient's superior axis exactly as our azimuth does (phi > 0 moves the source towards the patient's right,
    i.e. LAO), and theta tilts it about the patient's right-left axis as our elevation does (theta > 0 moves the
    source towards the feet, i.e. cranial): DiffDRR's pose is R = Rz(phi) Rx(theta), our R = Rz(az) Rx(el),
    and its "PA" frame change maps its camera onto ours with the same source, detector and pixel axes. Their PNGs
    (``plt.imsave``, row 0 at the top) are in our orientation: no left-right or up-down flip, no transpose
    (patient's right on the image's left, head at the top for (0, 0)). SV-DRR's README calls this convention
    "opposite to the intuitive one" (theta grows downwards, phi grows turning left); that is a statement about
    their viewer, not a flip between their images and ours. The isocenter is the CT's centre
    (``CTVolume.center_ras``). Pinned by ``Testing/test_svdrr_parity.py`` against DiffDRR itself (Pearson r > 0.9999
    after per-image min-max at 512 px)."""
    azimuth = math.degrees(phi)
    azimuth = azimuth - 360.0 * math.ceil((azimuth - 180.0) / 360.0)
    return azimuth, math.degrees(theta)


# -- view sets ----------------------------------------------------------------------------------------------
#: The most views one view set may hold (far beyond any orbit a user renders; a typo must not exhaust memory).
MAX_VIEWS = 100000


def arc(start: float = -90.0, stop: float = 90.0, step: float = 5.0,
        elevation: float = 0.0) -> list[tuple[float, float]]:
    """Azimuths from ``start`` to ``stop`` inclusive (SV-DRR's "simple" set is arc(-90, 90, 5): 37 views)."""
    if not all(math.isfinite(x) for x in (start, stop, step, elevation)) or step <= 0 or stop < start:
        raise GeometryError(f"an arc needs start <= stop and a positive step, got {start}:{stop}:{step}")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    if n > MAX_VIEWS:  # counted before anything is built
        raise GeometryError(f"the arc {start:g}:{stop:g}:{step:g} has {n} views; at most {MAX_VIEWS} are allowed")
    return [(start + i * step, float(elevation)) for i in range(n)]


def hemisphere(n: int) -> list[tuple[float, float]]:
    """``n`` source directions spread evenly (Fibonacci lattice) over the posterior hemisphere, PA first.

    Points are equal-area: cos of the angle from the PA axis falls linearly from 1 to 0 while the longitude
    advances by the golden angle, like SV-DRR's "hemisphere" evaluation set.
    """
    if not 1 <= n <= MAX_VIEWS:
        raise GeometryError(f"hemisphere view count must be 1-{MAX_VIEWS}, got {n}")
    golden = math.pi * (3.0 - math.sqrt(5.0))
    views = []
    for i in range(n):
        c = 1.0 - i / n  # cos(angle from PA): the first view is exactly PA
        r = math.sqrt(max(0.0, 1.0 - c * c))
        x, z = r * math.cos(i * golden), r * math.sin(i * golden)
        views.append((math.degrees(math.atan2(x, c)) + 0.0, math.degrees(math.asin(-z)) + 0.0))  # no -0.0
    return views


def parse_view_set(spec: str) -> list[tuple[float, float]]:
    """``arc:START:STOP:STEP[:ELEV]`` or ``hemisphere:N`` (the command-line and batch spelling of a view set)."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "arc":
            parts = [float(x) for x in rest.split(":")]
            if len(parts) not in (3, 4):
                raise ValueError("expected START:STOP:STEP[:ELEVATION]")
            return arc(*parts)
        if kind == "hemisphere":
            return hemisphere(int(rest))
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"bad view set {spec!r}: {exc}") from None
    raise GeometryError(f"bad view set {spec!r}: use arc:START:STOP:STEP or hemisphere:N")


def views(base: CArmGeometry, angles: Iterable[tuple[float, float]]) -> list[CArmGeometry]:
    return [base.with_view(a, e) for a, e in angles]
