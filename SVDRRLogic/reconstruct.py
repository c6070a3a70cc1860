"""A CT from one or two X-ray files, to a file: the route shared by ``svdrr reconstruct``, the worker (task
``reconstruct_ct``), the Slicer module (through the worker) and ``svdrr demo``.

Each X-ray comes with its view: given as ``FILE@AZ,EL`` (degrees, our C-arm convention) or read from the file (the
C-arm geometry our DRRs and synthesized views store, else DICOM's positioner angles or View Position), and is
mirrored where its DICOM Patient Orientation says its pixels are laid out otherwise than our detector's. The model is a catalogue name or a
model folder; its kind picks the method (DVG-Diffusion or the 3D patch EDM). The CT is written atomically,
marked synthetic; ``keep`` writes the intermediate products and a ``reconstruction.json`` manifest into a folder.
Everything a user can get wrong fails with one line before the model runs.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .images import ImageError, XRayImage
from .io import kind_of, load_xray, write_ct, write_image
from .io.common import atomic_output, first_line, geometry_from_metadata
from .synthesize import Progress, Reporter, resolve_model
from .weights import WeightsError

METHODS = ("dvg", "patch-edm")
#: The model each method uses when none is named: the embedded demonstration models.
DEFAULT_MODELS = {"dvg": "dvg-demo-64", "patch-edm": "patch-edm-demo-64"}
MANIFEST_NAME = "reconstruction.json"
#: DICOM View Position -> (azimuth, elevation): PA is our (0, 0); a left lateral (LL: the patient's left against
#: the detector) has the source on the patient's right, azimuth +90.
VIEW_POSITIONS = {"PA": (0.0, 0.0), "AP": (180.0, 0.0), "LL": (90.0, 0.0), "RL": (-90.0, 0.0)}


def parse_xray_spec(spec: str) -> tuple[str, tuple[float, float] | None]:
    """``FILE@AZ,EL`` -> (FILE, (az, el)); ``FILE@AZ`` -> (FILE, (az, 0)), as ``--view AZ``; ``FILE`` -> (FILE,
    None). Only a trailing ``@numbers`` is a view, so file names containing ``@`` still work; a tail that is no
    view after an existing file is a mistyped view, not a missing file."""
    path, sep, tail = str(spec).rpartition("@")
    if sep:
        parts = tail.split(",")
        try:
            view = tuple(float(p) for p in parts)
        except ValueError:
            view = ()
        if len(view) in (1, 2) and all(math.isfinite(v) for v in view):
            return path, (view + (0.0,))[:2]  # type: ignore[return-value]
        if len(parts) == 2 or (Path(path).exists() and not Path(spec).exists()):
            raise ImageError(f"{spec}: the view after @ must be AZIMUTH[,ELEVATION] in degrees")
    return str(spec), None


def view_from_file(image: XRayImage) -> tuple[float, float] | None:
    """The view an X-ray file states: our stored C-arm geometry, else DICOM's positioner angles, else its View
    Position (PA, AP, LL, RL); None when it says nothing."""
    stored = geometry_from_metadata(image.metadata)
    if stored is not None:
        return stored.azimuth, stored.elevation
    meta = image.metadata
    if "positioner_primary_angle" in meta:
        return float(meta["positioner_primary_angle"]), float(meta.get("positioner_secondary_angle", 0.0))
    return VIEW_POSITIONS.get(str(meta.get("view_position", "")).strip().upper())


def oriented(image: XRayImage, view: tuple[float, float]) -> XRayImage:
    """The image flipped, where its DICOM Patient Orientation says so, to the pixel layout our detector has at
    ``view`` (columns along u, rows along v, DESIGN.md section 3): an AP film displayed with the patient's right
    on the left is mirrored to the detector seen from the source side."""
    letters = image.metadata.get("patient_orientation")
    if not letters or len(letters) != 2 or not all(letters):
        return image
    from .geometry import CArmGeometry
    from .io.dicom_writer import patient_orientation
    geom = CArmGeometry(azimuth=view[0], elevation=view[1])
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
    array = image.array
    for axis, (have, want) in enumerate(zip(letters, (patient_orientation(geom.u), patient_orientation(geom.v)))):
        if opposite.get(have[0]) == want[0]:
            array = np.flip(array, axis=1 - axis)       # letter 0 describes columns (axis 1), letter 1 rows
    if array is image.array:
        return image
    return XRayImage(np.ascontiguousarray(array), image.pixel_spacing, dict(image.metadata, flipped_to_view=True),
                     None, image.source)


def load_inputs(specs: Sequence[str | tuple[str | XRayImage, Sequence[float] | None]]
                ) -> tuple[list[XRayImage], list[tuple[float, float]]]:
    """The X-rays, laid out as our detector sees them, and their views; a one-line error for a missing view."""
    images, views = [], []
    for spec in specs:
        src, view = parse_xray_spec(spec) if isinstance(spec, str) else spec
        image = src if isinstance(src, XRayImage) else load_xray(src)
        view = view if view is not None else view_from_file(image)
        if view is None:
            raise ImageError(f"{image.source}: its view is unknown; give it as FILE@AZIMUTH,ELEVATION "
                             "(e.g. frontal @0,0, lateral @90,0)")
        view = tuple(float(v) for v in view)
        images.append(oriented(image, view))
        views.append(view)
    if len(images) not in (1, 2):
        raise ImageError(f"reconstruction takes one or two X-rays, got {len(images)}")
    return images, views


def load_pipeline(model: str | os.PathLike, method: str | None = None, *, device: str = "auto",
                  dtype: str = "auto", catalogue=None, offline: bool | None = None, progress=True):
    """(pipeline, ModelChoice) for a catalogue name or folder; ``method`` must agree with the model's kind."""
    from .models.recon_folder import read_config
    from .models.svdrr import ModelLoadError
    choice = resolve_model(model, catalogue=catalogue, offline=offline, progress=progress, kinds=METHODS)
    try:
        kind = read_config(choice.folder)["kind"]
        if kind not in METHODS:
            raise WeightsError(f"{choice.folder}: a {kind!r} model, not a reconstruction model")
        if method is not None and method != kind:
            raise WeightsError(f"model {choice.name} is a {kind} model; it cannot run --method {method}")
        if kind == "dvg":
            from .pipelines.dvg import DVGReconstructionPipeline as cls
        else:
            from .pipelines.patch_edm import PatchEDMReconstructionPipeline as cls
        pipe = cls.from_folder(choice.folder, device=device, dtype=dtype, name=choice.name)
    except ModelLoadError as exc:
        raise WeightsError(str(exc)) from exc
    except OSError as exc:
        raise WeightsError(f"{choice.folder}: cannot read the model: {first_line(exc)}") from exc
    if progress is not True:
        pipe.set_progress_bar_config(disable=True)
    return pipe, choice


