"""SVDRR worker: runs one long job in its own process and reports on stdout in JSON lines.

Usage: ``PythonSlicer SVDRRWorker.py job.json`` (inside Slicer) or ``python SVDRRWorker.py job.json``.

Plain Python: no Qt, no MRML. The job file is a JSON object whose ``task`` picks what to do:

- ``render_orbit``: ``{"task": "render_orbit", "ct": path, "geometry": CArmGeometry.to_dict() (or
  {"preset": name, ...overrides}; without an isocenter the CT's centre is used), "views": "arc:-90:90:5" |
  "hemisphere:N" | [[azimuth, elevation], ...], "output_dir": folder, "format": "nrrd"|"png"|"dcm"|"nii"|"nii.gz"|
  "mha", "device": "auto"|"cpu"|"cuda", optional "output" ("line-integral"), "hu_model" ("physical"),
  "batch" (4)}``. Writes one image per view plus ``views.json``; the result lists the images.
- ``synthesize_views``: ``{"task": "synthesize_views", "xray": path (any file load_xray reads), "model": catalogue
  name or model folder, "views": as above, "output_dir": folder, optional "steps" (20), "guidance" (3.0), "seed"
  (0), "device" ("auto"), "format" ("nrrd"), "batch" (4), "source_view" ([azimuth, elevation] of the input; default
  from the file, else PA), "input_label" (what the manifest calls the input), "offline" (default: the environment)}``.
  Novel views with SV-DRR (``SVDRRLogic.synthesize``): one image per view plus ``synthesis.json``; a progress event
  after every denoising step; the result lists the images and names the manifest (``synthesis_json``).
- ``reconstruct_ct``: ``{"task": "reconstruct_ct", "xrays": [{"path": file, "view": [azimuth, elevation] or null
  (read from the file's stored C-arm geometry)}, ...] (one or two), "output": CT file (.nii.gz, .nii, .nrrd,
  .mha), "model": catalogue name or model folder or null (the method's demonstration model), "method": "dvg" |
  "patch-edm" | null (the model's kind), optional "steps" (the model's own), "seed" (0), "device" ("auto"), "dtype"
  ("auto"), "keep_intermediates" (folder for the intermediate products and ``reconstruction.json``),
  "center_ras" ([r, a, s] of the CT's centre; default: the first X-ray's stored isocenter, else the origin),
  "new_view" ("coarse"), "offline" (default: the environment)}``. A synthetic CT from the X-rays
  (``SVDRRLogic.reconstruct``; the output's folder is created), with progress events as the model runs; the result
  names the CT (``ct``, also the only item of ``outputs``) and carries the manifest, ``method``, ``model`` and
  ``demo_model``.

Events (the protocol of ``SVDRRLogic.jobs``): ``progress`` (fraction 0..1, rising), ``log``, one ``result``
(``outputs`` and task-specific keys) on success, or one ``error`` (``message``, ``detail`` traceback) and exit code
1 on failure (2 when the command line itself is wrong). Anything else written to stdout by libraries is diverted to
stderr so the event stream stays clean.

This file lives in a sub-folder of the module on purpose: Slicer loads every ``.py`` file at the top of a module
folder as a scripted module, and this one is not a module.
"""
import json
import os
import sys
import time
import traceback
from pathlib import Path

PROTOCOL_VERSION = 1


class Events:
    """Writes protocol events, one JSON object per line, to the stream it owns."""

    def __init__(self, stream):
        self._stream = stream
        self._last_fraction = 0.0

    def emit(self, kind, **fields):
        self._stream.write(json.dumps({"type": kind, **fields}, default=str) + "\n")
        self._stream.flush()

    def progress(self, fraction, message=""):
        fraction = max(self._last_fraction, min(1.0, float(fraction)))  # never goes back
        self._last_fraction = fraction
        self.emit("progress", fraction=round(fraction, 6), message=message)

    def log(self, message, level="info"):
        self.emit("log", level=level, message=message)


class JobFileError(ValueError):
    """A job description that cannot be run (missing key, wrong type, unknown task)."""


