"""Direct checks of a volume file's voxel data, for what ITK's readers let through.

ITK's NIfTI reader turns NaN and infinity into 0 and fills a file cut short (a copy that stopped halfway) with 0,
without an error: a CT would load with a slab of water or a hole of fictitious tissue, and every DRR would show
it. Its MetaImage reader does notice a short file, but prints a C++ diagnostic and blames a missing file. So the
header fields needed to find the voxels are parsed here, and the data is measured (and, for float NIfTI, scanned
for NaN/inf) in chunks, so memory stays bounded.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

_FLOAT_CODES = {16: "f4", 64: "f8"}  # NIfTI datatype codes FLOAT32 and FLOAT64
_CHUNK_BYTES = 1 << 24
_META_TYPES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
               "MET_ULONG": 8, "MET_LONG": 8, "MET_ULONG_LONG": 8, "MET_LONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}


def nifti_problem(path: Path) -> str | None:
    """Why the voxels of a NIfTI-1 file (``.nii`` or ``.nii.gz``) cannot be used although ITK read them: cut
    short, or NaN/inf in float data; None when they are sound."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(348)
            order = "<" if int.from_bytes(header[:4], "little") == 348 else ">"
            dims = np.frombuffer(header, dtype=f"{order}i2", count=8, offset=40)
            code, bitpix = (int(x) for x in np.frombuffer(header, dtype=f"{order}i2", count=2, offset=70))
            f.seek(int(np.frombuffer(header, dtype=f"{order}f4", count=1, offset=108)[0]))
            expected = int(np.prod(dims[1:dims[0] + 1], dtype=np.int64)) * bitpix // 8
            dtype = np.dtype(order + _FLOAT_CODES[code]) if code in _FLOAT_CODES else None
            found = 0
            while found < expected:
                block = f.read(min(expected - found, _CHUNK_BYTES))
                if not block:
                    break
                if dtype is not None and not np.isfinite(np.frombuffer(
                        block[:len(block) // dtype.itemsize * dtype.itemsize], dtype=dtype)).all():
                    return "contains NaN or infinite values"
                found += len(block)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return "is truncated or corrupt: its compressed voxel data ends early"
    if found < expected:
        return f"is truncated: {found} of its {expected} bytes of voxel data are there"
    return None


def metaimage_problem(path: Path) -> str | None:
    """Why a MetaImage file (``.mha``, or ``.mhd`` with its data file) is cut short, from the sizes its header
    states; None when the data is all there or its size cannot be known from the header."""
    fields, data_start = {}, 0
    with open(path, "rb") as f:
        for raw in f:
            data_start += len(raw)
            key, _, value = raw.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    try:
        dims = [int(x) for x in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        item = _META_TYPES[fields["ElementType"]]
    except (KeyError, ValueError):
        return None  # ITK's own reader judges a header it cannot size
    name = fields.get("ElementDataFile", "")
    if name.upper() == "LOCAL":
        data, size = path, path.stat().st_size - data_start
    elif name and (path.parent / name).is_file():
        data = path.parent / name
        size = data.stat().st_size
    else:
        return None
    compressed = fields.get("CompressedData", "False").lower() == "true"
    stated = fields.get("CompressedDataSize")
    if compressed and not (stated or "").isdigit():
        return None
    expected = int(stated) if compressed else int(np.prod(dims, dtype=np.int64)) * channels * item
    if size < expected:
        where = "" if data == path else f" (in {data.name})"
        return f"is truncated: {size} of its {expected} bytes of voxel data are there{where}"
    return None
