"""One image series: its checks, its slice order and its geometry, from headers only.

Instances are sorted along the slice normal (``dot(ImagePositionPatient, row x column)``), never by
InstanceNumber. Checked: duplicate instances (identical copies dropped, conflicting ones refused),
localizers, mixed orientations, sizes or pixel spacings, missing slices, uneven spacing, gantry tilt,
missing or truncated pixel data, transfer syntaxes no installed pydicom plugin decodes, and the
grid itself (:func:`medseg.io.geometry.grid_problem`). Blocking findings go to
:attr:`DicomSeries.problems`, harmless ones to :attr:`DicomSeries.notes`.

Geometry (LPS, SimpleITK order): ``origin`` = ImagePositionPatient of the first sorted slice;
``direction`` columns = row direction, column direction, slice normal; ``spacing`` = (column spacing,
row spacing, measured slice step). What the headers do not say is None, never a guess.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from medseg.errors import DicomError, printable
from medseg.io.dicom.duplicates import deduplicate
from medseg.io.dicom.frames import Frame, file_frames
from medseg.io.dicom.headers import Header, decodable
from medseg.io.dicom.planes import is_multiframe, slice_normal
from medseg.io.geometry import grid_problem

_ORIENTATION_TOL = 1e-3  # direction cosines
_POSITION_TOL_MM = 0.01
_LOCALIZER_MAX = 3  # a minority of at most this many images of another orientation / size is a localizer


@dataclass(frozen=True)
class DicomSeries:
    """One image series found by :func:`medseg.io.dicom.scan_dicom`.

    Attributes
    ----------
    series_uid, study_uid, modality, description, series_number
        From the headers (description = SeriesDescription, "" if absent).
    files
        Image files sorted along the slice normal (ascending); one file if ``multiframe``.
    size
        (columns, rows, slices); slices counts frames of multi-frame files.
    spacing
        (column spacing, row spacing, slice spacing) in mm; slice spacing is the measured step
        (for one slice: SpacingBetweenSlices, else SliceThickness). None where the headers do not say.
    origin
        LPS position (mm) of the first voxel (ImagePositionPatient of the first sorted slice), or None.
    direction
        9 values, SimpleITK order: columns are row direction, column direction, slice normal; None
        without ImageOrientationPatient.
    transfer_syntaxes
        Transfer syntax UIDs of the files.
    multiframe
        Read from one multi-frame instance (NumberOfFrames > 1).
    problems
        Blocking problems: the series cannot be read as one volume.
    notes
        Harmless findings (localizers dropped, identical duplicate copies ignored, ...).
    frame_order
        Multi-frame only: the frame indices (0-based, in the file) in slice order.
    localizer
        Every image of the series is a localizer (scout).
    enhanced
        Multi-frame with per-frame functional groups (position and orientation of every frame).
    orientations
        Number of different slice orientations among the series' images (more than 1: mixed).
    """

    series_uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    files: tuple[Path, ...]
    size: tuple[int, int, int]
    spacing: tuple[float | None, float | None, float | None]
    origin: tuple[float, float, float] | None
    direction: tuple[float, ...] | None
    transfer_syntaxes: tuple[str, ...]
    multiframe: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    frame_order: tuple[int, ...] = ()
    localizer: bool = False
    enhanced: bool = False
    orientations: int = 1

    @property
    def slices(self) -> int:
        """Number of slices (frames) of the volume."""
        return self.size[2]

    def summary(self) -> str:
        """One line: UID, modality, slices, description (no patient data)."""
        return (f"{self.series_uid}  {self.modality or '?'}  {self.slices} slice(s)  "
                f"{self.description!r}{'  [has problems]' if self.problems else ''}")


def series_folder(series: DicomSeries) -> Path:
    """The folder holding the series' files (their common folder)."""
    parents = {p.parent for p in series.files}
    return parents.pop() if len(parents) == 1 else Path(os.path.commonpath([str(p) for p in parents]))


def refuse_problems(series: DicomSeries) -> None:
    """Raise DicomError (naming the series' folder) listing the series' problems, if it has any."""
    if series.problems:
        raise DicomError(series_folder(series), f"series {series.series_uid} ({series.modality}, "
                                                f"{series.description!r}) cannot be used: " + "; ".join(series.problems))


