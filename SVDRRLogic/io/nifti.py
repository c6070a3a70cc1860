"""A direct look at NIfTI-1 float voxel data, because ITK's NIfTI reader silently turns NaN and infinity into 0.

Left undetected, a NaN region of a CT would load as 0 HU (water) and add fictitious tissue to every DRR. Only the
header fields needed to find the voxels are parsed; the data is scanned in chunks so memory stays bounded.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_FLOAT_CODES = {16: "f4", 64: "f8"}  # NIfTI datatype codes FLOAT32 and FLOAT64
_CHUNK_ELEMENTS = 1 << 22


def nifti_has_nonfinite(path: Path) -> bool:
    """True when a float NIfTI-1 file (``.nii`` or ``.nii.gz``, already read successfully by ITK) holds NaN/inf."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        header = f.read(348)
        order = "<" if int.from_bytes(header[:4], "little") == 348 else ">"
        dims = np.frombuffer(header, dtype=f"{order}i2", count=8, offset=40)
        code = int(np.frombuffer(header, dtype=f"{order}i2", count=1, offset=70)[0])
        if code not in _FLOAT_CODES:
            return False
        dtype = np.dtype(order + _FLOAT_CODES[code])
        f.seek(int(np.frombuffer(header, dtype=f"{order}f4", count=1, offset=108)[0]))
        remaining = int(np.prod(dims[1:dims[0] + 1], dtype=np.int64))
        while remaining > 0:
            chunk = np.frombuffer(f.read(min(remaining, _CHUNK_ELEMENTS) * dtype.itemsize), dtype=dtype)
            if chunk.size == 0:
                return False
            if not np.isfinite(chunk).all():
                return True
            remaining -= chunk.size
    return False
