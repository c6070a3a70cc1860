"""The novel-view part of the Slicer module's panel, without Qt: whether a model is usable, the worker job that
synthesizes views of an X-ray node, and the import of its result into the scene.

The job itself runs in the worker (task ``synthesize_views``, i.e. :func:`SVDRRLogic.synthesize.synthesize_views`);
the orbit job's pieces are shared (:func:`SVDRRLogic.session.check_view_spec`, :func:`~SVDRRLogic.session.load_orbit`
reads ``synthesis.json`` as it reads ``views.json``). Everything takes the scene explicitly and goes through
:mod:`SVDRRLogic.mrml`, so pytest drives it with ``slicer-core`` (Testing/test_synthesize.py). Results are new nodes
marked synthetic (`` (synthetic)`` in the name, ``SVDRR.Synthetic``, ``SVDRR.Kind = "Synthesized X-ray"``), each on
the detector plane of its view; the input node is only read.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import mrml, weights
from .geometry import CArmGeometry, GeometryError
from .images import ImageError
from .io import kind_of, write_image
from .mrml_scene import ATTR_METADATA, ATTR_SOURCE, ATTR_VIEW, set_json_attribute
from .session import check_view_spec, load_orbit

KIND = "Synthesized X-ray"
#: The sub-folders every SV-DRR model folder has (``SVDRRLogic.models.svdrr_folder.REQUIRED``, repeated here so that
#: checking a folder does not import torch).
MODEL_PARTS = ("transformer", "vae", "image_encoder", "cc_projection", "scheduler")


@dataclass
class ModelStatus:
    """Whether the panel can synthesize: ``model`` is what the job gets (None when unusable) and ``message`` one
    line for the user; ``demo`` marks the small demonstration model."""

    model: str | None
    message: str
    demo: bool = False

    @property
    def available(self) -> bool:
        return self.model is not None


def folder_is_set(folder: str | os.PathLike | None) -> bool:
    """Whether a folder was chosen (a path widget left empty gives '' or '.')."""
    return folder is not None and str(folder).strip() not in ("", ".")


def model_status(name: str | None, folder: str | os.PathLike | None = None, *, catalogue=None) -> ModelStatus:
    """Is a model usable without a download? A chosen ``folder`` wins over the catalogue ``name``: it must hold the
    SV-DRR parts (a cheap check; the worker loads and checks everything). A catalogue model must be an SV-DRR
    model already in the cache (``weights.resolve(..., offline=True)``, which also installs an embedded one)."""
    if folder_is_set(folder):
        path = Path(folder).expanduser()
        if not path.is_dir():
            return ModelStatus(None, f"model folder {path} does not exist")
        missing = [part for part in MODEL_PARTS if not (path / part).is_dir()]
        if missing:
            return ModelStatus(None, f"{path} is not an SV-DRR model folder: it lacks {', '.join(missing)}")
        return ModelStatus(str(path), f"model folder {path}")
    return catalogue_model_status(name, "svdrr", "an SV-DRR novel-view", "views", catalogue)


def catalogue_model_status(name: str | None, kind: str, label: str, products: str, catalogue=None) -> ModelStatus:
    """Is catalogue model ``name`` of ``kind`` usable offline (cached or embedded; ``weights.resolve(...,
    offline=True)`` installs an embedded one)? ``label`` names the kind and ``products`` what it makes, in the
    one-line message."""
    if not name:
        return ModelStatus(None, f"choose {label} model of the catalogue or a model folder")
    try:
        cat = catalogue if isinstance(catalogue, weights.Catalogue) else weights.Catalogue.load(catalogue)
        entry = cat.get(name)
        if entry.kind != kind:
            return ModelStatus(None, f"'{name}' is a {entry.kind} model, not {label} model")
        found = weights.resolve(entry.name, offline=True, progress=False, catalogue=cat)
    except weights.WeightsError as exc:
        return ModelStatus(None, str(exc))
    demo = f" (small demonstration model: its {products} only show the workflow)" if entry.demo else ""
    return ModelStatus(entry.name, f"{entry.name}{demo}: ready in {found}", demo=entry.demo)


def target_views(azimuth: float, elevation: float, spec: str = "") -> str | list[list[float]]:
    """The views the panel asks for: ``spec`` when given (``arc:...``, ``hemisphere:N`` or ``AZ,EL; AZ,EL; ...``),
    else the single view (``azimuth``, ``elevation``). GeometryError for a typo."""
    spec = (spec or "").strip()
    if not spec:
        views = [[float(azimuth), float(elevation)]]
    elif ":" in spec:
        views = spec
    else:
        try:
            views = [[float(x) for x in pair.split(",")] for pair in spec.replace("\n", ";").split(";")
                     if pair.strip()]
        except ValueError:
            raise GeometryError(f"bad views {spec!r}: use AZ,EL; AZ,EL; ... or arc:START:STOP:STEP or "
                                "hemisphere:N") from None
        if any(len(v) != 2 for v in views):
            raise GeometryError(f"bad views {spec!r}: each view is AZ,EL (two numbers in degrees)")
    views, _count = check_view_spec(views)
    for a, e in ([] if isinstance(views, str) else views):
        CArmGeometry(azimuth=a, elevation=e)
    return views


def synthesis_job(xray_path: str | os.PathLike, model: str | os.PathLike, views: str | Sequence[Sequence[float]],
                  output_dir: str | os.PathLike, *, steps: int = 20, guidance: float = 3.0, seed: int = 0,
                  device: str = "auto", fmt: str = "nrrd", batch: int = 4,
                  source_view: Sequence[float] | None = None, input_label: str | None = None) -> dict:
    """The worker's ``synthesize_views`` job; views and numbers are checked here, so a typo fails at once."""
    views, _count = check_view_spec(views)
    if int(steps) < 1 or int(batch) < 1:
        raise ValueError("steps and batch must be at least 1")
    if not math.isfinite(float(guidance)) or float(guidance) < 0.0:
        raise ValueError(f"guidance must be a number >= 0, not {guidance}")
    spec = {"task": "synthesize_views", "xray": os.fspath(xray_path), "model": os.fspath(model), "views": views,
            "output_dir": os.fspath(output_dir), "steps": int(steps), "guidance": float(guidance),
            "seed": int(seed), "device": device, "format": fmt, "batch": int(batch)}
    if source_view is not None:
        spec["source_view"] = [float(x) for x in source_view]
    if input_label:
        spec["input_label"] = str(input_label)
    return spec