def _same_orientation(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.max(np.abs(a - b)) <= _ORIENTATION_TOL)


def _fmt(values: Sequence[float] | np.ndarray, digits: int = 4) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


def _groups(frames: list[Frame], key: Callable[[Frame, Frame], bool]) -> list[list[Frame]]:
    """``frames`` grouped by ``key`` (largest group first)."""
    groups: list[list[Frame]] = []
    for frame in frames:
        for group in groups:
            if key(group[0], frame):
                group.append(frame)
                break
        else:
            groups.append([frame])
    return sorted(groups, key=len, reverse=True)


def _majority(frames: list[Frame], key: Callable[[Frame, Frame], bool], what: str, describe: Callable[[Frame], str],
              rel: Callable[[Path], str]) -> tuple[list[Frame], list[str], list[str]]:
    """Keep the largest group of ``frames`` by ``key``; a small minority (at most 3 images, the
    majority at least twice as large) is dropped as a localizer with a note, anything else is a problem."""
    groups = _groups(frames, key)
    if len(groups) <= 1:
        return frames, [], []
    major, minor = groups[0], [f for g in groups[1:] for f in g]
    if len(minor) <= _LOCALIZER_MAX and len(major) >= 2 * len(minor):
        return major, [(f"dropped {len(minor)} image(s) with a different {what} (localizer?): "
                       f"{', '.join(sorted(rel(f.path) for f in minor))}")], []
    counts = ", ".join(f"{len(g)} image(s) {describe(g[0])}" for g in groups)
    return frames, [], [f"mixed {what}s: {counts}"]


def _header_checks(headers: list[Header], rel: Callable[[Path], str]) -> list[str]:
    problems: list[str] = []
    multi = [h for h in headers if is_multiframe(h.ds)]
    if multi and len(headers) > 1:
        problems.append(f"{len(multi)} multi-frame and {len(headers) - len(multi)} other instance(s) in one series; "
                        "medseg reads a series as one multi-frame instance or as single-frame slices")
    for header in headers:
        if header.pixel_problem:
            problems.append(f"{rel(header.path)}: {header.pixel_problem}")
        ts = UID(header.transfer_syntax)
        if not decodable(ts):
            problems.append(f"{rel(header.path)}: transfer syntax {ts.name} ({ts}) cannot be decoded "
                            "(no installed pydicom pixel-data plugin supports it)")
        samples = int(header.ds.get("SamplesPerPixel", 1) or 1)
        if samples != 1:
            problems.append(f"{rel(header.path)}: {samples} samples per pixel (colour); only greyscale is supported")
    return problems


def _drop_localizers(frames: list[Frame], rel: Callable[[Path], str], problems: list[str], notes: list[str]
                     ) -> tuple[list[Frame], bool]:
    """Localizers (scouts) by ImageType: dropped with a note, or the whole series is one."""
    if frames and all(f.localizer for f in frames):
        problems.append("a localizer (scout) series, not a volume")
        return frames, True
    scouts = [f for f in frames if f.localizer]
    if scouts:
        notes.append(f"dropped {len(scouts)} localizer image(s): {', '.join(sorted(rel(f.path) for f in scouts)[:5])}")
    return [f for f in frames if not f.localizer], False


def _located(frame: Frame) -> bool:
    return frame.position is not None and frame.orientation is not None


def _position(frame: Frame) -> np.ndarray:
    """ImagePositionPatient of a frame :func:`_located` keeps."""
    assert frame.position is not None, "only located frames are sorted and measured"
    return frame.position


def _orientation(frame: Frame) -> np.ndarray:
    """ImageOrientationPatient of a frame :func:`_located` keeps."""
    assert frame.orientation is not None, "only located frames are grouped by orientation"
    return frame.orientation


