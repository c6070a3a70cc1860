"""MRML bridge tests on real MRML scenes from the PyPI ``slicer-core`` wheel (no mocks, no views, no Qt)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import slicer
except ImportError as exc:  # absent, or a broken install (e.g. VTK missing a system library such as libGL)
    pytest.skip(f"the MRML bridge tests need slicer-core (pip install slicer-core): {exc}", allow_module_level=True)
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package 'slicer' (a shap dependency) has the same name
    pytest.skip("the installed 'slicer' module is not slicer-core (no vtkMRMLScene)", allow_module_level=True)

import vtk

from SVDRRLogic import (
    CArmGeometry,
    CTVolume,
    ImageError,
    mrml,
)
from SVDRRLogic.mrml_carm import ROLES
from SVDRRLogic.mrml_scene import array_from_image, image_from_array, numpy_matrix, vtk_matrix

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def scene():
    return mrml.new_scene()


@pytest.fixture
def geometry():
    return CArmGeometry(azimuth=25.0, elevation=-15.0, sad=600.0, sdd=1000.0, detector=(8, 6), pixel=(0.7, 0.9),
                        isocenter=(10.0, -20.0, 30.0))


def image_for(g: CArmGeometry, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(10.0, 3.0, g.shape).astype(np.float32)


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return numpy_matrix(m)


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def oblique_ct(units: str = "hu") -> CTVolume:
    """A small CT with anisotropic spacing, an oblique left-handed (LPS-like) frame and an offset origin."""
    rng = np.random.default_rng(3)
    values = rng.normal(0.0, 300.0, (5, 6, 7)).astype(np.float32)
    values[0, 0, 0] = -1024.0
    m = np.eye(4)
    m[:3, :3] = rotation([1, 2, 3], 20.0) @ np.diag([-0.8, -0.9, 1.25])
    m[:3, 3] = (-40.0, 12.5, 7.0)
    if units == "mu":
        values = np.abs(values) * 1e-4
    return CTVolume(values, m, units=units, metadata={"patient": "phantom", "spacing": [0.8, 0.9, 1.25]},
                    source="/data/ct.nrrd")


def scalar_volume(scene, array_kji: np.ndarray, matrix: np.ndarray | None = None, name: str = "input"):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    node.SetAndObserveImageData(image_from_array(array_kji))
    if matrix is not None:
        node.SetIJKToRASMatrix(vtk_matrix(matrix))
    node.CreateDefaultDisplayNodes()
    return node


def snapshot(node):
    """What 'not modified' means: MTimes of the node and its voxels, its matrix, voxels and attributes."""
    image = node.GetImageData()
    return (node.GetMTime(), image.GetMTime(), ijk_to_ras(node).tolist(), array_from_image(image).tobytes(),
            {n: node.GetAttribute(n) for n in node.GetAttributeNames() or ()}, node.GetName())


# -- DRR on the detector ------------------------------------------------------------------------------------------
def test_drr_node_lies_on_detector_pixel_centres(scene, geometry):
    node = mrml.show_drr(scene, image_for(geometry), geometry)
    m = ijk_to_ras(node)
    w, h = geometry.detector
    centres = geometry.pixel_centers()
    for i, j in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1), (3, 2)]:
        ras = m @ np.array([i, j, 0.0, 1.0])
        assert np.linalg.norm(ras[:3] - centres[j, i]) < 0.01
    assert np.allclose(node.GetSpacing(), (0.7, 0.9, 1.0))


def test_drr_node_array_attributes_and_name(scene, geometry):
    img = image_for(geometry)
    node = mrml.show_drr(scene, img, geometry)
    arr = array_from_image(node.GetImageData())
    assert arr.shape == (1, 6, 8) and arr.dtype == np.float32
    assert np.array_equal(arr[0], img)
    assert node.GetName() == "DRR" + mrml.SYNTHETIC_SUFFIX
    assert node.GetAttribute("SVDRR.Synthetic") == "true"
    assert node.GetAttribute("SVDRR.Kind") == "DRR"
    assert CArmGeometry.from_dict(json.loads(node.GetAttribute("SVDRR.Geometry"))) == geometry
    assert mrml.geometry_from_node(node) == geometry
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    lo, hi = np.percentile(img, [1, 99])
    assert display.GetWindow() == pytest.approx(hi - lo, rel=1e-5)
    assert display.GetLevel() == pytest.approx((hi + lo) / 2, rel=1e-5)

    real = mrml.show_drr(scene, img, geometry, name="Projection", synthetic=False, kind="Synthesized X-ray",
                         window_level=(5.0, 2.0))
    assert real.GetName() == "Projection" and real.GetAttribute("SVDRR.Synthetic") == "false"
    assert real.GetAttribute("SVDRR.Kind") == "Synthesized X-ray"
    assert (real.GetDisplayNode().GetWindow(), real.GetDisplayNode().GetLevel()) == (5.0, 2.0)


def test_show_drr_updates_in_place_also_at_preview_resolution(scene, geometry):
    node = mrml.show_drr(scene, image_for(geometry), geometry)
    count = scene.GetNumberOfNodes()
    turned = geometry.with_view(-40.0, 5.0)
    img = image_for(turned, seed=1)
    assert mrml.show_drr(scene, img, turned, node=node) is node
    assert np.array_equal(array_from_image(node.GetImageData())[0], img)
    assert np.allclose(ijk_to_ras(node), turned.detector_ijk_to_ras)
    preview = turned.replace(detector=(4, 3), pixel=(1.4, 1.8))
    small = image_for(preview, seed=2)
    mrml.show_drr(scene, small, preview, node=node)
    assert array_from_image(node.GetImageData()).shape == (1, 3, 4)
    assert np.allclose(ijk_to_ras(node), preview.detector_ijk_to_ras)
    assert mrml.geometry_from_node(node) == preview
    assert scene.GetNumberOfNodes() == count and node.GetName().endswith(mrml.SYNTHETIC_SUFFIX)


def test_show_drr_refuses_bad_input_and_foreign_nodes(scene, geometry):
    with pytest.raises(ValueError, match="does not match the detector"):
        mrml.show_drr(scene, np.zeros((5, 5), np.float32), geometry)
    bad = image_for(geometry)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mrml.show_drr(scene, bad, geometry)
    ct_node = mrml.add_ct_volume_node(scene, oblique_ct(), "CT", volume_rendering=False)
    before = snapshot(ct_node)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        mrml.show_drr(scene, image_for(geometry), geometry, node=ct_node)
    assert snapshot(ct_node) == before
    empty = slicer.vtkMRMLScalarVolumeNode()  # an empty user-chosen output node is fine, and named synthetic
    empty.SetName("my output")
    scene.AddNode(empty)
    assert mrml.show_drr(scene, image_for(geometry), geometry, node=empty) is empty
    assert empty.GetName() == "my output" + mrml.SYNTHETIC_SUFFIX
    # an acquired film shown on its detector is an input too, although SVDRR made the node
    film = mrml.show_drr(scene, image_for(geometry), geometry, name="film", synthetic=False, kind="X-ray")
    before = snapshot(film)
    with pytest.raises(ValueError, match="refusing to overwrite 'film'"):
        mrml.show_drr(scene, image_for(geometry, seed=3), geometry, node=film)
    assert snapshot(film) == before


def test_rerendering_keeps_a_window_level_the_user_chose(scene, geometry):
    node = mrml.show_drr(scene, image_for(geometry), geometry)
    display = node.GetDisplayNode()
    turned = geometry.with_view(20.0, 0.0)
    brighter = image_for(turned, seed=1) * 3.0
    mrml.show_drr(scene, brighter, turned, node=node)  # still automatic: follows the new image
    lo, hi = np.percentile(brighter, [1, 99])
    assert display.GetWindow() == pytest.approx(hi - lo, rel=1e-5)
    display.SetWindowLevel(0.25, 0.5)  # the user sets it in the Volumes module
    mrml.show_drr(scene, image_for(geometry, seed=2), geometry, node=node)
    assert (display.GetWindow(), display.GetLevel()) == (0.25, 0.5)
    mrml.show_drr(scene, image_for(geometry, seed=2), geometry, node=node, window_level=(4.0, 1.0))
    assert (display.GetWindow(), display.GetLevel()) == (4.0, 1.0)  # an explicit one still applies


# -- reading nodes ------------------------------------------------------------------------------------------------
def test_xray_from_drr_node_keeps_geometry(scene, geometry):
    img = image_for(geometry)
    xray = mrml.xray_from_volume_node(mrml.show_drr(scene, img, geometry))
    assert np.array_equal(xray.array, img)
    assert xray.pixel_spacing == pytest.approx((0.9, 0.7))
    assert np.allclose(xray.ijk_to_ras, geometry.detector_ijk_to_ras)
    assert CArmGeometry.from_dict(xray.metadata["geometry"]) == geometry
    assert xray.metadata["synthetic"] is True and xray.metadata["kind"] == "DRR"


def test_xray_from_plain_and_colour_single_slice_nodes(scene):
    grey = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    node = scalar_volume(scene, grey, np.diag([0.2, 0.3, 1.0, 1.0]))
    xray = mrml.xray_from_volume_node(node)
    assert np.array_equal(xray.array, grey[0]) and xray.pixel_spacing == pytest.approx((0.3, 0.2))
    assert xray.metadata["synthetic"] is False and "geometry" not in xray.metadata
    assert mrml.classify_volume_node(node) == ("xray", "2D image 4x3 (X-ray)")

    rgb = np.zeros((1, 3, 4, 3), np.uint8)
    rgb[..., 1] = 100
    colour = slicer.vtkMRMLVectorVolumeNode()
    scene.AddNode(colour)
    colour.SetAndObserveImageData(image_from_array(rgb))
    kind, reason = mrml.classify_volume_node(colour)
    assert kind == "xray" and "colour" in reason
    assert np.allclose(mrml.xray_from_volume_node(colour).array, 58.7, atol=1e-3)

    coronal = scalar_volume(scene, np.arange(20, dtype=np.float32).reshape(5, 1, 4))  # j is the flat axis
    xray = mrml.xray_from_volume_node(coronal)
    assert xray.array.shape == (5, 4)
    assert np.allclose(xray.ijk_to_ras @ [3, 4, 0, 1], [3, 0, 4, 1])  # (col 3, row 4) is voxel (i 3, j 0, k 4)


def test_classify_volume_node(scene):
    ct_node = mrml.add_ct_volume_node(scene, oblique_ct(), "CT", volume_rendering=False)
    kind, reason = mrml.classify_volume_node(ct_node)
    assert kind == "ct" and reason.startswith("CT volume 7x6x5, HU range -1024..")
    assert mrml.classify_volume_node(None)[0] == "unsupported"
    label = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(label)
    label.SetAndObserveImageData(image_from_array(np.zeros((3, 3, 3), np.uint8)))
    kind, reason = mrml.classify_volume_node(label)
    assert kind == "unsupported" and "label map" in reason
    empty = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(empty)
    assert mrml.classify_volume_node(empty)[0] == "unsupported"
    model = slicer.vtkMRMLModelNode()
    scene.AddNode(model)
    assert "not an image volume" in mrml.classify_volume_node(model)[1]
    mr = scalar_volume(scene, np.full((3, 4, 5), 200.0, np.float32))
    kind, reason = mrml.classify_volume_node(mr)
    assert kind == "ct" and "do not look like Hounsfield units" in reason


def test_ct_volume_node_round_trip(scene):
    for units in ("hu", "mu"):
        ct = oblique_ct(units)
        node = mrml.add_ct_volume_node(scene, ct, "CT", synthetic=False)
        back = mrml.ct_from_volume_node(node)
        assert back.array_hu.dtype == np.float32 and np.array_equal(back.array_hu, ct.array_hu)
        assert np.allclose(back.ijk_to_ras, ct.ijk_to_ras, atol=1e-9)
        assert (back.units, back.metadata, back.source) == (ct.units, ct.metadata, ct.source)
        assert node.GetName() == "CT" and node.GetAttribute("SVDRR.Kind") == "CT"
        back.array_hu[:] = 0  # a copy, not a view on the node's voxels
        assert array_from_image(node.GetImageData()).any()
    synthetic = mrml.add_ct_volume_node(scene, oblique_ct(), "Reconstruction", synthetic=True)
    assert synthetic.GetName() == "Reconstruction" + mrml.SYNTHETIC_SUFFIX
    assert synthetic.GetAttribute("SVDRR.Kind") == "Reconstructed CT"
    assert mrml.ct_from_volume_node(synthetic).metadata["synthetic"] is True


def test_ct_volume_node_display_and_volume_rendering(scene):
    node = mrml.add_ct_volume_node(scene, oblique_ct(), "CT")
    display = node.GetDisplayNode()
    assert display.IsA("vtkMRMLScalarVolumeDisplayNode")
    assert (display.GetWindow(), display.GetLevel()) == (400.0, 40.0)
    assert display.GetNumberOfWindowLevelPresets() == len(mrml.CT_WINDOW_PRESETS)
    vr = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())
          if node.GetNthDisplayNode(i).IsA("vtkMRMLVolumeRenderingDisplayNode")]
    assert len(vr) == 1 and vr[0].GetVisibility()
    prop = vr[0].GetVolumePropertyNode().GetVolumeProperty()
    assert prop.GetScalarOpacity().GetValue(-1000.0) == 0.0 and prop.GetScalarOpacity().GetValue(1200.0) > 0.5
    assert mrml.add_ct_volume_node(scene, oblique_ct(), "no VR", volume_rendering=False).GetNumberOfDisplayNodes() == 1


def test_volume_rendering_through_the_module_logic():
    scene = slicer.vtkMRMLScene()  # as in Slicer: the module logic registered its classes before SVDRR runs
    logic = slicer.vtkSlicerVolumeRenderingLogic()
    logic.SetMRMLScene(scene)
    node = mrml.add_ct_volume_node(scene, oblique_ct(), "CT", volume_rendering_logic=logic)
    display = logic.GetFirstVolumeRenderingDisplayNode(node)
    assert display is not None and display.GetVisibility()
    # slicer-core ships no presets, so SVDRR's transfer functions are used
    assert display.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity().GetValue(1200.0) > 0.5
    logic.SetMRMLScene(None)


def test_linear_parent_transform_is_hardened_in_the_result_not_in_the_node(scene):
    ct = oblique_ct()
    node = mrml.add_ct_volume_node(scene, ct, "CT", volume_rendering=False)
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation([0, 0, 1], 30.0)
    to_parent[:3, 3] = (5.0, -7.0, 11.0)
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    transform.SetMatrixTransformToParent(vtk_matrix(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    before, transform_mtime = snapshot(node), transform.GetMTime()
    back = mrml.ct_from_volume_node(node)
    assert np.allclose(back.ijk_to_ras, to_parent @ ct.ijk_to_ras)
    assert np.array_equal(back.array_hu, ct.array_hu)
    assert snapshot(node) == before and transform.GetMTime() == transform_mtime
    assert np.allclose(ijk_to_ras(node), ct.ijk_to_ras)
    assert node.GetParentTransformNode() is transform


def test_non_linear_transform_is_refused(scene):
    node = mrml.add_ct_volume_node(scene, oblique_ct(), "CT", volume_rendering=False)
    tps = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50), (30, 30, 30)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + (5 if p == (30, 30, 30) else 0), p[1], p[2])
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    tps.SetBasisToR()
    warp = slicer.vtkMRMLTransformNode()
    warp.SetName("warp")
    scene.AddNode(warp)
    warp.SetAndObserveTransformToParent(tps)
    node.SetAndObserveTransformNodeID(warp.GetID())
    before = snapshot(node)
    with pytest.raises(ImageError, match="non-linear transform 'warp'"):
        mrml.ct_from_volume_node(node)
    assert mrml.classify_volume_node(node)[0] == "unsupported"
    assert snapshot(node) == before


def test_2d_node_is_not_a_ct_and_3d_is_not_an_xray(scene, geometry):
    drr = mrml.show_drr(scene, image_for(geometry), geometry)
    with pytest.raises(ImageError, match="is a 2D image, not a CT"):
        mrml.ct_from_volume_node(drr)
    ct_node = mrml.add_ct_volume_node(scene, oblique_ct(), "CT", volume_rendering=False)
    with pytest.raises(ImageError, match="3D volume, not a 2D X-ray"):
        mrml.xray_from_volume_node(ct_node)
    with pytest.raises(ImageError, match="sheared"):
        sheared = oblique_ct()
        sheared.ijk_to_ras[0, 2] += 0.3
        mrml.add_ct_volume_node(scene, sheared, "sheared")


def test_reading_never_modifies_input_nodes(scene, geometry):
    ct_node = scalar_volume(scene, oblique_ct().array_hu, oblique_ct().ijk_to_ras, "user CT")
    xray_node = scalar_volume(scene, np.ones((1, 6, 8), np.float32), None, "user X-ray")
    before = snapshot(ct_node), snapshot(xray_node)
    mrml.classify_volume_node(ct_node), mrml.classify_volume_node(xray_node)
    ct = mrml.ct_from_volume_node(ct_node)
    mrml.xray_from_volume_node(xray_node)
    mrml.show_drr(scene, image_for(geometry), geometry)
    mrml.add_ct_volume_node(scene, ct, "copy", volume_rendering=False)
    assert (snapshot(ct_node), snapshot(xray_node)) == before


# -- the C-arm ----------------------------------------------------------------------------------------------------
def test_carm_display_matches_geometry(scene, geometry):
    count = scene.GetNumberOfNodes()
    carm = mrml.CArmDisplay(scene, "C-arm", geometry)
    source = carm.source_node
    assert source.GetNumberOfControlPoints() == 1 and source.GetNthControlPointLabel(0) == "Source"
    assert np.allclose(carm.source_position(), geometry.source, atol=1e-9)
    cone = np.array([carm.cone_node.GetPolyData().GetPoint(i) for i in range(5)])
    w, h = geometry.detector
    m = geometry.detector_ijk_to_ras
    expected = [m @ [i, j, 0, 1] for i, j in [(-0.5, -0.5), (w - 0.5, -0.5), (w - 0.5, h - 0.5), (-0.5, h - 0.5)]]
    assert np.allclose(cone[0], geometry.source) and np.allclose(cone[1:], np.array(expected)[:, :3])
    normal = np.cross(geometry.u, geometry.v)
    assert np.allclose((cone[1:] - geometry.detector_center) @ normal, 0.0, atol=1e-9)
    edges = np.linalg.norm(np.diff(np.vstack([cone[1:], cone[1:2]]), axis=0), axis=1)
    assert np.allclose(edges, [w * 0.7, h * 0.9, w * 0.7, h * 0.9])
    plate = carm.detector_node.GetPolyData()
    assert np.allclose([plate.GetPoint(i) for i in range(4)], cone[1:])
    tcoords = plate.GetPointData().GetTCoords()
    assert [tcoords.GetTuple2(i) for i in range(4)] == [(0, 0), (1, 0), (1, 1), (0, 1)]
    ray = carm.ray_node.GetPolyData()
    assert np.allclose(ray.GetPoint(0), geometry.source) and np.allclose(ray.GetPoint(1), geometry.detector_center)
    assert mrml.geometry_from_node(source) == geometry
    assert scene.GetNumberOfNodes() == count + 4 + 4  # 4 displayable nodes + their display nodes
    carm.remove()
    assert scene.GetNumberOfNodes() == count


def test_dragging_the_source_gives_the_other_geometrys_angles(scene, geometry):
    carm = mrml.CArmDisplay(scene, "C-arm", geometry)
    for az, el in [(-70.0, 20.0), (135.0, -35.0), (0.0, 0.0)]:
        other = geometry.with_view(az, el)
        carm.source_node.SetNthControlPointPositionWorld(0, *other.source)
        assert carm.angles_from_source() == pytest.approx((az, el), abs=1e-6)
        halfway = np.asarray(geometry.isocenter) + 0.5 * (other.source - np.asarray(geometry.isocenter))
        carm.source_node.SetNthControlPointPositionWorld(0, *halfway)  # closer along the same ray: same angles
        assert carm.angles_from_source() == pytest.approx((az, el), abs=1e-6)
        new = carm.geometry_from_source()
        assert (new.azimuth, new.elevation) == pytest.approx((az, el), abs=1e-6) and new.sad == geometry.sad
        carm.update(new)
        assert np.allclose(carm.source_position(), other.source, atol=1e-6)


def test_update_moves_the_point_only_when_needed(scene, geometry):
    carm = mrml.CArmDisplay(scene, "C-arm", geometry)
    events = []
    carm.source_node.AddObserver(slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                                 lambda *args: events.append(carm.is_updating))
    carm.update(geometry)
    assert events == []
    carm.update(geometry.with_view(10.0, 10.0))
    assert events and all(events)  # observers can tell the display's own moves from user drags
    assert not carm.is_updating


def test_carm_image_texture_and_from_scene(scene, geometry):
    drr = mrml.show_drr(scene, image_for(geometry), geometry)
    carm = mrml.CArmDisplay(scene, "C-arm", geometry)
    carm.set_image(drr)
    display = carm.detector_node.GetDisplayNode()
    connection = display.GetTextureImageDataConnection()
    assert connection is not None
    producer = connection.GetProducer()
    producer.Update()
    texture = producer.GetOutputDataObject(connection.GetIndex())
    assert texture.GetDimensions() == (8, 6, 1) and texture.GetNumberOfScalarComponents() == 4
    assert display.GetOpacity() == 1.0
    again = mrml.CArmDisplay.from_scene(scene, "C-arm")
    assert again.geometry == geometry and again.source_node is carm.source_node
    assert again.detector_node.GetDisplayNode().GetTextureImageDataConnection() is not None
    assert mrml.CArmDisplay.from_scene(scene, "other") is None
    assert again.exists()
    scene.RemoveNode(carm.ray_node)  # the user deleted a part in the Data module
    assert not again.exists() and mrml.CArmDisplay.from_scene(scene, "C-arm") is None
    carm.set_image(None)
    assert display.GetTextureImageDataConnection() is None and display.GetOpacity() < 1.0
    # asked for again, the display is made anew and the remains of the old one are gone: never two half C-arms
    new = mrml.CArmDisplay.in_scene(scene, "C-arm")
    assert new.exists() and new.source_node is not carm.source_node and carm.detector_node.GetScene() is None
    parts = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    assert sorted(n.GetAttribute("SVDRR.CArmRole") for n in parts if n.GetAttribute("SVDRR.CArm") == "C-arm") == \
        sorted(ROLES)
    assert mrml.CArmDisplay.in_scene(scene, "C-arm").source_node is new.source_node


# -- orbits -------------------------------------------------------------------------------------------------------
def test_orbit_sequence_one_item_per_view(scene, geometry):
    azimuths = [30.0, -30.0, 0.0, 15.5, -60.0]
    geoms = [geometry.with_view(a, -15.0) for a in azimuths]
    images = np.stack([image_for(g, seed=n) for n, g in enumerate(geoms)])
    sequence, browser = mrml.add_orbit_sequence(scene, images, geoms)
    assert sequence.GetNumberOfDataNodes() == 5
    assert (sequence.GetIndexName(), sequence.GetIndexUnit()) == ("azimuth", "deg")
    items = mrml.orbit_items(sequence)
    assert [v for v, _ in items] == ["-60", "-30", "0", "15.5", "30"]  # numeric index: sorted by azimuth
    for value, item in items:
        n = int(item.GetAttribute("SVDRR.ViewIndex"))
        assert float(value) == azimuths[n]
        assert mrml.geometry_from_node(item) == geoms[n]
        assert np.allclose(ijk_to_ras(item), geoms[n].detector_ijk_to_ras)
        assert np.array_equal(array_from_image(item.GetImageData())[0], images[n])
        assert item.GetAttribute("SVDRR.Synthetic") == "true"
    assert browser.GetMasterSequenceNode() is sequence
    proxy = browser.GetProxyNode(sequence)
    assert proxy is not None and mrml.geometry_from_node(proxy) == geoms[4]
    assert mrml.select_orbit_view(browser, 3) is proxy
    assert mrml.geometry_from_node(proxy) == geoms[3] and np.allclose(ijk_to_ras(proxy), geoms[3].detector_ijk_to_ras)
    assert browser.GetSelectedItemNumber() == 3
    with pytest.raises(IndexError):
        mrml.select_orbit_view(browser, 5)


def test_orbit_sequence_indexed_by_view_number_when_not_an_arc(scene, geometry):
    geoms = [geometry.with_view(a, e) for a, e in [(0, 0), (0, 30), (45, 10)]]
    images = np.stack([image_for(g) for g in geoms])
    sequence, _ = mrml.add_orbit_sequence(scene, images, geoms, name="hemisphere", synthetic=False)
    assert sequence.GetIndexName() == "view" and sequence.GetName() == "hemisphere"
    named, _ = mrml.add_orbit_sequence(scene, images, geoms, name="phantom (synthetic) orbit 1")
    assert named.GetName() == "phantom orbit 1" + mrml.SYNTHETIC_SUFFIX  # the mark once, at the end
    assert [v for v, _ in mrml.orbit_items(sequence)] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="one geometry per view"):
        mrml.add_orbit_sequence(scene, images[:2], geoms)


# -- scene bundles ------------------------------------------------------------------------------------------------
def _counts(scene) -> dict:
    """Node classes that carry content (storage, subject hierarchy and colour nodes are bookkeeping)."""
    out: dict = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.IsA("vtkMRMLStorageNode") or node.IsA("vtkMRMLSubjectHierarchyNode"):
            continue
        out[node.GetClassName()] = out.get(node.GetClassName(), 0) + 1
    return out


def _svdrr_attributes(scene) -> dict:
    out = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        attrs = {n: node.GetAttribute(n) for n in node.GetAttributeNames() or () if n.startswith("SVDRR.")}
        if attrs:
            out[node.GetName()] = attrs
    return out


def test_scene_bundle_round_trip(scene, geometry, tmp_path, monkeypatch):
    drr = mrml.show_drr(scene, image_for(geometry), geometry)
    ct = oblique_ct()
    mrml.add_ct_volume_node(scene, ct, "CT")
    carm = mrml.CArmDisplay(scene, "C-arm", geometry)
    carm.set_image(drr)
    dragged = geometry.with_view(-50.0, 12.0).source
    carm.source_node.SetNthControlPointPositionWorld(0, *dragged)
    geoms = [geometry.with_view(a, 0.0) for a in (-20.0, 0.0, 20.0)]
    images = np.stack([image_for(g, seed=n) for n, g in enumerate(geoms)])
    mrml.add_orbit_sequence(scene, images, geoms)
    counts, attributes = _counts(scene), _svdrr_attributes(scene)

    path = mrml.save_scene_bundle(scene, tmp_path / "study.mrb")
    assert path == (tmp_path / "study.mrb").resolve() and path.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.mrb"]  # no staging leftovers
    loaded = mrml.load_scene_bundle(path)

    assert _counts(loaded) == counts
    assert _svdrr_attributes(loaded) == attributes
    drr2 = loaded.GetFirstNodeByName(drr.GetName())
    assert np.allclose(ijk_to_ras(drr2), geometry.detector_ijk_to_ras, atol=1e-6)
    assert np.array_equal(array_from_image(drr2.GetImageData()), array_from_image(drr.GetImageData()))
    ct2 = mrml.ct_from_volume_node(loaded.GetFirstNodeByName("CT"))
    assert np.array_equal(ct2.array_hu, ct.array_hu) and np.allclose(ct2.ijk_to_ras, ct.ijk_to_ras, atol=1e-6)
    assert ct2.metadata == ct.metadata
    carm2 = mrml.CArmDisplay.from_scene(loaded, "C-arm")
    assert carm2.geometry == geometry
    assert np.allclose(carm2.source_position(), dragged, atol=1e-4)
    assert carm2.angles_from_source() == pytest.approx((-50.0, 12.0), abs=1e-5)
    assert carm2.detector_node.GetDisplayNode().GetTextureImageDataConnection() is not None
    sequence = loaded.GetFirstNodeByClass("vtkMRMLSequenceNode")
    items = mrml.orbit_items(sequence)
    assert [v for v, _ in items] == ["-20", "0", "20"]
    for n, (_, item) in enumerate(items):
        assert mrml.geometry_from_node(item) == geoms[n]
        assert np.allclose(ijk_to_ras(item), geoms[n].detector_ijk_to_ras, atol=1e-6)
        assert np.array_equal(array_from_image(item.GetImageData())[0], images[n])
    browser = loaded.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
    assert browser.GetMasterSequenceNode() is sequence and browser.GetProxyNode(sequence) is not None

    mrml.save_scene_bundle(loaded, tmp_path / "again.mrb")  # a loaded scene saves again
    assert _counts(mrml.load_scene_bundle(tmp_path / "again.mrb")) == counts
    monkeypatch.chdir(tmp_path)
    assert mrml.save_scene_bundle(loaded, Path("relative") / "scene.mrb") == tmp_path / "relative" / "scene.mrb"


def test_scene_bundle_save_is_atomic_and_checked(scene, geometry, tmp_path):
    mrml.show_drr(scene, image_for(geometry), geometry)
    target = tmp_path / "keep [1].mrb"  # brackets in the file name: Slicer alone would write an empty bundle
    mrml.save_scene_bundle(scene, target)
    assert _counts(mrml.load_scene_bundle(target))["vtkMRMLScalarVolumeNode"] == 1
    good = target.read_bytes()
    geoms = [geometry.with_view(a) for a in (0.0, 10.0)]
    sequence, _ = mrml.add_orbit_sequence(scene, np.stack([image_for(g) for g in geoms]), geoms, name="orbit [1]",
                                          synthetic=False)
    assert sequence.GetName() == "orbit (1)"  # bracket-free, so it can be saved
    sequence.SetName("renamed [by the user]")
    with pytest.raises(OSError, match="sequence"):
        mrml.save_scene_bundle(scene, target)
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep [1].mrb"]
    with pytest.raises(OSError, match="sequence"):  # a failed save into a new folder leaves no folder behind
        mrml.save_scene_bundle(scene, tmp_path / "new" / "scene.mrb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep [1].mrb"]
    with pytest.raises(ValueError, match=".mrb"):
        mrml.save_scene_bundle(scene, tmp_path / "scene.zip")
    if Path("/proc/self").is_dir():  # a folder nobody may write in (also root): the error names it, not a temp path
        with pytest.raises(OSError, match=r"^/proc/x.mrb: cannot write in /proc: "):
            mrml.save_scene_bundle(scene, "/proc/x.mrb")
    with pytest.raises(FileNotFoundError):
        mrml.load_scene_bundle(tmp_path / "missing.mrb")
    cwd = os.getcwd()
    (tmp_path / "junk.mrb").write_bytes(b"not a zip")
    with pytest.raises(OSError):
        mrml.load_scene_bundle(tmp_path / "junk.mrb")
    assert os.getcwd() == cwd  # Slicer's failed unpack changes the working directory; the bridge restores it


# -- dependency rule ----------------------------------------------------------------------------------------------
def test_only_the_mrml_modules_import_slicer():
    offenders = [p.relative_to(ROOT).as_posix() for p in (ROOT / "SVDRRLogic").rglob("*.py")
                 if not p.name.startswith("mrml") and any(
                     line.strip().startswith(("import slicer", "from slicer")) for line in p.read_text().splitlines())]
    assert offenders == []
    for p in (ROOT / "SVDRRLogic").glob("mrml*.py"):
        tree = ast.parse(p.read_text())
        used = {f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        assert not used & {"slicer.mrmlScene", "slicer.app", "slicer.modules", "slicer.util"}, p.name
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"qt", "ctk", "SVDRRSlicer", "training"}, p.name
    code = "import sys, SVDRRLogic; sys.exit('slicer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