def claim_stdout():
    """Keep the real stdout for events only: Python prints and C libraries writing to fd 1 go to stderr."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)


def find_engine():
    """Put the SVDRRLogic shipped with this worker first on sys.path (installed module or source checkout)."""
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "SVDRRLogic" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return folder
    return None


# -- tasks --------------------------------------------------------------------------------------------------
def _required(job, key):
    if key not in job or job[key] in (None, ""):
        raise JobFileError(f"the job has no {key!r}")
    return job[key]


def _geometry(spec, ct):
    from SVDRRLogic import CArmGeometry

    if not isinstance(spec, dict):
        raise JobFileError("'geometry' must be an object: CArmGeometry.to_dict() or {'preset': name, ...}")
    spec = dict(spec)
    if "preset" in spec:
        name = spec.pop("preset")
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items()
                  if k in ("sad", "sdd", "detector", "pixel", "isocenter")}
        fields.setdefault("isocenter", tuple(ct.center_ras))
        return CArmGeometry.preset(name, **fields)
    if "isocenter" not in spec:
        spec["isocenter"] = list(ct.center_ras)
    return CArmGeometry.from_dict(spec)


def _angles(views):
    from SVDRRLogic.geometry import parse_view_set

    if isinstance(views, str):
        return parse_view_set(views)
    if isinstance(views, list) and views:
        try:
            return [(float(a), float(e)) for a, e in views]
        except (TypeError, ValueError):
            pass
    raise JobFileError("'views' must be a view set such as 'arc:-90:90:5' or 'hemisphere:20', "
                       "or a non-empty list of [azimuth, elevation] pairs")


def render_orbit(job, events):
    """Render DRRs of a CT for a set of views into files (images + views.json)."""
    ct_path = _required(job, "ct")
    out_dir = Path(_required(job, "output_dir"))
    fmt = str(job.get("format", "nrrd")).lower().lstrip(".")
    device = str(job.get("device", "auto"))
    batch = int(job.get("batch", 4))
    if batch < 1:
        raise JobFileError("'batch' must be at least 1")

    events.progress(0.0, "loading the engine")
    import SVDRRLogic
    from SVDRRLogic import load_ct
    from SVDRRLogic.export import render_views
    from SVDRRLogic.io.writers import IMAGE_FORMATS

    events.log(f"SVDRR engine {SVDRRLogic.__version__} from {Path(SVDRRLogic.__file__).parent}", level="debug")
    if fmt not in IMAGE_FORMATS:
        raise JobFileError(f"unknown format {fmt!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    angles = _angles(job.get("views", "arc:-90:90:5"))
    if not Path(ct_path).exists():
        raise FileNotFoundError(f"the CT {ct_path} does not exist")
    events.progress(0.0, f"loading the CT {Path(ct_path).name}")
    ct = load_ct(ct_path)
    geometry = _geometry(_required(job, "geometry"), ct)
    total = len(angles)
    events.log(f"rendering {total} views of {geometry.detector[0]}x{geometry.detector[1]} px on device {device}")
    started = time.monotonic()

    def on_view(index, image, geom):
        events.progress((index + 1) / total,
                        f"view {index + 1}/{total} (azimuth {geom.azimuth:g}, elevation {geom.elevation:g})")

    written = render_views(ct, geometry, angles, out_dir, fmt=fmt, output=str(job.get("output", "line-integral")),
                           hu_model=str(job.get("hu_model", "physical")), device=device, batch=batch,
                           on_view=on_view)
    return {"outputs": [str(p) for p in written], "views_json": str(out_dir / "views.json"),
            "count": len(written), "seconds": round(time.monotonic() - started, 3)}


def synthesize_views(job, events):
    """Novel views of one X-ray with an SV-DRR model (images + synthesis.json)."""
    xray_path = _required(job, "xray")
    model = str(_required(job, "model"))
    out_dir = Path(_required(job, "output_dir"))
    angles = _angles(_required(job, "views"))
    try:
        steps, batch, seed = int(job.get("steps", 20)), int(job.get("batch", 4)), int(job.get("seed", 0))
        guidance = float(job.get("guidance", 3.0))
    except (TypeError, ValueError):
        raise JobFileError("'steps', 'batch' and 'seed' must be whole numbers and 'guidance' a number") from None
    source_view = job.get("source_view")
    offline = job.get("offline")

    events.progress(0.0, "loading the engine")
    import SVDRRLogic
    from SVDRRLogic.synthesize import MANIFEST_NAME
    from SVDRRLogic.synthesize import synthesize_views as synthesize

    events.log(f"SVDRR engine {SVDRRLogic.__version__} from {Path(SVDRRLogic.__file__).parent}", level="debug")
    if not Path(xray_path).exists():
        raise FileNotFoundError(f"the X-ray {xray_path} does not exist")
    events.log(f"synthesizing {len(angles)} view(s) with {model}, {steps} steps, guidance {guidance:g}, seed {seed}")
    started = time.monotonic()
    written = synthesize(xray_path, model, angles, out_dir, steps=steps, guidance=guidance, seed=seed,
                         device=str(job.get("device", "auto")), fmt=str(job.get("format", "nrrd")), batch=batch,
                         progress=events.progress, source_view=source_view, offline=offline,
                         input_label=job.get("input_label"))
    manifest = out_dir / MANIFEST_NAME
    demo = json.loads(manifest.read_text(encoding="utf-8")).get("demo_model", False)
    return {"outputs": [str(p) for p in written], "synthesis_json": str(manifest), "count": len(written),
            "seconds": round(time.monotonic() - started, 3), "model": model, "demo_model": demo, "synthetic": True}


def _xray_inputs(xrays):
    """The job's ``xrays`` as (path, view or None) pairs for ``reconstruct_ct``; JobFileError for a malformed list."""
    if not isinstance(xrays, list) or not xrays:
        raise JobFileError("'xrays' must be a list of one or two {\"path\": file, \"view\": [azimuth, elevation]}")
    pairs = []
    for item in xrays:
        if not isinstance(item, dict) or not item.get("path"):
            raise JobFileError("each item of 'xrays' must be an object with a 'path' (and a 'view' or null)")
        view = item.get("view")
        if view is not None:
            try:
                azimuth, elevation = (float(v) for v in view)
            except (TypeError, ValueError):
                raise JobFileError(f"the view of {item['path']} must be [azimuth, elevation] or null") from None
            view = (azimuth, elevation)
        pairs.append((str(item["path"]), view))
    return pairs


