"""SVDRR headless batch: DRRs of a CT (or of the chest phantom) into files, a Slicer scene bundle and a 3D picture.

Runs in two places with the same arguments:

- inside Slicer, without a window::

      Slicer --no-main-window --python-script SVDRRBatch.py -- render CT.nii.gz -o out/ --scene out/scene.mrb

  (the scene is ``slicer.mrmlScene``; the script ends Slicer with ``slicer.util.exit(code)``);
- under plain Python with the ``slicer-core`` wheel (the scene is a new ``vtkMRMLScene``)::

      python SVDRRBatch.py render --phantom chest -o out/ --view 30,-10 --scene out/scene.mrb --screenshot out/3d.png

Subcommands (each a small function below; later issues add more):

- ``render``: one DRR per view, each as a volume node on its detector plane; the C-arm (source point, X-ray
  cone, detector, central ray) shows the first view with its DRR on the detector;
- ``orbit``: the views as one sequence (Sequences module: one item per view, with a browser); the C-arm shows the
  first view with the sequence's current image on the detector.

Both write one image file per view plus ``views.json`` (``-o``), the scene with the CT (volume-rendered), the DRRs
and the C-arm as a ``.mrb`` bundle (``--scene``), and the 3D view as a PNG (``--screenshot``). The rendering is
the engine's (``SVDRRLogic.export.render_views``), the scene is built by ``SVDRRLogic.mrml`` and
``SVDRRLogic.session``, so the files, the scene and the Slicer module agree.

A bad argument or input ends with one line on stderr and exit code 2 (1 for an unexpected failure; set
``SVDRR_DEBUG=1`` for the traceback), before anything is written: outputs are staged and moved into place only
when everything succeeded, and the scene bundle and the screenshot are written atomically.

This file lives in a sub-folder of the module on purpose: Slicer loads every ``.py`` file at the top of a module
folder as a scripted module, and this one is not a module.
"""
import argparse
import contextlib
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

PROG = "SVDRRBatch"
# Mirrors of the engine's choices, so that a typo is reported before the engine (and torch) is imported;
# Testing/test_batch.py checks that they match SVDRRLogic.
FORMATS = ("nrrd", "nii", "nii.gz", "mha", "png", "dcm")
HU_MODELS = ("physical", "diffdrr")
OUTPUTS = ("line-integral", "transmission", "display")
DEVICES = ("auto", "cpu", "cuda")
PHANTOMS = ("chest",)
SCREENSHOT_SIZE = (900, 700)
_LIST_OPTIONS = ("--view", "--detector", "--pixel", "--isocenter", "--screenshot-size")
_NEGATIVE_VALUE = re.compile(r"^-\.?\d")


class BatchError(Exception):
    """A bad argument or input: reported as one line on stderr with exit code 2."""


def inside_slicer():
    """True when Slicer runs this script (its ``slicer`` module, which has ``slicer.app``, is already loaded)."""
    return getattr(sys.modules.get("slicer"), "app", None) is not None


def script_arguments(argv):
    """The script's own arguments: those after ``--`` when there is one (Slicer's command line), else all."""
    argv = list(argv)
    return argv[argv.index("--") + 1:] if "--" in argv else argv


def find_engine():
    """Put the SVDRRLogic next to this script first on sys.path (installed module or source checkout)."""
    here = Path(globals().get("__file__") or sys.argv[0]).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "SVDRRLogic" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return folder
    return None


# -- command line -----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises BatchError (one line, exit 2) instead of printing the usage block."""

    def error(self, message):
        raise BatchError(f"{message} (see '{self.prog} --help')")


def _numbers(text, counts, what):
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if len(values) not in counts or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{what} needs {' or '.join(map(str, counts))} finite numbers, "
                                         f"got {text!r}")
    return values


def _view(text):
    values = _numbers(text, (1, 2), "--view AZ,EL")
    return values[0], (values[1] if len(values) > 1 else 0.0)


def _pixels(what):
    def parse(text):
        values = _numbers(text, (1, 2), what)
        if any(v != int(v) or v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"{what} needs whole, positive pixel counts, got {text!r}")
        return int(values[0]), int(values[-1])
    return parse


