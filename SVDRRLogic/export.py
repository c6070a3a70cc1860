"""Render a set of views of a CT to files: one image per view plus ``views.json`` with each view's geometry.

Shared by the command line, the headless Slicer batch script and the demo, so every route writes the same files.
Views are rendered in batches (bounded memory, progress per batch); ``views.json`` is written last and atomically,
so its presence means the set is complete, and a run that fails or is interrupted removes the views it wrote.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from .geometry import CArmGeometry
from .images import CTVolume, XRayImage
from .io import write_image
from .io.common import all_or_nothing, atomic_output
from .io.dicom_writer import DicomSeries
from .renderer import DRRRenderer, describe_device


def view_filename(index: int, geometry: CArmGeometry, fmt: str) -> str:
    return f"view_{index:04d}_az{geometry.azimuth:+07.2f}_el{geometry.elevation:+07.2f}.{fmt}"


def render_views(ct: CTVolume, base: CArmGeometry, angles: Sequence[tuple[float, float]], out_dir: Path,
                 fmt: str = "nrrd", output: str = "line-integral", hu_model: str = "physical",
                 device: str = "auto", batch: int = 8,
                 on_view: Callable[[int, np.ndarray, CArmGeometry], None] | None = None) -> list[Path]:
    """Write one DRR per (azimuth, elevation) in ``angles`` into ``out_dir``; return the written paths."""
    renderer = DRRRenderer(ct, device=device, hu_model=hu_model)
    geoms = [base.with_view(a, e) for a, e in angles]
    out_dir = Path(out_dir)
    written, records, series = [], [], DicomSeries()  # one DICOM series per set (other formats ignore it)
    with all_or_nothing(written, out_dir), \
            tqdm(total=len(geoms), unit="view", desc="rendering", disable=None) as bar:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "views.json").unlink(missing_ok=True)  # a failed re-run must not leave an old set looking whole
        for start in range(0, len(geoms), batch):
            chunk = geoms[start:start + batch]
            images = renderer.render(chunk, output=output)
            for offset, (geom, image) in enumerate(zip(chunk, images)):
                index = start + offset
                name = view_filename(index, geom, fmt)
                xray = XRayImage(image, pixel_spacing=(geom.pixel[1], geom.pixel[0]),
                                 metadata={"synthetic": True, "kind": "DRR", "output": output,
                                           "hu_model": renderer.hu_model, "source_ct": ct.source},
                                 ijk_to_ras=geom.detector_ijk_to_ras, source=name)
                written.append(write_image(out_dir / name, xray, geometry=geom, series=series.at(index + 1)))
                records.append({"index": index, "file": name, **geom.to_dict()})
                if on_view is not None:
                    on_view(index, image, geom)
            bar.update(len(chunk))
        manifest = {"synthetic": True, "note": "digitally reconstructed radiographs; not for diagnosis",
                    "ct": ct.source, "output": output, "hu_model": renderer.hu_model,
                    "device": describe_device(renderer.device), "views": records}
        _write_json_atomic(out_dir / "views.json", manifest)
    return written


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_output(path, ".json") as tmp:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
