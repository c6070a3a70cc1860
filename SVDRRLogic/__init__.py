"""SVDRR engine: CT/X-ray I/O, C-arm geometry, DRR projector, phantoms and models, without Qt or Slicer.

Public API (DESIGN.md section 2)::

    from SVDRRLogic import load_ct, load_xray, CArmGeometry, DRRRenderer

Names are resolved on first use (PEP 562), so ``import SVDRRLogic.geometry`` or ``SVDRRLogic.jobs`` works before
torch is installed (the Slicer module checks inputs and installs dependencies that way).
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CArmGeometry": "geometry", "GeometryError": "geometry",
    "CTVolume": "images", "ImageError": "images", "XRayImage": "images",
    "load_ct": "io", "load_xray": "io",
    "DRRRenderer": "renderer",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
