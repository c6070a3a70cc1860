"""The CT-reconstruction part of the Slicer module's panel, without Qt: whether a reconstruction model is usable, the
views of the X-ray nodes, the worker job that reconstructs a CT from them, and the import of the CT into the scene.

The job itself runs in the worker (task ``reconstruct_ct``, i.e. :func:`SVDRRLogic.reconstruct.reconstruct_ct`), so
the model never loads in Slicer's process. Like :mod:`SVDRRLogic.session_synthesis`, everything takes the scene
explicitly and goes through :mod:`SVDRRLogic.mrml`, so pytest drives it with ``slicer-core``
(Testing/test_reconstruction_session.py). The X-ray nodes and the reference CT are only read; the result is a new
node marked synthetic (`` (synthetic)`` in the name, ``SVDRR.Synthetic``, ``SVDRR.Kind = "Reconstructed CT"``).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from . import mrml
from .geometry import CArmGeometry, GeometryError
from .images import ImageError
from .io import load_ct, load_xray
from .io.common import geometry_from_metadata
from .mrml_scene import REFERENCE_CT_ROLE
from .reconstruct import METHODS
from .session_synthesis import ModelStatus, catalogue_model_status, folder_is_set, write_xray_input

KIND = "Reconstructed CT"
#: What the panel calls each method (``SVDRRLogic.reconstruct.METHODS``); the method is the model folder's kind.
METHOD_LABELS = dict(zip(METHODS, ("DVG-Diffusion", "3D patch EDM")))
CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
NEW_VIEWS = ("coarse", "svdrr", "none")
#: Opacity of the reconstruction over its reference CT in the slice views: both stay visible where they overlap.
COMPARE_OPACITY = 0.5


def method_of(label: str) -> str:
    """The method (``dvg`` / ``patch-edm``) for a panel label or a method name; ValueError for anything else."""
    for method, text in METHOD_LABELS.items():
        if label in (method, text):
            return method
    raise ValueError(f"unknown reconstruction method {label!r}; choose {' or '.join(METHOD_LABELS.values())}")


def reconstruction_model_status(method: str, name: str | None, folder: str | os.PathLike | None = None, *,
                                catalogue=None) -> ModelStatus:
    """Can ``method`` run with this model without a download? A chosen ``folder`` wins over the catalogue ``name``:
    its ``config.json`` must name the method as its kind (read as plain JSON: the worker loads and checks the
    weights). A catalogue model must be of that kind and in the cache or embedded (``weights.resolve(...,
    offline=True)`` installs an embedded one). One line in ``message`` either way."""
    method = method_of(method)
    label = METHOD_LABELS[method]
    if folder_is_set(folder):
        path = Path(folder).expanduser()
        config = path / "config.json"
        if not path.is_dir():
            return ModelStatus(None, f"model folder {path} does not exist")
        if not config.is_file():
            return ModelStatus(None, f"{path} is not a reconstruction model folder: it has no config.json")
        try:
            kind = json.loads(config.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError) as exc:
            return ModelStatus(None, f"{config}: unreadable model configuration ({exc})")
        if kind != method:
            return ModelStatus(None, f"{path} holds a {kind!r} model, not a {label} model")
        return ModelStatus(str(path), f"model folder {path}")
    return catalogue_model_status(name, method, f"a {label}", "CTs", catalogue)


def xray_view_of(node) -> tuple[float, float] | None:
    """(azimuth, elevation) of the C-arm view SVDRR stored on an X-ray node when it rendered or synthesized it, or
    None: no stored geometry, or voxels that no longer fit its detector (replaced since, so the view is stale)."""
    geometry = mrml.geometry_from_node(node)
    image = node.GetImageData() if geometry is not None else None
    if image is None or tuple(image.GetDimensions()) != (*geometry.detector, 1):
        return None
    return geometry.azimuth, geometry.elevation


def check_view(view: Sequence[float], what: str) -> tuple[float, float]:
    """A view as two floats within the C-arm's range, or a one-line GeometryError naming ``what``."""
    try:
        azimuth, elevation = (float(v) for v in view)
        CArmGeometry(azimuth=azimuth, elevation=elevation)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{what}: the view must be azimuth, elevation in degrees ({exc})") from None
    return azimuth, elevation


def reconstruction_job(inputs: Sequence[tuple[str | os.PathLike, Sequence[float] | None]],
                       output_path: str | os.PathLike, model: str | os.PathLike | None, method: str | None, *,
                       steps: int | None = None, seed: int = 0, device: str = "auto", dtype: str = "auto",
                       keep: str | os.PathLike | None = None, center_ras: Sequence[float] | None = None,
                       new_view: str = "coarse") -> dict:
    """The worker's ``reconstruct_ct`` job for one or two (X-ray file, view) pairs. Everything is checked here so
    a mistake fails at once, in one line, not after the worker has loaded the model: the count, each view (given,
    or stored in an existing file), the numbers and the output's format."""
    inputs = list(inputs)
    if len(inputs) not in (1, 2):
        raise ImageError(f"reconstruction takes one or two X-rays, got {len(inputs)}")
    xrays = []
    for n, (path, view) in enumerate(inputs, 1):
        if view is None and not _stored_view(path):
            raise ImageError(f"X-ray {n} ({Path(path).name}): its view is unknown; enter its azimuth and elevation")
        xrays.append({"path": os.fspath(path), "view": None if view is None else list(check_view(view, f"X-ray {n}"))})
    if method is not None:
        method = method_of(method)
    output = Path(output_path)
    if not output.name.endswith(CT_SUFFIXES):
        raise ImageError(f"{output}: write the CT as {', '.join(CT_SUFFIXES)}")
    if steps is not None and int(steps) < 1:
        raise ValueError("steps must be at least 1 (or none: the model's own number)")
    if int(seed) < 0:
        raise ValueError(f"seed must be a whole number >= 0, not {seed}")
    if new_view not in NEW_VIEWS:
        raise ValueError(f"new view must be one of {', '.join(NEW_VIEWS)}, not {new_view!r}")
    spec = {"task": "reconstruct_ct", "xrays": xrays, "output": os.fspath(output),
            "model": None if model is None else os.fspath(model), "method": method, "seed": int(seed),
            "device": device, "dtype": dtype, "new_view": new_view}
    if steps is not None:
        spec["steps"] = int(steps)
    if keep is not None:
        spec["keep_intermediates"] = os.fspath(keep)
    if center_ras is not None:
        center = [float(x) for x in center_ras]
        if len(center) != 3 or not all(math.isfinite(x) for x in center):
            raise ValueError(f"the CT's centre must be three finite R, A, S numbers in mm, not {center_ras}")
        spec["center_ras"] = center
    return spec


