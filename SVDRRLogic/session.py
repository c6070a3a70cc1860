"""The live DRR session behind the Slicer module's panel, without Qt: one CT node, its cached renderer, the C-arm
display and the DRR output node; plus the pieces of an orbit job (its description, and reading its files back),
which the novel-view jobs of :mod:`SVDRRLogic.session_synthesis` share.

The module's widget only wires widgets, timers and dialogs to this; everything here takes the scene explicitly
and goes through :mod:`SVDRRLogic.mrml`, so pytest drives it with the ``slicer-core`` wheel (Testing/test_session.py).
Inputs are only read: DRRs go into new or user-chosen output nodes (``mrml.show_drr`` refuses anything else).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from . import mrml
from .geometry import CArmGeometry, GeometryError, parse_view_set
from .images import CTVolume
from .io import load_xray, write_ct, write_image
from .mrml_scene import ATTR_KIND, ATTR_SYNTHETIC, world_ijk_to_ras
from .renderer import DRRRenderer, describe_device, resolve_device

CARM_NAME = "SVDRR C-arm"
PREVIEW_SCALE = 4


def view_geometry(preset: str, isocenter: Sequence[float], *, sad: float, sdd: float, detector: Sequence[int],
                  pixel: float, azimuth: float, elevation: float) -> CArmGeometry:
    """The geometry the panel describes: a preset with the user's distances, detector and square pixel size."""
    return CArmGeometry.preset(preset, isocenter=tuple(isocenter), sad=float(sad), sdd=float(sdd),
                               detector=(int(detector[0]), int(detector[1])),
                               pixel=(float(pixel), float(pixel))).with_view(float(azimuth), float(elevation))


def preview_geometry(geometry: CArmGeometry, scale: int = PREVIEW_SCALE) -> CArmGeometry:
    """The same view and detector extent with ``scale`` times fewer pixels per side (cheap live preview)."""
    scale = int(scale)
    if scale <= 1:
        return geometry
    w, h = geometry.detector
    w2, h2 = max(2, round(w / scale)), max(2, round(h / scale))
    return geometry.replace(detector=(w2, h2), pixel=(geometry.pixel[0] * w / w2, geometry.pixel[1] * h / h2))


def device_summary(device: str = "auto") -> str:
    """What ``device`` resolves to here, for the panel's label (never raises)."""
    try:
        return describe_device(resolve_device(device))
    except Exception as exc:  # e.g. CUDA asked for on a machine without it
        return f"unavailable: {exc}"


class DRRSession:
    """Renders DRRs of one CT node into the scene and keeps the C-arm display in step.

    Building the renderer (CT to the device, plane stacks) happens once, on the first render; :meth:`is_for`
    tells the caller when the CT node, its voxels or placement, the device or the HU model changed, i.e. when a
    new session is needed.
    """

    def __init__(self, scene, ct_node, device: str = "auto", hu_model: str = "physical", carm_name: str = CARM_NAME):
        self.scene = scene
        self.ct_node = ct_node
        self.ct: CTVolume = mrml.ct_from_volume_node(ct_node)
        self.device = device
        self.hu_model = hu_model
        self.carm_name = carm_name
        self.geometry: CArmGeometry | None = None   # the geometry of the last image shown (maybe a preview)
        self._key = _node_key(ct_node) + (device, hu_model)
        self._renderer: DRRRenderer | None = None
        self._carm = None

    def is_for(self, ct_node, device: str, hu_model: str) -> bool:
        return ct_node is not None and _node_key(ct_node) + (device, hu_model) == self._key

    @property
    def renderer(self) -> DRRRenderer:
        if self._renderer is None:
            self._renderer = DRRRenderer(self.ct, device=self.device, hu_model=self.hu_model)
        return self._renderer

    @property
    def carm(self):
        """The C-arm display (found again in the scene after a reload, made anew when the user deleted any of its
        nodes)."""
        if self._carm is None or not self._carm.exists():
            self._carm = mrml.CArmDisplay.in_scene(self.scene, self.carm_name)
        return self._carm

    def geometry_for(self, preset: str, **settings) -> CArmGeometry:
        """:func:`view_geometry` centred on this CT (the default isocenter, DESIGN.md section 3)."""
        return view_geometry(preset, self.ct.center_ras, **settings)

    def render(self, geometry: CArmGeometry, output_node=None, preview: bool = False,
               preview_scale: int = PREVIEW_SCALE, name: str = "DRR"):
        """Render ``geometry`` (reduced and single-sampled when ``preview``) into ``output_node`` (None: a new node),
        put it on the C-arm's detector and return the node."""
        shown = preview_geometry(geometry, preview_scale) if preview else geometry
        image = self.renderer.render(shown, oversample=1 if preview else 2)
        node = mrml.show_drr(self.scene, image, shown, name=name, node=output_node,
                             source=f"DRR of {self.ct.source}")
        carm = self.carm
        carm.update(shown)
        carm.set_image(node)
        self.geometry = shown
        return node

    def write_ct(self, path: str | os.PathLike) -> Path:
        """The session's CT as a file (what a worker process reads)."""
        return write_ct(path, self.ct)


