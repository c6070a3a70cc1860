"""Slicer's 3D view without Qt: the scene's volume renderings, models and markups rendered offscreen to a PNG.

Built from the ``slicer`` displayable managers (the classes Slicer's own 3D view uses, so the picture is what a
user sees in Slicer), on a VTK render window that needs no display: EGL by default
(``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow`` unless the variable is already set), which the standard VTK
wheel supports with Mesa (llvmpipe on a machine without a GPU). Used by the headless batch script, the README
screenshot and the screenshot tests. Inside Slicer the batch script grabs the application's real 3D view instead;
only under ``Slicer --no-main-window`` (no views at all) does it use this, with the application's own logic.

Two things matter for a correct picture and a clean exit (see ``../shared/reference/offscreen-rendering.md``):

- multisampling is off: with Slicer's depth peeling, Mesa's multisampled framebuffers drop volume renderings and
  translucent models from the image altogether;
- the view is taken apart in order (camera displayable manager and camera node, then the group, then the
  interactor style) before anything else is released; otherwise VTK calls an observer of a freed object at
  interpreter exit (segfault).

Like every ``SVDRRLogic/mrml*`` module it takes the scene as an argument and never touches Qt or ``slicer.app``.
"""
from __future__ import annotations

import gc
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtkmodules.util import numpy_support

from .mrml_scene import prepare_scene

__all__ = ["OffscreenThreeDView", "RenderingUnavailable", "ViewCamera", "apply_camera", "capture_window",
           "default_camera", "fit_camera", "probe_offscreen", "render_3d_view", "scene_bounds", "scene_points",
           "view_camera_node", "write_png"]

#: Displayable managers of the view, by class name: what Slicer's 3D view shows for SVDRR's nodes.
DISPLAYABLE_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                        "vtkMRMLModelDisplayableManager", "vtkMRMLVolumeRenderingDisplayableManager",
                        "vtkMRMLMarkupsDisplayableManager", "vtkMRMLOrientationMarkerDisplayableManager")
#: Slicer's default 3D background (light blue to white, top to bottom) and a dark one for pictures.
SLICER_BACKGROUND = ((0.7568, 0.7647, 0.9098), (1.0, 1.0, 1.0))
DARK_BACKGROUND = ((0.02, 0.03, 0.06), (0.18, 0.20, 0.26))
#: The VTK render window class used when ``VTK_DEFAULT_OPENGL_WINDOW`` is not set: EGL needs no display.
DEFAULT_BACKEND = "vtkEGLRenderWindow"


class RenderingUnavailable(RuntimeError):
    """No OpenGL context could be made here (no EGL/OSMesa/X); the message says what was tried."""


@dataclass(frozen=True)
class ViewCamera:
    """A perspective camera in RAS mm (what a ``vtkMRMLCameraNode`` holds)."""

    position: tuple[float, float, float]
    focal_point: tuple[float, float, float]
    view_up: tuple[float, float, float] = (0.0, 0.0, 1.0)
    view_angle: float = 30.0

    @classmethod
    def coerce(cls, value) -> ViewCamera:
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**{k: (tuple(float(x) for x in v) if isinstance(v, (list, tuple, np.ndarray)) else float(v))
                          for k, v in value.items()})
        raise TypeError(f"camera must be a ViewCamera or a dict of its fields, not {type(value).__name__}")

    def project(self, points: np.ndarray, size: Sequence[int]) -> np.ndarray:
        """Pixel (x right, y down) of RAS ``points`` (..., 3) in an image of ``size`` (width, height) taken with
        this camera: the same pinhole as VTK's (the view angle is the vertical field of view)."""
        right, up, forward = self._axes()
        p = np.asarray(points, dtype=np.float64) - np.asarray(self.position)
        depth = p @ forward
        f = (size[1] / 2.0) / math.tan(math.radians(self.view_angle) / 2.0)
        x = size[0] / 2.0 + f * (p @ right) / depth
        y = size[1] / 2.0 - f * (p @ up) / depth
        return np.stack([x, y], axis=-1)

    def _axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        forward = np.asarray(self.focal_point, float) - np.asarray(self.position, float)
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, np.asarray(self.view_up, float))
        right /= np.linalg.norm(right)
        return right, np.cross(right, forward), forward


