"""Image input and output at the boundary between files (LPS, DICOM, pictures) and the engine (RAS, HU, floats).

``load_ct`` and ``load_xray`` read every supported source into :class:`~SVDRRLogic.images.CTVolume` and
:class:`~SVDRRLogic.images.XRayImage`; ``write_image`` and ``write_ct`` write results atomically, marked synthetic
(an acquired X-ray handed on is not).
"""
from ..images import ImageWarning
from .common import AIR_HU, SYNTHETIC_MARK
from .ct import load_ct
from .dicom_series import SeriesInfo, list_dicom_series
from .dicom_writer import patient_orientation
from .writers import IMAGE_FORMATS, IMAGE_KINDS, kind_of, write_ct, write_image
from .xray import load_xray

__all__ = ["AIR_HU", "IMAGE_FORMATS", "IMAGE_KINDS", "SYNTHETIC_MARK", "ImageWarning", "SeriesInfo", "kind_of",
           "list_dicom_series", "load_ct", "load_xray", "patient_orientation", "write_ct", "write_image"]