def _glue_negative_values(argv):
    """Let ``--view -30,10`` work as typed: argparse would take ``-30,10`` for an option."""
    out = []
    for token in argv:
        if out and out[-1] in _LIST_OPTIONS and _NEGATIVE_VALUE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _common_options():
    common = argparse.ArgumentParser(add_help=False)
    inputs = common.add_argument_group("input")
    inputs.add_argument("ct", nargs="?", help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    inputs.add_argument("--phantom", choices=PHANTOMS, help="use a generated phantom instead of a CT (no data)")
    inputs.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    inputs.add_argument("--series", metavar="UID", help="DICOM SeriesInstanceUID when the folder holds several")

    views = common.add_argument_group("views (default: one PA view, 0,0)")
    views.add_argument("--view", type=_view, action="append", metavar="AZ,EL",
                       help="azimuth (LAO+) and elevation (cranial+) in degrees; repeatable")
    views.add_argument("--views", metavar="SET", help="a view set: arc:START:STOP:STEP[:EL] or hemisphere:N")

    geometry = common.add_argument_group("C-arm geometry (default: the preset's)")
    geometry.add_argument("--preset", default="svdrr-lidc", help="svdrr-lidc (default), x2ct or dvg-xraysyn")
    geometry.add_argument("--sad", type=float, metavar="MM", help="source-to-isocenter distance")
    geometry.add_argument("--sdd", type=float, metavar="MM", help="source-to-detector distance")
    geometry.add_argument("--detector", type=_pixels("--detector W,H"), metavar="W,H",
                          help="detector columns,rows in pixels")
    geometry.add_argument("--pixel", type=lambda t: _numbers(t, (1, 2), "--pixel"), metavar="MM[,MM]",
                          help="detector pixel size (column, row)")
    geometry.add_argument("--isocenter", type=lambda t: _numbers(t, (3,), "--isocenter R,A,S"), metavar="R,A,S",
                          help="isocenter in RAS mm (default: the CT's centre)")

    rendering = common.add_argument_group("rendering")
    rendering.add_argument("--hu-model", choices=HU_MODELS, default="physical", help="HU to attenuation")
    rendering.add_argument("--output", choices=OUTPUTS, default="line-integral", help="image values")
    rendering.add_argument("--device", choices=DEVICES, default="auto")
    rendering.add_argument("--batch", type=int, default=8, help="views rendered together (memory vs speed)")

    outputs = common.add_argument_group("outputs (at least one)")
    outputs.add_argument("-o", "--output-dir", type=Path, metavar="DIR",
                         help="one image per view plus views.json")
    outputs.add_argument("--format", choices=FORMATS, default="nrrd", help="image file format (default nrrd)")
    outputs.add_argument("--scene", type=Path, metavar="FILE.mrb", help="the Slicer scene as a bundle")
    outputs.add_argument("--screenshot", type=Path, metavar="FILE.png", help="the 3D view as a picture")
    outputs.add_argument("--screenshot-size", type=_pixels("--screenshot-size W,H"), default=SCREENSHOT_SIZE,
                         metavar="W,H", help="picture size in pixels (default 900,700)")
    common.add_argument("--verbose", action="store_true", help="let VTK's and Slicer's messages through")
    return common


EXAMPLES = """examples:
  python SVDRRBatch.py render --phantom chest --view 30,-10 -o out/ --scene out/scene.mrb --screenshot out/3d.png
  python SVDRRBatch.py orbit CT.nii.gz --views arc:-90:90:10 --format png -o orbit/ --scene orbit.mrb
  Slicer --no-main-window --python-script SVDRRBatch.py -- render CT.nii.gz -o out/ --scene out/scene.mrb

A bad argument or input: one line on stderr, exit code 2, nothing written."""


def build_parser():
    style = {"epilog": EXAMPLES, "formatter_class": argparse.RawDescriptionHelpFormatter}
    parser = _Parser(prog=PROG, description="SVDRR headless batch: DRRs of a CT into image files, a Slicer scene "
                                            "bundle (.mrb) and a picture of the 3D view.", **style)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    common = _common_options()
    sub.add_parser("render", parents=[common], help="one DRR node per view; the C-arm at the first view",
                   description="Render one DRR per view: image files, DRR nodes on their detector planes, the\n"
                               "C-arm at the first view with its DRR on the detector.", **style)
    sub.add_parser("orbit", parents=[common], help="the views as one sequence (Sequences module)",
                   description="Render the views as an orbit: image files and one sequence with one item per\n"
                               "view (browse it with the Sequences module); the C-arm shows the first view.", **style)
    return parser


def parse_arguments(argv):
    args = build_parser().parse_args(_glue_negative_values(script_arguments(argv)))
    if (args.ct is None) == (args.phantom is None):
        raise BatchError("give either a CT path or --phantom chest")
    if args.ct is not None and not Path(args.ct).exists():
        raise BatchError(f"the CT {args.ct} does not exist")
    for name in ("output_dir", "scene", "screenshot"):  # Slicer's bundle writer needs full paths
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).expanduser().absolute())
    if args.output_dir is None and args.scene is None and args.screenshot is None:
        raise BatchError("nothing to write: give -o DIR, --scene FILE.mrb and/or --screenshot FILE.png")
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        raise BatchError(f"-o {args.output_dir} is a file, not a folder")
    for path, suffix, option in ((args.scene, ".mrb", "--scene"), (args.screenshot, ".png", "--screenshot")):
        if path is not None and (path.suffix.lower() != suffix or path.is_dir()):
            raise BatchError(f"{option} {path}: give a file name ending in {suffix}")
    if not (16 <= min(args.screenshot_size) and max(args.screenshot_size) <= 8192):
        raise BatchError(f"--screenshot-size must be 16-8192 pixels per side, got {args.screenshot_size}")
    if args.batch < 1:
        raise BatchError("--batch must be at least 1")
    return args