def analyse(uid: str, headers: list[Header], root: Path) -> DicomSeries:
    """Group checks and geometry of one series' headers (sorted by path)."""

    def rel(path: Path) -> str:
        try:
            return printable(path.relative_to(root) if path != root else path.name)
        except ValueError:
            return printable(path)

    headers, problems, notes = deduplicate(headers, rel)
    first = headers[0].ds
    problems += _header_checks(headers, rel)
    frames: list[Frame] = []
    for header in headers:
        found, header_problems = file_frames(header, rel(header.path))
        frames.extend(found)
        problems.extend(header_problems)
    frames, localizer_series = _drop_localizers(frames, rel, problems, notes)

    missing = [f for f in frames if not _located(f)]
    if missing:
        problems.append(f"{len(missing)} image(s) without a usable ImagePositionPatient / ImageOrientationPatient "
                        f"(e.g. {rel(missing[0].path)}): not a cross-sectional volume")
    located = [f for f in frames if _located(f)]
    orientation_groups: list[list[Frame]] = []
    if located:
        located, dropped, mixed = _majority(located, lambda a, b: _same_orientation(_orientation(a), _orientation(b)),
                                            "orientation", lambda f: "oriented " + _fmt(_orientation(f), 3), rel)
        notes.extend(dropped)
        problems.extend(mixed)
        orientation_groups = _groups(located, lambda a, b: _same_orientation(_orientation(a), _orientation(b)))
        located, dropped, mixed = _majority(located, lambda a, b: (a.rows, a.columns) == (b.rows, b.columns), "size",
                                            lambda f: f"of {f.columns}x{f.rows}", rel)
        notes.extend(dropped)
        problems.extend(mixed)
        kept = {id(f) for f in located}
        frames = [f for f in frames if id(f) in kept or not _located(f)]
    spacings = {f.pixel_spacing for f in frames}
    known = {s for s in spacings if s is not None}  # all of them unless None is in spacings
    if None in spacings and not any("PixelSpacing" in p for p in problems):
        problems.append("no PixelSpacing")
    elif None not in spacings and len({tuple(np.round(s, 4)) for s in known}) > 1:
        problems.append(f"mixed pixel spacings: {', '.join(_fmt(s) for s in sorted(known))}")
    return _geometry(uid, headers, first, frames, located, orientation_groups, problems, notes, localizer_series, rel)


def _geometry(uid: str, headers: list[Header], first: Dataset, frames: list[Frame], located: list[Frame],
              orientation_groups: list[list[Frame]], problems: list[str], notes: list[str], localizer_series: bool,
              rel: Callable[[Path], str]) -> DicomSeries:
    """Sort the slices along the normal of the (largest group's) orientation and measure the grid."""
    # slices sharing one orientation (the largest group): only they have a common normal to sort and step along
    same = [f for f in located if not orientation_groups or any(f is g for g in orientation_groups[0])]
    reference = same[0] if same else (frames[0] if frames else None)
    rows = reference.rows if reference else int(first.get("Rows", 0) or 0)
    columns = reference.columns if reference else int(first.get("Columns", 0) or 0)
    direction: tuple[float, ...] | None = None
    origin: tuple[float, float, float] | None = None
    slice_spacing: float | None = None
    if same:
        row_dir, col_dir = _orientation(same[0])[:3], _orientation(same[0])[3:]
        normal = slice_normal(_orientation(same[0]))
        same.sort(key=lambda f: (float(_position(f) @ normal), f.path.name, f.frame or 0))
        others = [f for f in frames if not any(f is s for s in same)]
        ordered = same + others
        positions = np.array([float(_position(f) @ normal) for f in same])
        slice_spacing = _slice_checks(same, positions, normal, problems, rel)
        direction = tuple(float(v) for v in np.column_stack([row_dir, col_dir, normal]).ravel())
        x, y, z = (float(v) for v in _position(same[0]))  # ImagePositionPatient: 3 numbers (PlaneTags.floats)
        origin = (x, y, z)
        if len(frames) == 1:  # no step to measure: what the header says, and where it comes from
            one = frames[0]
            slice_spacing = one.spacing_between or one.thickness
            if slice_spacing is None:
                problems.append("one slice without SpacingBetweenSlices or SliceThickness: its slice spacing is unknown")
            else:
                source = "SpacingBetweenSlices" if one.spacing_between else "SliceThickness"
                notes.append(f"one slice: its slice spacing {slice_spacing:.6g} mm is the {source}")
    else:
        ordered = sorted(frames, key=lambda f: (f.path.name, f.frame or 0))
    pixel_spacing = reference.pixel_spacing if reference is not None else None
    spacing = (pixel_spacing[1] if pixel_spacing else None, pixel_spacing[0] if pixel_spacing else None, slice_spacing)
    known_spacing = [s for s in spacing if s is not None]
    if direction is not None and origin is not None and len(known_spacing) == 3 and len(orientation_groups) <= 1:
        problem = grid_problem(known_spacing, origin, direction)
        if problem is not None:
            problems.append(f"the series' grid: {problem}")
    multiframe = len(headers) == 1 and is_multiframe(headers[0].ds)
    files: tuple[Path, ...]
    if multiframe:
        files, frame_order = (headers[0].path,), tuple(int(f.frame or 0) for f in ordered)
    else:
        files, frame_order = tuple(dict.fromkeys(f.path for f in ordered)), ()
    try:
        series_number = int(first.get("SeriesNumber"))
    except (TypeError, ValueError):
        series_number = None
    return DicomSeries(
        series_uid=uid,
        study_uid=str(first.get("StudyInstanceUID", "")),
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "") or ""),
        series_number=series_number,
        files=files,
        size=(int(columns), int(rows), len(ordered)),
        spacing=spacing,
        origin=origin,
        direction=direction,
        transfer_syntaxes=tuple(sorted({h.transfer_syntax for h in headers})),
        multiframe=multiframe,
        problems=tuple(dict.fromkeys(problems)),
        notes=tuple(notes),
        frame_order=frame_order,
        localizer=localizer_series,
        enhanced=any("PerFrameFunctionalGroupsSequence" in h.ds for h in headers),
        orientations=max(1, len(orientation_groups)),
    )


