"""The geometry convention of DESIGN.md section 3, pinned number by number."""
import json
import math

import numpy as np
import pytest

from SVDRRLogic.geometry import (CArmGeometry, GeometryError, arc, hemisphere, parse_view_set, preset_names,
                                 rotation)


def test_pa_view_axes_and_positions():
    g = CArmGeometry(sad=1000, sdd=1500, detector=(4, 3), pixel=(2.0, 3.0), isocenter=(10, 20, 30))
    np.testing.assert_allclose(g.source_direction, [0, -1, 0], atol=1e-12)  # source behind the patient
    np.testing.assert_allclose(g.source, [10, -980, 30])
    np.testing.assert_allclose(g.detector_center, [10, 520, 30])  # detector in front
    np.testing.assert_allclose(g.u, [-1, 0, 0], atol=1e-12)  # columns run to the patient's left
    np.testing.assert_allclose(g.v, [0, 0, -1], atol=1e-12)  # rows run to the feet
    assert g.shape == (3, 4)


@pytest.mark.parametrize("az,el", [(0, 0), (30, -10), (-90, 0), (90, 45), (180, 0), (-135, 60)])
def test_source_direction_formula(az, el):
    g = CArmGeometry(az, el)
    a, e = math.radians(az), math.radians(el)
    np.testing.assert_allclose(g.source_direction, [math.sin(a) * math.cos(e), -math.cos(a) * math.cos(e),
                                                    -math.sin(e)], atol=1e-12)
    r = rotation(az, el)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    # u, v and s are orthonormal and right-handed with the detector normal pointing at the source
    np.testing.assert_allclose(np.cross(g.u, g.v), g.source_direction, atol=1e-12)


def test_lao_and_cranial_signs():
    lao = CArmGeometry(90, 0)
    assert lao.source[0] > 0 and lao.detector_center[0] < 0  # LAO 90: detector on the patient's left
    cran = CArmGeometry(0, 30)
    assert cran.detector_center[2] > 0 and cran.source[2] < 0  # cranial: detector tilted towards the head


def test_detector_corners_and_pixel_centres():
    g = CArmGeometry(25, -15, sad=800, sdd=1200, detector=(5, 4), pixel=(1.5, 2.5), isocenter=(1, 2, 3))
    c = g.pixel_centers()
    assert c.shape == (4, 5, 3)
    expected = g.detector_center + (0 - 2) * 1.5 * g.u + (0 - 1.5) * 2.5 * g.v
    np.testing.assert_allclose(c[0, 0], expected, atol=1e-9)
    expected = g.detector_center + (4 - 2) * 1.5 * g.u + (3 - 1.5) * 2.5 * g.v
    np.testing.assert_allclose(c[3, 4], expected, atol=1e-9)
    m = g.detector_ijk_to_ras
    np.testing.assert_allclose(m @ [4, 3, 0, 1], np.append(c[3, 4], 1), atol=1e-9)
    # every pixel centre lies on the detector plane, SDD from the source along the central ray
    np.testing.assert_allclose((c - g.source) @ -g.source_direction, 1200.0, atol=1e-9)


def test_projection_matrix_maps_pixel_centres_to_their_indices():
    g = CArmGeometry(-40, 20, sad=900, sdd=1300, detector=(7, 5), pixel=(1.1, 0.9), isocenter=(5, -3, 8))
    c = g.pixel_centers()
    jj, ii = np.mgrid[0:5, 0:7]
    np.testing.assert_allclose(g.project(c), np.stack([ii, jj], -1), atol=1e-9)
    # a point between source and pixel projects to the same pixel (it is a central projection)
    mid = g.source + 0.37 * (c[2, 3] - g.source)
    np.testing.assert_allclose(g.project(mid), [3, 2], atol=1e-9)
    np.testing.assert_allclose(g.project(np.array(g.isocenter)), [3, 2], atol=1e-9)


def test_rays_reach_pixel_centres():
    g = CArmGeometry(10, 5, detector=(6, 4), pixel=(3, 3))
    o, d = g.rays()
    np.testing.assert_allclose(o + d, g.pixel_centers().reshape(-1, 3), atol=1e-9)
    np.testing.assert_allclose(o, np.broadcast_to(g.source, o.shape))


