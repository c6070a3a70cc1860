"""``svdrr demo``: everything the product does by default, on data it makes itself (no downloads).

1. An orbit of DRRs of the procedural chest phantom and a labelled contact sheet.
2. Novel views: only when the catalogue has an SV-DRR model marked ``"demo": true`` that resolves without the network
   (an embedded model, or one already in the cache), the PA DRR of step 1 goes through it and the synthesized views
   get their own contact sheet; otherwise the demo says so in one line and goes on.
3. CT reconstruction: for each reconstruction method with such a demonstration model (DVG-Diffusion, 3D patch
   EDM), the phantom is reconstructed from its own frontal and lateral DRRs (and from the frontal one alone when
   the model takes one X-ray), through the same files and code as ``svdrr reconstruct``; PSNR and SSIM against the
   phantom are printed next to the plain back-projection baseline, and a sheet shows the middle slices.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import weights
from .export import render_views
from .geometry import CArmGeometry, arc
from .images import CTVolume, XRayImage
from .io import load_ct, load_xray, write_image
from .io.common import atomic_output
from .phantoms import chest_phantom
from .recon_grid import ReconGrid, backprojection_baseline, hu_to_unit

log = logging.getLogger(__name__)

BANNER = "SYNTHETIC DRRs of a generated phantom - not for diagnosis"
NOVEL_BANNER = "SYNTHESIZED views (SV-DRR demonstration model) of a phantom DRR - not for diagnosis"
NO_DEMO_MODEL = "no demonstration model installed: skipping novel views"
NO_RECON_MODEL = "no demonstration reconstruction model installed: skipping CT reconstruction"
RECON_BANNER = "RECONSTRUCTED CTs (demonstration models) of a phantom from its DRRs - not for diagnosis"
RECON_METHODS = {"dvg": "DVG-Diffusion", "patch-edm": "3D patch EDM"}
#: Side in pixels of a slice on the reconstruction sheet (the 64^3 volumes are upscaled to be seen).
RECON_TILE = 224
#: Sampling steps per method (absent: the model's default).
RECON_STEPS: dict[str, int] = {}
#: Frontal (PA) and lateral: the views both reconstruction methods were trained with.
RECON_VIEWS = ((0.0, 0.0), (90.0, 0.0))
#: The novel views of the demo: five azimuths around the PA source, at the model's own resolution.
NOVEL_VIEWS = arc(-90, 90, 45)


def contact_sheet(tiles: list[np.ndarray], labels: list[str], columns: int = 5, title: str = BANNER) -> Image.Image:
    """Tiles in [0, 1] laid out in a grid, each labelled, under a title line."""
    h, w = tiles[0].shape
    rows = -(-len(tiles) // columns)
    pad, head, cap = 4, 22, 14
    sheet = Image.new("L", (columns * (w + pad) + pad, head + rows * (h + cap + pad) + pad), color=0)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 5), title, fill=255)
    for n, (tile, label) in enumerate(zip(tiles, labels)):
        x = pad + (n % columns) * (w + pad)
        y = head + (n // columns) * (h + cap + pad)
        sheet.paste(Image.fromarray(np.uint8(np.clip(tile, 0, 1) * 255)), (x, y + cap))
        draw.text((x + 2, y + 1), label, fill=255)
    return sheet


def demo_model(catalogue=None, kind: str = "svdrr") -> str | None:
    """The first model of ``kind`` in the catalogue marked ``"demo": true`` that resolves offline (embedded in the
    extension, or already in the cache), or None. ``catalogue``: a Catalogue or a catalogue file (default
    ``Resources/models.json``)."""
    cat = catalogue if isinstance(catalogue, weights.Catalogue) else weights.Catalogue.load(catalogue)
    for entry in cat:
        if not (entry.demo and entry.kind == kind):
            continue
        try:
            weights.resolve(entry.name, offline=True, progress=False, catalogue=cat)
        except weights.WeightsError as exc:
            log.info("demonstration model '%s' is not usable offline: %s", entry.name, exc)
            continue
        return entry.name
    return None


def novel_view_step(out_dir: Path, source: XRayImage, device: str = "auto", catalogue=None,
                    say: Callable[[str], None] = print) -> Path | None:
    """Synthesize :data:`NOVEL_VIEWS` of ``source`` with the demonstration model into ``out_dir/novel_views`` and
    write ``out_dir/novel_views_sheet.png`` (the input first); without a demonstration model, say so and return
    None."""
    name = demo_model(catalogue)
    if name is None:
        say(NO_DEMO_MODEL)
        return None
    from .synthesize import synthesize_views  # torch, diffusers and transformers only when there is a model

    out_dir = Path(out_dir)
    written = synthesize_views(source, name, NOVEL_VIEWS, out_dir / "novel_views", steps=20, guidance=3.0, seed=0,
                               device=device, fmt="png", catalogue=catalogue, offline=True,
                               progress=lambda fraction, message: None)
    size = source.array.shape
    tiles = [_tile(source.array, size)] + [_tile(load_xray(p).array, size) for p in written]
    labels = ["input (PA DRR)"] + [f"synth az {a:+.0f} el {e:+.0f}" for a, e in NOVEL_VIEWS]
    sheet_path = out_dir / "novel_views_sheet.png"
    with atomic_output(sheet_path, ".png") as tmp:
        contact_sheet(tiles, labels, columns=len(tiles), title=NOVEL_BANNER).save(tmp, format="PNG")
    say(f"novel views ({name}, a small demonstration model: synthetic images, not for diagnosis): {sheet_path}")
    return sheet_path


def reconstruction_step(out_dir: Path, ct: CTVolume, device: str = "auto", catalogue=None,
                        say: Callable[[str], None] = print) -> dict | None:
    """Reconstruct ``ct`` from its own DRRs with every demonstration reconstruction model (module docstring, step 3)
    into ``out_dir/reconstruction``; returns the metrics (also in ``metrics.json`` there), or None without a model."""
    models = {kind: demo_model(catalogue, kind) for kind in RECON_METHODS}
    models = {kind: name for kind, name in models.items() if name is not None}
    if not models:
        say(NO_RECON_MODEL)
        return None
    import torch

    from .models.recon_folder import read_config
    from .reconstruct import reconstruct_ct
    from .volume_metrics import psnr_3d, ssim_slices

    folder = Path(out_dir) / "reconstruction"
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    rows: list[tuple[str, np.ndarray]] = []
    for kind, name in models.items():
        cfg = read_config(weights.resolve(name, offline=True, progress=False, catalogue=catalogue))
        grid = ReconGrid(int(cfg["grid"]), tuple(ct.center_ras))
        truth = grid.sample_ct(ct)
        geoms = [grid.geometry(*view) for view in RECON_VIEWS]
        images = grid.project(torch.from_numpy(truth), geoms)
        files = [write_image(folder / f"{label}_{grid.size}.nrrd", XRayImage(im.numpy()), g, format="nrrd")
                 for label, im, g in zip(("frontal", "lateral"), images, geoms)]
        if not rows or rows[0][1].shape != truth.shape:
            rows.append((f"phantom {grid.size}^3", truth))
            baseline = backprojection_baseline(grid, images, geoms)
            results[f"back-projection {grid.size}^3"] = _scores(baseline, truth, psnr_3d, ssim_slices)
            rows.append(("back-projection", baseline))
        counts = [n for n in (2, 1) if n in cfg.get("input_views", [2])]
        for n in counts:
            label = f"{RECON_METHODS[kind]} {'biplanar' if n == 2 else 'single view'}"
            out = folder / f"{kind}_{'biplanar' if n == 2 else 'single'}.nii.gz"
            reconstruct_ct([str(f) for f in files[:n]], out, model=name, seed=0, device=device,
                           steps=RECON_STEPS.get(kind), catalogue=catalogue, offline=True)
            unit = hu_to_unit(load_ct(out).array_hu)
            results[label] = {"model": name, **_scores(unit, truth, psnr_3d, ssim_slices)}
            rows.append((label, unit))
    with atomic_output(folder / "metrics.json", ".json") as tmp:
        tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    sheet_path = Path(out_dir) / "reconstruction_sheet.png"
    tiles, labels = [], []
    for label, volume in rows:
        for plane, tile in zip(("axial", "coronal", "sagittal"), _middle_slices(volume)):
            tiles.append(np.asarray(Image.fromarray(tile).resize((RECON_TILE, RECON_TILE), Image.BILINEAR)))
            labels.append(f"{label}: {plane}")
    with atomic_output(sheet_path, ".png") as tmp:
        contact_sheet(tiles, labels, columns=3, title=RECON_BANNER).save(tmp, format="PNG")
    for label, r in results.items():
        say(f"{label}: PSNR {r['psnr_3d']:.2f} dB, SSIM {r['ssim_slices']:.3f}")
    say(f"reconstructions (small demonstration models: synthetic CTs, not for diagnosis): {sheet_path}")
    return results


def _scores(unit: np.ndarray, truth: np.ndarray, psnr, ssim) -> dict:
    return {"psnr_3d": round(psnr(unit, truth), 3), "ssim_slices": round(ssim(unit, truth), 4)}


def _middle_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial (superior up is k), coronal and sagittal middle slices of a [k, j, i] grid volume, upright, on the
    CT's [0, 1] window."""
    k, j, i = (n // 2 for n in volume.shape)
    return [np.ascontiguousarray(a) for a in (volume[k], volume[::-1, j, :], volume[::-1, :, i])]


def _tile(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``array`` min-max scaled to [0, 1] and resized to ``size`` (rows, cols), for a contact sheet."""
    a = np.asarray(array, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if a.shape != tuple(size):
        a = np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BILINEAR))
    return a


def run_demo(out_dir: Path, device: str = "auto", catalogue=None, say: Callable[[str], None] = print) -> Path:
    """The demo's steps (module docstring) into ``out_dir``; returns the DRR contact sheet. ``catalogue`` is where
    the demonstration model is looked for (default ``Resources/models.json``); ``say`` prints progress lines."""
    out_dir = Path(out_dir)
    ct = chest_phantom(seed=0)
    base = CArmGeometry.preset("svdrr-lidc", isocenter=tuple(ct.center_ras), detector=(192, 192),
                               pixel=(358.4 / 192, 358.4 / 192))
    tiles: dict[int, tuple[np.ndarray, str]] = {}

    pa: dict[str, XRayImage] = {}

    def keep(index: int, image: np.ndarray, geom: CArmGeometry) -> None:
        tiles[index] = (image, f"az {geom.azimuth:+.0f}  el {geom.elevation:+.0f}")
        if (geom.azimuth, geom.elevation) == (0.0, 0.0):
            pa["drr"] = XRayImage(image, (geom.pixel[1], geom.pixel[0]),
                                  metadata={"synthetic": True, "kind": "DRR", "geometry": geom.to_dict()},
                                  ijk_to_ras=geom.detector_ijk_to_ras, source="PA DRR of the demo chest phantom")

    render_views(ct, base, arc(-90, 90, 18), out_dir / "orbit", fmt="png", output="display", device=device,
                 on_view=keep)
    ordered = [tiles[i] for i in sorted(tiles)]
    sheet_path = out_dir / "contact_sheet.png"
    with atomic_output(sheet_path, ".png") as tmp:
        contact_sheet([t for t, _ in ordered], [lab for _, lab in ordered]).save(tmp, format="PNG")
    novel_view_step(out_dir, pa["drr"], device=device, catalogue=catalogue, say=say)
    reconstruction_step(out_dir, ct, device=device, catalogue=catalogue, say=say)
    return sheet_path
