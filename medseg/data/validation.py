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
from medseg.io.image import read_geometry, read_image
from medseg.io.itkfiles import itk_readable

__all__ = ["validate_case", "validate_datalist"]


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
                             "file per channel: split it into CASE_0000.nii.gz, CASE_0001.nii.gz, ... in imagesTr/ "
                             "(the nnU-Net v2 raw layout)") from None
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
        array = sitk.GetArrayFromImage(read_image(case.label))
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
            raise InputError(case.label, "label map has non-integer values")
        values = {int(v) for v in np.unique(array)}
        undeclared = sorted(values - set(labels))
        if undeclared:
            declared = ", ".join(str(k) for k in sorted(labels))
            raise InputError(case.label, f"label values {undeclared} are not declared in labels ({declared})")
    for channel in case.images:
        read_image(channel, geometry.dims)  # full read: catches truncated pixel data
    return geometry


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
