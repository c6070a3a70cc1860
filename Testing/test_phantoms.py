"""Phantoms: the analytic ground truth the projector is tested against, and the procedural chest CT."""
import itertools

import numpy as np
import pytest

from SVDRRLogic.images import CTVolume
from SVDRRLogic.phantoms import (CHEST_LABELS, Ellipsoid, centered_ijk_to_ras, chest_phantom, line_integrals,
                                 rays_away_from_rim, shepp_logan_3d, single_ellipsoid, voxelize)


def phantom_at(ellipsoids, points):
    """Phantom value at (N, 3) RAS points, straight from the definition (sum of values of covering ellipsoids)."""
    pts = np.asarray(points, dtype=np.float64)
    return sum(e.value * (e.radius(pts[:, 0], pts[:, 1], pts[:, 2]) <= 1.0) for e in ellipsoids)


def tilted(angle_deg, axis):
    """A rotation about an arbitrary axis (Rodrigues), so tests do not only see rotations about z."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.radians(angle_deg)
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def voxel_centres(affine, shape):
    nk, nj, ni = shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


# -- analytic line integrals ---------------------------------------------------------------------------------------
def test_sphere_chord_through_centre_is_the_diameter():
    sphere = [Ellipsoid(center=(10.0, -5.0, 3.0), semi_axes=(30.0, 30.0, 30.0), value=1.0)]
    direction = np.array([0.3, -0.8, 0.52])
    direction *= 400.0 / np.linalg.norm(direction)
    origin = np.array([10.0, -5.0, 3.0]) - 0.5 * direction
    assert line_integrals(sphere, origin, direction) == pytest.approx(60.0, rel=1e-12)
    # a segment that stops at the centre sees the radius; one that passes 40 mm off-centre sees nothing
    assert line_integrals(sphere, origin, 0.5 * direction) == pytest.approx(30.0, rel=1e-12)
    offset = np.cross(direction, [1.0, 0.0, 0.0])
    assert line_integrals(sphere, origin + 40.0 * offset / np.linalg.norm(offset), direction) == 0.0


def test_line_integrals_match_numeric_quadrature():
    phantom = shepp_logan_3d(contrast="kak-slaney")
    phantom.append(Ellipsoid((15.0, -20.0, 10.0), (25.0, 12.0, 40.0), 0.01, tilted(35.0, (1.0, 2.0, -0.5))))
    rng = np.random.default_rng(7)
    targets = rng.uniform(-60.0, 60.0, (6, 3))
    origins = np.vstack([rng.normal(size=(5, 3)) * 400.0, [[0.0, 0.0, 0.0]]])  # the last one starts inside
    directions = targets - origins
    directions[-1] = (50.0, 20.0, 30.0)  # and ends inside too: the chord is clipped at both ends
    exact = line_integrals(phantom, origins, directions)
    assert exact.dtype == np.float64 and exact.shape == (6,)

    n = 200_000
    t = (np.arange(n) + 0.5) / n
    for o, d, value in zip(origins, directions, exact):
        numeric = phantom_at(phantom, o + t[:, None] * d).sum() * np.linalg.norm(d) / n
        assert numeric == pytest.approx(value, rel=1e-3, abs=1e-5)
    assert exact.max() > 1.0  # the rays really cross the head


def test_line_integrals_broadcast_and_degenerate_rays():
    phantom = single_ellipsoid()
    origins = np.zeros((2, 3, 3))
    directions = np.zeros((2, 3, 3))
    directions[0, :, 1] = 500.0
    out = line_integrals(phantom, origins, directions)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[0], 45.0 * 0.02)  # from the centre out through the 45 mm semi-axis
    np.testing.assert_array_equal(out[1], 0.0)        # zero-length segments integrate nothing


# -- rim mask ---------------------------------------------------------------------------------------------------------
def test_rim_mask_on_a_sphere_is_exact():
    radius, margin = 50.0, 3.0
    sphere = single_ellipsoid((radius,) * 3, mu=0.02)
    impact = np.arange(140) * 0.5 + 0.1  # never exactly on the threshold
    origins = np.stack([impact, np.full_like(impact, -300.0), np.zeros_like(impact)], axis=1)
    away = rays_away_from_rim(sphere, origins, np.array([0.0, 600.0, 0.0]), margin)
    np.testing.assert_array_equal(away, impact <= radius - margin)
    # a segment that ends inside the object is not a clean crossing
    assert not rays_away_from_rim(sphere, origins[:1], np.array([0.0, 300.0, 0.0]), margin).any()


def test_rim_mask_rays_keep_their_ellipsoids_under_small_shifts():
    phantom = shepp_logan_3d()
    rng = np.random.default_rng(3)
    origins = np.tile([0.0, -800.0, 0.0], (4000, 1))
    directions = np.column_stack([rng.uniform(-110, 110, 4000), np.full(4000, 1600.0), rng.uniform(-110, 110, 4000)])
    margin = 2.0
    away = rays_away_from_rim(phantom, origins, directions, margin)
    assert 0.2 < away.mean() < 0.9
    unit = directions[away] / np.linalg.norm(directions[away], axis=1, keepdims=True)
    side = np.cross(unit, [1.0, 0.0, 0.0])
    side /= np.linalg.norm(side, axis=1, keepdims=True)
    up = np.cross(unit, side)
    for e in phantom:
        hit = line_integrals([e], origins[away], directions[away]) > 0
        for shift in (side, -side, up, -up, (side + up) / np.sqrt(2)):
            moved = origins[away] + 0.99 * margin * shift
            np.testing.assert_array_equal(line_integrals([e], moved, directions[away]) > 0, hit)


# -- voxelization -----------------------------------------------------------------------------------------------------
def test_voxelize_conserves_mass():
    e = single_ellipsoid((60.0, 45.0, 70.0), mu=0.02, center=(3.3, -2.1, 1.7), rotation=tilted(25.0, (1, 1, 0)))
    vol = voxelize(e, (80, 70, 70), spacing=(2.0, 2.0, 2.0))
    assert isinstance(vol, CTVolume) and vol.units == "mu" and vol.shape == (80, 70, 70)
    np.testing.assert_allclose(vol.spacing, 2.0)
    mass = vol.array_hu.astype(np.float64).sum() * 8.0
    assert mass == pytest.approx(e[0].volume * 0.02, rel=5e-3)


def test_smart_supersampling_equals_brute_force():
    rotation = tilted(20.0, (0.3, -1.0, 0.4))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.7, -1.3, 2.1])  # oblique, LPS-like, anisotropic
    affine[:3, 3] = (11.3, 9.7, -13.1)
    phantom = [Ellipsoid((0.4, -1.1, 0.7), (9.3, 6.1, 11.2), 0.02, tilted(40.0, (1, 0, 1))),
               Ellipsoid((2.1, 5.3, -1.2), (3.2, 2.7, 4.1), -0.01, 30.0),  # partly outside the first
               Ellipsoid((-4.2, 3.3, 2.2), (0.9, 0.6, 1.1), 0.05)]  # smaller than a voxel
    shape, s = (14, 17, 16), 3
    fast = voxelize(phantom, shape, ijk_to_ras=affine, supersample=s)

    steps = (np.arange(s) + 0.5) / s - 0.5
    offsets = np.array(list(itertools.product(steps, repeat=3))) @ affine[:3, :3].T
    centres = voxel_centres(affine, shape)
    brute = np.mean([phantom_at(phantom, centres + off) for off in offsets], axis=0).reshape(shape)
    np.testing.assert_allclose(fast.array_hu, brute, atol=1e-7)
    np.testing.assert_array_equal(fast.ijk_to_ras, affine)
    assert brute.max() > 0.019 and brute.min() < 0.0
    assert voxelize(phantom[2:], shape, ijk_to_ras=affine, supersample=s).array_hu.max() > 0.0


def test_voxelized_phantom_reproduces_line_integrals_on_axis_rays():
    """Consistency of the two halves of the ground truth, without any projector: summing voxels along a grid axis
    matches the exact integral on rays away from the rim."""
    phantom = shepp_logan_3d(scale_mm=60.0)
    shape, spacing = (64, 64, 64), (2.0, 2.0, 2.0)
    vol = voxelize(phantom, shape, spacing=spacing)
    affine = centered_ijk_to_ras(shape, spacing)
    np.testing.assert_array_equal(vol.ijk_to_ras, affine)
    k, i = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    starts = np.stack([i, np.full_like(i, -10), k, np.ones_like(i)], axis=-1).reshape(-1, 4) @ affine.T
    origins, direction = starts[:, :3], np.array([0.0, 84 * 2.0, 0.0])
    away = rays_away_from_rim(phantom, origins, direction, margin_mm=3.0)
    assert away.sum() > 500
    summed = vol.array_hu.astype(np.float64).sum(axis=1).reshape(-1) * 2.0
    exact = line_integrals(phantom, origins, direction)
    error = np.abs(summed[away] - exact[away]) / exact[away]
    # a regular 4^3 sampling locates a surface facing the ray to 1/8 voxel: up to ~2 % on 2 mm voxels, 0.35 % typical
    assert error.max() < 0.03 and error.mean() < 0.005


@pytest.mark.parametrize("contrast", ["modified", "kak-slaney"])
def test_shepp_logan_values_are_non_negative(contrast):
    phantom = shepp_logan_3d(scale_mm=100.0, contrast=contrast)
    assert len(phantom) == 10
    assert phantom[0].value == pytest.approx(0.02 if contrast == "modified" else 0.04)
    rng = np.random.default_rng(0)
    points = np.vstack([rng.uniform(-100.0, 100.0, (300_000, 3)),
                        *(e.center + rng.uniform(-1, 1, (20_000, 3)) * e.semi_axes for e in phantom)])
    values = phantom_at(phantom, points)
    assert values.min() >= -1e-12
    assert voxelize(phantom, (48, 48, 48), spacing=(4.5, 4.5, 4.5), supersample=2).array_hu.min() >= -1e-7


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="contrast"):
        shepp_logan_3d(contrast="toft")
    with pytest.raises(ValueError, match="semi-axes"):
        Ellipsoid((0, 0, 0), (1.0, 0.0, 1.0), 0.02)
    with pytest.raises(ValueError, match="rotation"):
        Ellipsoid((0, 0, 0), (1.0, 1.0, 1.0), 0.02, np.ones((3, 3)))
    with pytest.raises(ValueError, match="supersample"):
        voxelize(single_ellipsoid(), (4, 4, 4), supersample=0)


# -- chest phantom ----------------------------------------------------------------------------------------------------
SMALL = dict(shape=(64, 128, 128), spacing=(2.8, 2.8, 5.0))


@pytest.fixture(scope="module")
def chest():
    return chest_phantom(**SMALL, seed=0, with_labels=True)


def centroid(volume, mask):
    k, j, i = np.nonzero(mask)
    return (np.stack([i, j, k, np.ones_like(i)], axis=1) @ volume.ijk_to_ras.T)[:, :3].mean(axis=0)


def test_chest_grid_is_dicom_like_and_centred(chest):
    vol, labels = chest
    assert vol.shape == (64, 128, 128) and labels.shape == vol.shape and labels.dtype == np.uint8
    assert vol.units == "hu" and vol.array_hu.dtype == np.float32
    np.testing.assert_allclose(vol.spacing, (2.8, 2.8, 5.0))
    np.testing.assert_allclose(np.sign(np.diag(vol.ijk_to_ras)[:3]), (-1, -1, 1))  # i -> L, j -> P, k -> S
    np.testing.assert_allclose(vol.center_ras, 0.0, atol=1e-9)


def test_chest_is_deterministic_per_seed(chest):
    vol, labels = chest
    again, labels_again = chest_phantom(**SMALL, seed=0, with_labels=True)
    np.testing.assert_array_equal(again.array_hu, vol.array_hu)
    np.testing.assert_array_equal(labels_again, labels)
    other = chest_phantom(**SMALL, seed=1)
    assert np.abs(other.array_hu - vol.array_hu).mean() > 20.0


def test_chest_intensities_are_realistic(chest):
    vol, labels = chest
    hu = vol.array_hu
    lung = labels == CHEST_LABELS["lung"]
    assert -900.0 < hu[lung].mean() < -700.0 and lung.sum() * np.prod(vol.spacing) > 2.0e6  # litres of lung
    assert hu.max() > 700.0 and hu[labels == CHEST_LABELS["rib"]].max() > 700.0
    corners = hu[:, :8, :8], hu[:, :8, -8:], hu[:, -8:, :8], hu[:, -8:, -8:]
    for corner in corners:
        assert abs(corner.mean() + 1000.0) < 5.0 and corner.std() < 30.0
    for name, (lo, hi) in {"fat": (-130, -70), "muscle": (20, 70), "heart": (20, 260), "aorta": (20, 260),
                           "airway": (-1024, -950), "spinal_canal": (0, 40), "liver": (40, 70)}.items():
        assert lo < hu[labels == CHEST_LABELS[name]].mean() < hi, name
    assert all((labels == v).any() for k, v in CHEST_LABELS.items() if k != "stomach_gas")


def test_chest_anatomy_is_on_the_correct_side(chest):
    vol, labels = chest
    heart = centroid(vol, labels == CHEST_LABELS["heart"])
    assert heart[0] < -10.0 and heart[1] > 0.0           # patient left (RAS -x) and anterior
    assert centroid(vol, labels == CHEST_LABELS["vertebra"])[1] < -20.0       # spine posterior
    assert centroid(vol, labels == CHEST_LABELS["sternum"])[1] > 50.0         # sternum anterior
    assert centroid(vol, labels == CHEST_LABELS["liver"])[0] > 0.0            # liver on the right
    aorta = labels == CHEST_LABELS["aorta"]
    low = aorta & (np.arange(vol.shape[0]) < vol.shape[0] // 4)[:, None, None]
    assert centroid(vol, low)[0] < -10.0                                       # descending aorta left of the spine
    lungs = labels == CHEST_LABELS["lung"]
    right, left = (centroid(vol, lungs & half) for half in
                   (np.arange(128)[None, None, :] < 64, np.arange(128)[None, None, :] >= 64))
    assert right[0] > 40.0 and left[0] < -40.0   # columns grow towards the patient's left
    airway = centroid(vol, labels == CHEST_LABELS["airway"])
    assert abs(airway[0]) < 15.0


def test_chest_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        chest_phantom(shape=(1, 64, 64))