def export_drr(node, path: str | os.PathLike, format: str | None = None) -> Path:
    """Write the image of a DRR node (with the C-arm geometry stored on it) to PNG, DICOM, NRRD, ..."""
    xray = mrml.xray_from_volume_node(node)
    return write_image(path, xray, mrml.geometry_from_node(node), format=format)


def check_view_spec(views: str | Sequence[Sequence[float]]) -> tuple[str | list[list[float]], int]:
    """A set of views as a worker job takes it (a view-set string such as ``arc:-90:90:5`` or ``hemisphere:N``,
    or ``[[azimuth, elevation], ...]``) and its number of views; a typo or an empty set raises GeometryError, so a
    job fails before anything starts."""
    if isinstance(views, str):
        views = views.strip()
        count = len(parse_view_set(views))
    else:
        try:
            views = [[float(a), float(e)] for a, e in views]
        except (TypeError, ValueError):
            raise GeometryError("views must be [azimuth, elevation] pairs of numbers in degrees") from None
        count = len(views)
    if count == 0:
        raise GeometryError("the view set is empty")
    return views, count


def orbit_job(ct_path: str | os.PathLike, geometry: CArmGeometry, views: str | Sequence[Sequence[float]],
              output_dir: str | os.PathLike, fmt: str = "nrrd", device: str = "auto",
              hu_model: str = "physical", batch: int = 4) -> dict:
    """The worker's ``render_orbit`` job; the view set is checked here, so a typo fails before anything starts."""
    views, _count = check_view_spec(views)
    return {"task": "render_orbit", "ct": os.fspath(ct_path), "geometry": geometry.to_dict(), "views": views,
            "output_dir": os.fspath(output_dir), "format": fmt, "device": device, "hu_model": hu_model,
            "batch": int(batch)}


def load_orbit(views_json: str | os.PathLike) -> tuple[np.ndarray, list[CArmGeometry]]:
    """The images (views, rows, cols) and geometries of a set of views written by the worker: its ``views.json``
    (DRRs) or ``synthesis.json`` (synthesized views); both list ``{"file", ...geometry}`` records."""
    path = Path(views_json)
    manifest = json.loads(path.read_text(encoding="utf-8"))
    records = manifest.get("views") or []
    if not records:
        raise ValueError(f"{path} lists no views")
    images = np.stack([load_xray(path.parent / r["file"]).array for r in records])
    return images, [CArmGeometry.from_dict(r) for r in records]


def add_orbit(scene, views_json: str | os.PathLike, name: str = "DRR orbit", sequences_logic=None,
              kind: str = "DRR"):
    """Import a finished orbit as a sequence (Sequences module); returns ``(sequence node, browser node)``."""
    images, geometries = load_orbit(views_json)
    return mrml.add_orbit_sequence(scene, images, geometries, name=name, sequences_logic=sequences_logic, kind=kind)


def add_chest_phantom(scene, name: str = "SVDRR chest phantom", volume_rendering_logic=None, **phantom):
    """The procedural chest CT (no patient data) as a new volume node: SVDRR's sample data."""
    from .phantoms import chest_phantom

    ct = chest_phantom(**phantom)
    return mrml.add_ct_volume_node(scene, ct, name=name, synthetic=True, kind="Phantom CT",
                                   volume_rendering_logic=volume_rendering_logic)


def default_input_node(scene):
    """The volume the panel starts on: the first CT or X-ray in the scene that SVDRR did not make (a loaded image
    or the sample phantom), or None."""
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(ATTR_SYNTHETIC) == "true" and node.GetAttribute(ATTR_KIND) != "Phantom CT":
            continue
        if mrml.classify_volume_node(node)[0] != "unsupported":
            return node
    return None


def _node_key(node) -> tuple:
    image = node.GetImageData()
    return (node.GetID(), image.GetMTime() if image is not None else 0,
            tuple(np.round(world_ijk_to_ras(node), 6).ravel().tolist()))
