"""MRML bridge: CT and X-ray volumes to and from a Slicer scene, DRRs on the detector, orbits as sequences.

The only place (with ``mrml_carm`` and ``mrml_scene``) that imports ``slicer``; every function takes the
``vtkMRMLScene`` (or a node) as an argument and never reads ``slicer.mrmlScene``/``slicer.app``/Qt, so it runs
inside Slicer and in plain Python with the ``slicer-core`` wheel. Input nodes are only read, never modified.

Conventions: numpy arrays as in :mod:`SVDRRLogic.images` (CT ``[k, j, i]``, X-ray ``[row, col]``), geometry in RAS
mm. A single-slice volume node holds ``array[None]`` (shape ``(1, rows, cols)``): column i, row j. What SVDRR
writes on nodes is in the ``SVDRR.*`` attributes (:mod:`SVDRRLogic.mrml_scene`); synthetic outputs also carry
``' (synthetic)'`` in their name.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import slicer
import vtk

from .attenuation import MU_WATER_PER_MM
from .geometry import CArmGeometry, GeometryError
from .images import CTVolume, ImageError, XRayImage, value_doubt
from .mrml_carm import CArmDisplay, cone_points, detector_corners
from .mrml_scene import (
    ATTR_GEOMETRY,
    ATTR_KIND,
    ATTR_METADATA,
    ATTR_SOURCE,
    ATTR_SYNTHETIC,
    ATTR_WINDOW_LEVEL,
    ATTR_UNITS,
    ATTR_VIEW,
    SYNTHETIC_SUFFIX,
    array_from_image,
    auto_window_level,
    ensure_volume_display,
    get_json_attribute,
    image_from_array,
    load_scene_bundle,
    new_scene,
    prepare_scene,
    save_scene_bundle,
    set_ijk_to_ras,
    set_json_attribute,
    set_volume_array,
    synthetic_name,
    world_ijk_to_ras,
)

__all__ = [
    "CT_WINDOW_PRESETS",
    "DRR_KINDS",
    "SYNTHETIC_SUFFIX",
    "CArmDisplay",
    "add_ct_volume_node",
    "add_orbit_sequence",
    "add_volume_rendering",
    "classify_volume_node",
    "compare_in_slice_views",
    "cone_points",
    "ct_from_volume_node",
    "detector_corners",
    "geometry_from_node",
    "load_scene_bundle",
    "new_scene",
    "orbit_items",
    "prepare_scene",
    "save_scene_bundle",
    "select_orbit_view",
    "show_drr",
    "volume_center_ras",
    "xray_from_volume_node",
]

log = logging.getLogger(__name__)

DRR_KINDS = ("DRR", "Synthesized X-ray", "X-ray")
#: The kinds of output a new image may replace: SVDRR's own synthetic images, never an X-ray ("X-ray" marks an
#: acquired film shown on its detector, an input).
REPLACEABLE_KINDS = ("DRR", "Synthesized X-ray")
#: Window/level presets offered for CT volumes in HU (window, level): soft tissue (default), lung, bone, brain.
CT_WINDOW_PRESETS = ((400.0, 40.0), (1500.0, -600.0), (1800.0, 400.0), (80.0, 40.0))


# -- reading nodes ----------------------------------------------------------------------------------------------
def classify_volume_node(node) -> tuple[str, str]:
    """('ct' | 'xray' | 'unsupported', a one-line reason for the user), without copying any voxels."""
    if node is None:
        return "unsupported", "no volume selected"
    name = node.GetName()
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        return "unsupported", f"'{name}' is a {node.GetClassName()}, not an image volume"
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return "unsupported", f"'{name}' is a label map (segmentation), not an image"
    if node.IsA("vtkMRMLDiffusionTensorVolumeNode") or node.IsA("vtkMRMLDiffusionWeightedVolumeNode"):
        return "unsupported", f"'{name}' is a diffusion MRI volume, not a CT or an X-ray"
    image = node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        return "unsupported", f"'{name}' has no image data"
    dims = image.GetDimensions()
    comps = scalars.GetNumberOfComponents()
    if sum(d > 1 for d in dims) < 2:
        return "unsupported", f"'{name}' is {'x'.join(map(str, dims))} voxels, too small to be an image"
    if node.GetParentTransformNode() is not None and not node.GetParentTransformNode().IsTransformToWorldLinear():
        return "unsupported", (f"'{name}' is under the non-linear transform "
                               f"'{node.GetParentTransformNode().GetName()}'; harden or remove it first")
    if min(dims) == 1:
        cols, rows = (d for d in dims if d > 1)
        if comps == 1:
            return "xray", f"2D image {cols}x{rows} (X-ray)"
        if comps in (3, 4):
            return "xray", f"2D colour image {cols}x{rows} (X-ray, read as grey)"
        return "unsupported", f"'{name}' is a 2D image with {comps} components per pixel"
    if comps != 1:
        return "unsupported", f"'{name}' is a 3D image with {comps} components per voxel (colour/vector), not a CT"
    lo, hi = image.GetScalarRange()
    size = "x".join(map(str, dims))
    units = node.GetAttribute(ATTR_UNITS) or "hu"
    doubt = value_doubt(lo, hi, units)
    reason = f"attenuation range {lo:.4g}..{hi:.4g} /mm" if units == "mu" else f"HU range {lo:.0f}..{hi:.0f}"
    return "ct", f"CT volume {size}, {reason}" + (f" ({doubt})" if doubt else "")


_KIND_ERRORS = {"ct": ("xray", "is a 2D image, not a CT", "a CT"),
                "xray": ("ct", "is a 3D volume, not a 2D X-ray", "an X-ray")}


def _require_kind(node, wanted: str) -> str:
    """The node's name, after checking :func:`classify_volume_node` says it is ``wanted``; ImageError otherwise."""
    kind, reason = classify_volume_node(node)
    name = node.GetName() if node is not None else "<none>"
    other, mismatch, what = _KIND_ERRORS[wanted]
    if kind == other:
        raise ImageError(f"'{name}' {mismatch} ({reason})")
    if kind != wanted:
        raise ImageError(f"'{name}' cannot be used as {what}: {reason}")
    return name


