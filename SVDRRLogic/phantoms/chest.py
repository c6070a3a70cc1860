"""A procedural chest CT in Hounsfield units: a realistic-looking input for DRRs when no patient CT is at hand.

Demos, command-line smoke runs and pipeline tests need a CT whose DRRs look like chest radiographs (lungs, heart
shadow, mediastinum, spine, ribs, clavicles, scapulae, diaphragm domes) but that ships no patient data and builds in
a second or two. Anatomy is defined in RAS millimetres around the origin (+x patient Right, +y Anterior,
+z Superior), drawn from a seed within plausible adult ranges, and sampled on the requested grid; it is not tied
to the grid, so a coarser spacing gives the same patient at lower resolution.

Storage follows a DICOM axial CT: ``ijk_to_ras = diag(-di, -dj, dk)`` (column i towards the patient's left, row j
towards posterior, slice k towards the head), with the grid centred on RAS (0, 0, 0). The heart and aortic arch
lie on the patient's left (x < 0), the spine posterior (y < 0). No table, no arms.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from ..images import CTVolume
from .analytic import Ellipsoid

LABELS = {
    "air": 0, "fat": 1, "muscle": 2, "mediastinum": 3, "lung": 4, "lung_vessel": 5, "airway": 6, "airway_wall": 7,
    "heart": 8, "aorta": 9, "esophagus": 10, "vertebra": 11, "disc": 12, "spinal_canal": 13, "rib": 14,
    "costal_cartilage": 15, "sternum": 16, "clavicle": 17, "scapula": 18, "liver": 19, "abdomen": 20,
    "stomach_gas": 21, "great_vessel": 22,
}

# Angular end of each rib's bone and of its costal cartilage, ribs 1-12, measured around the rib cage from the
# posterior midline (0) through the side (pi/2) to the sternum (pi): true ribs 1-7 reach the sternum through
# cartilage, 8-10 end in cartilage short of it, 11-12 float.
_RIB_BONE_END = np.array([2.55, 2.45, 2.4, 2.35, 2.3, 2.25, 2.2, 2.1, 2.0, 1.9, 1.65, 1.35])
_RIB_END = np.concatenate([np.full(7, np.pi - 0.12), _RIB_BONE_END[7:10] + 0.35, _RIB_BONE_END[10:]])
_RIB_START = 0.25  # where the ribs leave the transverse processes

_SLAB_VOXELS = 1 << 20  # voxels painted at once: bounds temporaries to a few tens of MB at any volume size


class _Window(NamedTuple):
    """Part of a slab inside a RAS box: its index and the RAS coordinates of its columns, rows and slices,
    shaped to broadcast to (slices, rows, columns)."""

    index: tuple[slice, slice, slice]
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray


class _Slab:
    """A run of slices being painted: HU and label arrays with the RAS coordinate of every column, row, slice."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        self.x, self.y, self.z = x, y, z
        self.hu = np.full((len(z), len(y), len(x)), -1000.0, dtype=np.float32)
        self.label = np.zeros(self.hu.shape, dtype=np.uint8)

    def window(self, lo: Sequence[float], hi: Sequence[float]) -> _Window | None:
        """The voxels whose centres lie in the RAS box [lo, hi], or None if there are none.

        Painting only inside each structure's box is what keeps the phantom fast: most structures are small.
        """
        index = []
        for v, a, b in zip((self.z, self.y, self.x), lo[::-1], hi[::-1]):
            hit = np.flatnonzero((v >= a) & (v <= b))
            if not hit.size:
                return None
            index.append(slice(hit[0], hit[-1] + 1))
        kz, jy, ix = index
        return _Window(tuple(index), self.x[ix][None, None, :], self.y[jy][None, :, None], self.z[kz][:, None, None])

    def everywhere(self) -> _Window:
        return self.window((-np.inf,) * 3, (np.inf,) * 3)

    def paint(self, w: _Window, mask: np.ndarray, hu, label: str) -> None:
        """Set HU (a number or an array broadcastable to the window) and the label where ``mask`` holds."""
        np.copyto(self.hu[w.index], hu, where=mask, casting="unsafe")
        np.copyto(self.label[w.index], LABELS[label], where=mask)

    def has(self, w: _Window, label: str) -> np.ndarray:
        return self.label[w.index] == LABELS[label]


