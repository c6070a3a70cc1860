"""The ``svdrr`` command line (also ``python -m SVDRRLogic``).

Every failure a user can cause (bad path, bad image, absurd geometry, missing device) ends with one line on
stderr and exit code 2; set ``SVDRR_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path

from . import __version__
from .attenuation import HU_MODELS, OUTPUTS
from .geometry import CArmGeometry, GeometryError, parse_view_set, preset_names
from .images import ImageWarning

FORMATS = ("nrrd", "nii.gz", "png", "dcm")
_NUMBER_LIST = re.compile(r"^-\d*\.?\d+(e-?\d+)?(,-?\d*\.?\d+(e-?\d+)?)*$")
_LIST_OPTIONS = {"--view", "--isocenter", "--detector", "--pixel", "--source-view", "--center"}


class UsageError(Exception):
    """A bad argument or input: reported as one line with exit code 2."""


def _floats(text: str, n: tuple[int, ...], what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if len(values) not in n:
        raise argparse.ArgumentTypeError(f"{what} needs {' or '.join(map(str, n))} numbers, got {text!r}")
    return values


def _view(text: str, option: str = "--view") -> tuple[float, float]:
    v = _floats(text, (1, 2), f"{option} AZ,EL")
    return (v[0], v[1] if len(v) > 1 else 0.0)


def _source_view(text: str) -> tuple[float, float]:
    return _view(text, "--source-view")


def _detector(text: str) -> tuple[int, int]:
    v = _floats(text, (1, 2), "--detector W,H")
    if any(x != int(x) for x in v):
        raise argparse.ArgumentTypeError(f"--detector needs whole pixel counts, got {text!r}")
    return (int(v[0]), int(v[-1]))


def _glue_negative_lists(argv: list[str]) -> list[str]:
    """Let ``--view -30,10`` work as typed: argparse would take ``-30,10`` for an option otherwise."""
    out: list[str] = []
    for tok in argv:
        if out and out[-1] in _LIST_OPTIONS and _NUMBER_LIST.match(tok):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``svdrr: error: ...``), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"svdrr: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="svdrr", description="DRRs, novel X-ray views and CT reconstruction.")
    p.add_argument("--version", action="version", version=f"svdrr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render DRRs of a CT for one or more C-arm views")
    r.add_argument("ct", nargs="?", help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    r.add_argument("-o", "--output-dir", required=True, type=Path)
    r.add_argument("--phantom", choices=["chest"], help="render a generated phantom instead of a CT")
    r.add_argument("--seed", type=int, default=0, help="phantom seed")
    r.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    r.add_argument("--view", type=_view, action="append", metavar="AZ,EL",
                   help="azimuth (LAO+) and elevation (cranial+, 0 when left out) in degrees; repeatable")
    r.add_argument("--views", metavar="SET", help="arc:START:STOP:STEP[:EL] or hemisphere:N")
    r.add_argument("--preset", default="svdrr-lidc", choices=preset_names())
    r.add_argument("--sad", type=float, help="source-to-isocenter distance, mm")
    r.add_argument("--sdd", type=float, help="source-to-detector distance, mm")
    r.add_argument("--detector", type=_detector, metavar="W,H", help="detector columns,rows in pixels")
    r.add_argument("--pixel", type=lambda t: _floats(t, (1, 2), "--pixel"), metavar="MM[,MM]",
                   help="detector pixel size in mm (column, row)")
    r.add_argument("--isocenter", type=lambda t: _floats(t, (3,), "--isocenter R,A,S"), metavar="R,A,S",
                   help="isocenter in RAS mm (default: the CT's centre)")
    r.add_argument("--intensity", choices=["hu", "mu"], default="hu",
                   help="voxel values: HU, or attenuation already in 1/mm")
    r.add_argument("--hu-model", choices=HU_MODELS, default="physical")
    r.add_argument("--output", choices=OUTPUTS, default="line-integral")
    r.add_argument("--format", choices=FORMATS, default="nrrd")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--batch", type=int, default=8, help="views rendered together (memory vs speed)")

    b = sub.add_parser("bench", help="projector speed and memory, side by side with installed peers")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--ct", help="CT to benchmark (default: the LIDC CT beside the project, else a phantom)")
    b.add_argument("--sizes", default="256,512", help="detector sizes in pixels")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--no-peers", action="store_true", help="skip plastimatch and DiffDRR")
    b.add_argument("--no-large", action="store_true", help="skip the 512x512x500 CT at 1024^2 memory check")

    br = sub.add_parser("bench-recon", help="time and peak memory of a CT reconstruction per method and model size")
    br.add_argument("--methods", default="dvg,patch-edm", help="comma-separated: dvg, patch-edm")
    br.add_argument("--configs", default="tiny", help="comma-separated model sizes: tiny, demo, paper")
    br.add_argument("--steps", type=int, help="time this many steps (and twice as many), extrapolate to the full run")
    br.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    br.add_argument("--json", action="store_true", help="print the results as JSON")

    s = sub.add_parser("synthesize", help="novel views of one X-ray with an SV-DRR model (synthetic images)",
                       description="Synthesize new C-arm views of the patient in one X-ray with an SV-DRR model. "
                                   "Writes one image per view and synthesis.json (the settings and every view's "
                                   "geometry). The images are plausible guesses, not measurements: not for "
                                   "diagnosis.")
    s.add_argument("xray", help="the X-ray: DICOM (CR/DX), PNG/JPEG, or a single-slice NRRD/NIfTI such as a DRR")
    s.add_argument("-o", "--output-dir", required=True, type=Path)
    s.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                   help="catalogue name (see 'svdrr models list') or a model folder in the authors' layout")
    s.add_argument("--view", type=_view, action="append", metavar="AZ,EL",
                   help="target azimuth (LAO+) and elevation (cranial+) in degrees; repeatable")
    s.add_argument("--views", metavar="SET", help="arc:START:STOP:STEP[:EL] or hemisphere:N "
                                                  "(default without --view: arc:-90:90:30)")
    s.add_argument("--steps", type=int, default=20, help="denoising steps (DPM-Solver++; default 20)")
    s.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")
    s.add_argument("--seed", type=int, default=0, help="noise seed: same seed, same images (default 0)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--format", choices=FORMATS, default="png")
    s.add_argument("--batch", type=int, default=4, help="views denoised together (memory vs speed)")
    s.add_argument("--source-view", type=_source_view, metavar="AZ,EL",
                   help="C-arm angles of the input X-ray (default: those stored in an SVDRR file, else PA 0,0, "
                        "the only source view the released models were trained with)")

    c = sub.add_parser("reconstruct", help="a CT from one or two X-rays (DVG-Diffusion or 3D patch EDM; synthetic)",
                       description="Reconstruct a CT volume from one or two X-rays with a generative model. Each "
                                   "X-ray is FILE@AZ,EL (C-arm azimuth and elevation in degrees, e.g. frontal "
                                   "@0,0 and lateral @90,0), or FILE alone when it is an SVDRR DRR that stores its "
                                   "view. The CT is a plausible guess, marked synthetic: not for diagnosis.")
    c.add_argument("xrays", nargs="+", metavar="XRAY[@AZ,EL]", help="one or two X-rays")
    c.add_argument("-o", "--output", required=True, type=Path, metavar="CT.nii.gz",
                   help="output CT (.nii.gz, .nii, .nrrd or .mha)")
    c.add_argument("--method", choices=["dvg", "patch-edm"],
                   help="reconstruction method (default: the model's; DVG-Diffusion when no model is named)")
    c.add_argument("--model", metavar="NAME_OR_DIR",
                   help="catalogue name or model folder (default: the method's embedded demo model)")
    c.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    c.add_argument("--seed", type=int, default=0, help="noise seed: same seed, same CT (default 0)")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    c.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="precision of the U-Nets (auto: fp16 on CUDA, fp32 on the CPU)")
    c.add_argument("--keep-intermediates", type=Path, metavar="DIR",
                   help="also write the model's inputs and intermediate products there")
    c.add_argument("--center", type=lambda t: _floats(t, (3,), "--center R,A,S"), metavar="R,A,S",
                   help="centre of the reconstructed 320 mm cube in RAS mm (default: the X-ray's isocenter)")
    c.add_argument("--new-view", choices=["coarse", "svdrr", "none"], default="coarse",
                   help="DVG only: the extra view from DVG's coarse path (default), from an SV-DRR model "
                        "(experiment), or none (ablation)")
    c.add_argument("--svdrr-model", metavar="NAME_OR_DIR", help="SV-DRR model for --new-view svdrr")

    d = sub.add_parser("demo", help="render an orbit of the phantom and write a contact sheet")
    d.add_argument("-o", "--output-dir", required=True, type=Path)
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--catalogue", type=Path, metavar="FILE",
                   help="model catalogue to find the demonstration model in (default: Resources/models.json)")

    m = sub.add_parser("models", help="the model catalogue: list, download, verify, create random test models")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="catalogue models and whether they are in the cache")
    ml.add_argument("--json", action="store_true", help="print the catalogue entries and cache states as JSON")
    md = msub.add_parser("download", help="fetch a model into the cache (SVDRR_HOME), checking sha256")
    md.add_argument("name", help="catalogue name (see 'svdrr models list')")
    md.add_argument("--quiet", action="store_true", help="no progress bars")
    mv = msub.add_parser("verify", help="re-hash the cached files of a model against the catalogue")
    mv.add_argument("name", help="catalogue name")
    mc = msub.add_parser("convert-dvg", help="turn the DVG-Diffusion authors' checkpoints into a model folder",
                         description="Convert the released DVG-Diffusion checkpoints (xing0916/DVG-Diffusion) into a "
                                     "DVG model folder of safetensors. Checkpoints are read with torch.load("
                                     "weights_only=True): tensors only, no code is ever run from them. Every "
                                     "network comes from the diffusion milestone unless its own file is given.")
    mc.add_argument("diffusion", help="the diffusion milestone, e.g. DVG_Diffusion.pt")
    mc.add_argument("--ct-vqgan", metavar="CKPT", help="the CT VQ-GAN checkpoint (default: from the milestone)")
    mc.add_argument("--vpge", metavar="CKPT", help="VPGE_0_90_VQGAN.ckpt (default: from the milestone)")
    mc.add_argument("--vpge-new", metavar="CKPT", help="VPGE_45_VQGAN.ckpt (default: from the milestone)")
    mc.add_argument("--coarse", metavar="PT", help="NewView_Coarse_Model.pt (default: from the milestone)")
    mc.add_argument("--config", choices=["paper", "demo", "tiny"], default="paper",
                    help="the networks' configuration (default: the paper's)")
    mc.add_argument("-o", "--output-dir", required=True, type=Path)
    mr = msub.add_parser("create-random", help="write a randomly initialised model in the layout of NAME")
    mr.add_argument("name", help="catalogue name whose kind and resolution to use")
    mr.add_argument("--config", choices=["tiny", "paper"], default="tiny",
                    help="tiny: seconds on a CPU (tests); paper: the published architecture's size")
    mr.add_argument("-o", "--output-dir", required=True, type=Path)
    return p


def _geometry(args, ct) -> CArmGeometry:
    overrides = {k: getattr(args, k) for k in ("sad", "sdd", "detector") if getattr(args, k) is not None}
    if args.pixel is not None:
        overrides["pixel"] = (args.pixel[0], args.pixel[-1])
    iso = args.isocenter if args.isocenter is not None else tuple(ct.center_ras)
    return CArmGeometry.preset(args.preset, isocenter=iso, **overrides)


def _angles(args) -> list[tuple[float, float]]:
    angles = list(args.view or [])
    if args.views:
        angles += parse_view_set(args.views)
    return angles or [(0.0, 0.0)]


def cmd_render(args) -> int:
    from .io import load_ct
    from .export import render_views

    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    if (args.ct is None) == (args.phantom is None):
        raise UsageError("give either a CT path or --phantom chest")
    if args.phantom:
        from .phantoms import chest_phantom
        ct = chest_phantom(seed=args.seed)
    else:
        ct = load_ct(args.ct, series_uid=args.series, units=args.intensity)
    base = _geometry(args, ct)
    written = render_views(ct, base, _angles(args), args.output_dir, fmt=args.format, output=args.output,
                           hu_model=args.hu_model, device=args.device, batch=args.batch)
    print(f"wrote {len(written)} view(s) and views.json to {args.output_dir}")
    return 0


def cmd_synthesize(args) -> int:
    from .synthesize import MANIFEST_NAME, synthesize_views

    if args.steps < 1 or args.batch < 1:
        raise UsageError("--steps and --batch must be at least 1")
    angles = list(args.view or []) + (parse_view_set(args.views) if args.views else [])
    written = synthesize_views(args.xray, args.model, angles or parse_view_set("arc:-90:90:30"), args.output_dir,
                               steps=args.steps, guidance=args.guidance, seed=args.seed, device=args.device,
                               fmt=args.format, batch=args.batch, source_view=args.source_view)
    print(f"wrote {len(written)} synthesized view(s) and {MANIFEST_NAME} to {args.output_dir} "
          "(synthetic images, not for diagnosis)")
    return 0


def cmd_reconstruct(args) -> int:
    from .reconstruct import reconstruct_ct

    if len(args.xrays) > 2:
        raise UsageError(f"reconstruction takes one or two X-rays, got {len(args.xrays)}")
    from tqdm import tqdm

    with tqdm(total=1000, desc="reconstructing", disable=None, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
              "{elapsed}<{remaining} {postfix}") as bar:  # on a terminal only

        def progress(fraction: float, message: str) -> None:
            bar.set_postfix_str(message, refresh=False)
            bar.update(round(fraction * 1000) - bar.n)

        manifest = reconstruct_ct(args.xrays, args.output, model=args.model, method=args.method,
                                  steps=args.steps, seed=args.seed, device=args.device, dtype=args.dtype,
                                  keep=args.keep_intermediates, center_ras=args.center, new_view=args.new_view,
                                  svdrr_model=args.svdrr_model, progress=progress)
    demo = " with a small demonstration model" if manifest["demo_model"] else ""
    print(f"wrote {args.output}: {manifest['method']} reconstruction{demo} in {manifest['seconds']:.1f} s "
          "(synthetic CT, not for diagnosis)")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    sizes = [int(s) for s in args.sizes.split(",")]
    result = run_bench(ct_path=args.ct, sizes=sizes, batch=args.batch, repeat=args.repeat, device=args.device,
                       peers=not args.no_peers, large=not args.no_large, log=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else result["table"])
    return 0


def cmd_bench_recon(args) -> int:
    from .bench_recon import FACTORIES, run_bench_recon

    methods, configs = args.methods.split(","), args.configs.split(",")
    if not set(methods) <= set(FACTORIES) or not set(configs) <= {"tiny", "demo", "paper"}:
        raise UsageError(f"--methods takes {', '.join(FACTORIES)}; --configs takes tiny, demo, paper")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    result = run_bench_recon(methods, configs, device=args.device, steps=args.steps)
    print(json.dumps(result["rows"], indent=2) if args.json else result["table"])
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    sheet = run_demo(args.output_dir, device=args.device, catalogue=args.catalogue)
    print(f"contact sheet: {sheet}")
    return 0


def cmd_models(args) -> int:
    from . import weights

    catalogue = weights.Catalogue.load()
    if args.models_command == "list":
        rows = [(e.name, e.kind, str(e.resolution or "-"), e.preset, e.source.describe(), weights.cache_status(e))
                for e in catalogue]
        if args.json:
            print(json.dumps([dict(zip(("name", "kind", "resolution", "preset", "source", "cache"), r))
                              | {"resolution": e.resolution, "licence": e.licence, "normalization": e.normalization,
                                 "verified": e.verified}  # numbers stay numbers (null when unknown)
                              for r, e in zip(rows, catalogue)], indent=2))
            return 0
        head = ("NAME", "KIND", "RES", "PRESET", "SOURCE", "CACHE")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print(f"cache: {weights.home() / 'models'}")
        return 0
    if args.models_command == "download":
        folder = weights.resolve(args.name, progress=not args.quiet, catalogue=catalogue, check=True)
        print(folder)
        return 0
    if args.models_command == "verify":
        report = weights.verify(args.name, catalogue=catalogue)
        if len(report.missing) == len(report.checks):
            raise weights.WeightsError(f"'{report.name}' is not in the cache ({report.folder}); "
                                       f"`svdrr models download {report.name}` fetches it")
        for line in report.lines():
            print(line)
        if not report.ok:
            bad = [c.path for c in report.checks if c.status not in weights.GOOD_STATUSES]
            raise weights.WeightsError(f"{len(bad)} of {len(report.checks)} files of '{report.name}' are missing "
                                       f"or bad in {report.folder}: {', '.join(bad)} "
                                       f"(`svdrr models download {report.name}` fetches them again)")
        print(f"{report.name}: all {len(report.checks)} files verified in {report.folder}")
        return 0
    if args.models_command == "convert-dvg":
        from .models.dvg_convert import convert_dvg_release
        out = convert_dvg_release(args.output_dir, args.diffusion, ct_vqgan=args.ct_vqgan, vpge=args.vpge,
                                  vpge_new=args.vpge_new, coarse=args.coarse, config=args.config)
        print(f"wrote the DVG model folder {out} (use it with: svdrr reconstruct ... --model {out})")
        return 0
    out = weights.create_random(args.name, args.output_dir, config=args.config, catalogue=catalogue)
    lacking = weights.layout_differences(catalogue.get(args.name), out)
    if lacking:
        print(f"svdrr: note: {out} lacks catalogue file(s) of '{args.name}': {', '.join(lacking)}", file=sys.stderr)
    print(f"wrote a random {args.config} '{catalogue.get(args.name).kind}' model to {out}")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings reach a command-line user as one line, like errors (an input's own problems without a label)."""
    label = "" if issubclass(category, ImageWarning) else f"{category.__name__}: "
    print(f"svdrr: warning: {label}{str(message).strip().splitlines()[0]}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = _glue_negative_lists(list(sys.argv[1:] if argv is None else argv))
    commands = {"render": cmd_render, "synthesize": cmd_synthesize, "reconstruct": cmd_reconstruct,
                "bench": cmd_bench, "bench-recon": cmd_bench_recon, "demo": cmd_demo, "models": cmd_models}
    try:
        args = build_parser().parse_args(argv)  # (its choices read the resources: inside, for one-line errors)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            code = commands[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside this handler, rather than at exit
        return code
    except KeyboardInterrupt:
        print("svdrr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (``svdrr models list | head``): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet
        return 0
    except Exception as exc:  # the one place a user-facing error becomes one line
        if os.environ.get("SVDRR_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        known = isinstance(exc, (UsageError, GeometryError, ValueError, RuntimeError, OSError, MemoryError))
        print(f"svdrr: error: {msg}", file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
