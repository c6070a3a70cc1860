"""Scene plumbing shared by the MRML bridge: node classes, the grey colour table, numpy <-> VTK, .mrb bundles.

Like every ``SVDRRLogic/mrml*`` module it imports ``slicer`` (inside Slicer: the application's module; in plain
Python: the PyPI ``slicer-core`` wheel) and takes the ``vtkMRMLScene`` as an argument. It never touches
``slicer.mrmlScene``, ``slicer.app``, ``slicer.modules`` or Qt, so the same code runs in both (DESIGN.md section 1).

What a Slicer application provides and a bare ``vtkMRMLScene`` lacks is added here on demand, idempotently:
node classes that module logics normally register (sequence browser, volume rendering, markups JSON storage) and
the ``Grey`` colour table that scalar volume display nodes need to produce an image.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtkmodules.util import numpy_support

from .images import ImageError

#: Node attributes written by SVDRR (read back by :mod:`SVDRRLogic.mrml`, the Slicer module and the worker).
ATTR_GEOMETRY = "SVDRR.Geometry"      # JSON of CArmGeometry.to_dict()
ATTR_SYNTHETIC = "SVDRR.Synthetic"    # "true" / "false"
ATTR_KIND = "SVDRR.Kind"              # "DRR", "Synthesized X-ray", "X-ray" (also on orbit sequences and items),
#                                       "CT", "Reconstructed CT"
ATTR_UNITS = "SVDRR.Units"            # CT voxel units: "hu" or "mu"
ATTR_METADATA = "SVDRR.Metadata"      # JSON of CTVolume.metadata
ATTR_SOURCE = "SVDRR.Source"          # where the image came from (file, model, renderer)
ATTR_VIEW = "SVDRR.ViewIndex"         # position of an orbit item in the list the caller gave
ATTR_WINDOW_LEVEL = "SVDRR.WindowLevel"  # [window, level] SVDRR last set on a DRR (a different one is the user's)
SYNTHETIC_SUFFIX = " (synthetic)"
#: Node reference role from a reconstructed CT to the CT it is shown beside (the CT its X-rays were rendered from).
REFERENCE_CT_ROLE = "SVDRR.ReferenceCT"

#: Classes a Slicer application registers through its module logics; a bare scene needs them to create the
#: nodes and, above all, to read them back from a .mrml/.mrb file.
_NODE_CLASSES = (
    "vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeDisplayNode", "vtkMRMLVolumeArchetypeStorageNode",
    "vtkMRMLModelNode", "vtkMRMLModelDisplayNode", "vtkMRMLModelStorageNode", "vtkMRMLColorTableNode",
    "vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsFiducialDisplayNode", "vtkMRMLMarkupsDisplayNode",
    "vtkMRMLMarkupsJsonStorageNode", "vtkMRMLMarkupsFiducialStorageNode",
    "vtkMRMLSequenceNode", "vtkMRMLSequenceBrowserNode", "vtkMRMLSequenceStorageNode",
    "vtkMRMLVolumeSequenceStorageNode",
    "vtkMRMLVolumePropertyNode", "vtkMRMLVolumePropertyStorageNode", "vtkMRMLVolumePropertyJsonStorageNode",
    "vtkMRMLGPURayCastVolumeRenderingDisplayNode", "vtkMRMLCPURayCastVolumeRenderingDisplayNode",
    "vtkMRMLLinearTransformNode", "vtkMRMLTransformNode", "vtkMRMLGridTransformNode",
    "vtkMRMLTransformStorageNode",
)


def new_scene() -> slicer.vtkMRMLScene:
    """A bare scene ready for the bridge (batch runs and tests; inside Slicer use the application's scene)."""
    scene = slicer.vtkMRMLScene()
    prepare_scene(scene)
    return scene


def prepare_scene(scene) -> None:
    """Register the node classes SVDRR uses, add the Grey colour table and a selection node, where missing.

    A no-op in a Slicer application's scene, which has all of them already.
    """
    for name in _NODE_CLASSES:
        cls = getattr(slicer, name, None)
        if cls is not None and not _is_registered(scene, name):
            scene.RegisterNodeClass(cls())
    grey_color_node_id(scene)
    if scene.GetNodeByID("vtkMRMLSelectionNodeSingleton") is None:
        # the application's selection node (markups look up their length unit in it when saved)
        selection = slicer.vtkMRMLSelectionNode()
        selection.SetSingletonTag("Singleton")
        scene.AddNode(selection)


def _is_registered(scene, class_name: str) -> bool:
    if hasattr(scene, "IsNodeClassRegistered"):
        return bool(scene.IsNodeClassRegistered(class_name))
    return bool(scene.GetTagByClassName(class_name))


def grey_color_node_id(scene) -> str:
    """ID of the Grey colour table, created as Slicer's colour logic would (singleton, not saved) when missing.

    Without it a scalar volume display node has no lookup table and its output image (used for the DRR texture
    on the detector) is empty.
    """
    node_id = slicer.vtkMRMLColorLogic.GetColorTableNodeID(slicer.vtkMRMLColorTableNode.Grey)
    if scene.GetNodeByID(node_id) is None:
        node = slicer.vtkMRMLColorTableNode()
        node.SetTypeToGrey()
        node.SetSingletonTag(node.GetTypeAsString())
        node.SetName(node.GetTypeAsString())
        node.SetSaveWithScene(False)
        node.SetHideFromEditors(True)
        scene.AddNode(node)
    return node_id


# -- numpy <-> VTK --------------------------------------------------------------------------------------------
def vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    m = np.asarray(m, dtype=np.float64)
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def numpy_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def image_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """vtkImageData (deep copy) from an array indexed [k, j, i] (or [k, j, i, components])."""
    a = np.ascontiguousarray(array)
    comps = a.shape[3] if a.ndim == 4 else 1
    image = vtk.vtkImageData()
    image.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
    scalars = numpy_support.numpy_to_vtk(a.reshape(-1, comps) if comps > 1 else a.reshape(-1), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def array_from_image(image: vtk.vtkImageData) -> np.ndarray:
    """A copy of the voxels indexed [k, j, i] (plus a trailing component axis when there are several)."""
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise ValueError("no voxel data")
    i, j, k = image.GetDimensions()
    comps = scalars.GetNumberOfComponents()
    flat = numpy_support.vtk_to_numpy(scalars)
    shape = (k, j, i) if comps == 1 else (k, j, i, comps)
    return np.array(flat, copy=True).reshape(shape)


def set_volume_array(node, array: np.ndarray) -> None:
    """Put ``array`` [k, j, i] into a volume node: in place when size and type match (cheap live update)."""
    a = np.ascontiguousarray(array)
    image = node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if (scalars is not None and image.GetDimensions() == (a.shape[2], a.shape[1], a.shape[0])
            and scalars.GetNumberOfComponents() == 1
            and numpy_support.get_vtk_array_type(a.dtype) == scalars.GetDataType()):
        numpy_support.vtk_to_numpy(scalars)[:] = a.reshape(-1)
        scalars.Modified()
        image.Modified()
        node.Modified()
        return
    node.SetAndObserveImageData(image_from_array(a))


def set_ijk_to_ras(node, ijk_to_ras: np.ndarray) -> None:
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))


