"""DRRs and synthesized views as DICOM: a derived Secondary Capture that says plainly it is not an acquisition.

Why Secondary Capture: the DX IOD requires detector and exposure attributes we cannot honestly fill, while SC has
``ConversionType = SYN`` (synthetic image). The X-ray attributes viewers and our reader use are added anyway:
Modality DX, positioner angles (our azimuth/elevation are exactly DICOM's primary/secondary angles), source
distances, ImagerPixelSpacing (the DRR's pixel size is defined at the detector) and the Patient Orientation of the
detector axes. Float values are stored as 16-bit with RescaleSlope/RescaleIntercept. The full C-arm geometry goes
into a private block so that :func:`load_xray` restores the view exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from ..geometry import CArmGeometry
from ..images import XRayImage
from .common import SYNTHETIC_MARK, geometry_json, quantize_u16
from .dicom_xray import GEOMETRY_ELEMENT, PRIVATE_CREATOR, PRIVATE_GROUP

#: DICOM patient-orientation letters for the +/- direction of each RAS axis.
_LETTERS = (("R", "L"), ("A", "P"), ("H", "F"))


def patient_orientation(direction_ras: np.ndarray) -> str:
    """The DICOM Patient Orientation letters of a direction in RAS, strongest component first (``L``, ``FP``...).

    Components under 0.001 of the unit vector are numerical noise and left out.
    """
    d = np.asarray(direction_ras, dtype=np.float64)
    d = d / np.linalg.norm(d)
    order = np.argsort(-np.abs(d), kind="stable")
    return "".join(_LETTERS[a][0 if d[a] > 0 else 1] for a in order if abs(d[a]) > 1e-3)


@dataclass(frozen=True)
class DicomSeries:
    """Where a written image belongs: its study and series (shared by the views of one render or synthesis run,
    so a viewer shows them as one series, in view order) and its instance number. The default is a series of
    its own."""

    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    instance: int = 1

    def at(self, instance: int) -> DicomSeries:
        """The same series, instance ``instance`` (1-based)."""
        return replace(self, instance=int(instance))


def write_dicom(xray: XRayImage, path: Path, geometry: CArmGeometry | None, kind: str,
                series: DicomSeries | None = None) -> None:
    """Write ``xray`` as one DICOM file at ``path``; ``kind`` is "drr" or "synthesized"."""
    ds = Dataset()
    _identify(ds, geometry, kind, series or DicomSeries())
    _pixels(ds, xray.array)
    if geometry is not None:
        _positioner(ds, geometry)
    elif xray.metadata.get("spacing_known", True):
        keyword = "ImagerPixelSpacing" if xray.metadata.get("spacing_at") == "detector" else "PixelSpacing"
        setattr(ds, keyword, [_ds(s) for s in xray.pixel_spacing])
    ds.save_as(path, enforce_file_format=True)


def _ds(value: float) -> DSfloat:
    """A decimal string within DICOM's 16 characters."""
    return DSfloat(float(value), auto_format=True)


def _identify(ds: Dataset, geometry: CArmGeometry | None, kind: str, series: DicomSeries) -> None:
    """Patient/study/series/instance identity, and the synthetic marking in every place a reader may look."""
    now = datetime.now()
    sop_uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series.study_uid, series.series_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, series.instance
    ds.Modality, ds.ConversionType = "DX", "SYN"
    ds.Manufacturer, ds.SoftwareVersions = "SVDRR", "SVDRR"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    what = "DRR rendered from a CT" if kind == "drr" else "view synthesized by a generative model"
    view = f" az {geometry.azimuth:g} el {geometry.elevation:g}" if geometry is not None else ""
    ds.ImageComments = f"{SYNTHETIC_MARK}: {what}"
    ds.DerivationDescription = f"{SYNTHETIC_MARK}: {what} by SVDRR{view}"
    prefix = f"{SYNTHETIC_MARK} " if kind == "synthesized" else ""
    ds.SeriesDescription = f"{prefix}{'DRR' if kind == 'drr' else 'view'}{view}"[:64]


def _pixels(ds: Dataset, values: np.ndarray) -> None:
    stored, offset, scale = quantize_u16(values)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(offset), _ds(scale if scale else 1.0), "US"
    ds.WindowCenter, ds.WindowWidth = _ds(offset + 32767.5 * scale), _ds(max(65535.0 * scale, 1e-6))
    ds.PixelData = stored.tobytes()


def _positioner(ds: Dataset, geometry: CArmGeometry) -> None:
    """The C-arm pose in DICOM X-ray attributes, plus the exact geometry in our private block."""
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = _ds(geometry.azimuth), _ds(geometry.elevation)
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = _ds(geometry.sdd), _ds(geometry.sad)
    ds.EstimatedRadiographicMagnificationFactor = _ds(geometry.sdd / geometry.sad)
    du, dv = geometry.pixel
    ds.ImagerPixelSpacing = [_ds(dv), _ds(du)]
    ds.NominalScannedPixelSpacing = ds.ImagerPixelSpacing  # what readers of Secondary Capture (GDCM, ITK) use
    ds.PatientOrientation = [patient_orientation(geometry.u), patient_orientation(geometry.v)]
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(GEOMETRY_ELEMENT, "UT", geometry_json(geometry))