def ct_from_volume_node(node) -> CTVolume:
    """The CT in ``node`` (voxels copied, float32 ``[k, j, i]``), its linear parent transforms hardened into
    ``ijk_to_ras``; the node is not modified. 2D images, non-linear transforms and non-images raise ImageError."""
    name = _require_kind(node, "ct")
    ijk_to_ras = world_ijk_to_ras(node)
    array = array_from_image(node.GetImageData()).astype(np.float32, copy=False)
    metadata = get_json_attribute(node, ATTR_METADATA)
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    if node.GetAttribute(ATTR_SYNTHETIC) == "true":
        metadata.setdefault("synthetic", True)
    return CTVolume(array, ijk_to_ras, units=node.GetAttribute(ATTR_UNITS) or "hu", metadata=metadata,
                    source=node.GetAttribute(ATTR_SOURCE) or f"MRML node '{name}'")


def xray_from_volume_node(node) -> XRayImage:
    """The 2D image in a single-slice ``node`` as an XRayImage: ``array[row, col]``, pixel spacing, the node's
    IJK-to-RAS (linear parent transforms hardened) and metadata from the ``SVDRR.*`` attributes."""
    name = _require_kind(node, "xray")
    ijk = world_ijk_to_ras(node)
    voxels = array_from_image(node.GetImageData())
    colour = voxels.ndim == 4
    if colour:
        voxels = voxels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    flat = list(node.GetImageData().GetDimensions()).index(1) if voxels.shape[0] != 1 else 2
    # (array, column axis, row axis) for each possible flat axis of the [k, j, i] block
    array, col_axis, row_axis = {2: (voxels[0], 0, 1), 1: (voxels[:, 0, :], 0, 2), 0: (voxels[:, :, 0], 1, 2)}[flat]
    m = np.eye(4)
    m[:, 0], m[:, 1], m[:, 2], m[:, 3] = ijk[:, col_axis], ijk[:, row_axis], ijk[:, flat], ijk[:, 3]
    spacing = (float(np.linalg.norm(m[:3, 1])), float(np.linalg.norm(m[:3, 0])))
    geometry = geometry_from_node(node)
    metadata = {"node_name": name, "node_id": node.GetID(), "synthetic": node.GetAttribute(ATTR_SYNTHETIC) == "true",
                "kind": node.GetAttribute(ATTR_KIND) or "", "color_converted": colour,
                "spacing_known": geometry is not None or not np.allclose(spacing, 1.0),
                "spacing_at": "detector" if geometry is not None else "unknown"}
    if geometry is not None:
        metadata["geometry"] = geometry.to_dict()
    return XRayImage(np.asarray(array, dtype=np.float32), spacing, metadata=metadata, ijk_to_ras=m,
                     source=node.GetAttribute(ATTR_SOURCE) or f"MRML node '{name}'")


