"""The Slicer module's live DRR session and orbit import on a real MRML scene (slicer-core), without Qt.

This is the flow of the module's panel (SVDRRSlicerTest runs the same flow inside Slicer): load the sample CT,
render a view, drag the source point, render a preview and a full view, run an orbit job and import it.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the session tests need slicer-core (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' module is not slicer-core", allow_module_level=True)

from SVDRRLogic import GeometryError, mrml, session  # noqa: E402
from SVDRRLogic.io import load_xray  # noqa: E402
from SVDRRLogic.jobs import FINISHED, start_job, write_job_file  # noqa: E402
from SVDRRLogic.mrml_carm import IMAGE_REFERENCE  # noqa: E402

WORKER = Path(__file__).resolve().parent.parent / "SVDRRSlicer" / "Scripts" / "SVDRRWorker.py"
SMALL = dict(sad=1650.0, sdd=1800.0, detector=(64, 48), pixel=6.0)


@pytest.fixture(scope="module")
def scene_and_ct():
    scene = mrml.new_scene()
    node = session.add_chest_phantom(scene, shape=(48, 96, 96), spacing=(3.7, 3.7, 6.7))
    return scene, node


def test_view_and_preview_geometry():
    g = session.view_geometry("svdrr-lidc", (1, 2, 3), azimuth=30, elevation=-10, **SMALL)
    assert (g.azimuth, g.elevation, g.detector, g.pixel, g.isocenter) == (30.0, -10.0, (64, 48), (6.0, 6.0),
                                                                         (1.0, 2.0, 3.0))
    assert g.preset_name == "svdrr-lidc"
    p = session.preview_geometry(g, 4)
    assert p.detector == (16, 12) and p.pixel == (24.0, 24.0)
    np.testing.assert_allclose(p.detector_center, g.detector_center)
    assert session.preview_geometry(g, 1) is g
    tiny = session.preview_geometry(g.replace(detector=(5, 3)), 8)
    assert tiny.detector == (2, 2)
    with pytest.raises(GeometryError, match="must exceed SAD"):
        session.view_geometry("svdrr-lidc", (0, 0, 0), azimuth=0, elevation=0, sad=900, sdd=800,
                              detector=(8, 8), pixel=1.0)
    assert session.device_summary("cpu").startswith("cpu")
    assert "unavailable" in session.device_summary("no-such-device")


def test_live_session_renders_previews_and_full_views(scene_and_ct):
    scene, ct_node = scene_and_ct
    kind, reason = mrml.classify_volume_node(ct_node)
    assert kind == "ct", reason
    drr = session.DRRSession(scene, ct_node, device="cpu")
    assert drr.is_for(ct_node, "cpu", "physical") and not drr.is_for(ct_node, "cpu", "diffdrr")
    g = drr.geometry_for("svdrr-lidc", azimuth=0, elevation=0, **SMALL)
    np.testing.assert_allclose(g.isocenter, drr.ct.center_ras)

    node = drr.render(g)
    assert mrml.geometry_from_node(node) == g
    full = mrml.xray_from_volume_node(node).array
    assert full.shape == (48, 64) and full.max() > 1.0
    assert drr.carm.geometry == g

    # the user drags the source point: the angles follow it, and a preview goes into the same node
    moved = g.with_view(40.0, 15.0)
    drr.carm.source_node.SetNthControlPointPositionWorld(0, *moved.source)
    az, el = drr.carm.angles_from_source()
    assert (az, el) == pytest.approx((40.0, 15.0), abs=1e-6)
    preview = drr.render(g.with_view(az, el), output_node=node, preview=True, preview_scale=4)
    assert preview is node and mrml.xray_from_volume_node(node).array.shape == (12, 16)
    assert drr.geometry.detector == (16, 12)

    # release: full resolution again, same node, C-arm at the new view
    drr.render(g.with_view(az, el), output_node=node)
    assert mrml.xray_from_volume_node(node).array.shape == (48, 64)
    np.testing.assert_allclose(drr.carm.source_position(), moved.source, atol=1e-6)

    # changing the CT's voxels makes the session stale
    ct_node.GetImageData().Modified()
    assert not drr.is_for(ct_node, "cpu", "physical")


@pytest.mark.parametrize("deleted", ["source", "cone", "detector", "ray"])
def test_a_deleted_carm_part_is_rebuilt_without_leftovers(scene_and_ct, deleted):
    scene, ct_node = scene_and_ct
    drr = session.DRRSession(scene, ct_node, device="cpu", carm_name=f"C-arm without {deleted}")
    g = drr.geometry_for("svdrr-lidc", azimuth=10, elevation=0, **SMALL)
    node = drr.render(g)
    scene.RemoveNode(drr.carm.nodes[deleted])  # the user deletes it in the Data module
    drr.render(g.with_view(20.0, 0.0), output_node=node)
    assert drr.carm.exists() and drr.carm.geometry.azimuth == 20.0
    assert drr.carm.detector_node.GetNodeReference(IMAGE_REFERENCE) is node
    roles = [scene.GetNthNode(i).GetAttribute("SVDRR.CArmRole") for i in range(scene.GetNumberOfNodes())
             if scene.GetNthNode(i).GetAttribute("SVDRR.CArm") == drr.carm_name]
    assert sorted(roles) == sorted(("source", "cone", "detector", "ray"))
    # a new session (another HU model) finds that C-arm instead of adding a second one
    again = session.DRRSession(scene, ct_node, device="cpu", hu_model="diffdrr", carm_name=drr.carm_name)
    assert again.carm.source_node is drr.carm.source_node


def test_the_panel_starts_on_a_loaded_image_or_the_phantom_never_an_output(scene_and_ct):
    scene = mrml.new_scene()
    assert session.default_input_node(scene) is None
    drr = mrml.show_drr(scene, np.arange(12, dtype=np.float32).reshape(3, 4),
                        session.view_geometry("svdrr-lidc", (0, 0, 0), azimuth=0, elevation=0, sad=1650, sdd=1800,
                                              detector=(4, 3), pixel=1.0))
    assert session.default_input_node(scene) is None and drr.GetAttribute("SVDRR.Kind") == "DRR"
    phantom = session.add_chest_phantom(scene, shape=(8, 16, 16), spacing=(20.0, 20.0, 30.0))
    assert session.default_input_node(scene) is phantom


def test_inputs_are_never_overwritten(scene_and_ct):
    scene, ct_node = scene_and_ct
    drr = session.DRRSession(scene, ct_node, device="cpu")
    g = drr.geometry_for("svdrr-lidc", azimuth=0, elevation=0, **SMALL)
    with pytest.raises(ValueError, match="refusing"):
        drr.render(g, output_node=ct_node)


def test_export_drr_keeps_the_geometry(scene_and_ct, tmp_path):
    scene, ct_node = scene_and_ct
    drr = session.DRRSession(scene, ct_node, device="cpu")
    g = drr.geometry_for("svdrr-lidc", azimuth=-20, elevation=5, **SMALL)
    node = drr.render(g)
    for name in ("drr.png", "drr.nrrd", "drr.dcm"):
        path = session.export_drr(node, tmp_path / name)
        back = load_xray(path)
        assert back.array.shape == (48, 64)
        assert back.metadata.get("synthetic") is True
    np.testing.assert_allclose(load_xray(tmp_path / "drr.nrrd").array, mrml.xray_from_volume_node(node).array,
                               rtol=1e-5, atol=1e-5)


def test_orbit_job_runs_and_imports_as_a_sequence(scene_and_ct, tmp_path):
    scene, ct_node = scene_and_ct
    drr = session.DRRSession(scene, ct_node, device="cpu")
    g = drr.geometry_for("svdrr-lidc", azimuth=0, elevation=0, **SMALL)
    with pytest.raises(GeometryError, match="bad view set"):
        session.orbit_job(tmp_path / "ct.nrrd", g, "arc:1:2", tmp_path)
    spec = session.orbit_job(drr.write_ct(tmp_path / "ct.nrrd"), g, "arc:-20:20:10", tmp_path / "orbit",
                             fmt="png", device="cpu")
    assert json.loads(json.dumps(spec)) == spec
    job = start_job([sys.executable, str(WORKER), str(write_job_file(spec, tmp_path / "job.json"))])
    job.wait(timeout=120)
    assert job.state == FINISHED, job.error
    sequence, browser = session.add_orbit(scene, job.result["views_json"], name="Orbit")
    assert sequence.GetNumberOfDataNodes() == 5
    assert [sequence.GetNthIndexValue(i) for i in range(5)] == ["-20", "-10", "0", "10", "20"]
    item = sequence.GetNthDataNode(4)
    assert mrml.geometry_from_node(item).azimuth == 20.0
    assert browser.GetMasterSequenceNode() is sequence
    images, geometries = session.load_orbit(job.result["views_json"])
    assert images.shape == (5, 48, 64) and [x.azimuth for x in geometries] == [-20, -10, 0, 10, 20]
    # the orbit and the live view agree (same renderer; the orbit went through 16-bit PNG)
    live = mrml.xray_from_volume_node(drr.render(g.with_view(20.0, 0.0))).array
    np.testing.assert_allclose(images[4], live, atol=2e-3 * live.max())


def test_chest_phantom_sample(scene_and_ct):
    _scene, ct_node = scene_and_ct
    assert ct_node.GetName().startswith("SVDRR chest phantom")
    assert ct_node.GetAttribute("SVDRR.Synthetic") == "true"  # generated, not a patient
    ct = mrml.ct_from_volume_node(ct_node)
    assert ct.shape == (48, 96, 96) and ct.array_hu.min() < -900 and ct.array_hu.max() > 300
