"""``svdrr demo``: everything the product does by default, on data it makes itself (no downloads).

For now: an orbit of DRRs of the procedural chest phantom and a labelled contact sheet; the novel-view and
reconstruction issues add their steps here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .export import render_views
from .geometry import CArmGeometry, arc
from .io.common import atomic_output
from .phantoms import chest_phantom

BANNER = "SYNTHETIC DRRs of a generated phantom - not for diagnosis"


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


def run_demo(out_dir: Path, device: str = "auto") -> Path:
    out_dir = Path(out_dir)
    ct = chest_phantom(seed=0)
    base = CArmGeometry.preset("svdrr-lidc", isocenter=tuple(ct.center_ras), detector=(192, 192),
                               pixel=(358.4 / 192, 358.4 / 192))
    tiles: dict[int, tuple[np.ndarray, str]] = {}

    def keep(index: int, image: np.ndarray, geom: CArmGeometry) -> None:
        tiles[index] = (image, f"az {geom.azimuth:+.0f}  el {geom.elevation:+.0f}")

    render_views(ct, base, arc(-90, 90, 18), out_dir / "orbit", fmt="png", output="display", device=device,
                 on_view=keep)
    ordered = [tiles[i] for i in sorted(tiles)]
    sheet_path = out_dir / "contact_sheet.png"
    with atomic_output(sheet_path, ".png") as tmp:
        contact_sheet([t for t, _ in ordered], [lab for _, lab in ordered]).save(tmp, format="PNG")
    return sheet_path