def geometry_from_node(node) -> CArmGeometry | None:
    """The C-arm view stored on a node by SVDRR (``SVDRR.Geometry``), or None when absent or unreadable."""
    stored = get_json_attribute(node, ATTR_GEOMETRY) if node is not None else None
    if not isinstance(stored, dict):
        return None
    try:
        return CArmGeometry.from_dict(stored)
    except (GeometryError, TypeError, KeyError, ValueError):
        log.warning("node '%s' has an unreadable %s attribute; ignored", node.GetName(), ATTR_GEOMETRY)
        return None


# -- DRRs and X-rays on the detector ----------------------------------------------------------------------------
def show_drr(scene, image: np.ndarray, geometry: CArmGeometry, name: str = "DRR", node=None,
             synthetic: bool = True, kind: str = "DRR", window_level: tuple[float, float] | None = None,
             source: str | None = None):
    """Put a projection image on the detector plane of ``geometry`` as a single-slice scalar volume node.

    Creates a node, or updates ``node`` in place (live re-render; the size may change, e.g. a reduced preview
    resolution). ``node`` must be an SVDRR output or an empty volume node: any other node is refused, so inputs
    are never overwritten. IJK-to-RAS is ``geometry.detector_ijk_to_ras`` (voxel (i, j, 0) sits on the centre of
    detector pixel (col i, row j)). Window/level is ``window_level``, else the 1..99 percentile range, except on an
    updated node whose window/level the user changed since SVDRR set it: live re-rendering keeps what they chose.
    Attributes: ``SVDRR.Geometry``, ``SVDRR.Synthetic``, ``SVDRR.Kind``. A synthetic image's node name always ends
    in ``' (synthetic)'``: a new node is ``name`` with it, an updated one keeps the name the user gave it, with it.
    """
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.shape != geometry.shape:
        raise ValueError(f"image shape {pixels.shape} does not match the detector of the geometry, "
                         f"{geometry.shape} (rows, cols)")
    if not np.isfinite(pixels).all():
        raise ValueError("the image contains NaN or infinite values")
    if kind not in DRR_KINDS:
        raise ValueError(f"kind must be one of {', '.join(DRR_KINDS)}, not {kind!r}")
    prepare_scene(scene)
    if node is None:
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetName(synthetic_name(name, synthetic))
        scene.AddNode(node)
    else:
        _check_output_node(scene, node, REPLACEABLE_KINDS)
        node.SetName(synthetic_name(node.GetName(), synthetic))
    if window_level is None and not _user_window_level(node):
        window_level = auto_window_level(pixels)
    was = node.StartModify()
    try:
        set_volume_array(node, pixels[None])
        set_ijk_to_ras(node, geometry.detector_ijk_to_ras)
        if node.GetParentTransformNode() is not None:
            node.SetAndObserveTransformNodeID(None)  # our output: its geometry is the detector's, nothing else
        _tag(node, kind, synthetic, source)
        set_json_attribute(node, ATTR_GEOMETRY, geometry.to_dict())
        if window_level is not None:
            set_json_attribute(node, ATTR_WINDOW_LEVEL, [float(x) for x in window_level])
    finally:
        node.EndModify(was)
    ensure_volume_display(scene, node, window_level)
    return node


def _user_window_level(node) -> bool:
    """True when the node's display shows another window/level than the one SVDRR last set on it."""
    display = node.GetDisplayNode()
    applied = get_json_attribute(node, ATTR_WINDOW_LEVEL)
    if display is None or not isinstance(applied, list) or len(applied) != 2:
        return False
    return not np.allclose([display.GetWindow(), display.GetLevel()], applied, rtol=1e-6, atol=1e-9)