# -- the engine -------------------------------------------------------------------------------------------------
class Engine:
    """The SVDRRLogic modules the batch uses, imported once the arguments are known to be sound: first the geometry
    (no torch, no MRML: bad views are reported at once), then, in :meth:`load`, everything else."""

    def __init__(self):
        find_engine()
        with _missing_packages():
            from SVDRRLogic import geometry
        self.geometry = geometry

    def load(self):
        with _missing_packages():
            from SVDRRLogic import export, mrml, mrml_view, session
            from SVDRRLogic.io import load_ct
            from SVDRRLogic.renderer import resolve_device
        self.export, self.mrml, self.mrml_view, self.session = export, mrml, mrml_view, session
        self.load_ct, self.resolve_device = load_ct, resolve_device
        return self


@contextlib.contextmanager
def _missing_packages():
    """Turns an ImportError into one line that says where the packages should come from."""
    try:
        yield
    except ImportError as exc:
        where = "Slicer (open the SVDRR module once to install them)" if inside_slicer() else \
            "this Python (pip install slicer-core, and the packages of pyproject.toml)"
        raise BatchError(f"the SVDRR engine or one of its packages is missing from {where}: {exc}") from None


def quiet_vtk():
    """VTK and MRML warnings go to memory instead of stderr, so that an error is exactly one line (plain Python;
    inside Slicer its own log keeps them)."""
    import vtk

    vtk.vtkOutputWindow.SetInstance(vtk.vtkStringOutputWindow())
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)


def angles_of(args, engine):
    angles = list(args.view or [])
    if args.views:
        angles += engine.geometry.parse_view_set(args.views)
    return angles or [(0.0, 0.0)]


def base_geometry(args, engine, isocenter):
    overrides = {k: getattr(args, k) for k in ("sad", "sdd", "detector") if getattr(args, k) is not None}
    if args.pixel is not None:
        overrides["pixel"] = (args.pixel[0], args.pixel[-1])
    if args.isocenter is not None:
        isocenter = args.isocenter
    return engine.geometry.CArmGeometry.preset(args.preset, isocenter=tuple(isocenter), **overrides)


def check_geometry(args, engine, angles):
    """Every view is a valid C-arm pose (preset, distances, detector, angles): checked before any work."""
    base = base_geometry(args, engine, (0.0, 0.0, 0.0))
    for azimuth, elevation in angles:
        base.with_view(azimuth, elevation)


