"""SVDRR engine: CT/X-ray I/O, C-arm geometry, DRR projector, phantoms and models, without Qt or Slicer.

Public API (DESIGN.md section 2)::

    from SVDRRLogic import load_ct, load_xray, CArmGeometry, DRRRenderer
"""
from .geometry import CArmGeometry, GeometryError
from .images import CTVolume, ImageError, XRayImage
from .io import load_ct, load_xray
from .renderer import DRRRenderer

__version__ = "0.1.0"
__all__ = ["CArmGeometry", "CTVolume", "DRRRenderer", "GeometryError", "ImageError", "XRayImage", "load_ct",
           "load_xray", "__version__"]