def _check_output_node(scene, node, kinds: Sequence[str]) -> None:
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"output node '{node.GetName()}' is a {node.GetClassName()}, not a scalar volume node")
    if node.GetScene() is None:
        scene.AddNode(node)
    elif node.GetScene() is not scene:
        raise ValueError(f"output node '{node.GetName()}' belongs to another scene")
    image = node.GetImageData()
    empty = image is None or image.GetPointData().GetScalars() is None
    if not empty and (node.GetAttribute(ATTR_KIND) not in kinds or node.GetAttribute(ATTR_SYNTHETIC) != "true"):
        raise ValueError(f"refusing to overwrite '{node.GetName()}': it is not an image SVDRR rendered or "
                         f"synthesized (inputs are never modified); choose a new or empty output volume")


def _tag(node, kind: str, synthetic: bool, source: str | None) -> None:
    node.SetAttribute(ATTR_KIND, kind)
    node.SetAttribute(ATTR_SYNTHETIC, "true" if synthetic else "false")
    if source:
        node.SetAttribute(ATTR_SOURCE, source)


# -- CT volumes ---------------------------------------------------------------------------------------------------
def add_ct_volume_node(scene, ct: CTVolume, name: str = "CT", synthetic: bool = False,
                       volume_rendering: bool = True, volume_rendering_logic=None, kind: str | None = None):
    """A new scalar volume node holding ``ct`` (float32 voxels, ``ct.ijk_to_ras``), CT window/level presets and,
    when ``volume_rendering``, a visible volume rendering. ``kind`` (the ``SVDRR.Kind`` attribute) defaults to
    "Reconstructed CT" for synthetic volumes and "CT" otherwise; a generated phantom says "Phantom CT".

    Volume rendering: with ``volume_rendering_logic`` (inside Slicer pass the Volume Rendering module's logic) its
    default nodes and the ``CT-Chest-Contrast-Enhanced`` preset are used; without it a GPU ray-cast display node
    and a volume property node with SVDRR's own CT transfer functions are created directly (works with
    slicer-core, where no presets are shipped). Skipped with a logged reason when those classes are missing.
    Units, metadata and source are kept in ``SVDRR.*`` attributes so :func:`ct_from_volume_node` returns ``ct``.
    """
    directions = ct.ijk_to_ras[:3, :3] / ct.spacing
    if np.abs(directions.T @ directions - np.eye(3)).max() > 1e-4:
        raise ImageError(f"{ct.source}: the voxel axes are not orthogonal (sheared, e.g. gantry tilt); a Slicer "
                         "volume node cannot hold that geometry, resample the CT first")
    prepare_scene(scene)
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(synthetic_name(name, synthetic))
    scene.AddNode(node)
    was = node.StartModify()
    try:
        node.SetAndObserveImageData(image_from_array(ct.array_hu))
        set_ijk_to_ras(node, ct.ijk_to_ras)
        _tag(node, kind or ("Reconstructed CT" if synthetic else "CT"), synthetic, ct.source)
        node.SetAttribute(ATTR_UNITS, ct.units)
        set_json_attribute(node, ATTR_METADATA, ct.metadata)
    finally:
        node.EndModify(was)
    if ct.units == "hu":
        display = ensure_volume_display(scene, node, CT_WINDOW_PRESETS[0])
        for window, level in CT_WINDOW_PRESETS:
            display.AddWindowLevelPreset(window, level)
    else:
        ensure_volume_display(scene, node, auto_window_level(ct.array_hu, 0.5, 99.5))
    if volume_rendering:
        add_volume_rendering(scene, node, volume_rendering_logic)
    return node


