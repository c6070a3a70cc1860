"""The C-arm in the 3D view: source point (draggable), X-ray cone, detector plate (with the DRR on it), central ray.

Nodes (all carry ``SVDRR.CArm`` = the display's name and ``SVDRR.CArmRole``, so :meth:`CArmDisplay.from_scene`
finds them again after a scene bundle is reloaded):

- ``<name> source``: markups fiducial with exactly one control point labelled ``Source`` at ``geometry.source``;
  the user drags it, :meth:`CArmDisplay.angles_from_source` turns its position into positioner angles. It also
  stores the current geometry (``SVDRR.Geometry``);
- ``<name> X-ray cone``: translucent model, the pyramid from the source to the 4 detector corners;
- ``<name> detector``: model, one quad over the detector's outer pixel edges, with texture coordinates: (0, 0) at
  the outer corner of pixel (col 0, row 0), s along the columns, t along the rows;
- ``<name> central ray``: model, a line from the source to the detector centre.

The DRR on the detector (:meth:`CArmDisplay.set_image`) is a texture on the detector model, taken from the
volume's display node output (its window/level and colour map, so the 3D view follows what the user sets in the
Volumes module). This works in the same way inside Slicer and with slicer-core, needs no slice view, and is what
SlicerRT does for its planar images. Independently, the DRR volume node itself lies on the detector plane
(:func:`SVDRRLogic.mrml.show_drr`), so a slice view aligned to it shows it at full resolution.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from .geometry import CArmGeometry, GeometryError
from .mrml_scene import (
    ATTR_GEOMETRY,
    ensure_volume_display,
    get_json_attribute,
    prepare_scene,
    remove_node_and_helpers,
    set_json_attribute,
)

ATTR_CARM = "SVDRR.CArm"
ATTR_ROLE = "SVDRR.CArmRole"
IMAGE_REFERENCE = "SVDRRDetectorImage"
ROLES = ("source", "cone", "detector", "ray")

_SOURCE_COLOR = (1.0, 0.85, 0.1)
_CONE_COLOR, _CONE_OPACITY = (1.0, 0.9, 0.35), 0.15
_DETECTOR_COLOR, _DETECTOR_OPACITY = (0.35, 0.65, 1.0), 0.4
_RAY_COLOR = (1.0, 0.3, 0.2)
_MOVE_TOLERANCE_MM = 1e-6


def detector_corners(geometry: CArmGeometry) -> np.ndarray:
    """RAS of the detector's 4 outer corners (pixel edges, not centres), going round: (0,0), (W,0), (W,H), (0,H).

    They are the corners of pixels (col 0, row 0), (W-1, 0), (W-1, H-1), (0, H-1) pushed out by half a pixel.
    """
    w, h = geometry.detector
    ijk = np.array([[-0.5, -0.5, 0, 1], [w - 0.5, -0.5, 0, 1], [w - 0.5, h - 0.5, 0, 1], [-0.5, h - 0.5, 0, 1]])
    return (geometry.detector_ijk_to_ras @ ijk.T).T[:, :3]


def cone_points(geometry: CArmGeometry) -> np.ndarray:
    """The X-ray cone's 5 vertices: the source, then the detector corners in :func:`detector_corners` order."""
    return np.vstack([geometry.source, detector_corners(geometry)])