# -- staged outputs ---------------------------------------------------------------------------------------------
class Outputs:
    """Images and the screenshot are written to a staging folder and moved into place by :meth:`commit`, so a run
    that fails leaves nothing behind; :meth:`discard` removes the staging folder."""

    def __init__(self, args):
        self.output_dir, self.scene, self.screenshot = args.output_dir, args.scene, args.screenshot
        anchor = next((p for p in self._candidates(args) if p.is_dir() and os.access(p, os.W_OK)), None)
        self.staging = Path(tempfile.mkdtemp(prefix=".svdrr-batch-", dir=anchor))
        self.views_dir = self.staging / "views"
        self.staged_screenshot = self.staging / "screenshot.png"

    @staticmethod
    def _candidates(args):
        """Existing folders near the outputs (the same file system makes the final moves renames)."""
        for path in (args.output_dir, args.scene and args.scene.parent, args.screenshot and args.screenshot.parent):
            if path is not None:
                path = Path(path).absolute()
                yield from (path, *path.parents)

    def commit(self):
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            staged = sorted(self.views_dir.iterdir(), key=lambda p: p.name == "views.json")  # the manifest last
            for path in staged:
                shutil.move(str(path), str(self.output_dir / path.name))
        if self.screenshot is not None:
            self.screenshot.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.staged_screenshot), str(self.screenshot))
        self.discard()

    def discard(self):
        shutil.rmtree(self.staging, ignore_errors=True)


# -- the scene --------------------------------------------------------------------------------------------------
class Job:
    """What the subcommands share: the scene, the CT node, the rendered views and the engine."""

    def __init__(self, args, engine, outputs):
        self.args, self.engine, self.outputs = args, engine, outputs
        self.scene = _slicer().mrmlScene if inside_slicer() else engine.mrml.new_scene()
        self.ct_node = self._load_ct()
        self.session = engine.session.DRRSession(self.scene, self.ct_node, device=args.device,
                                                 hu_model=args.hu_model)
        self.images, self.geometries, self.seconds, self.device = [], [], 0.0, ""

    def _load_ct(self):
        args, engine = self.args, self.engine
        rendering = _module_logic("volumerendering")
        if args.phantom:
            return engine.session.add_chest_phantom(self.scene, seed=args.seed, volume_rendering_logic=rendering)
        ct = engine.load_ct(args.ct, series_uid=args.series)
        name = Path(args.ct).name
        for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
            if name.lower().endswith(suffix):
                name = name[:-len(suffix)]
                break
        return engine.mrml.add_ct_volume_node(self.scene, ct, name=name or "CT", volume_rendering_logic=rendering)

    def render(self, angles):
        """Render every view of the CT node into the staging folder (one file per view plus views.json)."""
        args = self.args
        base = base_geometry(args, self.engine, self.session.ct.center_ras)

        def keep(index, image, geometry):
            self.images.append(image)
            self.geometries.append(geometry)

        started = time.monotonic()
        self.engine.export.render_views(self.session.ct, base, angles, self.outputs.views_dir, fmt=args.format,
                                        output=args.output, hu_model=args.hu_model, device=args.device,
                                        batch=args.batch, on_view=keep)
        self.seconds = time.monotonic() - started
        self.device = self.engine.session.device_summary(args.device)

    def show_carm(self, geometry, image_node):
        """The C-arm at ``geometry`` with ``image_node`` on its detector (found again if already in the scene)."""
        carm = self.session.carm
        carm.update(geometry)
        carm.set_image(image_node)
        return carm


def _slicer():
    import slicer

    return slicer


def _module_logic(name):
    """A Slicer module's logic (inside Slicer), else None: the engine then builds what it needs itself."""
    if not inside_slicer():
        return None
    module = getattr(_slicer().modules, name, None)
    return module.logic() if module is not None else None


def _view_label(geometry):
    return f"az{geometry.azimuth:g} el{geometry.elevation:g}"


# -- subcommands ------------------------------------------------------------------------------------------------
def cmd_render(job):
    """One DRR node per view, on its detector plane; the C-arm at the first view with its DRR."""
    mrml, source = job.engine.mrml, f"DRR of {job.session.ct.source}"
    nodes = [mrml.show_drr(job.scene, image, geometry, name=f"DRR {_view_label(geometry)}", source=source)
             for image, geometry in zip(job.images, job.geometries)]
    job.show_carm(job.geometries[0], nodes[0])
    return f"{len(nodes)} DRR node(s)"