def add_volume_rendering(scene, node, logic=None):
    """A visible volume rendering display node for a CT ``node``; returns it, or None when not available here."""
    if logic is not None:
        display = logic.CreateDefaultVolumeRenderingNodes(node)
        preset = logic.GetPresetByName("CT-Chest-Contrast-Enhanced") if node.GetAttribute(ATTR_UNITS) != "mu" else None
        if preset is not None:
            display.GetVolumePropertyNode().Copy(preset)
        else:
            _ct_transfer_functions(display.GetVolumePropertyNode(), node.GetAttribute(ATTR_UNITS) or "hu")
        display.SetVisibility(True)
        return display
    display_class = getattr(slicer, "vtkMRMLGPURayCastVolumeRenderingDisplayNode", None)
    property_class = getattr(slicer, "vtkMRMLVolumePropertyNode", None)
    if display_class is None or property_class is None:
        log.info("volume rendering skipped for '%s': this Slicer build has no volume rendering MRML classes",
                 node.GetName())
        return None
    prop = property_class()
    prop.SetName(f"{node.GetName()} volume property")
    scene.AddNode(prop)
    _ct_transfer_functions(prop, node.GetAttribute(ATTR_UNITS) or "hu")
    display = display_class()
    display.SetName(f"{node.GetName()} volume rendering")
    scene.AddNode(display)
    display.SetAndObserveVolumePropertyNodeID(prop.GetID())
    display.SetFollowVolumeDisplayNode(False)
    display.SetCroppingEnabled(False)
    node.AddAndObserveDisplayNodeID(display.GetID())
    display.SetVisibility(True)
    return display


def volume_center_ras(node) -> tuple[float, float, float]:
    """Centre of a volume node's box in world RAS (linear parent transforms applied), without copying voxels."""
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return tuple(0.5 * (bounds[2 * axis] + bounds[2 * axis + 1]) for axis in range(3))


def compare_in_slice_views(scene, node, reference=None, opacity: float = 0.5) -> int:
    """Show ``node`` in every slice view of the scene: over ``reference`` (as foreground at ``opacity``, the
    reference as background) so two volumes that share RAS are compared where they overlap, or alone as the
    background when there is no reference. Only the views' composite nodes change, never the volumes. Returns the
    number of slice views set (0 without a view layout, e.g. a batch scene)."""
    count = scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(count):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        was = composite.StartModify()
        if reference is None:
            composite.SetBackgroundVolumeID(node.GetID())
        else:
            composite.SetBackgroundVolumeID(reference.GetID())
            composite.SetForegroundVolumeID(node.GetID())
            composite.SetForegroundOpacity(float(opacity))
        composite.EndModify(was)
    return count


def _ct_transfer_functions(prop_node, units: str) -> None:
    """SVDRR's CT look: air and soft tissue clear, bone from ~150 HU opaque ivory, a faint reddish tissue band."""
    opacity_hu = ((-1024.0, 0.0), (-100.0, 0.0), (40.0, 0.03), (150.0, 0.05), (350.0, 0.45), (1200.0, 0.8),
                  (3071.0, 0.85))
    colour_hu = ((-1024.0, (0.0, 0.0, 0.0)), (40.0, (0.7, 0.35, 0.3)), (250.0, (0.9, 0.8, 0.6)),
                 (1200.0, (1.0, 0.98, 0.93)))

    def x(hu: float) -> float:
        return hu if units == "hu" else MU_WATER_PER_MM * (1.0 + hu / 1000.0)

    opacity = vtk.vtkPiecewiseFunction()
    for hu, a in opacity_hu:
        opacity.AddPoint(x(hu), a)
    colour = vtk.vtkColorTransferFunction()
    for hu, rgb in colour_hu:
        colour.AddRGBPoint(x(hu), *rgb)
    prop = prop_node.GetVolumeProperty()
    prop.SetScalarOpacity(opacity)
    prop.SetColor(colour)
    prop.ShadeOn()
    prop.SetInterpolationTypeToLinear()
    prop_node.Modified()