def _segment_distance(w: _Window, p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each voxel of ``w`` to the segment p0-p1, and the segment parameter (0..1) of the nearest point."""
    v = p1 - p0
    dx, dy, dz = w.x - p0[0], w.y - p0[1], w.z - p0[2]
    t = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) / max(float(v @ v), 1e-12), 0.0, 1.0)
    return np.sqrt((dx - t * v[0]) ** 2 + (dy - t * v[1]) ** 2 + (dz - t * v[2]) ** 2), t


def _tube(slab: _Slab, p0, p1, r0: float, r1: float, hu, label: str, only_in: str | None = None) -> None:
    """Paint a tapered capsule (radius r0 at p0 to r1 at p1), optionally only over voxels labelled ``only_in``."""
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    r = max(r0, r1)
    w = slab.window(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
    if w is None:
        return
    d, t = _segment_distance(w, p0, p1)
    mask = d <= r0 + (r1 - r0) * t
    if only_in is not None:
        mask &= slab.has(w, only_in)
    slab.paint(w, mask, hu, label)


def _bone_tube(slab: _Slab, p0, p1, radius: float, label: str, cortex_hu: float, marrow_hu: float,
               cortex_mm: float = 1.5) -> None:
    """A tubular bone: dense cortex around cancellous marrow (what makes bone edges bright on radiographs)."""
    _tube(slab, p0, p1, radius, radius, cortex_hu, label)
    _tube(slab, p0, p1, radius - cortex_mm, radius - cortex_mm, marrow_hu, label)


def _ellipsoid(slab: _Slab, e: Ellipsoid, hu, label: str, only_in: str | None = None) -> None:
    w = slab.window(*e.bounds())
    if w is None:
        return
    mask = e.radius(w.x, w.y, w.z) <= 1.0
    if only_in is not None:
        mask &= slab.has(w, only_in)
    slab.paint(w, mask, hu, label)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


class _SmoothNoise:
    """Zero-mean, unit-variance noise correlated over ~``step`` mm (lung texture), fixed in RAS space.

    Gaussian-smoothed noise on a coarse grid over a box larger than any chest (so the texture does not depend on
    the sampling grid), interpolated trilinearly. The interpolation is separable: the in-plane part is done
    once for the grid's columns ``x`` and rows ``y``, and each slab then needs one small matrix product.
    """

    def __init__(self, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, step: float = 7.0,
                 half_extent: Sequence[float] = (300.0, 250.0, 250.0)):
        self.step = step
        self.lo = [-h for h in half_extent]  # (z, y, x)
        n = [int(np.ceil(2 * h / step)) + 1 for h in half_extent]
        coarse = gaussian_filter(rng.standard_normal(n), 1.0, mode="wrap")
        coarse /= coarse.std()
        plane = coarse @ self._hat(x, self.lo[2], n[2]).T                  # (z, y, columns)
        self.plane = (self._hat(y, self.lo[1], n[1]) @ plane).astype(np.float32)   # (z, rows, columns)

    def _hat(self, v: np.ndarray, lo: float, n: int) -> np.ndarray:
        pos = (v - lo) / self.step
        return np.clip(1.0 - np.abs(pos[:, None] - np.arange(n)[None, :]), 0.0, None)

    def sample(self, z: np.ndarray) -> np.ndarray:
        """The noise at every (z, row, column) of the grid for the given slice positions, (len(z), nj, ni)."""
        weights = self._hat(z, self.lo[0], self.plane.shape[0]).astype(np.float32)
        return np.tensordot(weights, self.plane, axes=1)


class _Chest:
    """One random patient: every anatomical parameter is drawn here, then any slab of the grid can be painted."""

    def __init__(self, rng: np.random.Generator, x: np.ndarray, y: np.ndarray):
        u = rng.uniform
        size = u(0.92, 1.08)
        self.body_a = 158.0 * size * u(0.95, 1.05)        # half-width, left-right
        self.body_b = 108.0 * size * u(0.95, 1.05)        # half-depth, anterior
        self.body_b_post = 0.96 * self.body_b             # the back is a little flatter
        self.fat = u(8.0, 18.0)
        self.cage_a, self.cage_b = 0.78 * self.body_a, 0.74 * self.body_b   # rib centreline ellipse
        self.cage_y = 0.08 * self.body_b
        self.pitch = 25.0 * size * u(0.96, 1.04)          # vertebral level spacing
        self.z_t1 = 5.5 * self.pitch + u(-10.0, 10.0)     # level of T1 (mid-chest near z = 0)
        self.rib_drop = u(55.0, 75.0) * size              # how much lower a rib's anterior end is
        self.dome_right = self.z_t1 - 8.3 * self.pitch + u(-10.0, 10.0)
        self.dome_left = self.dome_right - u(8.0, 22.0)
        self.dome_depth = u(45.0, 65.0)
        self.apex_z = self.z_t1 + u(5.0, 20.0)
        self.lung_hu = u(-875.0, -835.0)
        self.blood_hu = u(150.0, 250.0) if rng.random() < 0.5 else u(35.0, 50.0)   # with or without contrast
        self.spine_y0 = -0.33 * self.body_b
        self.kyphosis = u(3.0, 8.0)
        self.cancellous_hu = u(150.0, 260.0)
        self.noise_hu = u(10.0, 20.0)

        front = self.spine_y(self.z_t1 - 4 * self.pitch) + self.vertebra_radii(self.z_t1 - 4 * self.pitch)[1]
        self.carina = np.array([u(-3.0, 3.0), front + 26.0, self.z_t1 - 4.0 * self.pitch + u(-8.0, 8.0)])
        cx, ty, cz = self.carina

        self.heart = Ellipsoid(
            center=(-0.22 * self.cage_a + u(-8.0, 8.0), self.cage_y + 0.22 * self.cage_b,
                    self.dome_left + 38.0 + u(-5.0, 5.0)),
            semi_axes=np.array([68.0, 48.0, 44.0]) * size * u(0.9, 1.1, 3),
            value=0.0, rotation=self._frame((-0.62, 0.5, -0.6) + rng.normal(0.0, 0.08, 3)))
        hc = self.heart.center
        desc_y = self.spine_y(cz) + self.vertebra_radii(cz)[1] - 2.0
        top, bottom = self.z_t1 + 150.0, self.z_t1 - 450.0   # beyond any field of view: tubes leave the volume
        self.aorta = [((hc[0] + 30, hc[1] - 5, hc[2] + 25), 14.0), ((14.0, ty + 32, cz + 5), 14.0),
                      ((2.0, ty + 26, cz + 30), 13.0), ((-24.0, ty + 4, cz + 30), 12.5),
                      ((-28.0, desc_y, cz + 5), 11.5), ((-24.0, desc_y + 2, bottom), 10.5)]
        left_lower = self.carina + (-34.0, -8.0, -34.0)
        right_main = self.carina + (12.0, -3.0, -22.0)
        self.airways = [  # (start, end, lumen radius): trachea, main, lobar bronchi
            ((cx, ty + 12.0, top), self.carina, 8.5), (self.carina, right_main, 6.5), (self.carina, left_lower, 6.0),
            (right_main, right_main + (30.0, 0.0, 4.0), 4.5), (right_main, right_main + (18.0, -6.0, -42.0), 5.0),
            (left_lower, left_lower + (-22.0, 10.0, 12.0), 4.5), (left_lower, left_lower + (-14.0, -10.0, -40.0), 4.5)]
        oes_y = self.spine_y(cz) + self.vertebra_radii(cz)[1] + 7.0
        self.esophagus = ((-3.0, oes_y + 8.0, top), (-14.0, oes_y + 4.0, self.dome_left - 20.0))
        hila = right_main + (25.0, -2.0, -10.0), left_lower + (-12.0, -2.0, 0.0)
        self.vessels = self._vessel_tree(rng, hila[0], +1) + self._vessel_tree(rng, hila[1], -1)
        bifurcation = np.array([-10.0, ty + 22.0, cz - 12.0])
        self.great_vessels = [  # (start, end, r0, r1): SVC, arch branches, pulmonary trunk and arteries
            ((0.17 * self.cage_a + 3.0, ty + 18.0, top), (0.15 * self.cage_a, ty + 22.0, hc[2] + 30.0), 10.0, 10.0),
            ((2.0, ty + 26.0, cz + 30.0), (14.0, ty + 18.0, top), 6.5, 6.0),
            ((-8.0, ty + 20.0, cz + 32.0), (-12.0, ty + 14.0, top), 4.5, 4.5),
            ((-24.0, ty + 4.0, cz + 30.0), (-34.0, ty + 2.0, top), 5.5, 5.5),
            ((hc[0] + 18.0, hc[1] + 18.0, hc[2] + 30.0), bifurcation, 13.0, 12.0),
            (bifurcation, hila[0], 10.0, 8.0), (bifurcation, hila[1], 10.0, 8.0)]
        self.stomach = None if rng.random() < 0.2 else Ellipsoid(
            center=(-0.45 * self.cage_a, self.cage_y + 0.15 * self.cage_b, self.dome_left - 28.0),
            semi_axes=(u(20.0, 35.0), u(18.0, 28.0), u(10.0, 16.0)), value=0.0)
        notch = self.z_t1 - 1.5 * self.pitch
        self.sternum_z = (self.z_t1 - 9.2 * self.pitch, notch)
        self.clavicle_z = notch + u(5.0, 12.0)
        self.scapula_z = (self.z_t1 - 6.5 * self.pitch + u(-8.0, 8.0), self.z_t1 - 0.3 * self.pitch)
        self.texture = _SmoothNoise(rng, x, y)

    # -- shape functions of z, used by several structures -----------------------------------------------------
    def cage_scale(self, z):
        """The rib cage (and the pleura inside it) widens from the thoracic inlet down to about T9."""
        t = np.clip((self.z_t1 + 20.0 - z) / (8.0 * self.pitch), 0.0, 1.0)
        return 0.5 + 0.5 * (1.0 - (1.0 - t) ** 2)

    def spine_y(self, z):
        """AP position of the vertebral bodies' centres: the thoracic kyphosis bows the mid-spine backwards."""
        return self.spine_y0 - self.kyphosis * (1.0 - np.clip((z / (6.0 * self.pitch)) ** 2, 0.0, 1.0))

    def vertebra_radii(self, z):
        """Vertebral bodies grow from T1 to T12."""
        f = np.clip((self.z_t1 - z) / (11.0 * self.pitch), 0.0, 1.0)
        return 14.0 + 8.0 * f, 11.0 + 6.0 * f

    def diaphragm(self, x, y):
        """Height of the diaphragm: two domes, the right one higher (the liver beneath it)."""
        def dome(top, side):
            return top - self.dome_depth * (((x - side * 0.45 * self.cage_a) / (0.6 * self.cage_a)) ** 2
                                            + ((y - self.cage_y + 0.1 * self.cage_b) / (0.9 * self.cage_b)) ** 2)
        return np.maximum(dome(self.dome_right, 1.0), dome(self.dome_left, -1.0))

    @staticmethod
    def _frame(long_axis) -> np.ndarray:
        """Rotation whose first column is ``long_axis``: orients an ellipsoid (the heart) along it."""
        u1 = _unit(long_axis)
        u2 = _unit(np.cross((0.0, 0.0, 1.0), u1))
        return np.column_stack([u1, u2, np.cross(u1, u2)])

    @staticmethod
    def _vessel_tree(rng: np.random.Generator, hilum, side: float) -> list:
        """Pulmonary vessels fanning out of a hilum: primaries with two children each, tapering to ~1 mm."""
        segments = []
        for _ in range(14):
            direction = _unit((side * rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-1.0, 1.0)))
            length, r0 = rng.uniform(45.0, 90.0), rng.uniform(3.0, 4.5)
            end = hilum + length * direction
            segments.append((hilum, end, r0, 1.4))
            for _ in range(2):
                t = rng.uniform(0.35, 0.75)
                child = _unit(direction + rng.normal(0.0, 0.6, 3))
                start = hilum + t * length * direction
                segments.append((start, start + rng.uniform(25.0, 50.0) * child, 0.7 * (r0 + (1.4 - r0) * t), 1.0))
        return segments

    # -- painting, in order: later structures overwrite earlier ones ------------------------------------------
    def paint(self, s: _Slab) -> None:
        self._body(s)
        self._cavity(s)
        for p0, p1, r0, r1 in self.vessels:
            _tube(s, p0, p1, r0, r1, 40.0, "lung_vessel", only_in="lung")
        _tube(s, *self.esophagus, 7.0, 7.0, 35.0, "esophagus")
        self._heart(s)
        for p0, p1, r0, r1 in self.great_vessels:
            _tube(s, p0, p1, r0, r1, self.blood_hu, "great_vessel")
        for (p0, r0), (p1, r1) in zip(self.aorta, self.aorta[1:]):
            _tube(s, p0, p1, r0, r1, self.blood_hu, "aorta")
        for p0, p1, r in self.airways:
            _tube(s, p0, p1, r + 1.8, r + 1.8, 70.0, "airway_wall")
        for p0, p1, r in self.airways:
            _tube(s, p0, p1, r, r, -1000.0, "airway")
        self._spine(s)
        self._cage(s)
        self._clavicles(s)

    def _body(self, s: _Slab) -> None:
        w = s.everywhere()
        for shrink, hu, label in ((0.0, -100.0, "fat"), (self.fat, 45.0, "muscle")):
            b = np.where(w.y >= 0, self.body_b, self.body_b_post) - shrink
            inside = (w.x / (self.body_a - shrink)) ** 2 + (w.y / b) ** 2 <= 1.0
            s.paint(w, inside, hu, label)

    def _cavity(self, s: _Slab) -> None:
        """Pleural cavity above the diaphragm (lungs, mediastinum) and the upper abdomen below it."""
        w = s.window((-self.cage_a, self.cage_y - self.cage_b, -np.inf),
                     (self.cage_a, self.cage_y + self.cage_b, np.inf))
        if w is None:
            return
        scale = self.cage_scale(w.z)
        a, b = self.cage_a * scale - 9.0, self.cage_b * scale - 9.0   # the pleura lies inside the ribs
        pleura = (w.x / a) ** 2 + ((w.y - self.cage_y) / b) ** 2 <= 1.0
        floor = self.diaphragm(w.x, w.y)
        above = pleura & (w.z >= floor)
        liver = pleura & (w.z < floor) & (w.x > -20.0 - 0.5 * np.maximum(w.y - self.cage_y, 0.0))
        s.paint(w, pleura & (w.z < floor), 30.0, "abdomen")
        s.paint(w, liver, 55.0, "liver")
        if self.stomach is not None:
            _ellipsoid(s, self.stomach, -1000.0, "stomach_gas", only_in="abdomen")
        s.paint(w, above, -40.0, "mediastinum")

        medial = np.where(w.y > self.carina[1], 10.0, 6.0)
        apex = self.apex_z - ((np.abs(w.x) - 0.35 * self.cage_a) ** 2
                              + (w.y - self.cage_y + 0.2 * self.cage_b) ** 2) / 80.0
        lung = above & (np.abs(w.x) > medial) & (w.z <= apex)
        if lung.any():
            texture = self.texture.sample(s.z[w.index[0]])[:, w.index[1], w.index[2]]
            dependent = 0.25 * np.clip(self.cage_y - w.y, -80.0, 80.0)  # posterior lung is denser (gravity)
            s.paint(w, lung, self.lung_hu + 35.0 * texture + dependent, "lung")

    def _heart(self, s: _Slab) -> None:
        """Pericardial fat, myocardium, and the blood pool inside it."""
        for grow, hu, label in ((4.0, -80.0, "fat"), (0.0, 45.0, "heart"), (-9.0, self.blood_hu, "heart")):
            e = Ellipsoid(self.heart.center, self.heart.semi_axes + grow, 0.0, self.heart.rotation)
            _ellipsoid(s, e, hu, label)

    def _spine(self, s: _Slab) -> None:
        """Vertebral bodies (cortex and cancellous bone), discs, canal and neural arches as functions of z, then
        each level's spinous and transverse processes."""
        y_lo = -self.body_b_post
        w = s.window((-45.0, y_lo, -np.inf), (45.0, self.spine_y0 + 25.0, np.inf))
        if w is None:
            return
        rx, ry = self.vertebra_radii(w.z)
        yv = self.spine_y(w.z)
        level = (self.z_t1 - w.z) / self.pitch
        dz = np.abs(level - np.round(level)) * self.pitch       # distance from the level's mid-plane
        half_height = 0.4 * self.pitch                          # the remaining fifth of the pitch is disc
        column = (w.x / rx) ** 2 + ((w.y - yv) / ry) ** 2 <= 1.0
        core = ((w.x / (rx - 2.0)) ** 2 + ((w.y - yv) / (ry - 2.0)) ** 2 <= 1.0) & (dz <= half_height - 1.5)
        s.paint(w, column & (dz > half_height), 90.0, "disc")
        s.paint(w, column & (dz <= half_height), 800.0, "vertebra")
        s.paint(w, core, self.cancellous_hu, "vertebra")

        r_canal = 8.0
        y_canal = yv - ry - r_canal - 1.0
        rr = np.sqrt(w.x ** 2 + (w.y - y_canal) ** 2)
        s.paint(w, rr <= r_canal, 20.0, "spinal_canal")
        arch = (rr > r_canal) & (rr <= r_canal + 5.0) & (w.y <= yv - ry + 2.0) & (dz <= half_height)
        s.paint(w, arch, 600.0, "vertebra")

        skin = -self.body_b_post + 14.0
        for n in range(int(np.floor((self.z_t1 - s.z.max()) / self.pitch)) - 1,
                       int(np.ceil((self.z_t1 - s.z.min()) / self.pitch)) + 2):
            zn = self.z_t1 - n * self.pitch
            ryn = self.vertebra_radii(zn)[1]
            yc = self.spine_y(zn) - ryn - r_canal - 1.0
            root = yc - r_canal - 3.0
            length = min(25.0, root - skin)
            _bone_tube(s, (0.0, root, zn), (0.0, root - length, zn - 0.8 * length), 4.0, "vertebra", 900.0, 300.0)
            for side in (1.0, -1.0):
                _bone_tube(s, (side * (r_canal + 2.0), yc, zn + 2.0), (side * (r_canal + 22.0), yc - 7.0, zn + 5.0),
                           5.0, "vertebra", 900.0, 300.0)

    def _cage(self, s: _Slab) -> None:
        """Ribs, costal cartilage, scapulae and sternum, painted in rib-cage coordinates.

        Around the cage ellipse (scaled with z), phi runs from the posterior midline (0) to the sternum (pi) on each
        side, and dr is the outward distance from the rib centreline. Rib n leaves the spine at its vertebral
        level and descends by ``rib_drop`` towards the front, so one rounding of a continuous rib index finds the
        rib nearest to every voxel at once, with no loop over ribs.
        """
        margin = 25.0
        w = s.window((-self.cage_a - margin, self.cage_y - self.cage_b - margin, -np.inf),
                     (self.cage_a + margin, self.cage_y + self.cage_b + margin, np.inf))
        if w is None:
            return
        scale = self.cage_scale(w.z)
        a, b = self.cage_a * scale, self.cage_b * scale
        ax, ay = np.abs(w.x) / a, (w.y - self.cage_y) / b
        phi = np.arctan2(ax, -ay)
        dr = (np.sqrt(ax ** 2 + ay ** 2) - 1.0) * np.sqrt((a * np.sin(phi)) ** 2 + (b * np.cos(phi)) ** 2)

        z0, z1 = self.scapula_z
        lateral = 0.42 + 0.95 * np.clip((w.z - z0) / (z1 - z0), 0.0, 1.0) ** 0.7
        scapula = (dr >= 14.0) & (dr <= 19.0) & (phi >= 0.42) & (phi <= lateral) & (w.z >= z0) & (w.z <= z1)
        s.paint(w, scapula, 650.0, "scapula")

        drop = self.rib_drop * np.clip((phi - _RIB_START) / (np.pi - _RIB_START), 0.0, 1.0) ** 1.4
        level = (self.z_t1 - w.z - drop) / self.pitch + 1.0
        n = np.rint(level)
        dz = (level - n) * self.pitch
        index = np.clip(n.astype(int), 1, 12) - 1
        rib = ((dr / 4.5) ** 2 + (dz / 6.5) ** 2 <= 1.0) & (n >= 1) & (n <= 12) & (phi >= _RIB_START)
        bone = rib & (phi <= _RIB_BONE_END[index])
        s.paint(w, rib & ~bone & (phi <= _RIB_END[index]), 120.0, "costal_cartilage")
        s.paint(w, bone, 950.0, "rib")
        s.paint(w, bone & ((dr / 3.0) ** 2 + (dz / 5.0) ** 2 <= 1.0), 250.0, "rib")

        bottom, notch = self.sternum_z
        y_front = self.cage_y + b
        half_width = np.where(w.z > notch - 2.0 * self.pitch, 25.0, 15.0)
        sternum = (np.abs(w.x) <= half_width) & (np.abs(w.y - y_front) <= 6.0) & (w.z >= bottom) & (w.z <= notch)
        core = (np.abs(w.x) <= half_width - 1.5) & (np.abs(w.y - y_front) <= 4.5)
        s.paint(w, sternum, 700.0, "sternum")
        s.paint(w, sternum & core, 330.0, "sternum")

    def _clavicles(self, s: _Slab) -> None:
        """S-shaped clavicles from the sternal notch over the lung apices to the shoulders."""
        zc = self.clavicle_z
        front = self.cage_y + self.cage_b * float(self.cage_scale(self.sternum_z[1]))
        for side in (1.0, -1.0):
            points = [(side * 22.0, front + 2.0, zc), (side * 0.5 * self.cage_a, front - 5.0, zc + 10.0),
                      (side * (self.cage_a + 10.0), self.cage_y - 0.3 * self.cage_b, zc + 22.0)]
            for p0, p1 in zip(points, points[1:]):
                _bone_tube(s, p0, p1, 7.0, "clavicle", 1000.0, 300.0, cortex_mm=1.8)