def reconstruct_ct(job, events):
    """A CT from one or two X-rays with a DVG-Diffusion or 3D patch EDM model (one CT file, optional intermediates)."""
    pairs = _xray_inputs(_required(job, "xrays"))
    output = str(_required(job, "output"))
    try:
        steps = None if job.get("steps") is None else int(job["steps"])
        seed = int(job.get("seed", 0))
    except (TypeError, ValueError):
        raise JobFileError("'steps' and 'seed' must be whole numbers") from None

    events.progress(0.0, "loading the engine")
    import SVDRRLogic
    from SVDRRLogic.reconstruct import reconstruct_ct as reconstruct

    events.log(f"SVDRR engine {SVDRRLogic.__version__} from {Path(SVDRRLogic.__file__).parent}", level="debug")
    for path, _view in pairs:
        if not Path(path).exists():
            raise FileNotFoundError(f"the X-ray {path} does not exist")
    model, method = job.get("model"), job.get("method")
    events.log(f"reconstructing a CT from {len(pairs)} X-ray(s) with {model or 'the demonstration model'}"
               f"{f' ({method})' if method else ''}, seed {seed}")
    started = time.monotonic()
    Path(output).expanduser().parent.mkdir(parents=True, exist_ok=True)  # a job's output folder is made for it
    manifest = reconstruct(pairs, output, model=model, method=method, steps=steps, seed=seed,
                           device=str(job.get("device", "auto")), dtype=str(job.get("dtype", "auto")),
                           keep=job.get("keep_intermediates"), center_ras=job.get("center_ras"),
                           new_view=str(job.get("new_view", "coarse")), progress=events.progress,
                           offline=job.get("offline"))
    return {"outputs": [manifest["output"]], "ct": manifest["output"], "manifest": manifest,
            "method": manifest["method"], "model": manifest["model"]["name"], "demo_model": manifest["demo_model"],
            "seconds": round(time.monotonic() - started, 3), "synthetic": True}


TASKS = {"render_orbit": render_orbit, "synthesize_views": synthesize_views, "reconstruct_ct": reconstruct_ct}


# -- main ---------------------------------------------------------------------------------------------------
def run(job_path, events):
    """Run the job described in ``job_path``; return the exit code."""
    try:
        try:
            job = json.loads(Path(job_path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise JobFileError(f"cannot read the job file {job_path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise JobFileError(f"the job file {job_path} is not valid JSON: {exc}") from None
        if not isinstance(job, dict):
            raise JobFileError(f"the job file {job_path} must hold a JSON object")
        task = job.get("task")
        if task not in TASKS:
            raise JobFileError(f"unknown task {task!r}; this worker knows {', '.join(sorted(TASKS))}")
        if find_engine() is None:
            events.log("SVDRRLogic is not next to the worker; using the installed one", level="warning")
        result = TASKS[task](job, events)
        events.emit("result", task=task, **result)
        return 0
    except Exception as exc:  # every failure becomes one error event
        message = str(exc) or type(exc).__name__
        if isinstance(exc, ImportError):
            message = f"the SVDRR engine or one of its dependencies is missing: {message}"
        events.emit("error", message=message, exception=type(exc).__name__, detail=traceback.format_exc())
        return 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    events = Events(claim_stdout())
    if len(argv) != 1:
        events.emit("error", message="usage: SVDRRWorker.py JOB.json", exception="UsageError", detail="")
        return 2
    return run(argv[0], events)


if __name__ == "__main__":
    sys.exit(main())
