"""Novel X-ray views of one X-ray, to files: SV-DRR run on a set of C-arm views, each view written on its detector.

Shared by the command line (``svdrr synthesize``), the worker (task ``synthesize_views``), the Slicer module (through
the worker) and ``svdrr demo``, so every route writes the same files: one image per view (``write_image(...,
kind="synthesized")``: marked synthetic, placed with the C-arm geometry of its view) and ``synthesis.json``, written
last and atomically, so its presence means the set is complete. Its ``views`` records have the layout of the DRR
``views.json`` (``index``, ``file`` and the view's geometry), so the same reader imports both.

The target geometry is the one the model was trained with: the geometry preset of its catalogue entry (``svdrr-lidc``
for a folder given by path), with the detector resampled to the model's resolution (R x R pixels covering the
preset's detector). The isocenter and the source view come from the input when it is one of our DRRs (its stored
C-arm geometry), else the origin and the PA view (the only source view the released models were trained with).

Everything a user can get wrong fails before the model is loaded, with one line: the X-ray (missing, not an image,
constant), the views, the numbers, the format, and the model (unknown, not SV-DRR, not in the cache while offline,
a folder with missing parts or unreadable weights: :class:`~SVDRRLogic.weights.WeightsError`).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import weights
from .geometry import CArmGeometry, GeometryError
from .images import ImageError, XRayImage
from .io import IMAGE_FORMATS, load_xray, write_image
from .io.common import all_or_nothing, atomic_output, first_line, geometry_from_metadata
from .io.dicom_writer import DicomSeries
from .weights import WeightsError

MANIFEST_NAME = "synthesis.json"
DEFAULT_PRESET = "svdrr-lidc"
KIND = "Synthesized X-ray"
NOTE = ("synthesized by a diffusion model from one X-ray: plausible images, not measurements of the patient; "
        "not for diagnosis")
KIND_LABELS = {"svdrr": "an SV-DRR novel-view model", "dvg": "a DVG-Diffusion reconstruction model",
               "patch-edm": "a 3D patch EDM reconstruction model"}
#: Shares of the progress fraction: resolving and loading the model, then the denoising steps, then the files.
_LOAD_SHARE, _WRITE_SHARE = 0.05, 0.02

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class ModelChoice:
    """The model a synthesis uses: its name, its local folder and, for a catalogue model, its entry."""

    name: str
    folder: Path
    entry: weights.ModelEntry | None = None
    folder_kind: str = "svdrr"

    @property
    def preset(self) -> str:
        return self.entry.preset if self.entry is not None else DEFAULT_PRESET

    @property
    def demo(self) -> bool:
        return bool(self.entry is not None and self.entry.demo)

    def describe(self) -> dict:
        e = self.entry
        return {"name": self.name, "folder": str(self.folder), "catalogue": e is not None,
                "source": e.source.describe() if e else f"folder {self.folder}", "kind": e.kind if e else self.folder_kind,
                "preset": self.preset, "licence": e.licence if e else None, "demo": self.demo}


def resolve_model(model: str | os.PathLike, *, catalogue=None, offline: bool | None = None,
                  progress: weights.Progress = True, kinds: Sequence[str] = ("svdrr",)) -> ModelChoice:
    """An existing folder as is; else a catalogue name (or Hugging Face repo id) of a model of one of ``kinds``,
    resolved to a local folder by :func:`SVDRRLogic.weights.resolve` (cache, else download unless offline).
    WeightsError else."""
    given = Path(model).expanduser()
    if given.is_dir():
        return ModelChoice(given.resolve().name, given, folder_kind=_folder_kind(given))
    text = str(model).strip()
    if not text:
        raise WeightsError("no model given: name a model of the catalogue (`svdrr models list`) or a model folder")
    cat = weights.Catalogue.load(catalogue) if not isinstance(catalogue, weights.Catalogue) else catalogue
    known = text in cat or any(e.source.hf == text for e in cat)
    if not known and (os.sep in text or "/" in text or text.startswith((".", "~"))):
        raise WeightsError(f"no model folder at {text} (and it is not a model of the catalogue)")
    entry = cat.get(text)
    if entry.kind not in kinds:
        wanted = " or ".join(KIND_LABELS.get(k, k) for k in kinds)
        raise WeightsError(f"model '{entry.name}' is a {entry.kind} model, not {wanted}")
    folder = weights.resolve(entry.name, offline=offline, progress=progress, catalogue=cat)
    return ModelChoice(entry.name, folder, entry)


def check_views(views: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """``views`` as a list of (azimuth, elevation) floats, each a valid C-arm pose (GeometryError otherwise)."""
    try:
        out = [(float(a), float(e)) for a, e in views]
    except (TypeError, ValueError):
        raise GeometryError("views must be (azimuth, elevation) pairs of numbers in degrees") from None
    if not out:
        raise GeometryError("no views to synthesize")
    for a, e in out:
        CArmGeometry(azimuth=a, elevation=e)  # the same range and finiteness checks as every other view
    return out


def target_geometry(preset: str, resolution: int, isocenter: Sequence[float] = (0.0, 0.0, 0.0)) -> CArmGeometry:
    """The preset's C-arm with a detector of ``resolution`` x ``resolution`` pixels over the preset's detector
    extent (the model's output covers the field of view of its training DRRs)."""
    base = CArmGeometry.preset(preset, isocenter=tuple(isocenter))
    width, height = (n * p for n, p in zip(base.detector, base.pixel))
    return base.replace(detector=(int(resolution), int(resolution)),
                        pixel=(width / int(resolution), height / int(resolution)))


def synthesize_views(xray: XRayImage | str | os.PathLike, model: str | os.PathLike,
                     views: Sequence[Sequence[float]], out_dir: str | os.PathLike, *, steps: int = 20,
                     guidance: float = 3.0, seed: int = 0, device: str = "auto", fmt: str = "png", batch: int = 4,
                     progress: Progress | None = None, dtype: str = "auto",
                     source_view: Sequence[float] | None = None, isocenter: Sequence[float] | None = None,
                     catalogue=None, offline: bool | None = None, input_label: str | None = None) -> list[Path]:
    """Synthesize ``views`` ((azimuth, elevation) in degrees, LAO+ / cranial+) of the patient in ``xray`` (an
    XRayImage or a file :func:`~SVDRRLogic.io.load_xray` reads) with the SV-DRR ``model`` (catalogue name or
    folder) and write them into ``out_dir``: one ``fmt`` image per view, then ``synthesis.json``. Returns the
    image paths in the order of ``views``.

    ``steps``/``guidance``/``seed``: DPM-Solver++ steps, classifier-free guidance scale, noise seed (a view's
    initial noise depends only on the seed and the view, so the same settings give the same images; ``batch`` only
    changes float round-off). ``progress(fraction,
    message)`` is called while the model loads, after every denoising step and for every file (raise from it to
    stop); without it the pipeline and any download show progress bars on stderr. ``source_view``/``isocenter``
    override what the input says (see the module docstring); ``input_label`` is what the manifest calls the input
    (default: its file). ``catalogue``: a Catalogue or catalogue file (default ``Resources/models.json``).
    """
    started = time.monotonic()
    views = check_views(views)
    steps, batch, seed, guidance = int(steps), int(batch), int(seed), float(guidance)
    if steps < 1 or batch < 1:
        raise ValueError("steps and batch must be at least 1")
    if not math.isfinite(guidance) or guidance < 0.0:
        raise ValueError(f"guidance must be a number >= 0 (1 or less turns guidance off), not {guidance}")
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in IMAGE_FORMATS:
        raise ImageError(f"unknown output format {fmt!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    image = xray if isinstance(xray, XRayImage) else load_xray(xray)
    file = image.source
    if input_label:  # errors then name what the user chose, not a file handed over to a worker
        image = replace(image, source=str(input_label))
    stored = geometry_from_metadata(image.metadata)
    source_view = _pair(source_view, "source_view") if source_view is not None else (
        (stored.azimuth, stored.elevation) if stored is not None else (0.0, 0.0))
    iso = tuple(float(x) for x in isocenter) if isocenter is not None else (
        stored.isocenter if stored is not None else (0.0, 0.0, 0.0))
    CArmGeometry(azimuth=source_view[0], elevation=source_view[1], isocenter=iso)

    # torch, diffusers and transformers only now: everything above fails fast without them
    from .export import view_filename
    from .models import ModelLoadError
    from .pipelines import SVDRRPipeline, normalize_source
    from .renderer import describe_device, resolve_device

    normalize_source(image, 8)  # a constant or non-2D image fails here, before the weights are read
    report = Reporter(progress)
    report(0.0, f"resolving the model {model}")
    choice = resolve_model(model, catalogue=catalogue, offline=offline,
                           progress=report.download if progress is not None else True)
    dev = resolve_device(device)
    report(0.0, f"loading {choice.name} on {describe_device(dev)}")
    try:
        pipe = SVDRRPipeline.from_folder(choice.folder, device=dev, dtype=dtype, name=choice.name)
    except ModelLoadError as exc:
        raise WeightsError(str(exc)) from exc
    except OSError as exc:  # an unreadable file
        raise WeightsError(f"{choice.folder}: cannot read the model: {first_line(exc)}") from exc
    if progress is not None:
        pipe.set_progress_bar_config(disable=True)

    base = target_geometry(choice.preset, pipe.resolution, iso)
    geometries = [base.with_view(a, e) for a, e in views]
    out = Path(out_dir).expanduser()
    written, records, series = [], [], DicomSeries()  # one DICOM series per set (other formats ignore it)
    with all_or_nothing(written, out):
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # an old manifest must not vouch for a half-written new set

        chunks = [range(i, min(i + batch, len(views))) for i in range(0, len(views), batch)]
        total = len(chunks) * steps

        def fraction(steps_done: int) -> float:
            return (_LOAD_SHARE + (1.0 - _LOAD_SHARE - _WRITE_SHARE) * steps_done / total
                    + _WRITE_SHARE * len(written) / len(views))

        for number, chunk in enumerate(chunks):
            what = (f"views {chunk.start + 1}-{chunk.stop}" if len(chunk) > 1 else f"view {chunk.start + 1}") + \
                f" of {len(views)}"

            def on_step(done, _total, _first, number=number, what=what):
                report(fraction(number * steps + done), f"{what}: step {done}/{steps}")

            result = pipe(image, [views[i] for i in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=seed, batch_size=batch, callback=on_step, source_view=source_view)
            for i, array, meta in zip(chunk, result.images, result.metadata):
                geom = geometries[i]
                name = view_filename(i, geom, fmt)
                meta = {**meta, "kind": KIND, "model_folder": str(choice.folder), "demo_model": choice.demo}
                item = XRayImage(array, pixel_spacing=(geom.pixel[1], geom.pixel[0]), metadata=meta,
                                 ijk_to_ras=geom.detector_ijk_to_ras, source=name)
                written.append(write_image(out / name, item, geometry=geom, format=fmt, kind="synthesized",
                                           series=series.at(i + 1)))
                records.append({"index": i, "file": name, **geom.to_dict(), "relative_pose": meta["relative_pose"],
                                "metadata": meta})
                report(fraction((number + 1) * steps), f"wrote {name}")

        manifest = {
            "synthetic": True, "note": NOTE, "kind": KIND,
            "input": {"file": file, "label": input_label or file,
                      "geometry": stored.to_dict() if stored is not None else None,
                      "synthetic": bool(image.metadata.get("synthetic", False))},
            "model": choice.describe(), "demo_model": choice.demo, "resolution": pipe.resolution,
            "steps": steps, "guidance_scale": guidance, "seed": seed, "batch": batch,
            "device": describe_device(dev), "requested_device": str(device), "dtype": str(pipe.transformer.dtype),
            "format": fmt, "source_view": list(source_view), "preset": choice.preset,
            "seconds": round(time.monotonic() - started, 3), "views": records,
        }
        with atomic_output(out / MANIFEST_NAME, ".json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    report(1.0, f"{len(written)} view(s) synthesized")
    return written


class Reporter:
    """Calls the user's ``progress(fraction, message)``; turns download byte counts into throttled messages."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self._last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, fraction)), message)

    def download(self, file: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._last < 0.5 and not (total and done >= total):
            return
        self._last = now
        size = f"{done / 1e6:.1f}" + (f" of {total / 1e6:.1f}" if total else "") + " MB"
        self(0.0, f"downloading {file}: {size}")


def _pair(value: Sequence[float], what: str) -> tuple[float, float]:
    try:
        a, e = (float(x) for x in value)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} must be (azimuth, elevation) in degrees, got {value!r}") from None
    return a, e


def _folder_kind(folder: Path) -> str:
    """A reconstruction model folder names its kind in config.json; SV-DRR folders have model_index.json."""
    try:
        return str(json.loads((folder / "config.json").read_text()).get("kind", "svdrr"))
    except (OSError, ValueError, AttributeError):
        return "svdrr"