def _slice_checks(frames: list[Frame], positions: np.ndarray, normal: np.ndarray, problems: list[str],
                  rel: Callable[[Path], str]) -> float | None:
    """Same-position instances, gaps, uneven steps and tilt of slices sharing one orientation; returns
    the slice spacing (None if < 2 slices)."""
    if len(frames) < 2:
        return None
    steps = np.diff(positions)
    same = np.flatnonzero(steps < _POSITION_TOL_MM)
    if same.size:
        a, b = frames[same[0]], frames[same[0] + 1]
        problems.append(f"{same.size} pair(s) of different instances at the same slice position (e.g. "
                        f"{rel(a.path)} and {rel(b.path)} at {positions[same[0]]:.2f} mm): "
                        "several acquisitions, echoes or phases in one series?")
        steps = steps[steps >= _POSITION_TOL_MM]
        if steps.size == 0:
            return None
    median = float(np.median(steps))
    gaps = np.flatnonzero(np.diff(positions) > 1.5 * median)
    if gaps.size:
        k = int(gaps[0])
        gap = positions[k + 1] - positions[k]
        problems.append(f"missing slices: {gaps.size} gap(s), e.g. {gap:.2f} mm between "
                        f"{rel(frames[k].path)} and {rel(frames[k + 1].path)} (median step {median:.2f} mm, "
                        f"about {max(1, round(gap / median) - 1)} slice(s) missing)")
    regular = steps[steps <= 1.5 * median]
    tolerance = max(_POSITION_TOL_MM, 0.01 * median)
    if regular.size and float(np.max(np.abs(regular - median))) > tolerance:
        problems.append(f"uneven slice spacing: steps from {regular.min():.3f} to {regular.max():.3f} mm "
                        f"(median {median:.3f} mm)")
    # gantry tilt / shear: consecutive positions must move along the normal only
    points = np.array([f.position for f in frames])
    delta = np.diff(points, axis=0)
    along = delta @ normal
    across = np.linalg.norm(delta - np.outer(along, normal), axis=1)
    tilted = across > 1e-3 * np.abs(along) + 1e-3
    if np.any(tilted):
        angle = float(np.degrees(np.arctan2(np.median(across[tilted]), np.median(np.abs(along[tilted])))))
        problems.append(f"gantry tilt (or sheared slices): slice positions deviate {angle:.1f} degrees from the "
                        "slice normal; resample the series to an untilted grid first")
    if gaps.size or not steps.size:
        return median
    return float((positions[-1] - positions[0]) / (len(positions) - 1))