def reconstruct_ct(xrays: Sequence, out_path: str | os.PathLike, *, model: str | os.PathLike | None = None,
                   method: str | None = None, steps: int | None = None, seed: int = 0, device: str = "auto",
                   dtype: str = "auto", keep: str | os.PathLike | None = None,
                   center_ras: Sequence[float] | None = None, new_view: str = "coarse", svdrr_model=None,
                   progress: Progress | None = None, catalogue=None, offline: bool | None = None) -> dict:
    """Reconstruct a CT from ``xrays`` (``FILE[@AZ,EL]`` strings or (path or XRayImage, view) pairs) and write it
    to ``out_path`` (NIfTI, NRRD or MHA by extension). Returns the manifest (also written into ``keep``).

    ``model``: catalogue name or folder (default: the demo model of ``method``, DVG when neither is given).
    ``new_view`` and ``svdrr_model`` (DVG only): the extra view from DVG's coarse path, from an SV-DRR model, or
    none. ``progress(fraction, message)`` as in :func:`~SVDRRLogic.synthesize.synthesize_views`.
    """
    started = time.monotonic()
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    out = Path(out_path).expanduser()
    if not out.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
        raise ImageError(f"{out}: write the CT as .nii.gz, .nii, .nrrd or .mha")
    if not out.parent.is_dir():  # checked before minutes of model work, not after
        raise ImageError(f"{out}: the folder {out.parent} does not exist")
    if keep is not None and Path(keep).expanduser().exists() and not Path(keep).expanduser().is_dir():
        raise ImageError(f"{keep}: is a file; --keep-intermediates needs a folder")
    images, views = load_inputs(xrays)
    steps = None if steps is None else int(steps)
    if steps is not None and steps < 1:
        raise ValueError("steps must be at least 1")
    report = Reporter(progress)
    model = model or DEFAULT_MODELS[method or "dvg"]
    report(0.0, f"loading the model {model}")
    pipe, choice = load_pipeline(model, method, device=device, dtype=dtype, catalogue=catalogue, offline=offline,
                                 progress=report.download if progress is not None else True)
    extra = {}
    if pipe.method == "dvg":
        extra["new_view"] = new_view
        if new_view == "svdrr":
            from .pipelines import SVDRRPipeline
            svdrr_choice = resolve_model(svdrr_model or "svdrr-demo-64", catalogue=catalogue, offline=offline)
            extra["svdrr_pipeline"] = SVDRRPipeline.from_folder(svdrr_choice.folder, device=pipe.device)
            extra["svdrr_pipeline"].set_progress_bar_config(disable=True)
    elif new_view != "coarse" or svdrr_model is not None:
        raise ValueError("--new-view and --svdrr-model apply to DVG-Diffusion models only")

    def on_progress(fraction: float, message: str) -> None:
        report(0.05 + 0.9 * fraction, message)

    result = _run(pipe, images, views, num_inference_steps=steps, generator=seed, center_ras=center_ras,
                  callback=on_progress, **extra)
    result.ct.metadata.update(model_folder=str(choice.folder), demo_model=choice.demo)
    write_ct(out, result.ct)
    manifest = {
        "synthetic": True, "note": result.ct.metadata["note"], "output": str(out), "method": pipe.method,
        "model": choice.describe(), "demo_model": choice.demo, "steps": result.ct.metadata.get("steps"),
        "seed": int(seed), "device": str(pipe.device), "grid": result.ct.metadata["grid"],
        "inputs": [{"file": im.source, "view": list(v)} for im, v in zip(images, views)],
        "seconds": round(time.monotonic() - started, 3),
    }
    if keep is not None:
        manifest["intermediates"] = _write_intermediates(Path(keep).expanduser(), result, manifest)
    report(1.0, f"wrote {out}")
    return manifest


def _run(pipe, images, views, **kwargs):
    """The pipeline call, with CUDA running out of memory turned into advice."""
    import torch
    try:
        return pipe(images, views, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise MemoryError(f"the GPU ran out of memory reconstructing with {pipe.model_name}; close other GPU "
                          "programs, use --dtype fp16 or bf16, or run on the CPU with --device cpu") from None


def _write_intermediates(folder: Path, result, manifest: dict) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    written = []
    for i, image in enumerate(result.inputs):
        written.append(write_image(folder / f"input_{i}.nrrd", image, format="nrrd", kind=kind_of(image)).name)
    for name, item in result.intermediates.items():
        if isinstance(item, XRayImage):
            written.append(write_image(folder / f"{name}.nrrd", item, format="nrrd", kind="synthesized").name)
        else:
            written.append(write_ct(folder / f"{name}.nii.gz", item).name)
    with atomic_output(folder / MANIFEST_NAME, ".json") as tmp:
        tmp.write_text(json.dumps({**manifest, "intermediates": written}, indent=1), encoding="utf-8")
    return written
