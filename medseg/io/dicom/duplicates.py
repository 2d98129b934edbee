"""Several files holding the same instance (one SOPInstanceUID): harmless copies or a conflict.

PACS exports and merged CDs often hold the same instance twice (byte-identical, or re-encoded in
another transfer syntax); one copy is kept. Two files that share a SOPInstanceUID but hold different
pixels or geometry are two different images under one identity: which one is "the" slice cannot be
told, so the series is refused.
"""

from __future__ import annotations

import filecmp
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from medseg.io.dicom.headers import PIXEL_TAGS, Header, quiet_pydicom

#: Header values two copies of one instance must share (compared as numbers where they are numbers).
_COMPARED = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "PixelRepresentation", "SamplesPerPixel",
             "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept")


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else [str(value)]


def _same_value(a: object, b: object) -> bool:
    va, vb = _values(a), _values(b)
    if len(va) != len(vb):
        return False
    try:
        return bool(np.allclose([float(v) for v in va], [float(v) for v in vb], rtol=1e-6, atol=1e-4))
    except ValueError:
        return va == vb


def _pixel_bytes(ds: pydicom.Dataset) -> bytes | None:
    for tag in PIXEL_TAGS:
        if tag in ds:
            return bytes(ds[tag].value)
    return None


def conflict(a: Header, b: Header) -> str | None:
    """What differs between two files with the same SOPInstanceUID, or None if they hold the same image.

    Byte-identical files are the same; otherwise the geometry and pixel-format tags are compared, then
    the pixel data (as stored when both use one transfer syntax, else decoded).
    """
    try:
        if filecmp.cmp(a.path, b.path, shallow=False):
            return None
    except OSError:
        pass
    for keyword in _COMPARED:
        if not _same_value(a.ds.get(keyword), b.ds.get(keyword)):
            return keyword
    try:
        with quiet_pydicom():
            full_a = pydicom.dcmread(a.path, force=True)
            full_b = pydicom.dcmread(b.path, force=True)
    except Exception:  # noqa: BLE001 - a copy that cannot be read cannot be shown to be the same
        return "pixel data (one copy could not be read to compare)"
    stored_a, stored_b = _pixel_bytes(full_a), _pixel_bytes(full_b)
    if stored_a is not None and stored_a == stored_b:
        return None
    decoded: list[np.ndarray] = []
    for ds in (full_a, full_b):
        try:
            with quiet_pydicom():
                decoded.append(np.asarray(ds.pixel_array))
        except Exception:  # noqa: BLE001
            return "pixel data (stored differently, and could not be decoded to compare)"
    return None if decoded[0].shape == decoded[1].shape and np.array_equal(decoded[0], decoded[1]) else "pixel data"


def deduplicate(headers: list[Header], rel: Callable[[Path], str]) -> tuple[list[Header], list[str], list[str]]:
    """(the headers with one copy per instance, problems, notes).

    Copies of an instance that hold the same image are dropped with a note; copies that differ are a
    problem naming both files and what differs.
    """
    seen: dict[str, Header] = {}
    copies: list[Header] = []
    problems: list[str] = []
    for header in headers:
        sop = str(header.ds.get("SOPInstanceUID", "")) or str(header.path)
        if sop not in seen:
            seen[sop] = header
            continue
        what = conflict(seen[sop], header)
        if what is None:
            copies.append(header)
        else:
            problems.append(f"{rel(seen[sop].path)} and {rel(header.path)} share SOPInstanceUID {sop} but differ in "
                            f"{what}: two different images under one instance UID")
    notes = []
    if copies:
        notes.append(f"ignored {len(copies)} identical duplicate copy(ies) of the same instance: "
                     f"{', '.join(rel(h.path) for h in copies[:5])}{' ...' if len(copies) > 5 else ''}")
    return list(seen.values()), problems, notes