class CArmDisplay:
    """The C-arm of one view in a scene. ``update(geometry)`` moves everything; ``remove()`` deletes it all.

    ``is_updating`` is True while :meth:`update` moves the source point, so an observer of the source node's
    ``PointModifiedEvent`` can tell a user drag from the display following a new geometry. ``update`` only moves
    the point when it is not already at ``geometry.source``, so "drag -> angles -> render -> update" settles.
    """

    def __init__(self, scene, name: str = "C-arm", geometry: CArmGeometry | None = None, _nodes=None):
        self.scene = scene
        self.name = name
        self.geometry: CArmGeometry | None = None
        self.is_updating = False
        prepare_scene(scene)
        if _nodes is None:
            _nodes = self._create_nodes()
        self.source_node, self.cone_node, self.detector_node, self.ray_node = (_nodes[r] for r in ROLES)
        if geometry is not None:
            self.update(geometry)
        else:  # re-attached to existing nodes: take their geometry, leave a dragged source where the user left it
            stored = get_json_attribute(self.source_node, ATTR_GEOMETRY)
            self.geometry = CArmGeometry.from_dict(stored) if isinstance(stored, dict) else None

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_scene(cls, scene, name: str = "C-arm") -> CArmDisplay | None:
        """The display named ``name`` already in ``scene`` (e.g. after loading a bundle), or None.

        Restores the geometry from the source node and the DRR texture from the detector's node reference; moves
        nothing (a source point dragged before saving stays where it was).
        """
        found = {}
        for node in _nodes_of(scene, name):
            found.setdefault(node.GetAttribute(ATTR_ROLE), node)
        if set(found) != set(ROLES):
            return None
        display = cls(scene, name, _nodes=found)
        image = display.detector_node.GetNodeReference(IMAGE_REFERENCE)
        if image is not None:
            display.set_image(image)
        return display

    @classmethod
    def in_scene(cls, scene, name: str = "C-arm") -> CArmDisplay:
        """The display named ``name``: restored from ``scene``, or made anew when it is missing or the user deleted
        some of its nodes (whose remains are removed first, so a scene never holds two half C-arms)."""
        display = cls.from_scene(scene, name)
        if display is None:
            for node in _nodes_of(scene, name):
                remove_node_and_helpers(scene, node)
            display = cls(scene, name)
        return display

    def _create_nodes(self) -> dict:
        scene, name = self.scene, self.name
        source = slicer.vtkMRMLMarkupsFiducialNode()
        source.SetName(f"{name} source")
        scene.AddNode(source)
        source.CreateDefaultDisplayNodes()
        source.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), "Source")
        source.SetMaximumNumberOfControlPoints(1)
        source.SetFixedNumberOfControlPoints(True)  # the user moves the source, never adds or deletes it
        display = source.GetDisplayNode()
        display.SetSelectedColor(*_SOURCE_COLOR)
        display.SetColor(*_SOURCE_COLOR)
        display.SetGlyphScale(4.0)
        display.SetTextScale(4.0)

        cone = self._model(f"{name} X-ray cone", _polydata(5, polys=[(0, 1, 2), (0, 2, 3), (0, 3, 4), (0, 4, 1)]),
                           _CONE_COLOR, _CONE_OPACITY)
        plate = _polydata(4, polys=[(0, 1, 2, 3)])
        tcoords = vtk.vtkFloatArray()
        tcoords.SetName("TCoords")
        tcoords.SetNumberOfComponents(2)
        for st in ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)):
            tcoords.InsertNextTuple2(*st)
        plate.GetPointData().SetTCoords(tcoords)
        detector = self._model(f"{name} detector", plate, _DETECTOR_COLOR, _DETECTOR_OPACITY)
        detector.GetDisplayNode().SetEdgeVisibility(True)
        detector.GetDisplayNode().SetEdgeColor(*_DETECTOR_COLOR)
        ray = self._model(f"{name} central ray", _polydata(2, lines=[(0, 1)]), _RAY_COLOR, 1.0)
        ray.GetDisplayNode().SetLineWidth(2.0)
        nodes = {"source": source, "cone": cone, "detector": detector, "ray": ray}
        for role, node in nodes.items():
            node.SetAttribute(ATTR_CARM, name)
            node.SetAttribute(ATTR_ROLE, role)
        return nodes

    def _model(self, name: str, polydata, color, opacity: float):
        node = slicer.vtkMRMLModelNode()
        node.SetName(name)
        self.scene.AddNode(node)
        node.SetAndObservePolyData(polydata)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetColor(*color)
        display.SetOpacity(opacity)
        display.SetBackfaceCulling(False)
        display.SetScalarVisibility(False)
        display.SetVisibility2D(True)
        return node

    # -- use ----------------------------------------------------------------------------------------------------
    @property
    def nodes(self) -> dict:
        """The display's nodes by role: ``source``, ``cone``, ``detector``, ``ray``."""
        return dict(zip(ROLES, (self.source_node, self.cone_node, self.detector_node, self.ray_node)))

    def update(self, geometry: CArmGeometry) -> None:
        """Move source, cone, detector and central ray to ``geometry`` (and remember it on the source node)."""
        self.is_updating = True
        try:
            _set_points(self.cone_node, cone_points(geometry))
            _set_points(self.detector_node, detector_corners(geometry))
            _set_points(self.ray_node, np.vstack([geometry.source, geometry.detector_center]))
            if np.linalg.norm(self.source_position() - geometry.source) > _MOVE_TOLERANCE_MM:
                self.source_node.SetNthControlPointPositionWorld(0, *(float(x) for x in geometry.source))
            set_json_attribute(self.source_node, ATTR_GEOMETRY, geometry.to_dict())
            self.geometry = geometry
        finally:
            self.is_updating = False

    def source_position(self) -> np.ndarray:
        """Current RAS position of the (possibly dragged) source control point."""
        p = [0.0, 0.0, 0.0]
        self.source_node.GetNthControlPointPositionWorld(0, p)
        return np.array(p, dtype=np.float64)

    def angles_from_source(self) -> tuple[float, float]:
        """(azimuth, elevation) that put the source on the ray from the isocenter through the source point."""
        if self.geometry is None:
            raise GeometryError("the C-arm display has no geometry yet; call update(geometry) first")
        return self.geometry.positioner_angles_from_source(self.source_position())

    def geometry_from_source(self) -> CArmGeometry:
        """The current geometry turned to the dragged source point (distances and detector unchanged)."""
        return self.geometry.with_view(*self.angles_from_source())

    def set_image(self, volume_node) -> None:
        """Show ``volume_node`` (a 2D scalar volume, e.g. the DRR) as a texture on the detector; None clears it."""
        display = self.detector_node.GetDisplayNode()
        was = display.StartModify()
        if volume_node is None:
            display.SetTextureImageDataConnection(None)
            display.SetColor(*_DETECTOR_COLOR)
            display.SetOpacity(_DETECTOR_OPACITY)
            display.SetAmbient(0.0)
            display.SetDiffuse(1.0)
            self.detector_node.SetNodeReferenceID(IMAGE_REFERENCE, None)
        else:
            volume_display = ensure_volume_display(self.scene, volume_node)
            display.SetTextureImageDataConnection(volume_display.GetOutputImageDataConnection())
            display.SetInterpolateTexture(True)
            display.SetColor(1.0, 1.0, 1.0)
            display.SetOpacity(1.0)
            display.SetAmbient(1.0)   # show the image's grey values, not a lit surface
            display.SetDiffuse(0.0)
            self.detector_node.SetNodeReferenceID(IMAGE_REFERENCE, volume_node.GetID())
        display.EndModify(was)

    def exists(self) -> bool:
        """True while all four nodes are still in the scene (the user may delete any of them)."""
        return all(node.GetScene() is self.scene for node in self.nodes.values())

    def set_visible(self, visible: bool) -> None:
        for node in self.nodes.values():
            node.GetDisplayNode().SetVisibility(bool(visible))

    def remove(self) -> None:
        """Delete every node of the display (with their display and storage nodes) from the scene."""
        if self.detector_node.GetScene() is not None:
            self.detector_node.GetDisplayNode().SetTextureImageDataConnection(None)
        for node in self.nodes.values():
            remove_node_and_helpers(self.scene, node)


