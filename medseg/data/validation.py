"""Checking the cases of a dataset before training: readable files, every channel and the label map on
one grid, label values the dataset declares."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.data.cases import Case, Datalist
from medseg.errors import InputError
from medseg.io.geometry import Geometry
from medseg.io.image import read_geometry, read_voxels
from medseg.io.itkfiles import itk_readable

__all__ = ["read_label_map", "validate_case", "validate_datalist"]

#: Voxels counted at a time by :func:`read_label_map` (its temporary arrays stay this small).
_SLAB_VOXELS = 1 << 24


def _file_dimension(path: Path) -> int | None:
    """The number of axes an image file declares, or None when its header cannot be read."""
    reader = sitk.ImageFileReader()
    try:
        with itk_readable(path) as name:
            reader.SetFileName(name)
            reader.ReadImageInformation()
        return int(reader.GetDimension())
    except (RuntimeError, OSError, InputError):
        return None


def _geometry(path: Path, dims: int | None) -> Geometry:
    """:func:`read_geometry`, with a hint for 4D (several channels in one file) images."""
    try:
        return read_geometry(path, dims)
    except InputError:
        if _file_dimension(path) == 4:
            raise InputError(path, "is a 4D image (several channels in one file, as in the MSD); medseg reads one "
                             "file per channel (CASE_0000.nii.gz, CASE_0001.nii.gz, ... in imagesTr/, the nnU-Net v2 "
                             "raw layout): `medseg convert-msd --data MSD_DATASET --out NEW_FOLDER` converts an MSD "
                             "dataset") from None
        raise


def validate_case(case: Case, labels: Collection[int], dims: int | None = None) -> Geometry:
    """Check a case: readable channel files and label map, all on one grid, integer label values
    within ``labels`` (the declared values: a ``{value: name}`` mapping or any collection of values).

    Returns the geometry of the first channel.

    Raises
    ------
    InputError
        Naming the file: unreadable or truncated files, wrong dimensionality, a 4D image, a channel
        or a label map not on the grid of the first channel, non-integer label values or values not
        in ``labels``.
    """
    geometry = _geometry(case.image, dims)
    for number, channel in enumerate(case.images[1:], start=1):
        problem = geometry.mismatch(_geometry(channel, geometry.dims))
        if problem:
            raise InputError(channel, f"channel {number} of case {case.name} is not on the grid of channel 0 "
                             f"({case.image.name}): {problem}")
    if case.label is not None:
        problem = geometry.mismatch(_geometry(case.label, geometry.dims))
        if problem:
            raise InputError(case.label, f"label map does not match its image {case.image.name}: {problem}")
        read_label_map(case.label, case.image, geometry, labels)
    for channel in case.images:
        read_voxels(channel, geometry.dims)  # full read: catches truncated pixel data, NaN voxels
    return geometry


def read_label_map(path: Path, image: Path, geometry: Geometry, labels: Collection[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A case's label map read once (:func:`~medseg.io.image.read_voxels`) and checked: on the grid
    ``geometry`` of its image ``image``, integer values declared in ``labels``. Returns the voxels (index
    order, their stored type) and the voxel count of each value from 0 to the largest declared one,
    counted a slab at a time (no sort, no 64-bit copy of the whole map).

    Raises
    ------
    InputError
        Naming ``path``: unreadable, off the image's grid, non-integer or undeclared values.
    """
    label_geometry, array = read_voxels(path, geometry.dims)
    problem = geometry.mismatch(label_geometry)
    if problem:
        raise InputError(path, f"label map does not match its image {image.name}: {problem}")
    top = max(labels)
    counts = np.zeros(top + 1, np.int64)
    flat = array.reshape(-1, order="A")
    outside: set[int] = set()
    for start in range(0, flat.size, _SLAB_VOXELS):
        block = flat[start : start + _SLAB_VOXELS]
        if block.dtype.kind == "f" and not np.all(np.mod(block, 1) == 0):
            raise InputError(path, "label map has non-integer values")
        beyond = (block < 0) | (block > top)
        if beyond.any():
            outside.update(int(v) for v in np.unique(block[beyond]))
            block = block[~beyond]
        counts += np.bincount(block.astype(np.intp), minlength=top + 1)
    undeclared = sorted(outside | {int(v) for v in np.flatnonzero(counts) if int(v) not in labels})
    if undeclared:
        declared = ", ".join(str(k) for k in sorted(labels))
        raise InputError(path, f"label values {undeclared} are not declared in labels ({declared})")
    return array, counts


def validate_datalist(datalist: Datalist, include_test: bool = False) -> list[Geometry]:
    """Validate every training case (and test case if asked) and return their geometries (first channel).

    Label maps may hold the dataset's labels (for regions: the label values the regions unite) and
    its ignore label. All cases must share the same dimensionality (2D or 3D).

    Raises
    ------
    InputError
        As :func:`validate_case`, or mixed 2D and 3D images.
    """
    cases = datalist.training + (datalist.test if include_test else [])
    geometries: list[Geometry] = []
    dims: int | None = None
    for case in cases:
        geometry = validate_case(case, datalist.allowed_label_values, dims)
        dims = geometry.dims
        geometries.append(geometry)
    return geometries
