"""Reading label maps for evaluation and reports: integer values only, declared labels, mappings.

A label map holds non-negative integer labels. Float pixel types are accepted when every value is
integral (some tools write label maps as float32); NaN, infinite, fractional and negative values
are refused, naming the file. (NaN and infinite voxels of a file are refused when it is read,
:func:`medseg.io.image.read_image`, which checks a float NIfTI on its stored values: SimpleITK
would read them as 0, a background that could score Dice 1.0.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.image import read_image, to_array

__all__ = [
    "as_label_map",
    "describe_values",
    "label_values",
    "map_labels",
    "read_label_map",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 24


def label_values(labels: np.ndarray) -> list[int]:
    """The distinct values of an integer label map (bincount when small, unique otherwise)."""
    if labels.size == 0:
        return []
    top = int(labels.max())
    if top >= 65536 or labels.dtype == np.uint64:  # bincount cannot take uint64
        return [int(v) for v in np.unique(labels)]
    flat = labels.reshape(-1)
    counts = np.zeros(top + 1, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):  # chunks bound the temporary intp copy bincount makes
        counts += np.bincount(flat[start : start + _CHUNK], minlength=top + 1)
    return [int(v) for v in np.flatnonzero(counts)]


def describe_values(values: Iterable[int]) -> str:
    """``0..5`` for a contiguous run, else ``0, 1, 3``."""
    ordered = sorted(values)
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}..{ordered[-1]}"
    return ", ".join(str(v) for v in ordered)


def as_label_map(path: Path, array: np.ndarray, declared: Mapping[int, str] | None = None,
                 hint: str = "") -> np.ndarray:
    """Check that ``array`` is a label map (non-negative integers, declared labels) and return it as ints.

    ``hint`` is appended to the message about an undeclared value (e.g. how to map it).

    Raises
    ------
    InputError
        (naming ``path``) Non-integral, NaN, infinite or negative values, a non-numeric pixel type,
        or a value not in ``declared``.
    """
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = array[~finite]
            what = "NaN" if np.isnan(bad).any() else "infinite"
            raise InputError(path, f"not a label map: holds {bad.size} {what} voxel(s); label maps hold integers")
        fractional = array != np.round(array)
        if fractional.any():
            raise InputError(path, f"not a label map: holds non-integer value {float(array[fractional].flat[0]):g} "
                             f"({int(fractional.sum())} voxel(s)); label maps hold integers")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise InputError(path, f"not a label map: pixel type {array.dtype} is not integer")
    if array.size and int(array.min()) < 0:
        raise InputError(path, f"not a label map: holds negative value {int(array.min())}")
    if declared is not None:
        allowed = set(declared) | {0}
        undeclared = [v for v in label_values(array) if v not in allowed]
        if undeclared:
            raise InputError(path, f"label value {undeclared[0]} not declared in labels ({describe_values(allowed)})"
                             + hint)
    return array


def map_labels(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """``labels`` with each value ``k`` in ``mapping`` replaced by ``mapping[k]`` (others unchanged)."""
    if not mapping:
        return labels
    top = max(int(labels.max()) if labels.size else 0, max(mapping))
    lut = np.arange(top + 1, dtype=np.int64)
    for source, target in mapping.items():
        lut[source] = target
    mapped: np.ndarray = lut[labels]
    return mapped


def read_label_map(path: Path, declared: Mapping[int, str] | None = None,
                   mapping: Mapping[int, int] | None = None, hint: str = "") -> np.ndarray:
    """Read a label map (index order ``(x, y, z)``), check it, apply ``mapping``, check ``declared``.

    Raises
    ------
    InputError
        Unreadable file; NaN, infinite, fractional or negative values; a value (after
        ``mapping``) not in ``declared``.
    """
    path = Path(path)
    array = to_array(read_image(path))  # NaN and infinite voxels are refused there, NIfTI included
    array = as_label_map(path, array)
    if mapping:
        array = map_labels(array, mapping)
    return as_label_map(path, array, declared, hint) if declared is not None else array