def _stored_view(path: str | os.PathLike) -> bool:
    """Whether an existing X-ray file stores its C-arm geometry (then the worker reads its view from it)."""
    return Path(path).is_file() and geometry_from_metadata(load_xray(path).metadata) is not None


def write_reconstruction_inputs(nodes: Sequence, folder: str | os.PathLike,
                                user_views: Sequence[Sequence[float] | None] | None = None
                                ) -> list[tuple[Path, tuple[float, float]]]:
    """Each X-ray node as a float NRRD for the worker (``session_synthesis.write_xray_input``, which keeps a DRR's
    C-arm geometry, so the CT is placed around the same isocenter) with its view: the one the user entered when
    given (it overrides a stored one), else the stored one; a one-line ImageError when neither exists."""
    nodes = list(nodes)
    user_views = list(user_views) if user_views is not None else [None] * len(nodes)
    if len(user_views) != len(nodes):
        raise ValueError(f"{len(nodes)} X-ray node(s) but {len(user_views)} view(s)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n, (node, entered) in enumerate(zip(nodes, user_views)):
        name = node.GetName()
        view = check_view(entered, f"'{name}'") if entered is not None else xray_view_of(node)
        if view is None:
            raise ImageError(f"'{name}' has no stored C-arm view; enter its azimuth and elevation")
        written.append((write_xray_input(node, folder / f"xray_{n}.nrrd"), view))
    return written


def default_center(nodes: Sequence, reference_ct_node=None) -> list[float] | None:
    """Where the CT goes when the first X-ray does not say: a DRR's stored isocenter places it (None: the worker
    reads it from the file); a film without geometry is centred on the reference CT when there is one (so the
    result lands on it), else on the origin (None)."""
    if reference_ct_node is None or xray_view_of(nodes[0]) is not None:
        return None
    return list(mrml.volume_center_ras(reference_ct_node))


def import_reconstruction(scene, ct_path: str | os.PathLike, name: str = KIND, reference_ct_node=None, *,
                          manifest: dict | None = None, volume_rendering: bool = True,
                          volume_rendering_logic=None):
    """Import a finished ``reconstruct_ct`` job's CT as a new scalar volume node, marked synthetic, with CT
    window/level presets and volume rendering (``mrml.add_ct_volume_node``: through ``volume_rendering_logic``, the
    Volume Rendering module's logic inside Slicer, else with MRML display nodes made directly; skipped where
    neither exists). ``manifest`` (the job's result) fills ``SVDRR.Metadata`` and ``SVDRR.Source``.

    The CT already sits in RAS where the X-rays' C-arm was aimed, so "next to" the ``reference_ct_node`` (the CT the
    DRRs came from, when there is one) means in the same views, not moved: every slice view shows the reference as
    background and the reconstruction over it at half opacity, which compares the two where they overlap (the fader
    of the slice view's controller trades one for the other), and the node references the reference CT
    (role ``SVDRR.ReferenceCT``). Without a reference the reconstruction becomes the slice views' background.
    """
    if reference_ct_node is not None and mrml.classify_volume_node(reference_ct_node)[0] != "ct":
        raise ImageError(f"'{reference_ct_node.GetName()}' is not a CT volume: it cannot be the reference CT")
    ct = load_ct(ct_path)
    manifest = dict(manifest or {})
    ct.metadata.update({k: v for k, v in manifest.items() if k not in ("output", "intermediates")}, synthetic=True)
    ct.source = _source_line(manifest, ct_path)
    node = mrml.add_ct_volume_node(scene, ct, name=name, synthetic=True, kind=KIND,
                                   volume_rendering=volume_rendering, volume_rendering_logic=volume_rendering_logic)
    if reference_ct_node is not None:
        node.SetNodeReferenceID(REFERENCE_CT_ROLE, reference_ct_node.GetID())
    mrml.compare_in_slice_views(scene, node, reference_ct_node, COMPARE_OPACITY)
    return node


def _source_line(manifest: dict, ct_path) -> str:
    """``SVDRR.Source``: which model made the CT from which views (the file path when there is no manifest)."""
    if not manifest:
        return str(ct_path)
    model = manifest.get("model", {})
    views = ", ".join(f"({v[0]:g}, {v[1]:g})" for v in (i.get("view", (0, 0)) for i in manifest.get("inputs", [])))
    label = METHOD_LABELS.get(manifest.get("method"), manifest.get("method", "?"))
    source = f"reconstructed by {model.get('name', 'a model')} ({label}) from X-rays at views {views}"
    return source + (" (demonstration model)" if manifest.get("demo_model") else "")