# A broken OpenGL backend does not raise: VTK crashes the process on the first render. So it is tried in a child.
_PROBE = """
import vtk
window = vtk.vtkRenderWindow()
window.SetOffScreenRendering(1)
window.SetMultiSamples(0)
window.SetSize(32, 32)
renderer = vtk.vtkRenderer()
renderer.SetBackground(1.0, 0.0, 0.0)
window.AddRenderer(renderer)
window.Render()
grab = vtk.vtkWindowToImageFilter()
grab.SetInput(window)
grab.Update()
red = grab.GetOutput().GetScalarComponentAsDouble(16, 16, 0, 0)
print("svdrr-probe", window.GetClassName(), red)
"""


def probe_offscreen(backend: str | None = DEFAULT_BACKEND, timeout: float = 120.0) -> str | None:
    """None when offscreen OpenGL rendering works here, else a one-line reason. Runs in a child process (the
    same interpreter), because a missing or broken backend crashes VTK instead of raising an error."""
    env = dict(os.environ)
    if backend:
        env.setdefault("VTK_DEFAULT_OPENGL_WINDOW", backend)
    shown = env.get("VTK_DEFAULT_OPENGL_WINDOW", "VTK's default render window")
    try:
        run = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"offscreen rendering with {shown} could not be tried: {exc}"
    words = (run.stdout.strip().splitlines() or [""])[-1].split()
    if run.returncode == 0 and len(words) == 3 and words[0] == "svdrr-probe":
        if words[2].replace(".", "", 1).isdigit() and float(words[2]) > 200:
            return None
        return f"offscreen rendering with {shown} ({words[1]}) ran but drew nothing"
    if run.returncode < 0:
        how = f"crashed (signal {-run.returncode})"
    else:
        how = f"failed (exit code {run.returncode})"
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", run.stderr)  # vtkLogger colours its lines
    detail = [line for line in stderr.splitlines() if "WARN" in line or "ERR" in line or "Error" in line]
    hint = f": {detail[-1].split('|', 1)[-1].strip()}" if detail else ""
    return (f"offscreen OpenGL rendering with {shown} {how}{hint}; install Mesa's EGL (libegl1, "
            "libgl1-mesa-dri) or OSMesa (libosmesa6 with VTK_DEFAULT_OPENGL_WINDOW=vtkOSOpenGLRenderWindow)")


# -- what is in the scene ---------------------------------------------------------------------------------------
def _visible_in_3d(node) -> bool:
    for i in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(i)
        if display is not None and display.GetVisibility() and (
                not hasattr(display, "GetVisibility3D") or display.GetVisibility3D()):
            return True
    return False


def scene_points(scene) -> np.ndarray:
    """Points that outline what the 3D view shows: the 8 corners of every volume-rendered volume, the points of
    every visible model (the C-arm's cone, detector, ray) and the control points of visible markups."""
    points = []
    for volume in _nodes(scene, "vtkMRMLScalarVolumeNode"):
        renders = [volume.GetNthDisplayNode(i) for i in range(volume.GetNumberOfDisplayNodes())]
        if any(d is not None and d.IsA("vtkMRMLVolumeRenderingDisplayNode") and d.GetVisibility() for d in renders):
            bounds = [0.0] * 6
            volume.GetRASBounds(bounds)
            points += [(x, y, z) for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]]
    for model in _nodes(scene, "vtkMRMLModelNode"):
        pd = model.GetPolyData()
        if pd is not None and pd.GetNumberOfPoints() and _visible_in_3d(model) and not model.GetHideFromEditors():
            points += numpy_support.vtk_to_numpy(pd.GetPoints().GetData()).tolist()
    for markups in _nodes(scene, "vtkMRMLMarkupsNode"):
        if _visible_in_3d(markups):
            for i in range(markups.GetNumberOfControlPoints()):
                p = [0.0, 0.0, 0.0]
                markups.GetNthControlPointPositionWorld(i, p)
                points.append(p)
    return np.asarray(points, dtype=np.float64).reshape(-1, 3)


