"""X-rays from ordinary pictures (PNG, JPEG, TIFF, BMP) through Pillow.

Such files carry no trustworthy physical size, so the spacing is 1.0 mm and ``metadata["spacing_known"]`` is False
-- except for the 16-bit PNGs we write ourselves, whose text chunks restore the float values (``svdrr:offset`` +
stored value x ``svdrr:scale``), the pixel spacing and the C-arm geometry. Colour pictures become gray with the
ITU-R BT.601 luma weights. Values keep the picture's own polarity (a film scan or screenshot shows bone bright).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..images import ImageError, XRayImage
from .common import SYNTHETIC_MARK, first_line, parse_geometry

#: PNG text-chunk keys written by :func:`SVDRRLogic.io.writers.write_image` and understood here.
KEY_OFFSET, KEY_SCALE, KEY_SPACING = "svdrr:offset", "svdrr:scale", "svdrr:pixel_spacing"
KEY_GEOMETRY, KEY_SYNTHETIC, KEY_KIND = "svdrr:geometry", "svdrr:synthetic", "svdrr:kind"

_GRAY_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "F", "1")


def read_raster(path: Path) -> XRayImage:
    """One picture as an XRayImage, restoring values, spacing and view from our own PNG text chunks."""
    values, text, metadata = _decode(path)
    metadata.update(source=str(path), synthetic=text.get(KEY_SYNTHETIC) == SYNTHETIC_MARK,
                    pixel_spacing_source=None, spacing_at="unknown", spacing_known=False)
    spacing = (1.0, 1.0)
    try:
        if KEY_SCALE in text:
            values = float(text.get(KEY_OFFSET, 0.0)) + values * float(text[KEY_SCALE])
            metadata["kind"] = text.get(KEY_KIND, "")
        if KEY_SPACING in text:
            spacing = tuple(float(x) for x in text[KEY_SPACING].split())
            metadata.update(pixel_spacing_source=KEY_SPACING, spacing_at="detector", spacing_known=True)
    except ValueError:
        raise ImageError(f"{path}: corrupt svdrr scale or spacing text chunk") from None
    ijk_to_ras = None
    if KEY_GEOMETRY in text:
        metadata["geometry"], ijk_to_ras = parse_geometry(text[KEY_GEOMETRY], str(path))
    return XRayImage(values, spacing, metadata=metadata, ijk_to_ras=ijk_to_ras, source=str(path))


def _decode(path: Path) -> tuple[np.ndarray, dict[str, str], dict]:
    """Gray values, text chunks and format facts of a single-frame picture; Pillow's failures become ImageError."""
    try:
        with Image.open(path) as picture:
            picture.load()
            frames = getattr(picture, "n_frames", 1)
            values, converted = _gray(picture)
            text = {str(k): str(v) for k, v in getattr(picture, "text", {}).items()}
            facts = {"format": str(picture.format).lower(), "mode": picture.mode, "color_converted": converted}
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (neither DICOM nor a picture format Pillow can read)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: picture cannot be decoded, truncated or corrupt ({first_line(exc)})") from None
    if frames > 1:
        raise ImageError(f"{path}: holds {frames} frames (a stack or animation), not a single X-ray")
    return values, text, facts


def _gray(picture: Image.Image) -> tuple[np.ndarray, bool]:
    """Gray values as float64 at the picture's own bit depth, and whether colour had to be converted."""
    if picture.mode in _GRAY_MODES:
        return np.asarray(picture, dtype=np.float64), False
    if picture.mode in ("LA", "La"):
        return np.asarray(picture.getchannel("L"), dtype=np.float64), False
    rgb = np.asarray(picture.convert("RGB"), dtype=np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114]), True
