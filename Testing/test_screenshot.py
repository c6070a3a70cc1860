"""Offscreen pictures of Slicer's 3D view (``SVDRRLogic.mrml_view``) of a scene made by the batch script.

The batch script renders the chest phantom (as a CT file, at a quarter of its default resolution to keep this
fast) with the C-arm at LAO 30 / caudal 10 and writes the scene bundle and a screenshot. A second process loads the bundle and renders the same view again, and with one thing changed at a
time (no DRR on the detector, no volume rendering, no X-ray cone), so each part can be found in the picture where
the camera projects it. Rendering runs in child processes: a missing OpenGL backend crashes VTK instead of raising,
and the pytest process then stays safe. Skipped, with the reason, where no offscreen OpenGL works (EGL by default).
"""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the 3D view needs slicer-core (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' module is not slicer-core", allow_module_level=True)

from PIL import Image, ImageDraw  # noqa: E402
from scipy.spatial import ConvexHull  # noqa: E402

from SVDRRLogic import CArmGeometry, mrml_view  # noqa: E402
from SVDRRLogic.io import write_ct  # noqa: E402
from SVDRRLogic.mrml_carm import cone_points, detector_corners  # noqa: E402
from SVDRRLogic.phantoms import chest_phantom  # noqa: E402

import slicer_standin  # noqa: E402  (Testing/slicer_standin.py)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "SVDRRSlicer" / "Scripts" / "SVDRRBatch.py"
SIZE = (480, 360)

# Runs in a child: load the bundle, render the default view of it with and without each part.
VARIANTS = """
import json, sys
import numpy as np
from SVDRRLogic import mrml, mrml_view
from SVDRRLogic.session import CARM_NAME

bundle, out = sys.argv[1], sys.argv[2]
size = tuple(json.loads(sys.argv[3]))
scene = mrml.load_scene_bundle(bundle)
carm = mrml.CArmDisplay.from_scene(scene, CARM_NAME)
drr = carm.detector_node.GetNodeReference("SVDRRDetectorImage")
rendering = scene.GetFirstNodeByClass("vtkMRMLGPURayCastVolumeRenderingDisplayNode")
ct = rendering.GetVolumeNode()
bounds = [0.0] * 6
ct.GetRASBounds(bounds)
display = drr.GetDisplayNode()
pictures = {}
with mrml_view.OffscreenThreeDView(scene, size) as view:
    camera = view.set_camera()
    pictures["full"] = view.capture()
    carm.set_image(None)
    pictures["no_drr"] = view.capture()
    carm.set_image(drr)
    rendering.SetVisibility(False)
    pictures["no_volume"] = view.capture()
    rendering.SetVisibility(True)
    carm.cone_node.GetDisplayNode().SetVisibility(False)
    pictures["no_cone"] = view.capture()
np.savez_compressed(out, drr=mrml.xray_from_volume_node(drr).array, **pictures)
print(json.dumps({"camera": camera.__dict__, "geometry": carm.geometry.to_dict(), "ct_bounds": bounds,
                  "window_level": [display.GetWindow(), display.GetLevel()]}, default=float))
"""


@pytest.fixture(scope="module")
def batch_scene(tmp_path_factory):
    """The batch script's scene bundle and screenshot of the chest phantom (the script first checks, in a child
    process, that offscreen OpenGL works: :func:`SVDRRLogic.mrml_view.probe_offscreen`). The same run under the
    stand-in for ``Slicer --no-main-window`` (slicer_standin.py) goes on at the same time, for the test below."""
    folder = tmp_path_factory.mktemp("batch")
    ct = write_ct(folder / "chest.nrrd", chest_phantom(shape=(64, 128, 128), spacing=(2.8, 2.8, 5.0)))
    args = [ct, "--preset", "x2ct", "--view", "30,-10", "--detector", "80,80", "--pixel", "6.25", "--device", "cpu",
            "--screenshot-size", ",".join(map(str, SIZE))]
    in_slicer = slicer_standin.start(SCRIPT, "render", *args, "--screenshot", folder / "in-slicer" / "shot.png")
    run = subprocess.run([sys.executable, str(SCRIPT), "render", *map(str, args), "--scene",
                          str(folder / "scene.mrb"), "--screenshot", str(folder / "shot.png")],
                         capture_output=True, text=True, timeout=300, check=False)
    in_slicer = slicer_standin.finish(in_slicer)
    if run.returncode == 2 and "cannot make the --screenshot here" in run.stderr:
        pytest.skip(f"no offscreen OpenGL here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    return SimpleNamespace(folder=folder, in_slicer=in_slicer)


def test_inside_slicer_without_a_main_window(batch_scene):
    """``Slicer --no-main-window`` has no layout, so no 3D view to grab: the batch script renders Slicer's 3D view
    offscreen with the application's own logic instead."""
    code, report, err = batch_scene.in_slicer
    assert code == 0 and report == {"exits": [0], "drr_nodes": 1}, err
    folder = batch_scene.folder
    with Image.open(folder / "in-slicer" / "shot.png") as image, Image.open(folder / "shot.png") as ref:
        assert image.size == SIZE
        # the same scene and camera as the plain-Python run: the same picture
        assert np.abs(np.asarray(image).astype(np.int16) - np.asarray(ref)).mean() < 2.0


@pytest.fixture(scope="module")
def variants(batch_scene):
    out = batch_scene.folder / "variants.npz"
    run = subprocess.run([sys.executable, "-c", VARIANTS, str(batch_scene.folder / "scene.mrb"), str(out),
                          json.dumps(SIZE)], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr  # also: no crash when the view is taken apart and Python exits
    info = json.loads(run.stdout.strip().splitlines()[-1])
    with np.load(out) as data:
        pictures = {k: data[k] for k in data.files}
    camera = mrml_view.ViewCamera.coerce(info["camera"])
    return pictures, camera, CArmGeometry.from_dict(info["geometry"]), info


def mask_of(points_px: np.ndarray, shrink: float = 0.0) -> np.ndarray:
    """Pixels inside the convex hull of ``points_px`` (x, y), pulled ``shrink`` (a fraction) towards its centre."""
    hull = points_px[ConvexHull(points_px).vertices]
    centre = hull.mean(axis=0)
    hull = centre + (hull - centre) * (1.0 - shrink)
    canvas = Image.new("L", SIZE, 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in hull], fill=1)
    return np.asarray(canvas, dtype=bool)


def grey(picture: np.ndarray) -> np.ndarray:
    return picture.astype(np.float64) @ [0.299, 0.587, 0.114]


def test_batch_screenshot_shows_a_scene(batch_scene):
    with Image.open(batch_scene.folder / "shot.png") as image:
        assert image.format == "PNG" and image.size == SIZE and image.mode == "RGB"
        picture = np.asarray(image)
    assert grey(picture).std() > 20  # not blank
    colours = np.unique(picture.reshape(-1, 3) // 8, axis=0)
    assert len(colours) > 300  # background gradient, volume rendering, cone, DRR: many colours
    assert not list(batch_scene.folder.glob(".*"))  # the PNG was written atomically, no temporary file is left


def test_batch_screenshot_is_the_view_of_its_scene(batch_scene, variants):
    """The picture taken by the batch script equals the view of the saved scene rendered again."""
    pictures, *_ = variants
    with Image.open(batch_scene.folder / "shot.png") as image:
        shot = np.asarray(image).astype(np.int16)
    assert np.abs(shot - pictures["full"]).mean() < 2.0


def test_drr_is_on_the_detector_the_right_way_round(variants):
    pictures, camera, geometry, info = variants
    corners = camera.project(detector_corners(geometry), SIZE)
    inside = mask_of(corners, shrink=0.1)
    assert inside.sum() > 0.03 * SIZE[0] * SIZE[1]  # the detector faces the camera, large enough to read

    full, bare = pictures["full"].astype(np.float64), pictures["no_drr"].astype(np.float64)
    region = full[inside]
    assert np.abs(region - bare[inside]).mean() > 20  # the texture replaces the translucent blue plate
    assert (region.max(axis=1) - region.min(axis=1)).mean() < 6  # grey values, not colours
    assert grey(full)[inside].std() > 15  # an image, not a flat plate
    plate = bare[inside].mean(axis=0)
    assert plate[2] > plate[0] + 10  # without the image the plate is bluish

    # Map each pixel of the detector's picture back to the DRR through the homography of the projected corners:
    # the picture's grey must follow the DRR's window/levelled values there (and not those of a mirrored DRR).
    w, h = geometry.detector
    homography = _homography(corners, np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64))
    ys, xs = np.nonzero(inside)
    uvw = homography @ np.stack([xs + 0.5, ys + 0.5, np.ones_like(xs, dtype=np.float64)])
    cols = np.clip(np.floor(uvw[0] / uvw[2]).astype(int), 0, w - 1)
    rows = np.clip(np.floor(uvw[1] / uvw[2]).astype(int), 0, h - 1)
    window, level = info["window_level"]
    drr = np.clip(pictures["drr"], level - window / 2, level + window / 2)
    seen = grey(full)[ys, xs]
    right_way = np.corrcoef(seen, drr[rows, cols])[0, 1]
    mirrored = np.corrcoef(seen, drr[:, ::-1][rows, cols])[0, 1]
    upside_down = np.corrcoef(seen, drr[::-1, :][rows, cols])[0, 1]
    assert right_way > 0.9, right_way
    assert right_way > max(mirrored, upside_down) + 0.1, (right_way, mirrored, upside_down)


def test_volume_rendering_and_cone_are_visible(variants):
    pictures, camera, geometry, info = variants
    full = pictures["full"].astype(np.float64)
    detector = mask_of(camera.project(detector_corners(geometry), SIZE))
    b = info["ct_bounds"]
    box = np.array([(x, y, z) for x in b[0:2] for y in b[2:4] for z in b[4:6]])
    ct = mask_of(camera.project(box, SIZE), shrink=0.15) & ~detector
    assert ct.sum() > 0.02 * SIZE[0] * SIZE[1]
    assert np.abs(full - pictures["no_volume"])[ct].mean() > 15  # the CT's volume rendering is in the picture

    cone = mask_of(camera.project(cone_points(geometry), SIZE), shrink=0.1) & ~detector & ~mask_of(
        camera.project(box, SIZE))
    assert cone.sum() > 0.01 * SIZE[0] * SIZE[1]
    assert np.abs(full - pictures["no_cone"])[cone].mean() > 5  # the translucent X-ray cone is drawn

    x, y = np.round(camera.project(geometry.source, SIZE)).astype(int)
    near = full[max(0, y - 8):y + 9, max(0, x - 8):x + 9]
    yellow = (near[..., 0] > 180) & (near[..., 1] > 140) & (near[..., 2] < 120)
    assert yellow.sum() >= 5  # the source point (a yellow markup) sits where the source projects


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 H with dst ~ H @ src for 4 point pairs (direct linear transform)."""
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    return np.linalg.svd(np.asarray(rows))[2][-1].reshape(3, 3)