def chest_ijk_to_ras(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """DICOM-like axial storage, i -> patient Left, j -> Posterior, k -> Superior, centred on RAS (0, 0, 0)."""
    nk, nj, ni = shape
    di, dj, dk = (float(v) for v in spacing)
    m = np.diag([-di, -dj, dk, 1.0])
    m[:3, 3] = -m[:3, :3] @ (np.array([ni, nj, nk]) - 1) / 2
    return m


def chest_phantom(shape: Sequence[int] = (128, 256, 256), spacing: Sequence[float] = (1.4, 1.4, 2.5), seed: int = 0,
                  with_labels: bool = False):
    """A random but plausible adult chest CT in HU, ``CTVolume(units="hu")``, reproducible from ``seed``.

    ``shape`` is (slices nk, rows nj, columns ni) and ``spacing`` (di, dj, dk) in mm; the defaults give a
    358 x 358 x 320 mm field of view, enough for the whole chest. With ``with_labels`` the return value is
    ``(volume, labels)``, labels a uint8 [k, j, i] array of the ``LABELS`` values (useful as a segmentation, and
    for checking anatomy). Per seed the body and lung size, rib angle, diaphragm and heart position, contrast
    phase and noise level vary; CT noise is 10-20 HU.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three sizes (nk, nj, ni) of at least 2, got {shape}")
    ijk_to_ras = chest_ijk_to_ras(shape, spacing)
    nk, nj, ni = shape
    x = ijk_to_ras[0, 3] + ijk_to_ras[0, 0] * np.arange(ni)
    y = ijk_to_ras[1, 3] + ijk_to_ras[1, 1] * np.arange(nj)
    z = ijk_to_ras[2, 3] + ijk_to_ras[2, 2] * np.arange(nk)
    anatomy_rng, noise_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
    chest = _Chest(anatomy_rng, x, y)

    hu = np.empty(shape, dtype=np.float32)
    labels = np.empty(shape, dtype=np.uint8) if with_labels else None
    step = max(1, _SLAB_VOXELS // (nj * ni))
    for k0 in range(0, nk, step):
        slab = _Slab(x, y, z[k0:k0 + step])
        chest.paint(slab)
        slab.hu += chest.noise_hu * noise_rng.standard_normal(slab.hu.shape, dtype=np.float32)
        hu[k0:k0 + step] = np.clip(slab.hu, -1024.0, 3071.0)
        if labels is not None:
            labels[k0:k0 + step] = slab.label
    volume = CTVolume(hu, ijk_to_ras, units="hu", source=f"<chest phantom seed {seed}>",
                      metadata={"phantom": "chest", "seed": int(seed), "synthetic": True,
                                "carina_ras": chest.carina.tolist(), "heart_center_ras": chest.heart.center.tolist()})
    return (volume, labels) if with_labels else volume
