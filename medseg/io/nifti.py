"""Checks of a NIfTI file's own header, before nibabel or ITK read it.

Both nibabel and ITK quietly repair a broken NIfTI header while loading it: a ``pixdim`` of 0 or
NaN becomes 1 mm (nibabel logs "setting 0 dims to 1", ITK says nothing), and the two libraries may
then disagree about the grid. :func:`check_nifti_header` reads the header as written
(``check=False``) and refuses what would need such a repair; :func:`check_nifti_data` decompresses a
``.nii.gz`` to its end to catch truncation (nibabel and ITK return truncated gzip files without
complaint). Decompression goes through Intel's ISA-L (the ``isal`` package, as ``xopen`` uses it): about
twice as fast as Python's ``gzip`` on the same stream, and as strict about its checksum and its end.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel.spatialimages import HeaderDataError

from medseg.errors import InputError
from medseg.io.geometry import grid_problem, split_affine
from medseg.io.layout import MAX_DEFLATE_RATIO

__all__ = ["NiftiInfo", "check_nifti_data", "check_nifti_header", "read_nifti_bytes"]

#: What a broken gzip stream raises: a bad header (OSError), an early end (EOFError), corrupt deflate data
#: (ISA-L's error; its stubs declare it as an instance, hence the cast).
_STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error,
                                                   cast("type[Exception]", isal_zlib.error))


class NiftiInfo:
    """What :func:`check_nifti_header` learned: the pixel data's offset and length in the (decompressed)
    file, its shape and type, and the header as written (NIfTI-1 or NIfTI-2, unrepaired)."""

    def __init__(self, offset: int, data_bytes: int, shape: tuple[int, ...], dtype: np.dtype,
                 header: nib.Nifti1Header) -> None:
        self.offset = offset
        self.data_bytes = data_bytes
        self.shape = shape
        self.dtype = dtype
        self.header = header


def _raw_header(path: Path) -> nib.Nifti1Header:
    """The header exactly as written (no repairs), NIfTI-1 or NIfTI-2."""
    opener = igzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fp:
            head = fp.read(540)
    except _STREAM_ERRORS as exc:
        raise InputError(path, f"not a readable image ({exc})") from None
    for endian in "<>":
        if len(head) >= 4:
            size = struct.unpack(endian + "i", head[:4])[0]
            klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
            if klass is not None and len(head) >= size:
                try:
                    return klass(head[:size], endianness=endian, check=False)
                except (HeaderDataError, ValueError) as exc:
                    raise InputError(path, f"not a readable image (NIfTI header: {exc})") from None
    raise InputError(path, "not a readable image (not a NIfTI-1 or NIfTI-2 header)")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def check_nifti_header(path: str | os.PathLike[str]) -> NiftiInfo:
    """Check the geometry and size fields of a NIfTI header as written.

    Refused: a ``pixdim`` voxel size that is 0, negative, NaN or infinite; a qform (``qform_code``
    > 0) with non-finite quaternion or offset, or a quaternion that is not a rotation; an sform
    (``sform_code`` > 0) or resulting affine whose spacing, origin or direction fails
    :func:`medseg.io.geometry.grid_problem`; an unknown data type; an uncompressed file shorter than
    the header declares; a compressed file too short to decompress to the declared size.

    Raises
    ------
    InputError
        Naming the file and the header field.
    """
    path = Path(path)
    header = _raw_header(path)
    dims = int(header["dim"][0])
    if not 1 <= dims <= 7:
        raise InputError(path, f"NIfTI dim[0] = {dims} is not a number of dimensions (1 to 7)")
    spatial = min(dims, 3)
    pixdim = np.asarray(header["pixdim"][1 : spatial + 1], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)):
        raise InputError(path, f"NIfTI pixdim (voxel spacing) {_fmt(pixdim)} is not finite")
    if np.any(pixdim <= 0):
        raise InputError(path, f"NIfTI pixdim (voxel spacing) {_fmt(pixdim)} is not positive")
    if int(header["qform_code"]) > 0:
        quaternion = np.asarray([header["quatern_b"], header["quatern_c"], header["quatern_d"]], dtype=np.float64)
        offset = np.asarray([header["qoffset_x"], header["qoffset_y"], header["qoffset_z"]], dtype=np.float64)
        if not (np.all(np.isfinite(quaternion)) and np.all(np.isfinite(offset))):
            raise InputError(path, f"NIfTI qform (quatern_b/c/d {_fmt(quaternion)}, qoffset {_fmt(offset)}) is not finite")
        if float(quaternion @ quaternion) > 1.0 + 1e-3:
            raise InputError(path, f"NIfTI qform quaternion {_fmt(quaternion)} is not a rotation (b^2 + c^2 + d^2 > 1)")
    if int(header["sform_code"]) > 0:
        rows = np.asarray([header["srow_x"], header["srow_y"], header["srow_z"]], dtype=np.float64)
        if not np.all(np.isfinite(rows)):
            raise InputError(path, "NIfTI sform (srow_x/y/z) is not finite")
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    which = "sform" if int(header["sform_code"]) > 0 else "qform" if int(header["qform_code"]) > 0 else "pixdim"
    spacing, origin, direction = split_affine(affine)
    if spatial == 3:
        problem = grid_problem(spacing, origin, direction.ravel())
    else:  # a 1D/2D image: only its own axes need a size; ITK keeps the top-left block
        problem = grid_problem(spacing[:spatial], origin[:spatial], np.eye(spatial).ravel())
        if problem is None and not np.all(np.isfinite(affine)):
            problem = "affine is not finite"
    if problem is not None:
        raise InputError(path, f"NIfTI {which}: {problem}")
    try:
        dtype = np.dtype(header.get_data_dtype())
    except (HeaderDataError, KeyError, TypeError) as exc:
        raise InputError(path, f"NIfTI datatype code {int(header['datatype'])} is unknown ({exc})") from None
    shape = tuple(int(n) for n in header.get_data_shape())
    if any(n < 1 for n in shape):
        raise InputError(path, f"NIfTI size {shape} has an empty axis")
    data_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    offset = int(header.get_data_offset())
    size = path.stat().st_size
    declared = f"{' x '.join(map(str, shape))} voxels of {dtype.name}"
    if path.name.lower().endswith(".gz"):
        if size * MAX_DEFLATE_RATIO + 4096 < offset + data_bytes:
            raise InputError(path, f"the header declares {declared} ({data_bytes} bytes), more than the "
                                   f"{size} bytes of compressed data can hold: the file is truncated or its "
                                   "header is wrong")
    elif size < offset + data_bytes:
        raise InputError(path, f"file is truncated: {size} bytes, the header needs {offset + data_bytes} "
                               f"({declared})")
    return NiftiInfo(offset, data_bytes, shape, dtype, header)


def check_nifti_data(path: str | os.PathLike[str], info: NiftiInfo) -> None:
    """For a ``.nii.gz``: decompress to the end (discarding the data) and check that the stream is
    intact and holds the pixel data the header declares. Uncompressed files were checked by size.

    Raises
    ------
    InputError
        If the stream ends early, fails its checksum, or is shorter than the header declares.
    """
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        _decompress(path, info, keep=False)


def read_nifti_bytes(path: str | os.PathLike[str], info: NiftiInfo) -> bytes:
    """The whole file as bytes, a ``.nii.gz`` decompressed in one pass that checks the stream as
    :func:`check_nifti_data` does (header, extensions and pixel data; whatever follows the pixel
    data is read to the end of the stream and dropped).

    Raises
    ------
    InputError
        As :func:`check_nifti_data`; an unreadable file.
    """
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        return _decompress(path, info, keep=True)
    try:
        return path.read_bytes()  # its size was checked against the header
    except OSError as exc:
        raise InputError(path, f"not a readable image ({exc})") from None


def _decompress(path: Path, info: NiftiInfo, keep: bool) -> bytes:
    """Decompress ``path`` to the end; the header and pixel data (``keep``) or nothing."""
    need = info.offset + info.data_bytes
    kept = b""
    count = 0
    try:
        with igzip.open(path, "rb") as stream:
            if keep:
                kept = stream.read(need)  # at most what the header declares (checked against the file size)
                count = len(kept)
            while chunk := stream.read(1 << 22):
                count += len(chunk)
    except _STREAM_ERRORS as exc:
        raise InputError(path, f"compressed data is truncated or corrupt ({exc})") from None
    if count < need:
        raise InputError(path, f"file is truncated: it decompresses to {count} bytes, the header needs {need}")
    return kept