# -- orbits as sequences ------------------------------------------------------------------------------------------
def add_orbit_sequence(scene, images: np.ndarray, geometries: Sequence[CArmGeometry], name: str = "DRR orbit",
                       synthetic: bool = True, kind: str = "DRR", sequences_logic=None):
    """A sequence with one single-slice volume per view, each on its own detector plane with its geometry, and a
    browser to scrub through them (Sequences module). Returns ``(sequence_node, browser_node)``.

    The index is the azimuth in degrees when the views differ only by azimuth (an arc), else the view number.
    Square brackets in ``name`` become parentheses (Slicer cannot save such a sequence in a scene bundle).
    Items are named ``'<name> <index>'``, carry the ``SVDRR.*`` attributes and ``SVDRR.ViewIndex`` (position in
    ``geometries``) and share one window/level. The browser's proxy node is created here (or by
    ``sequences_logic``, the Sequences module logic, when given).
    """
    stack = np.asarray(images, dtype=np.float32)
    geometries = list(geometries)
    if stack.ndim != 3 or len(geometries) != stack.shape[0] or not geometries:
        raise ValueError(f"need images (views, rows, cols) and one geometry per view; got {stack.shape} images "
                         f"and {len(geometries)} geometries")
    for g in geometries:
        if g.shape != stack.shape[1:]:
            raise ValueError(f"image size {stack.shape[1:]} does not match a geometry's detector {g.shape}")
    if not np.isfinite(stack).all():
        raise ValueError("the images contain NaN or infinite values")
    if kind not in DRR_KINDS:
        raise ValueError(f"kind must be one of {', '.join(DRR_KINDS)}, not {kind!r}")
    prepare_scene(scene)
    azimuths = [round(g.azimuth, 6) + 0.0 for g in geometries]
    by_azimuth = len(set(azimuths)) == len(azimuths) and len({round(g.elevation, 6) for g in geometries}) == 1
    labels = [f"{a:g}" for a in azimuths] if by_azimuth else [str(n) for n in range(len(geometries))]

    sequence = slicer.vtkMRMLSequenceNode()
    # Slicer saves a sequence whose name contains '[' or ']' as an empty bundle: never give it such a name
    sequence.SetName(synthetic_name(name.replace("[", "(").replace("]", ")"), synthetic))
    scene.AddNode(sequence)
    sequence.SetIndexName("azimuth" if by_azimuth else "view")
    sequence.SetIndexUnit("deg" if by_azimuth else "")
    sequence.SetIndexType(sequence.NumericIndex)
    _tag(sequence, kind, synthetic, None)
    window_level = auto_window_level(stack)
    for n, (pixels, g, label) in enumerate(zip(stack, geometries, labels)):
        item = slicer.vtkMRMLScalarVolumeNode()
        item.SetName(f"{sequence.GetName()} {label}")
        item.SetAndObserveImageData(image_from_array(pixels[None]))
        set_ijk_to_ras(item, g.detector_ijk_to_ras)
        _tag(item, kind, synthetic, None)
        set_json_attribute(item, ATTR_GEOMETRY, g.to_dict())
        item.SetAttribute(ATTR_VIEW, str(n))
        sequence.SetDataNodeAtValue(item, label)

    browser = slicer.vtkMRMLSequenceBrowserNode()
    browser.SetName(f"{sequence.GetName()} browser")
    scene.AddNode(browser)
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetPlaybackRateFps(5.0)
    browser.SetPlaybackLooped(True)
    browser.SetSelectedItemNumber(0)
    proxy = select_orbit_view(browser, 0, sequences_logic)
    ensure_volume_display(scene, proxy, window_level)
    return sequence, browser


def select_orbit_view(browser, item_number: int, sequences_logic=None):
    """Show item ``item_number`` of the browser's sequence in its proxy node (created if needed); returns the proxy.

    Inside Slicer the Sequences module updates proxies by itself; this also works where no such logic runs.
    """
    sequence = browser.GetMasterSequenceNode()
    count = sequence.GetNumberOfDataNodes()
    if not 0 <= item_number < count:
        raise IndexError(f"view {item_number} does not exist; the orbit has {count} views")
    browser.SetSelectedItemNumber(item_number)
    if sequences_logic is not None:
        sequences_logic.UpdateProxyNodesFromSequences(browser)
    item = sequence.GetNthDataNode(item_number)
    proxy = browser.GetProxyNode(sequence)
    scene = browser.GetScene()
    if proxy is None:
        proxy = slicer.vtkMRMLScalarVolumeNode()
        proxy.SetName(sequence.GetName())
        scene.AddNode(proxy)
        browser.AddProxyNode(proxy, sequence, False)
    if sequences_logic is None:
        proxy.CopyContent(item, True)
    ensure_volume_display(scene, proxy)
    return proxy


def orbit_items(sequence) -> list[tuple[str, object]]:
    """``(index value, item node)`` of every view in an orbit sequence, in the sequence's order."""
    return [(sequence.GetNthIndexValue(i), sequence.GetNthDataNode(i)) for i in range(sequence.GetNumberOfDataNodes())]
