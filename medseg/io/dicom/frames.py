"""The slices of one DICOM file with their geometry tags, each value checked where it is read.

A single-frame image is one slice; a multi-frame image is one slice per frame: an enhanced CT / MR
instance with its position and orientation per frame (functional groups), any other multi-frame
instance (ultrasound cine, secondary capture) with frames of no known position.

A tag that is present but unusable (a ``PixelSpacing`` of 0, a NaN position, an orientation that is
not two orthogonal unit vectors, a non-finite rescale) is a problem naming the file and the tag; the
slice then has no value for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from medseg.io.dicom.headers import Header

#: Largest deviation from unit length / orthogonality accepted for ImageOrientationPatient.
ORIENTATION_VECTOR_TOL = 1e-3


@dataclass(frozen=True)
class Frame:
    """One slice: a single-frame file or one frame of a multi-frame file (None: tag absent or unusable)."""

    path: Path
    frame: int | None
    sop_uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    localizer: bool
    thickness: float | None
    spacing_between: float | None = None


def _fmt(values: object) -> str:
    try:
        return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return repr(values)


class _Tags:
    """Reads geometry tags of one file, collecting the problems of present-but-unusable values."""

    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.problems: list[str] = []

    def _bad(self, keyword: str, value: object, why: str) -> None:
        self.problems.append(f"{self.rel}: {keyword} {_fmt(value)} {why}")

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
            self._bad(keyword, value, "is not numeric")
            return None
        if array.shape != (n,):
            self._bad(keyword, value, f"has {array.size} value(s), expected {n}")
            return None
        if not np.all(np.isfinite(array)):
            self._bad(keyword, value, "is not finite")
            return None
        return array

    def spacing(self, item: Dataset | None, keyword: str = "PixelSpacing") -> tuple[float, float] | None:
        array = self.floats(item, keyword, 2)
        if array is None:
            return None
        if np.any(array <= 0):
            self._bad(keyword, array, "is not positive")
            return None
        return float(array[0]), float(array[1])

    def orientation(self, item: Dataset | None) -> np.ndarray | None:
        array = self.floats(item, "ImageOrientationPatient", 6)
        if array is None:
            return None
        row, column = array[:3], array[3:]
        if (abs(np.linalg.norm(row) - 1) > ORIENTATION_VECTOR_TOL or abs(np.linalg.norm(column) - 1) > ORIENTATION_VECTOR_TOL
                or abs(float(row @ column)) > ORIENTATION_VECTOR_TOL):
            self._bad("ImageOrientationPatient", array, "is not two orthogonal unit vectors")
            return None
        return array

    def positive(self, item: Dataset | None, keyword: str) -> float | None:
        """An optional positive length (SliceThickness, SpacingBetweenSlices): None when absent or unusable."""
        array = self.floats(item, keyword, 1)
        if array is None:
            return None
        if array[0] <= 0:
            return None  # 0 is common for "unknown"; never used as a spacing
        return float(array[0])

    def rescale(self, item: Dataset | None) -> None:
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            self.floats(item, keyword, 1)
        slope = item.get("RescaleSlope") if item is not None else None
        try:
            if slope not in (None, "") and float(slope) == 0:
                self._bad("RescaleSlope", [slope], "is 0 (every voxel would have the same value)")
        except (TypeError, ValueError):
            pass


def _group(item: Dataset | None, sequence: str) -> Dataset | None:
    if item is None:
        return None
    seq = item.get(sequence)
    return seq[0] if seq else None


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent or unreadable)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def file_frames(header: Header, rel: str) -> tuple[list[Frame], list[str]]:
    """The slices of one file and the problems found in its header."""
    ds = header.ds
    tags = _Tags(rel)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    localizer = "LOCALIZER" in image_type
    n_frames = number_of_frames(ds)
    uid = str(ds.get("SOPInstanceUID", ""))
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
        frames = []
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if len(per_frame) != n_frames:
            tags.problems.append(f"{rel}: {len(per_frame)} per-frame functional groups for {n_frames} frames")
        shared_orientation = tags.orientation(_group(shared, "PlaneOrientationSequence"))
        shared_measures = _group(shared, "PixelMeasuresSequence")
        shared_spacing = tags.spacing(shared_measures)
        tags.rescale(_group(shared, "PixelValueTransformationSequence"))
        for index, item in enumerate(per_frame):
            plane = _group(item, "PlanePositionSequence")
            orient_item = _group(item, "PlaneOrientationSequence")
            orientation = tags.orientation(orient_item) if orient_item is not None else shared_orientation
            measures = _group(item, "PixelMeasuresSequence")
            spacing = tags.spacing(measures) if measures is not None else shared_spacing
            tags.rescale(_group(item, "PixelValueTransformationSequence"))
            source = measures if measures is not None else shared_measures
            frames.append(Frame(header.path, index, uid, tags.floats(plane, "ImagePositionPatient", 3), orientation,
                                spacing, rows, columns, localizer, tags.positive(source, "SliceThickness"),
                                tags.positive(source, "SpacingBetweenSlices")))
        return frames, list(dict.fromkeys(tags.problems))
    position = tags.floats(ds, "ImagePositionPatient", 3)
    orientation = tags.orientation(ds)
    spacing = tags.spacing(ds)
    tags.rescale(ds)
    thickness, between = tags.positive(ds, "SliceThickness"), tags.positive(ds, "SpacingBetweenSlices")
    if n_frames > 1:  # a multi-frame image without per-frame geometry (cine, secondary capture)
        tags.problems.append(f"{rel}: a multi-frame instance ({n_frames} frames) without per-frame functional "
                             "groups: the frames have no known position")
        return [Frame(header.path, index, uid, None, orientation, spacing, rows, columns, localizer, thickness, between)
                for index in range(n_frames)], tags.problems
    return [Frame(header.path, None, uid, position, orientation, spacing, rows, columns, localizer, thickness,
                  between)], tags.problems