def cmd_orbit(job):
    """All views as one sequence with a browser; the C-arm at the first view, showing the sequence's image."""
    import numpy as np

    name = f"{job.ct_node.GetName()} orbit"
    sequence, browser = job.engine.mrml.add_orbit_sequence(job.scene, np.stack(job.images), job.geometries,
                                                           name=name, sequences_logic=_module_logic("sequences"))
    job.show_carm(job.geometries[0], browser.GetProxyNode(sequence))
    return f"sequence '{sequence.GetName()}' of {sequence.GetNumberOfDataNodes()} view(s)"


COMMANDS = {"render": cmd_render, "orbit": cmd_orbit}


# -- the 3D view picture ----------------------------------------------------------------------------------------
def screenshot(job, path):
    """The 3D view as a PNG: Slicer's own view inside Slicer, an offscreen copy of it under plain Python."""
    view = job.engine.mrml_view
    size = job.args.screenshot_size
    if not inside_slicer():
        return view.render_3d_view(job.scene, path, size)
    slicer = _slicer()
    layout = slicer.app.layoutManager()
    if layout is None or layout.threeDViewCount == 0:  # --no-main-window: no views; Slicer's view, offscreen
        return view.render_3d_view(job.scene, path, size, app_logic=slicer.app.applicationLogic(), backend=None)
    three_d = layout.threeDWidget(0).threeDView()
    camera_node = view.view_camera_node(job.scene, three_d.mrmlViewNode())
    view.apply_camera(camera_node, view.default_camera(job.scene, (three_d.width, three_d.height)))
    slicer.app.processEvents()
    three_d.forceRender()
    return view.write_png(path, view.capture_window(three_d.renderWindow()))


# -- main -------------------------------------------------------------------------------------------------------
def run(argv):
    """Run the batch described by ``argv`` (the script's arguments); return the exit code."""
    outputs = None
    try:
        args = parse_arguments(argv)
        started = time.monotonic()
        engine = Engine()
        angles = angles_of(args, engine)
        check_geometry(args, engine, angles)
        engine.load().resolve_device(args.device)  # CUDA asked for where there is none: say so now
        if args.screenshot is not None and not inside_slicer():
            problem = engine.mrml_view.probe_offscreen()
            if problem:
                raise BatchError(f"cannot make the --screenshot here: {problem}")
        outputs = Outputs(args)
        job = Job(args, engine, outputs)
        job.render(angles)
        made = COMMANDS[args.command](job)
        if args.screenshot is not None:
            screenshot(job, outputs.staged_screenshot)
        if args.scene is not None:
            engine.mrml.save_scene_bundle(job.scene, args.scene)
        outputs.commit()
        outputs = None
        _report(args, job, made, time.monotonic() - started)
        return 0
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place where a failure becomes one line
        if os.environ.get("SVDRR_DEBUG"):
            raise
        return _report_error(exc)
    finally:
        if outputs is not None:
            outputs.discard()


def _report(args, job, made, seconds):
    w, h = job.geometries[0].detector
    lines = [(f"{PROG} {args.command}: {len(job.images)} view(s) of {w}x{h} px rendered in {job.seconds:.1f} s on "
              f"{job.device}; {made}; {seconds:.1f} s in all")]
    if args.output_dir is not None:
        lines.append(f"  images:     {args.output_dir} ({len(job.images)} {args.format} file(s) + views.json)")
    if args.scene is not None:
        lines.append(f"  scene:      {args.scene}")
    if args.screenshot is not None:
        lines.append(f"  screenshot: {args.screenshot}")
    print("\n".join(lines), flush=True)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """A warning about an input (e.g. values unlike HU) reaches the user as one line, like an error."""
    print(f"{PROG}: warning: {str(message).strip().splitlines()[0]}", file=file or sys.stderr, flush=True)


def _report_error(exc):
    text = str(exc).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, (BatchError, ValueError, OSError, RuntimeError)):  # GeometryError, ImageError: ValueErrors
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 2
    print(f"{PROG}: internal error ({type(exc).__name__}): {message}; set SVDRR_DEBUG=1 for the traceback",
          file=sys.stderr, flush=True)
    return 1


def main():
    if not inside_slicer() and "--verbose" not in sys.argv:
        try:
            quiet_vtk()
        except ImportError:  # no VTK at all: the engine import reports it
            pass
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        code = run(sys.argv[1:])
    if inside_slicer():
        _slicer().util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    main()