@pytest.mark.parametrize("name,sad,sdd,det,pix", [("svdrr-lidc", 1650, 1800, (512, 512), (0.7, 0.7)),
                                                 ("x2ct", 541, 949, (320, 320), (1.5625, 1.5625)),
                                                 ("dvg-xraysyn", 2500, 3000, (128, 128), (2.5, 2.5))])
def test_presets(name, sad, sdd, det, pix):
    assert name in preset_names()
    g = CArmGeometry.preset(name, isocenter=(1, 2, 3))
    assert (g.sad, g.sdd, g.detector, g.pixel, g.isocenter) == (sad, sdd, det, pix, (1, 2, 3))
    assert g.preset_name == name
    assert CArmGeometry.preset(name, sad=sad - 1).sad == sad - 1


def test_unknown_preset_names_the_choices():
    with pytest.raises(GeometryError, match="svdrr-lidc"):
        CArmGeometry.preset("nope")


def test_round_trip_through_json():
    g = CArmGeometry.preset("x2ct", isocenter=(4, 5, 6)).with_view(-30, 12.5)
    d = json.loads(json.dumps(g.to_dict()))
    assert CArmGeometry.from_dict(d) == g
    np.testing.assert_allclose(d["projection_matrix"], g.projection_matrix)
    np.testing.assert_allclose(d["detector_ijk_to_ras"], g.detector_ijk_to_ras)


@pytest.mark.parametrize("az,el", [(0, 0), (33, -12), (-80, 50), (150, 10)])
def test_angles_from_dragged_source(az, el):
    g = CArmGeometry(az, el, isocenter=(3, 4, 5))
    a, e = g.positioner_angles_from_source(g.source)
    assert (a, e) == pytest.approx((az, el), abs=1e-9)
    # dragging the source closer keeps the angles (only the direction from the isocenter matters)
    assert g.positioner_angles_from_source(np.array(g.isocenter) + 0.1 * (g.source - g.isocenter)) == \
        pytest.approx((az, el), abs=1e-9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sad=0), "source-to-isocenter"), (dict(sad=1000, sdd=900), "must exceed SAD"),
    (dict(detector=(0, 10)), "detector size"), (dict(detector=(10.5, 10)), "detector size"),
    (dict(pixel=(0, 1)), "pixel size"), (dict(azimuth=float("nan")), "finite"),
    (dict(elevation=500), "out of range"), (dict(isocenter=(1, 2)), "3 coordinates")])
def test_absurd_geometry_is_refused(kwargs, match):
    with pytest.raises(GeometryError, match=match):
        CArmGeometry(**kwargs)


def test_arc_is_svdrr_simple_set():
    views = arc(-90, 90, 5)
    assert len(views) == 37 and views[0] == (-90, 0) and views[-1] == (90, 0) and (0, 0) in views
    assert parse_view_set("arc:-90:90:5") == views
    assert parse_view_set("arc:-10:10:10:15") == [(-10, 15), (0, 15), (10, 15)]


def test_hemisphere_is_even_and_posterior():
    views = hemisphere(500)
    assert views[0] == pytest.approx((0.0, 0.0)) and math.copysign(1.0, views[0][1]) == 1.0  # 0, not -0 (el-000)
    s = np.array([CArmGeometry(a, e).source_direction for a, e in views])
    assert (s[:, 1] <= 1e-9).all()  # every source behind the patient
    # equal-area: the fraction of points within 60 degrees of PA matches the cap's area fraction (1 - cos 60)
    frac = np.mean(-s[:, 1] >= math.cos(math.radians(60)))
    assert frac == pytest.approx(0.5, abs=0.01)
    # no two points coincide and spacing is roughly uniform
    dots = s @ s.T - 2 * np.eye(len(s))
    nearest = np.degrees(np.arccos(np.clip(dots.max(1), -1, 1)))
    assert nearest.min() > 0.5 * np.median(nearest)
    assert len(parse_view_set("hemisphere:12")) == 12


@pytest.mark.parametrize("spec", ["arc:1:2", "arc:5:0:1", "arc:0:10:0", "hemisphere:0", "sphere:3", "hemisphere:x",
                                  "arc:0:1e9:1e-3", "arc:0:inf:1", "arc:nan:1:1", "hemisphere:100001"])
def test_bad_view_sets(spec):  # a huge set fails at once, before any view is built
    with pytest.raises(GeometryError):
        parse_view_set(spec)