def world_ijk_to_ras(node) -> np.ndarray:
    """The node's IJK-to-RAS with its parent transforms applied (hardened); non-linear ones are refused."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = numpy_matrix(m)
    parent = node.GetParentTransformNode()
    if parent is None:
        return ijk_to_ras
    if not parent.IsTransformToWorldLinear():
        raise ImageError(
            f"volume '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; its voxels cannot "
            "be described by one IJK-to-RAS matrix. Harden the transform (Data module, right-click > Harden "
            "transform) or resample the volume first")
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return numpy_matrix(to_world) @ ijk_to_ras


def auto_window_level(images: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """(window, level) spanning the ``low``..``high`` percentiles (of a subsample for big images)."""
    a = np.asarray(images, dtype=np.float32).reshape(-1)
    if a.size > 1 << 20:
        a = a[:: a.size >> 20]
    lo, hi = (float(x) for x in np.percentile(a, [low, high]))
    if not hi > lo:
        lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        hi = lo + 1.0
    return hi - lo, (hi + lo) / 2.0


def ensure_volume_display(scene, node, window_level: tuple[float, float] | None = None):
    """The node's scalar display node (created with the Grey colour table when missing), window/level applied."""
    display = node.GetDisplayNode()
    if display is None or not display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        grey_color_node_id(scene)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    if not display.GetColorNodeID():
        display.SetAndObserveColorNodeID(grey_color_node_id(scene))
    if window_level is not None:
        window, level = (float(x) for x in window_level)
        was = display.StartModify()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(window, level)
        display.EndModify(was)
    return display


# -- attributes -----------------------------------------------------------------------------------------------
def set_json_attribute(node, name: str, value: Any) -> None:
    node.SetAttribute(name, json.dumps(value, default=_json_default, separators=(",", ":")))


def get_json_attribute(node, name: str) -> Any:
    text = node.GetAttribute(name)
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def synthetic_name(name: str, synthetic: bool) -> str:
    """``name`` ending in the synthetic mark once (a name built from a synthetic node's name, e.g. "phantom
    (synthetic) orbit", carries it only at the end)."""
    return name.replace(SYNTHETIC_SUFFIX, "").rstrip() + SYNTHETIC_SUFFIX if synthetic else name


