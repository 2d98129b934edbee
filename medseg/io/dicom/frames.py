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

from medseg.io.dicom.headers import Header
from medseg.io.dicom.planes import PlaneTags, first_item, functional_group, number_of_frames


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


class _Tags(PlaneTags):
    """The geometry tags of one file (:class:`~medseg.io.dicom.planes.PlaneTags`), its slice thickness and
    its rescale, each checked."""

    def positive(self, item: Dataset | None, keyword: str) -> float | None:
        """An optional positive length (SliceThickness, SpacingBetweenSlices): None when absent or unusable."""
        array = self.floats(item, keyword, 1)
        if array is None:
            return None
        if array[0] <= 0:
            return None  # 0 is common for "unknown"; never used as a spacing
        return float(array[0])

    def rescale(self, item: Dataset | None) -> None:
        """Check RescaleSlope / RescaleIntercept of ``item``: numbers, finite, a slope other than 0."""
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            self.floats(item, keyword, 1)
        slope = item.get("RescaleSlope") if item is not None else None
        try:
            if slope not in (None, "") and float(slope) == 0:
                self.bad("RescaleSlope", [slope], "is 0 (every voxel would have the same value)")
        except (TypeError, ValueError):
            pass


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
        tags.rescale(first_item(shared, "PixelValueTransformationSequence"))
        for index, item in enumerate(per_frame):
            position, orientation, spacing = tags.plane(ds, index)
            tags.rescale(first_item(item, "PixelValueTransformationSequence"))
            measures = functional_group(ds, index, "PixelMeasuresSequence")
            frames.append(Frame(header.path, index, uid, position, orientation, spacing, rows, columns, localizer,
                                tags.positive(measures, "SliceThickness"),
                                tags.positive(measures, "SpacingBetweenSlices")))
        return frames, list(dict.fromkeys(tags.problems))
    position, orientation, spacing = tags.plane(ds, None)
    tags.rescale(ds)
    thickness, between = tags.positive(ds, "SliceThickness"), tags.positive(ds, "SpacingBetweenSlices")
    if n_frames > 1:  # a multi-frame image without per-frame geometry (cine, secondary capture)
        tags.problems.append(f"{rel}: a multi-frame instance ({n_frames} frames) without per-frame functional "
                             "groups: the frames have no known position")
        return [Frame(header.path, index, uid, None, orientation, spacing, rows, columns, localizer, thickness, between)
                for index in range(n_frames)], tags.problems
    return [Frame(header.path, None, uid, position, orientation, spacing, rows, columns, localizer, thickness,
                  between)], tags.problems
