"""Plane geometry of DICOM image slices: one module for the series reader, the SEG / RTSTRUCT writers and
the synthetic series writer.

A slice (a single-frame instance, or one frame of an enhanced multi-frame instance) lies in the plane of
three tags (DICOM PS3.3 C.7.6.2.1.1):

* ``ImagePositionPatient``: LPS position (mm) of the centre of the first pixel;
* ``ImageOrientationPatient``: the row direction (increasing column index), then the column direction
  (increasing row index);
* ``PixelSpacing``: (between rows, between columns) in mm.

A multi-frame instance holds them in its functional groups (``PlanePositionSequence``,
``PlaneOrientationSequence``, ``PixelMeasuresSequence``), per frame first, then shared
(:func:`functional_group`). Slices are ordered along the slice normal ``row x column``, ascending.
Pixel -> patient mapping and the normal come from :mod:`highdicom.spatial`.

A series read as a volume has, in SimpleITK order, ``direction`` columns = row direction, column
direction, slice normal; ``origin`` = the first slice's position; ``spacing`` = (column spacing, row
spacing, slice step) -- :func:`grid_planes` is the inverse: the slices of such a grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from highdicom.spatial import create_affine_matrix_from_attributes, get_normal_vector
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from medseg.errors import DicomError

__all__ = [
    "ORIENTATION_VECTOR_TOL",
    "Plane",
    "PlaneTags",
    "SourcePlane",
    "check_label_map",
    "first_item",
    "functional_group",
    "grid_planes",
    "is_multiframe",
    "number_of_frames",
    "slice_normal",
    "source_planes",
]

#: Largest deviation from unit length / orthogonality accepted for ImageOrientationPatient.
ORIENTATION_VECTOR_TOL = 1e-3


# --------------------------------------------------------------------------------------------
# Where a slice's geometry lives
# --------------------------------------------------------------------------------------------

def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent or unreadable)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def is_multiframe(ds: Dataset) -> bool:
    """Whether ``ds`` is a multi-frame instance (NumberOfFrames > 1 or per-frame functional groups)."""
    return number_of_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def first_item(item: Dataset | None, sequence: str) -> Dataset | None:
    """The first item of ``item``'s ``sequence``, or None (no item, no sequence or an empty one)."""
    if item is None:
        return None
    seq = item.get(sequence)
    return seq[0] if seq else None