def remove_node_and_helpers(scene, node) -> None:
    """Remove a node with its display and storage nodes (the scene does not cascade removals)."""
    if node is None or node.GetScene() is None:
        return
    helpers = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetNumberOfStorageNodes"):
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is not None:
            scene.RemoveNode(helper)


# -- scene bundles ----------------------------------------------------------------------------------------------
def save_scene_bundle(scene, path: str | os.PathLike) -> Path:
    """Write the whole scene to a Slicer scene bundle (.mrb). Atomic: a failed save leaves ``path`` untouched.

    The bundle is first written under a temporary folder next to ``path`` (same file system), checked, then
    renamed over ``path``. Like Slicer's own "Save scene", this adds default storage nodes to nodes that had none.

    Slicer writes an *empty* bundle, and reports success, when the bundle's file name contains '[' or ']'; the
    same happens inside it to every sequence whose node name contains them. So the staging file gets a name
    without brackets, and the result is checked: a bundle without its scene file, or with an empty sequence,
    raises OSError naming the culprit instead of leaving a silently incomplete file.
    """
    path = Path(path).expanduser().absolute()  # Slicer's writer refuses relative folders
    if path.suffix.lower() != ".mrb":
        raise ValueError(f"{path}: a scene bundle file name must end in .mrb")
    new_folder = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    url, root, cwd = scene.GetURL(), scene.GetRootDirectory(), os.getcwd()
    try:
        staging = Path(tempfile.mkdtemp(prefix=".svdrr-save-", dir=path.parent))
    except OSError as exc:
        raise OSError(f"{path}: cannot write in {path.parent}: {exc.strerror or exc}") from None
    try:
        target = staging / (_BRACKETS.sub("_", path.stem) + ".mrb")
        messages = slicer.vtkMRMLMessageCollection()
        ok = scene.WriteToMRB(str(target), None, messages)
        if not ok or not target.is_file():
            raise OSError(f"{path}: saving the scene bundle failed: {_messages(messages) or 'no details'}")
        _check_bundle(target, path)
        os.replace(target, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if new_folder:
            shutil.rmtree(path.parent, ignore_errors=True)  # a failed save leaves nothing behind
        raise
    finally:
        os.chdir(cwd)  # Slicer's zip code changes the working directory and may leave it changed
        shutil.rmtree(staging, ignore_errors=True)
        scene.SetURL(url)
        scene.SetRootDirectory(root)
    return path.resolve()


def load_scene_bundle(path: str | os.PathLike):
    """Read a .mrb into a new ``vtkMRMLScene`` (node classes registered, Grey colour table present)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scene bundle")
    scene = slicer.vtkMRMLScene()
    prepare_scene(scene)
    cwd = os.getcwd()
    cache = tempfile.mkdtemp(prefix="svdrr-mrb-")
    io_manager, cache_manager = slicer.vtkDataIOManager(), slicer.vtkCacheManager()
    cache_manager.SetRemoteCacheDirectory(cache)
    io_manager.SetCacheManager(cache_manager)
    scene.SetDataIOManager(io_manager)
    scene.SetCacheManager(cache_manager)
    try:
        messages = slicer.vtkMRMLMessageCollection()
        ok = scene.ReadFromMRB(str(path.resolve()), False, messages)
        if not ok:
            raise OSError(f"{path}: not a readable scene bundle: {_messages(messages) or 'no details'}")
    finally:
        # on a bad archive Slicer leaves the working directory inside the (about to be deleted) unpack folder
        os.chdir(cwd)
        scene.SetDataIOManager(None)
        scene.SetCacheManager(None)
        shutil.rmtree(cache, ignore_errors=True)
    grey_color_node_id(scene)
    return scene


_BRACKETS = re.compile(r"[\[\]]")


def _check_bundle(bundle: Path, shown_as: Path) -> None:
    """Every scene file Slicer should have put in the bundle (its own, one per nested sequence bundle) is there."""
    try:
        with zipfile.ZipFile(bundle) as archive:
            if not any(n.endswith(".mrml") for n in archive.namelist()):
                raise OSError(f"{shown_as}: Slicer wrote a bundle without its scene file")
            for inner in (n for n in archive.namelist() if n.endswith(".seq.mrb")):
                with zipfile.ZipFile(io.BytesIO(archive.read(inner))) as nested:
                    if not any(n.endswith(".mrml") for n in nested.namelist()):
                        raise OSError(f"{shown_as}: Slicer wrote the sequence '{Path(inner).name}' empty; rename the "
                                      "sequence node without '[' or ']' and save again")
    except zipfile.BadZipFile:
        raise OSError(f"{shown_as}: Slicer wrote a corrupt bundle") from None


def _messages(collection) -> str:
    n = collection.GetNumberOfMessages()
    return "; ".join(collection.GetNthMessageText(i) for i in range(n) if collection.GetNthMessageText(i))