def _nodes_of(scene, name: str) -> list:
    """The nodes of the C-arm display ``name`` in ``scene``."""
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return [n for n in nodes if n.GetAttribute(ATTR_CARM) == name and n.GetAttribute(ATTR_ROLE) in ROLES]


def _polydata(n_points: int, polys=(), lines=()):
    pd = vtk.vtkPolyData()
    points = vtk.vtkPoints()
    points.SetDataTypeToDouble()
    points.SetNumberOfPoints(n_points)
    for i in range(n_points):
        points.SetPoint(i, 0.0, 0.0, 0.0)
    pd.SetPoints(points)
    for attr, cells in (("SetPolys", polys), ("SetLines", lines)):
        if cells:
            array = vtk.vtkCellArray()
            for cell in cells:
                array.InsertNextCell(len(cell), cell)
            getattr(pd, attr)(array)
    return pd


def _set_points(model_node, points: np.ndarray) -> None:
    pd = model_node.GetPolyData()
    pts = pd.GetPoints()
    if pts is None or pts.GetNumberOfPoints() != len(points):
        raise GeometryError(f"model '{model_node.GetName()}' does not have the {len(points)} points of the C-arm "
                            "display; it was edited by hand, remove the display and create it again")
    for i, p in enumerate(points):
        pts.SetPoint(i, float(p[0]), float(p[1]), float(p[2]))
    pts.Modified()
    pd.Modified()