def write_xray_input(node, path: str | os.PathLike) -> Path:
    """The X-ray of a volume node as a float NRRD for the worker (``mrml.xray_from_volume_node``), marked synthetic
    only when the node is; a DRR made by SVDRR keeps its C-arm geometry, so the views are synthesized around the
    same isocenter, from its angles. A blank image fails here, naming the node, before any job starts."""
    xray = mrml.xray_from_volume_node(node)
    lo, hi = float(xray.array.min()), float(xray.array.max())
    if not hi > lo:
        raise ImageError(f"'{node.GetName()}' is blank (every pixel is {lo:g}); there is nothing to work from")
    geometry = mrml.geometry_from_node(node)
    if geometry is not None and geometry.shape != xray.array.shape:
        geometry = None  # the voxels were replaced since SVDRR wrote them: the stored view no longer applies
    if geometry is None:
        xray.metadata.pop("geometry", None)
    return write_image(path, xray, geometry, format="nrrd", kind=kind_of(xray))


@dataclass
class SynthesisImport:
    """What :func:`import_synthesis` added: one node per view, or a sequence (and its browser) for a set."""

    nodes: list = field(default_factory=list)
    sequence: object = None
    browser: object = None
    manifest: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return self.sequence.GetNumberOfDataNodes() if self.sequence is not None else len(self.nodes)


def import_synthesis(scene, manifest_path: str | os.PathLike, name: str = "Synthesized X-ray",
                     as_sequence: bool | None = None, sequences_logic=None) -> SynthesisImport:
    """Import the views of ``synthesis.json`` (a finished ``synthesize_views`` job): each on its detector plane,
    marked synthetic. ``as_sequence`` None: a sequence when there is more than one view (an orbit to browse with
    the Sequences module), else a volume node. Every node (or sequence item) carries its view's settings in
    ``SVDRR.Metadata`` and the model and input in ``SVDRR.Source``."""
    path = Path(manifest_path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: cannot read the synthesis manifest ({exc})") from None
    if not manifest.get("synthetic"):
        raise ImageError(f"{path}: not a manifest of synthesized views")
    images, geometries = load_orbit(path)
    records = manifest["views"]
    model = manifest.get("model", {})
    source = f"synthesized by {model.get('name', 'a model')} from {manifest.get('input', {}).get('label', '?')}"
    if model.get("demo"):
        source += " (demonstration model)"
    if as_sequence is None:
        as_sequence = len(geometries) > 1
    if as_sequence:
        sequence, browser = mrml.add_orbit_sequence(scene, images, geometries, name=name, synthetic=True, kind=KIND,
                                                    sequences_logic=sequences_logic)
        set_json_attribute(sequence, ATTR_METADATA, {k: v for k, v in manifest.items() if k != "views"})
        sequence.SetAttribute(ATTR_SOURCE, source)
        for _label, item in mrml.orbit_items(sequence):
            record = records[int(item.GetAttribute(ATTR_VIEW))]
            set_json_attribute(item, ATTR_METADATA, record.get("metadata", {}))
            item.SetAttribute(ATTR_SOURCE, source)
        return SynthesisImport([], sequence, browser, manifest)
    nodes = []
    for image, geometry, record in zip(images, geometries, records):
        label = f"{name} az {geometry.azimuth:g} el {geometry.elevation:g}"
        node = mrml.show_drr(scene, image, geometry, name=label, synthetic=True, kind=KIND, source=source)
        set_json_attribute(node, ATTR_METADATA, record.get("metadata", {}))
        nodes.append(node)
    return SynthesisImport(nodes, None, None, manifest)