def scene_bounds(scene) -> np.ndarray:
    """(2, 3) array: lowest and highest RAS corner around :func:`scene_points`; ValueError on an empty view."""
    points = scene_points(scene)
    if not len(points):
        raise ValueError("the scene shows nothing in 3D (no visible model, markup or volume rendering)")
    return np.stack([points.min(axis=0), points.max(axis=0)])


def _nodes(scene, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


# -- cameras ----------------------------------------------------------------------------------------------------
def fit_camera(points: np.ndarray, direction: Sequence[float], view_up: Sequence[float] = (0.0, 0.0, 1.0),
               size: Sequence[int] = (900, 700), view_angle: float = 30.0, margin: float = 0.06) -> ViewCamera:
    """A camera looking along ``-direction`` (``direction`` points from the scene to the camera) that frames all
    ``points`` tightly, leaving ``margin`` (a fraction of the image) free on each side."""
    d = np.asarray(direction, dtype=np.float64)
    d /= np.linalg.norm(d)
    up = np.asarray(view_up, dtype=np.float64)
    up = up - (up @ d) * d
    if np.linalg.norm(up) < 1e-6:  # looking straight along view_up: any perpendicular will do
        up = np.cross(d, [1.0, 0.0, 0.0] if abs(d[0]) < 0.9 else [0.0, 1.0, 0.0])
    up /= np.linalg.norm(up)
    right = np.cross(-d, up)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    tan_v = math.tan(math.radians(view_angle) / 2.0) * (1.0 - 2.0 * margin)
    tan_h = tan_v * size[0] / size[1]
    # centre the points across the view, then back off until every point is inside the frustum
    x, y = pts @ right, pts @ up
    centre = pts.mean(axis=0) + ((x.max() + x.min()) / 2 - x.mean()) * right + ((y.max() + y.min()) / 2 - y.mean()) * up
    rel = pts - centre
    x, y, z = rel @ right, rel @ up, rel @ d
    distance = float(np.max(np.maximum(z + np.abs(x) / tan_h, z + np.abs(y) / tan_v)))
    distance = max(distance, float(np.max(z)) + 1.0)
    return ViewCamera(tuple(centre + distance * d), tuple(centre), tuple(up), float(view_angle))


def default_camera(scene, size: Sequence[int] = (900, 700), view_angle: float = 30.0) -> ViewCamera:
    """A camera that shows everything in the 3D view, from the front-side of the patient.

    With an SVDRR C-arm in the scene it looks across the beam from above, on the detector's side of it, so the
    cone is seen from the side, the DRR on the detector from its front (not mirrored) and the patient beside it.
    Without one it looks at the patient from the front left, above, like Slicer's anterior-oblique views.
    """
    points = scene_points(scene)
    if not len(points):
        raise ValueError("the scene shows nothing in 3D (no visible model, markup or volume rendering)")
    direction = _carm_view_direction(scene)
    if direction is None:
        direction = np.array([-0.55, 0.7, 0.45])
    return fit_camera(points, direction, (0.0, 0.0, 1.0), size, view_angle)


def _carm_view_direction(scene) -> np.ndarray | None:
    from .mrml import geometry_from_node
    from .mrml_carm import ATTR_ROLE

    for markups in _nodes(scene, "vtkMRMLMarkupsFiducialNode"):
        if markups.GetAttribute(ATTR_ROLE) == "source" and _visible_in_3d(markups):
            geometry = geometry_from_node(markups)
            if geometry is not None:
                beam = -geometry.source_direction          # from the source towards the detector
                across = np.cross(beam, [0.0, 0.0, 1.0])   # horizontal, perpendicular to the beam
                if np.linalg.norm(across) < 1e-6:
                    across = np.array([1.0, 0.0, 0.0])
                across /= np.linalg.norm(across)
                if across[1] < 0:                           # the patient's front side
                    across = -across
                return 0.7 * across + 0.7 * beam + np.array([0.0, 0.0, 0.35])
    return None


def view_camera_node(scene, view_node):
    """The camera node of a 3D view node (Slicer 5 pairs them by layout name), or None."""
    for camera_node in _nodes(scene, "vtkMRMLCameraNode"):
        if camera_node.GetLayoutName() == view_node.GetLayoutName():
            return camera_node
    return None


def apply_camera(camera_node, camera: ViewCamera) -> None:
    """Put ``camera`` on a ``vtkMRMLCameraNode`` (also how the batch script aims Slicer's own 3D view)."""
    was = camera_node.StartModify()
    camera_node.SetPosition(*camera.position)
    camera_node.SetFocalPoint(*camera.focal_point)
    camera_node.SetViewUp(*camera.view_up)
    camera_node.SetViewAngle(camera.view_angle)
    camera_node.EndModify(was)
    camera_node.ResetClippingRange()


# -- the view ---------------------------------------------------------------------------------------------------
class OffscreenThreeDView:
    """Slicer's 3D view of ``scene`` in an offscreen render window; use as a context manager (or call close()).

    ``app_logic``: an existing ``vtkMRMLApplicationLogic`` (inside Slicer, ``slicer.app.applicationLogic()``);
    without it a ``vtkSlicerApplicationLogic`` is made for the scene (it adds the interaction node). The view
    node (layout name ``layout_name``) and its camera node are added to the scene when missing, as Slicer does, so
    a scene saved afterwards opens in Slicer with the same camera.
    """

    def __init__(self, scene, size: Sequence[int] = (900, 700), app_logic=None, layout_name: str = "1",
                 background: tuple | None = None, backend: str | None = DEFAULT_BACKEND):
        self.scene = scene
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 16 or max(self.size) > 8192:
            raise ValueError(f"view size {self.size} must be 16-8192 pixels per side")
        if backend:
            os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", backend)
        self._own_app_logic = app_logic is None
        self.app_logic = app_logic or slicer.vtkSlicerApplicationLogic()
        try:
            self._build(layout_name, background)
        except BaseException:
            self.close()
            raise

    def _build(self, layout_name: str, background) -> None:
        scene = self.scene
        prepare_scene(scene)
        if self._own_app_logic:
            self.app_logic.SetMRMLScene(scene)
            self.app_logic.SetSliceLogics(vtk.vtkCollection())
            # the markups displayable manager makes its widgets through the Markups module logic
            self._markups_logic = slicer.vtkSlicerMarkupsLogic()
            self._markups_logic.SetMRMLApplicationLogic(self.app_logic)
            self._markups_logic.SetMRMLScene(scene)
            self.app_logic.SetModuleLogic("Markups", self._markups_logic)
        if self.app_logic.GetViewLogics() is None:
            self.app_logic.SetViewLogics(vtk.vtkCollection())
        factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(self.app_logic)
        for name in DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)

        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)   # see the module docstring: else volume rendering vanishes on Mesa
        self.window.SetAlphaBitPlanes(1)
        self.window.SetSize(*self.size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.SetUseDepthPeeling(1)
        self.renderer.SetMaximumNumberOfPeels(8)
        self.renderer.SetUseFXAA(True)
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self._check_context()

        self.view_logic = slicer.vtkMRMLViewLogic()
        self.view_logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.GetViewLogics().AddItem(self.view_logic)
        self.view_logic.SetMRMLScene(scene)
        self.view_node = scene.GetSingletonNode(layout_name, "vtkMRMLViewNode")
        restyle = self.view_node is None or self._own_app_logic  # leave the look of a Slicer app's view alone
        if self.view_node is None:
            self.view_node = self.view_logic.AddViewNode(layout_name)
        self.style = slicer.vtkMRMLThreeDViewInteractorStyle()
        self.group = slicer.vtkMRMLDisplayableManagerGroup()
        self.group.Initialize(factory, self.renderer)
        self.style.SetDisplayableManagers(self.group)
        self.style.SetInteractor(self.interactor)
        self.group.SetMRMLDisplayableNode(self.view_node)
        self.camera_manager = self.group.GetDisplayableManagerByClassName("vtkMRMLCameraDisplayableManager")
        self.camera_node = self.camera_manager.GetCameraNode()
        if restyle:
            self._style_view(background)

    def _check_context(self) -> None:
        """Render once to make the OpenGL context now, and turn a failure into one clear error."""
        self.window.Render()
        if not (self.window.IsCurrent() or self.window.SupportsOpenGL()):
            backend = os.environ.get("VTK_DEFAULT_OPENGL_WINDOW", self.window.GetClassName())
            raise RenderingUnavailable(f"no OpenGL context for offscreen rendering ({backend}); install Mesa's "
                                       "EGL (libegl1, libgl1-mesa-dri) or OSMesa, or run under xvfb-run")

    def _style_view(self, background) -> None:
        view = self.view_node
        was = view.StartModify()
        view.SetBoxVisible(False)
        view.SetAxisLabelsVisible(False)
        view.SetOrientationMarkerType(slicer.vtkMRMLViewNode.OrientationMarkerTypeAxes)
        view.SetOrientationMarkerSize(slicer.vtkMRMLViewNode.OrientationMarkerSizeMedium)
        view.SetVolumeRenderingQuality(slicer.vtkMRMLViewNode.Normal)  # not "adaptive": no frame-rate guesses
        top, bottom = background or SLICER_BACKGROUND
        view.SetBackgroundColor(*bottom)
        view.SetBackgroundColor2(*top)
        view.EndModify(was)

    # -- use ------------------------------------------------------------------------------------------------
    def set_camera(self, camera: ViewCamera | dict | None = None) -> ViewCamera:
        """Aim the view (None: :func:`default_camera`); returns the camera used."""
        camera = default_camera(self.scene, self.size) if camera is None else ViewCamera.coerce(camera)
        apply_camera(self.camera_node, camera)
        self.renderer.ResetCameraClippingRange()
        return camera

    def render(self) -> None:
        self.group.RequestRender()
        self.renderer.ResetCameraClippingRange()
        self.window.Render()

    def capture(self) -> np.ndarray:
        """The rendered view as uint8 RGB, shape (height, width, 3), row 0 at the top."""
        self.render()
        return capture_window(self.window)

    def close(self) -> None:
        """Take the view apart in the order that lets VTK release it safely (idempotent)."""
        owned = self.__dict__
        # the camera displayable manager (and the camera node it observes) must go before the group
        for name in ("camera_manager", "camera_node", "group", "style", "view_node"):
            owned.pop(name, None)
            gc.collect()
        view_logic = owned.pop("view_logic", None)
        if view_logic is not None:
            self.app_logic.GetViewLogics().RemoveItem(view_logic)
            view_logic.SetMRMLScene(None)
        window = owned.pop("window", None)
        if window is not None:
            window.Finalize()
        owned.pop("interactor", None)
        owned.pop("renderer", None)
        app_logic = owned.pop("app_logic", None)
        if app_logic is not None and self._own_app_logic:
            markups = owned.pop("_markups_logic", None)
            if markups is not None:
                markups.SetMRMLScene(None)
            slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(None)
            app_logic.SetMRMLScene(None)
        gc.collect()

    def __enter__(self) -> OffscreenThreeDView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def capture_window(window) -> np.ndarray:
    """What a rendered VTK window shows, as uint8 RGB (height, width, 3), row 0 at the top."""
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.ShouldRerenderOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.ascontiguousarray(pixels[::-1, :, :3])


def render_3d_view(scene, path: str | os.PathLike, size: Sequence[int] = (900, 700),
                   camera: ViewCamera | dict | None = None, background: tuple | None = None,
                   app_logic=None, backend: str | None = DEFAULT_BACKEND) -> Path:
    """Render Slicer's 3D view of ``scene`` offscreen and write it to the PNG ``path`` (atomically: a failure
    leaves no file behind). ``camera`` None frames the whole scene (:func:`default_camera`). Returns the path."""
    out = Path(path).expanduser()
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: a screenshot file name must end in .png")
    if not out.parent.is_dir():
        raise ValueError(f"{out}: output folder {out.parent} does not exist")
    with OffscreenThreeDView(scene, size, app_logic=app_logic, background=background, backend=backend) as view:
        view.set_camera(camera)
        pixels = view.capture()
    write_png(out, pixels)
    return out


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> Path:
    """Write uint8 RGB ``pixels`` (rows, cols, 3) to a PNG, atomically (temporary file, then rename)."""
    from PIL import Image

    from .io.common import atomic_output

    with atomic_output(path, ".png") as tmp:
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(tmp, format="PNG", optimize=True)
    return Path(path)