def functional_group(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """Functional group ``sequence`` of frame ``index`` (0-based): the per-frame item, else the shared one."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > i:
            found = first_item(seq[i], sequence)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------------------------
# Reading the geometry tags, each value checked
# --------------------------------------------------------------------------------------------

def _fmt(values: object) -> str:
    if not isinstance(values, Iterable):
        return repr(values)
    try:
        return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
    except (TypeError, ValueError):
        return repr(values)


class PlaneTags:
    """Reads the plane geometry tags of one file, collecting the problems of present-but-unusable values
    (a ``PixelSpacing`` of 0, a NaN position, an orientation that is not two orthogonal unit vectors) in
    :attr:`problems`, each naming ``where`` and the tag; an unusable value reads as None."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.problems: list[str] = []

    def bad(self, keyword: str, value: object, why: str) -> None:
        """Record that ``keyword`` holds ``value``, which ``why``."""
        self.problems.append(f"{self.where}: {keyword} {_fmt(value)} {why}")

    def floats(self, item: Dataset | None, keyword: str, n: int) -> np.ndarray | None:
        """``n`` finite numbers, or None (absent: silently; otherwise with a problem)."""
        if item is None:
            return None
        value = item.get(keyword)
        if value is None or value == "":
            return None
        try:
            values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
            array = np.asarray([float(v) for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            self.bad(keyword, value, "is not numeric")
            return None
        if array.shape != (n,):
            self.bad(keyword, value, f"has {array.size} value(s), expected {n}")
            return None
        if not np.all(np.isfinite(array)):
            self.bad(keyword, value, "is not finite")
            return None
        return array

    def spacing(self, item: Dataset | None, keyword: str = "PixelSpacing") -> tuple[float, float] | None:
        """Two positive spacings (mm), or None."""
        array = self.floats(item, keyword, 2)
        if array is None:
            return None
        if np.any(array <= 0):
            self.bad(keyword, array, "is not positive")
            return None
        return float(array[0]), float(array[1])

    def orientation(self, item: Dataset | None) -> np.ndarray | None:
        """ImageOrientationPatient as 6 numbers (two orthogonal unit vectors within
        :data:`ORIENTATION_VECTOR_TOL`), or None."""
        array = self.floats(item, "ImageOrientationPatient", 6)
        if array is None:
            return None
        row, column = array[:3], array[3:]
        if (abs(np.linalg.norm(row) - 1) > ORIENTATION_VECTOR_TOL
                or abs(np.linalg.norm(column) - 1) > ORIENTATION_VECTOR_TOL
                or abs(float(row @ column)) > ORIENTATION_VECTOR_TOL):
            self.bad("ImageOrientationPatient", array, "is not two orthogonal unit vectors")
            return None
        return array

    def plane(self, ds: Dataset, frame: int | None
              ) -> tuple[np.ndarray | None, np.ndarray | None, tuple[float, float] | None]:
        """(position, orientation, pixel spacing) of a single-frame instance (``frame`` None: the top-level
        tags) or of frame ``frame`` (0-based) of a multi-frame one (its functional groups)."""
        if frame is None:
            return (self.floats(ds, "ImagePositionPatient", 3), self.orientation(ds), self.spacing(ds))
        return (self.floats(functional_group(ds, frame, "PlanePositionSequence"), "ImagePositionPatient", 3),
                self.orientation(functional_group(ds, frame, "PlaneOrientationSequence")),
                self.spacing(functional_group(ds, frame, "PixelMeasuresSequence")))


# --------------------------------------------------------------------------------------------
# Planes
# --------------------------------------------------------------------------------------------

def slice_normal(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit normal ``row x column`` of an ImageOrientationPatient (the direction slices are sorted along)."""
    # highdicom.spatial annotates its vectors Sequence[float] but takes (and checks for) NumPy arrays too
    normal = get_normal_vector(np.asarray(orientation, dtype=np.float64), index_convention="RD")  # type: ignore[arg-type]
    unit: np.ndarray = normal / np.linalg.norm(normal)  # ImageOrientationPatient is unit only to its decimal digits
    return unit


@dataclass(frozen=True)
class Plane:
    """The plane of one slice: ImagePositionPatient, ImageOrientationPatient, PixelSpacing and matrix size."""

    position: np.ndarray  # ImagePositionPatient (LPS mm) of the first pixel's centre
    orientation: np.ndarray  # ImageOrientationPatient: row direction, then column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    rows: int
    columns: int

    @property
    def row_direction(self) -> np.ndarray:
        """Direction of increasing column index (first half of ImageOrientationPatient)."""
        return self.orientation[:3]

    @property
    def column_direction(self) -> np.ndarray:
        """Direction of increasing row index (second half of ImageOrientationPatient)."""
        return self.orientation[3:]

    @property
    def normal(self) -> np.ndarray:
        """Slice normal, row direction x column direction (highdicom.spatial; unit length for an orientation
        of two orthonormal vectors, :func:`slice_normal` normalises it)."""
        return get_normal_vector(self.orientation, index_convention="RD")  # type: ignore[arg-type]  # see slice_normal

    @property
    def distance(self) -> float:
        """Signed distance (mm) of the plane from the origin along :attr:`normal`: the slice order key."""
        return float(self.position @ self.normal)

    @property
    def affine(self) -> np.ndarray:
        """4 x 4 affine from pixel index (column, row, 0, 1) to LPS (x, y, z, 1) (highdicom.spatial)."""
        return create_affine_matrix_from_attributes(self.position, self.orientation,  # type: ignore[arg-type]
                                                    self.pixel_spacing)  # (arrays: see slice_normal)

    def to_patient(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """LPS points (n, 3) of continuous pixel indices (row, column) in this plane (index 0: a pixel centre)."""
        affine = self.affine
        indices = np.stack([np.asarray(columns, dtype=np.float64), np.asarray(rows, dtype=np.float64)], axis=-1)
        points: np.ndarray = indices @ affine[:3, :2].T + affine[:3, 3]
        return points


@dataclass(frozen=True)
class SourcePlane(Plane):
    """One source slice (an instance, or one frame of a multi-frame instance) and its plane."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    frame_number: int | None = None  # 1-based frame of a multi-frame instance, None for single-frame


def grid_planes(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float],
                size: Sequence[int]) -> list[Plane]:
    """The slices of a 3D grid (SimpleITK order: ``size`` = (columns, rows, slices)), in z-index order.

    Slice k: position = origin + k * spacing[2] * direction[:, 2]; orientation = direction[:, 0],
    direction[:, 1]; pixel spacing = (spacing[1], spacing[0]).

    Raises
    ------
    ValueError
        Not a 3D grid (3 spacings, 3 origin values, 9 direction values, 3 sizes).
    """
    if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9 or len(size) != 3:
        raise ValueError(f"not a 3D grid: spacing {spacing}, origin {origin}, direction {direction}, size {size}")
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    spacing_a = np.asarray(spacing, dtype=np.float64)
    origin_a = np.asarray(origin, dtype=np.float64)
    orientation = np.concatenate([matrix[:, 0], matrix[:, 1]])
    step = matrix[:, 2]
    return [Plane(origin_a + k * spacing_a[2] * step, orientation, (float(spacing_a[1]), float(spacing_a[0])),
                  int(size[1]), int(size[0])) for k in range(int(size[2]))]


def _source_plane(ds: Dataset, frame: int | None) -> SourcePlane:
    """The plane of a single-frame instance (``frame`` None) or of frame ``frame`` (0-based)."""
    uid = str(ds.get("SOPInstanceUID", "?"))
    tags = PlaneTags(f"instance {uid}" + ("" if frame is None else f" frame {frame + 1}"))
    position, orientation, spacing = tags.plane(ds, frame)
    if tags.problems:
        raise DicomError(None, "; ".join(tags.problems))
    if position is None or orientation is None or spacing is None:
        if frame is None:
            raise DicomError(None, f"instance {uid}: no ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
        raise DicomError(None, f"instance {uid}: frame {frame + 1} has no plane position, orientation or pixel spacing")
    return SourcePlane(position, orientation, spacing, int(ds.Rows), int(ds.Columns),
                       sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=uid,
                       frame_number=None if frame is None else frame + 1)


def source_planes(sources: Sequence[Dataset]) -> list[SourcePlane]:
    """The slices of the source instances in the order a label map's slices follow.

    Single-frame sources: one plane per dataset, in the given order (slice k = ``sources[k]``).
    One multi-frame source: one plane per frame, sorted along the slice normal, ascending (stable),
    as :func:`medseg.io.dicom.read_series` orders them.

    Raises
    ------
    DicomError
        No sources, several multi-frame sources, or a source without usable plane geometry.
    """
    if not sources:
        raise DicomError(None, "no source instances given")
    if any(is_multiframe(ds) for ds in sources):
        if len(sources) != 1:
            raise DicomError(None, f"{len(sources)} source instances with a multi-frame one among them; "
                                   "expected one multi-frame instance or single-frame instances only")
        ds = sources[0]
        planes = [_source_plane(ds, i) for i in range(number_of_frames(ds))]
        order = np.argsort([p.distance for p in planes], kind="stable")
        return [planes[i] for i in order]
    return [_source_plane(ds, None) for ds in sources]


def check_label_map(label_map: np.ndarray, planes: Sequence[Plane], segments: Mapping[int, Any]) -> np.ndarray:
    """Validate a (slices, rows, columns) label map against the source planes and the segments; return it
    as an array.

    Raises
    ------
    ValueError
        Wrong shape, or label values that no segment describes.
    """
    label_map = np.asarray(label_map)
    expected = (len(planes), planes[0].rows, planes[0].columns)
    if label_map.ndim != 3 or tuple(label_map.shape) != expected:
        raise ValueError(f"label map has shape {label_map.shape}; the source slices need {expected} "
                         "(slices, rows, columns)")
    present = {int(v) for v in np.unique(label_map)} - {0}
    unknown = sorted(present - {int(k) for k in segments})
    if unknown:
        raise ValueError(f"label map holds values {unknown} that no segment describes")
    return label_map
