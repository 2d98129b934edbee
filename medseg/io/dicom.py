"""DICOM series input: discover, sort, validate and select image series; read them as SimpleITK images.

What PACS and CD/USB exports look like, and what this module does with it:

* a folder tree of mixed studies and series, files with or without ``.dcm`` (``IM000001``),
  recognised by content (``DICM`` after the 128-byte preamble, or a data set without preamble that
  pydicom reads and that holds UIDs); stray non-DICOM files are skipped and listed in
  :attr:`DicomScan.skipped`; a DICOMDIR is read and its references checked (``scan_dicom`` of a
  DICOMDIR file reads exactly the files it references);
* instances grouped by SeriesInstanceUID and sorted along the slice normal
  (``dot(ImagePositionPatient, row x column)``), never by InstanceNumber;
* each series checked for missing slices, uneven spacing, gantry tilt, mixed orientations, sizes
  or pixel spacings, duplicate instances, localizers, missing or truncated pixel data and transfer
  syntaxes no installed pydicom plugin decodes (blocking ones in :attr:`DicomSeries.problems`,
  harmless ones in :attr:`DicomSeries.notes`);
* enhanced (multi-frame) CT / MR read frame by frame from the functional groups.

Scanning reads headers only (pixel data is skipped; its presence and length are checked from the
element header); pixel data is decoded by :func:`read_series` / :func:`source_datasets`.

Geometry (LPS, SimpleITK order): ``origin`` = ImagePositionPatient of the first sorted slice;
``direction`` columns = row direction, column direction, slice normal; ``spacing`` = (column spacing,
row spacing, measured slice step).

Typical use::

    scan = scan_dicom("export/")
    series = select_series(scan, modality="CT", min_slices=20)
    image = read_series(series)          # float32, HU for CT
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medseg.errors import DicomError, InputError

__all__ = [
    "DicomSeries",
    "DicomScan",
    "is_dicom_input",
    "scan_dicom",
    "select_series",
    "read_series",
    "source_datasets",
    "decode_series",
    "describe_orientation",
    "inspect_lines",
]

log = logging.getLogger(__name__)

#: SOP classes that carry pixel data but are not image series medseg segments.
_NOT_IMAGES: dict[str, str] = {
    "1.2.840.10008.1.3.10": "a DICOMDIR",
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG (segmentation)",
    "1.2.840.10008.5.1.4.1.1.481.3": "a DICOM RT Structure Set",
}
_NOT_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "SR", "PR", "KO", "DOC", "REG", "RTPLAN", "RTDOSE", "RWV", "FID"}
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_MAGIC = ((b"\x89PNG", "PNG image"), (b"%PDF", "PDF document"), (b"PK\x03\x04", "ZIP archive"),
          (b"\xff\xd8\xff", "JPEG image"), (b"GIF8", "GIF image"), (b"MZ", "Windows program"),
          (b"\x1f\x8b", "gzip file"), (b"\x7fELF", "program"))

_ORIENTATION_TOL = 1e-3  # direction cosines
_POSITION_TOL_MM = 0.01
_LOCALIZER_MAX = 3  # a minority of at most this many images of another orientation / size is a localizer


@dataclass(frozen=True)
class DicomSeries:
    """One image series found by :func:`scan_dicom`.

    Attributes
    ----------
    series_uid, study_uid, modality, description, series_number
        From the headers (description = SeriesDescription, "" if absent).
    files
        Image files sorted along the slice normal (ascending); one file if ``multiframe``.
    size
        (columns, rows, slices).
    spacing
        (column spacing, row spacing, slice spacing) in mm; slice spacing is the measured step.
    origin
        LPS position (mm) of the first voxel (ImagePositionPatient of the first sorted slice).
    direction
        9 values, SimpleITK order: columns are row direction, column direction, slice normal.
    transfer_syntaxes
        Transfer syntax UIDs of the files.
    multiframe
        An enhanced (multi-frame) instance.
    problems
        Blocking problems: the series cannot be read as one volume.
    notes
        Harmless findings (localizers dropped, duplicate copies ignored, ...).
    frame_order
        Multi-frame only: the frame indices (0-based, in the file) in slice order.
    localizer
        Every image of the series is a localizer (scout).
    """

    series_uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    files: tuple[Path, ...]
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    transfer_syntaxes: tuple[str, ...]
    multiframe: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    frame_order: tuple[int, ...] = ()
    localizer: bool = False

    @property
    def slices(self) -> int:
        """Number of slices (frames) of the volume."""
        return self.size[2]

    def summary(self) -> str:
        """One line: UID, modality, slices, description (no patient data)."""
        return (f"{self.series_uid}  {self.modality or '?'}  {self.slices} slice(s)  "
                f"{self.description!r}{'  [has problems]' if self.problems else ''}")


@dataclass
class DicomScan:
    """Result of :func:`scan_dicom`: the image series and the files that were skipped (with why)."""

    root: Path
    series: list[DicomSeries]
    skipped: list[tuple[Path, str]]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Recognising DICOM files
# --------------------------------------------------------------------------------------------


def _sniff(path: Path) -> tuple[str, str]:
    """Classify a file from its first bytes: ("part10" | "raw" | "no", reason when "no")."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError as exc:
        return "no", f"unreadable ({exc.strerror or exc})"
    if len(head) == 132 and head[128:132] == b"DICM":
        return "part10", ""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return "no", f"not DICOM ({kind})"
    # a data set without preamble (old exports, ACR-NEMA style) starts with a group 0000/0002/0008 tag
    if len(head) >= 8 and head[:2] in (b"\x00\x00", b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return "raw", ""
    if not head:
        return "no", "not DICOM (empty file)"
    return "no", "not DICOM"


def _looks_like_uid(value: object) -> bool:
    return isinstance(value, str) and bool(value) and UID(value).is_valid


def is_dicom_input(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is DICOM input: a DICOM file (DICOMDIR, ``.dcm``, ``IM000001``) or a folder
    holding DICOM files anywhere below it, and not a NIfTI / NRRD / MetaImage file or a folder of them.

    Only file headers are looked at; the search stops at the first DICOM file.
    """
    from medseg.io.image import image_suffix

    path = Path(path)
    if path.is_file():
        if image_suffix(path):
            return False
        kind, _ = _sniff(path)
        return kind == "part10" or (kind == "raw" and _read_header(path, raw=True)[0] is not None)
    if not path.is_dir():
        return False
    try:
        if any(p.is_file() and image_suffix(p) and not p.name.startswith(".") for p in path.iterdir()):
            return False
    except OSError:
        return False
    for file in _walk(path):
        kind, _ = _sniff(file)
        if kind == "part10" or (kind == "raw" and _read_header(file, raw=True)[0] is not None):
            return True
    return False


def _walk(root: Path) -> Iterable[Path]:
    """Every file below ``root`` (sorted, recursive; hidden folders such as ``.git`` skipped)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            yield Path(folder) / name


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """One slice: a single-frame file or one frame of a multi-frame file."""

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


@dataclass
class _Header:
    path: Path
    ds: Dataset
    transfer_syntax: str
    pixel_problem: str | None


def _pixel_problem(fp, ds: Dataset, size: int, implicit: bool, little: bool) -> str | None:
    """After a header-only read (``fp`` at the pixel data element, or at the end): the problem with
    the pixel data, or None. Detects a missing element and truncation without reading the pixels."""
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return "no pixel data"
    endian = "<" if little else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group << 16 | element) not in _PIXEL_TAGS:
        return "no pixel data"
    if implicit or not (head[4:6].isalpha() and head[4:6].isupper()):  # (some files lie about their VR)
        length, offset = struct.unpack(endian + "L", head[4:8])[0], 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        length, offset = struct.unpack(endian + "L", head[8:12])[0], 12
    else:
        length, offset = struct.unpack(endian + "H", head[6:8])[0], 8
    if length == 0xFFFFFFFF:  # encapsulated: walk the fragment items (headers only) to the delimiter
        fp.seek(start + offset)
        while True:
            item = fp.read(8)
            if len(item) < 8:
                return "truncated file (the encapsulated pixel data ends early)"
            group, element, length = struct.unpack("<HHL", item)
            if (group, element) == (0xFFFE, 0xE0DD):
                return None
            if (group, element) != (0xFFFE, 0xE000):
                return f"corrupt encapsulated pixel data (({group:04X},{element:04X}) where an item was expected)"
            here = fp.tell()
            if here + length > size:
                return f"truncated file (a pixel data fragment has {size - here} of {length} bytes)"
            fp.seek(here + length)
    if start + offset + length > size:
        return f"truncated file (pixel data has {max(0, size - start - offset)} of {length} bytes)"
    if length == 0:
        return "no pixel data (empty PixelData element)"
    return None


def _read_header(path: Path, raw: bool = False) -> tuple[_Header | None, str]:
    """Read the header of ``path`` (no pixel data); (header, "") or (None, reason)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=raw)
            implicit, little = ds.original_encoding
            if implicit is None:
                implicit, little = True, True
            meta = getattr(ds, "file_meta", None)
            ts = meta.get("TransferSyntaxUID") if meta is not None else None
            deflated = ts is not None and UID(ts) == pydicom.uid.DeflatedExplicitVRLittleEndian
            problem = None if deflated else _pixel_problem(fp, ds, size, bool(implicit), bool(little))
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        if raw:  # no preamble and no readable data set: just another file
            return None, "not DICOM"
        if isinstance(exc, (InvalidDicomError, EOFError)):
            return None, f"unreadable DICOM ({_short(exc)})"
        return None, f"unreadable DICOM ({type(exc).__name__}: {_short(exc)})"
    if raw and not (_looks_like_uid(ds.get("SOPInstanceUID")) or _looks_like_uid(ds.get("SeriesInstanceUID"))):
        return None, "not DICOM"
    if ts is None:
        ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return _Header(path, ds, str(ts), problem), ""


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _floats(value: object, n: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return array if array.shape == (n,) and np.all(np.isfinite(array)) else None


def _group(item: Dataset | None, sequence: str) -> Dataset | None:
    if item is None:
        return None
    seq = item.get(sequence)
    return seq[0] if seq else None


def _frames(header: _Header, rel: str) -> tuple[list[_Frame], list[str]]:
    """The slices of one file and the problems found in its header."""
    ds = header.ds
    problems: list[str] = []
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    localizer = "LOCALIZER" in image_type
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
        frames = []
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if len(per_frame) != n_frames:
            problems.append(f"{rel}: {len(per_frame)} per-frame functional groups for {n_frames} frames")
        for index, item in enumerate(per_frame):
            plane = _group(item, "PlanePositionSequence")
            orient = _group(item, "PlaneOrientationSequence") or _group(shared, "PlaneOrientationSequence")
            measures = _group(item, "PixelMeasuresSequence") or _group(shared, "PixelMeasuresSequence")
            spacing = _floats(measures.get("PixelSpacing"), 2) if measures is not None else None
            thickness = measures.get("SliceThickness") if measures is not None else None
            frames.append(_Frame(header.path, index, str(ds.get("SOPInstanceUID", "")),
                                 _floats(plane.get("ImagePositionPatient"), 3) if plane is not None else None,
                                 _floats(orient.get("ImageOrientationPatient"), 6) if orient is not None else None,
                                 None if spacing is None else (float(spacing[0]), float(spacing[1])), rows, columns,
                                 localizer, None if thickness in (None, "") else float(thickness)))
        return frames, problems
    if n_frames > 1:
        problems.append(f"{rel}: a multi-frame instance without per-frame functional groups ({n_frames} frames)")
    spacing = _floats(ds.get("PixelSpacing"), 2)
    thickness = ds.get("SliceThickness")
    return [_Frame(header.path, None, str(ds.get("SOPInstanceUID", "")), _floats(ds.get("ImagePositionPatient"), 3),
                   _floats(ds.get("ImageOrientationPatient"), 6),
                   None if spacing is None else (float(spacing[0]), float(spacing[1])), rows, columns, localizer,
                   None if thickness in (None, "") else float(thickness))], problems


# --------------------------------------------------------------------------------------------
# Series analysis
# --------------------------------------------------------------------------------------------


def _same_orientation(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.max(np.abs(a - b)) <= _ORIENTATION_TOL)


def _majority(frames: list[_Frame], key, what: str, describe) -> tuple[list[_Frame], list[str], list[str]]:
    """Keep the largest group of ``frames`` by ``key``; a small minority (at most 3 images, the
    majority at least twice as large) is dropped as a localizer with a note, anything else is a problem."""
    groups: list[list[_Frame]] = []
    for frame in frames:
        for group in groups:
            if key(group[0], frame):
                group.append(frame)
                break
        else:
            groups.append([frame])
    if len(groups) == 1:
        return frames, [], []
    groups.sort(key=len, reverse=True)
    major, minor = groups[0], [f for g in groups[1:] for f in g]
    if len(minor) <= _LOCALIZER_MAX and len(major) >= 2 * len(minor):
        return major, [f"dropped {len(minor)} image(s) with a different {what} (localizer?): "
                       f"{', '.join(sorted(f.path.name for f in minor))}"], []
    counts = ", ".join(f"{len(g)} image(s) {describe(g[0])}" for g in groups)
    return frames, [], [f"mixed {what}s: {counts}"]


def _fmt(values: Sequence[float], digits: int = 4) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


def _analyse(uid: str, headers: list[_Header], root: Path) -> DicomSeries:
    """Group checks and geometry of one series' headers (sorted by path)."""
    problems: list[str] = []
    notes: list[str] = []

    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(root)) if path != root else path.name
        except ValueError:
            return str(path)

    # duplicates of the same instance (same SOP Instance UID): keep the first copy
    seen: dict[str, _Header] = {}
    duplicates = []
    for header in headers:
        sop = str(header.ds.get("SOPInstanceUID", "")) or str(header.path)
        if sop in seen:
            duplicates.append(header)
        else:
            seen[sop] = header
    if duplicates:
        notes.append(f"ignored {len(duplicates)} duplicate copy(ies) of the same instance: "
                     f"{', '.join(rel(h.path) for h in duplicates[:5])}{' ...' if len(duplicates) > 5 else ''}")
    headers = list(seen.values())
    first = headers[0].ds
    multiframe_files = [h for h in headers if "PerFrameFunctionalGroupsSequence" in h.ds]
    multiframe = bool(multiframe_files)
    if multiframe and len(headers) > 1:
        problems.append(f"{len(multiframe_files)} multi-frame and {len(headers) - len(multiframe_files)} other "
                        "instance(s) in one series; medseg reads a series as one multi-frame instance or as "
                        "single-frame slices")

    for header in headers:
        if header.pixel_problem:
            problems.append(f"{rel(header.path)}: {header.pixel_problem}")
        ts = UID(header.transfer_syntax)
        if not _decodable(ts):
            problems.append(f"{rel(header.path)}: transfer syntax {ts.name} ({ts}) cannot be decoded "
                            "(no installed pydicom pixel-data plugin supports it)")
        samples = int(header.ds.get("SamplesPerPixel", 1) or 1)
        if samples != 1:
            problems.append(f"{rel(header.path)}: {samples} samples per pixel (colour); only greyscale is supported")

    frames: list[_Frame] = []
    for header in headers:
        found, header_problems = _frames(header, rel(header.path))
        frames.extend(found)
        problems.extend(header_problems)

    # localizers (scouts): by ImageType, then by a small minority of another orientation or size
    localizer_series = bool(frames) and all(f.localizer for f in frames)
    if not localizer_series:
        scouts = [f for f in frames if f.localizer]
        if scouts:
            notes.append(f"dropped {len(scouts)} localizer image(s): "
                         f"{', '.join(sorted(rel(f.path) for f in scouts)[:5])}")
            frames = [f for f in frames if not f.localizer]
    else:
        problems.append("a localizer (scout) series, not a volume")

    missing_geometry = [f for f in frames if f.position is None or f.orientation is None]
    if missing_geometry:
        problems.append(f"{len(missing_geometry)} image(s) without ImagePositionPatient / ImageOrientationPatient "
                        f"(e.g. {rel(missing_geometry[0].path)}): not a cross-sectional volume")
    geometric = [f for f in frames if f.position is not None and f.orientation is not None]
    if geometric:
        geometric, dropped, mixed = _majority(
            geometric, lambda a, b: _same_orientation(a.orientation, b.orientation), "orientation",
            lambda f: "oriented " + _fmt(f.orientation, 3))
        notes.extend(dropped)
        problems.extend(mixed)
        geometric, dropped, mixed = _majority(
            geometric, lambda a, b: (a.rows, a.columns) == (b.rows, b.columns), "size",
            lambda f: f"of {f.columns}x{f.rows}")
        notes.extend(dropped)
        problems.extend(mixed)
        spacings = {f.pixel_spacing for f in geometric}
        if None in spacings:
            problems.append("no PixelSpacing")
        elif len({tuple(np.round(s, 4)) for s in spacings}) > 1:  # type: ignore[arg-type]
            problems.append(f"mixed pixel spacings: {', '.join(_fmt(s) for s in sorted(spacings))}")  # type: ignore[arg-type]
        kept = {id(f) for f in geometric}
        frames = [f for f in frames if id(f) in kept or f.position is None or f.orientation is None]

    # geometry: sort along the normal of the (majority) orientation
    reference = geometric[0] if geometric else (frames[0] if frames else None)
    rows = reference.rows if reference else int(first.get("Rows", 0) or 0)
    columns = reference.columns if reference else int(first.get("Columns", 0) or 0)
    if reference is not None and reference.orientation is not None:
        row_dir, col_dir = reference.orientation[:3], reference.orientation[3:]
    else:
        row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(row_dir, col_dir)
    norm = np.linalg.norm(normal)
    normal = normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
    if geometric:
        geometric.sort(key=lambda f: (float(f.position @ normal), f.path.name, f.frame or 0))
        ordered = geometric + [f for f in frames if f.position is None or f.orientation is None]
    else:
        ordered = sorted(frames, key=lambda f: (f.path.name, f.frame or 0))
    positions = np.array([float(f.position @ normal) for f in geometric]) if geometric else np.zeros(0)
    slice_spacing = _slice_checks(geometric, positions, normal, problems, rel)
    if slice_spacing is None:
        thickness = reference.thickness if reference is not None else None
        slice_spacing = thickness if thickness and thickness > 0 else 1.0
    pixel_spacing = reference.pixel_spacing if reference is not None and reference.pixel_spacing else (1.0, 1.0)
    origin = tuple(float(v) for v in ordered[0].position) if ordered and ordered[0].position is not None else (0.0,) * 3
    direction = np.column_stack([row_dir, col_dir, normal])

    if multiframe and len(headers) == 1:
        files = (headers[0].path,)
        frame_order = tuple(int(f.frame or 0) for f in ordered)
    else:
        files, frame_order = tuple(dict.fromkeys(f.path for f in ordered)), ()
    series_number = first.get("SeriesNumber")
    return DicomSeries(
        series_uid=uid,
        study_uid=str(first.get("StudyInstanceUID", "")),
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "") or ""),
        series_number=None if series_number in (None, "") else int(series_number),
        files=files,
        size=(int(columns), int(rows), len(ordered)),
        spacing=(float(pixel_spacing[1]), float(pixel_spacing[0]), float(slice_spacing)),
        origin=origin,  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
        transfer_syntaxes=tuple(sorted({h.transfer_syntax for h in headers})),
        multiframe=multiframe,
        problems=tuple(dict.fromkeys(problems)),
        notes=tuple(notes),
        frame_order=frame_order,
        localizer=localizer_series,
    )


def _slice_checks(frames: list[_Frame], positions: np.ndarray, normal: np.ndarray, problems: list[str],
                  rel) -> float | None:
    """Same-position instances, gaps, uneven steps and tilt; returns the slice spacing (None if < 2 slices)."""
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


def _decodable(ts: UID) -> bool:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------


def _resolve_ci(base: Path, parts: Sequence[str]) -> Path | None:
    """``base / parts``, matching each part case-insensitively (CD file systems show lower case)."""
    path = base
    for part in parts:
        exact = path / part
        if exact.exists():
            path = exact
            continue
        try:
            matches = [p for p in path.iterdir() if p.name.lower() == part.lower()]
        except OSError:
            return None
        if not matches:
            return None
        path = matches[0]
    return path


def _dicomdir_references(dicomdir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files a DICOMDIR references (resolved case-insensitively) and the missing ones."""
    try:
        ds = pydicom.dcmread(dicomdir, force=True)
    except Exception as exc:  # noqa: BLE001
        return [], [(dicomdir, f"unreadable DICOMDIR ({_short(exc)})")]
    found, missing = [], []
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [str(file_id)] if isinstance(file_id, str) else [str(p) for p in file_id]
        path = _resolve_ci(dicomdir.parent, parts)
        if path is None or not path.is_file():
            missing.append((dicomdir.parent.joinpath(*parts), f"referenced by {dicomdir.name} but missing"))
        else:
            found.append(path)
    return found, missing


def _is_dicomdir(path: Path) -> bool:
    return path.name.upper() == "DICOMDIR"


def scan_dicom(path: str | os.PathLike[str]) -> DicomScan:
    """Find the DICOM image series in a folder tree, a DICOMDIR or a single file (headers only).

    Raises
    ------
    DicomError
        The path does not exist, or no DICOM image was found (the message says what was seen).
    """
    root = Path(path)
    if not root.exists():
        raise DicomError(root, "no such file or folder")
    skipped: list[tuple[Path, str]] = []
    notes: list[str] = []
    if root.is_file() and _is_dicomdir(root):
        candidates, missing = _dicomdir_references(root)
        skipped.extend(missing)
        notes.append(f"{root.name}: {len(candidates)} referenced file(s)")
    elif root.is_file():
        candidates = [root]
    else:
        candidates = []
        for file in _walk(root):
            if _is_dicomdir(file):
                referenced, missing = _dicomdir_references(file)
                skipped.extend(missing)
                notes.append(f"{file.relative_to(root)}: {len(referenced)} referenced file(s), "
                             f"{len(missing)} missing")
                continue
            candidates.append(file)
    by_series: dict[str, list[_Header]] = {}
    for file in candidates:
        kind, reason = _sniff(file)
        if kind == "no":
            skipped.append((file, reason))
            continue
        header, reason = _read_header(file, raw=kind == "raw")
        if header is None:
            skipped.append((file, reason))
            continue
        ds = header.ds
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
        modality = str(ds.get("Modality", "")).upper()
        sop_name = UID(sop_class).name if sop_class else "no SOP class"
        if sop_class in _NOT_IMAGES or modality in _NOT_IMAGE_MODALITIES:
            kind_name = _NOT_IMAGES.get(sop_class) or f"a DICOM {modality} object ({sop_name})"
            skipped.append((file, f"{kind_name}, not an image series"))
            continue
        if "Rows" not in ds and "PerFrameFunctionalGroupsSequence" not in ds and "Image Storage" not in sop_name:
            skipped.append((file, f"a DICOM object ({sop_name}), not an image series"))
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            skipped.append((file, "DICOM image without SeriesInstanceUID"))
            continue
        by_series.setdefault(series_uid, []).append(header)
    series = [_analyse(uid, headers, root if root.is_dir() else root.parent) for uid, headers in by_series.items()]
    series.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else 1 << 30, s.series_uid))
    if skipped:
        reasons = Counter(reason.split(" (")[0] for _, reason in skipped)
        log.info("%s: skipped %d file(s): %s", root, len(skipped), ", ".join(f"{n} {r}" for r, n in reasons.items()))
    if not series:
        detail = f"; skipped {len(skipped)} file(s), e.g. {skipped[0][0].name}: {skipped[0][1]}" if skipped else ""
        raise DicomError(root, f"no DICOM images found ({len(candidates)} file(s) looked at{detail})")
    log.info("%s: %d DICOM series (%s)", root, len(series),
             ", ".join(f"{s.modality} {s.slices} slice(s)" for s in series))
    return DicomScan(root=root, series=series, skipped=skipped, notes=notes)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _rule_text(series_uid, modality, min_slices, description) -> str:
    parts = []
    if series_uid:
        parts.append(f"series UID {series_uid}")
    if modality:
        parts.append(f"modality {modality}")
    if min_slices > 1:
        parts.append(f"at least {min_slices} slices")
    if description:
        parts.append(f"description matching {description!r}")
    return ", ".join(parts)


def _candidates(series: Sequence[DicomSeries]) -> str:
    return "\n".join(f"  {s.summary()}" for s in series)


def select_series(scan: DicomScan, *, series_uid: str | None = None, modality: str | None = None,
                  min_slices: int = 1, description: str | None = None) -> DicomSeries:
    """Pick the one series matching every given rule.

    Localizer-only series are never picked unless named by ``series_uid``.

    Parameters
    ----------
    series_uid
        Exact SeriesInstanceUID.
    modality
        e.g. ``"CT"`` (case-insensitive).
    min_slices
        Minimum number of slices (frames).
    description
        Regular expression searched (case-insensitive) in SeriesDescription.

    Raises
    ------
    InputError
        ``description`` is not a valid regular expression.
    DicomError
        No series or several match (the message lists the candidates, one per line: series UID,
        modality, slices, description), or the chosen series has blocking problems.
    """
    pattern = None
    if description:
        try:
            pattern = re.compile(description, re.IGNORECASE)
        except re.error as exc:
            raise InputError(None, f"series description pattern {description!r} is not a valid regular "
                                   f"expression ({exc})") from None
    matches = []
    for series in scan.series:
        if series_uid and series.series_uid != series_uid:
            continue
        if not series_uid and series.localizer:
            continue
        if modality and series.modality.upper() != modality.upper():
            continue
        if series.slices < min_slices:
            continue
        if pattern is not None and not pattern.search(series.description):
            continue
        matches.append(series)
    rule = _rule_text(series_uid, modality, min_slices, description)
    if not matches:
        raise DicomError(scan.root, f"no DICOM series matches ({rule or 'no rule'}); the series found:\n"
                                    f"{_candidates(scan.series)}")
    if len(matches) > 1:
        found = f"{len(matches)} DICOM series match ({rule})" if rule else f"{len(matches)} DICOM series found"
        raise DicomError(scan.root, f"{found}; choose one by series UID, "
                                    f"modality, minimum slices or description (--series-uid, --modality, "
                                    f"--min-slices, --series-description):\n{_candidates(matches)}")
    chosen = matches[0]
    if chosen.problems:
        raise DicomError(_series_folder(chosen), f"series {chosen.series_uid} ({chosen.modality}, "
                                                 f"{chosen.description!r}) cannot be used: "
                                                 + "; ".join(chosen.problems))
    return chosen


def _series_folder(series: DicomSeries) -> Path:
    parents = {p.parent for p in series.files}
    return parents.pop() if len(parents) == 1 else Path(os.path.commonpath([str(p) for p in parents]))


# --------------------------------------------------------------------------------------------
# Reading pixels
# --------------------------------------------------------------------------------------------


def _load(path: Path, series: DicomSeries) -> Dataset:
    """Read a whole instance (pixel data included); DicomError naming the series and the file."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001
        raise DicomError(path, f"series {series.series_uid}: unreadable ({_short(exc)})") from None
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DicomError(path, f"series {series.series_uid}: no pixel data")
    return _with_transfer_syntax(ds)


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """``ds`` with a file meta TransferSyntaxUID (files without meta: the encoding they were read in)."""
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        implicit, _ = ds.original_encoding
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _decode(ds: Dataset, path: Path, series: DicomSeries) -> np.ndarray:
    """ds.pixel_array, with DicomError naming the series and the file when it cannot be decoded."""
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if not _decodable(ts):
        raise DicomError(path, f"series {series.series_uid}: transfer syntax {ts.name} ({ts}) cannot be decoded "
                               "(no installed pydicom pixel-data plugin supports it)")
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, ...
        raise DicomError(path, f"series {series.series_uid}: cannot decode the pixel data ({ts.name}): "
                               f"{_short(exc)}") from None


def _pixels(ds: Dataset, path: Path, series: DicomSeries) -> np.ndarray:
    """Decoded stored values of every frame: (frames, rows, columns)."""
    array = _decode(ds, path, series)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3 or array.shape[0] != frames:
        raise DicomError(path, f"series {series.series_uid}: decoded pixel data of shape {array.shape} does not "
                               f"match {frames} greyscale frame(s)")
    return array


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    """(slope, intercept) of a frame: per-frame, shared or top-level Pixel Value Transformation."""
    items = []
    if ds.get("PerFrameFunctionalGroupsSequence"):
        items.append(_group(ds.PerFrameFunctionalGroupsSequence[frame], "PixelValueTransformationSequence"))
    if ds.get("SharedFunctionalGroupsSequence"):
        items.append(_group(ds.SharedFunctionalGroupsSequence[0], "PixelValueTransformationSequence"))
    items.append(ds)
    for item in items:
        if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
            return float(item.RescaleSlope), float(item.RescaleIntercept)
    return 1.0, 0.0


def source_datasets(series: DicomSeries, pixels: bool = True) -> list[Dataset]:
    """The source instances in the slice order of :func:`read_series` (one data set for a multi-frame
    series: its frames in :attr:`DicomSeries.frame_order`); with ``pixels=False`` their headers only, read
    up to the pixel data (what the DICOM SEG and RTSTRUCT writers need, without holding the series' pixel
    bytes a second time), the pixel data still checked for presence and truncation.

    Raises
    ------
    DicomError
        The series has blocking problems, or a file is unreadable, has no pixel data or (headers only)
        is truncated.
    """
    _refuse_problems(series)
    if pixels:
        return [_load(path, series) for path in series.files]
    datasets = []
    for path in series.files:
        header, reason = _read_header(path, raw=True)
        if header is None:
            raise DicomError(path, f"series {series.series_uid}: {reason}")
        if header.pixel_problem:
            raise DicomError(path, f"series {series.series_uid}: {header.pixel_problem}")
        datasets.append(_with_transfer_syntax(header.ds))
    return datasets


def _refuse_problems(series: DicomSeries) -> None:
    if series.problems:
        raise DicomError(_series_folder(series), f"series {series.series_uid} ({series.modality}, "
                                                 f"{series.description!r}) cannot be used: "
                                                 + "; ".join(series.problems))


def read_series(series: DicomSeries) -> sitk.Image:
    """Read a series as a 3D float32 image in modality units (rescale applied) with its geometry.

    z index k is ``series.files[k]`` (single-frame) or frame ``series.frame_order[k]`` (multi-frame).

    Raises
    ------
    DicomError
        The series has blocking problems, or a file is truncated, has no pixel data, cannot be
        decoded or does not match the series size (the message names the series and the file).
    """
    _refuse_problems(series)
    columns, rows, slices = series.size
    volume = np.empty((slices, rows, columns), dtype=np.float32)
    if series.multiframe:
        path = series.files[0]
        ds = _load(path, series)
        stored = _pixels(ds, path, series)
        for k, frame in enumerate(series.frame_order):
            slope, intercept = _rescale(ds, frame)
            volume[k] = _checked(stored[frame], rows, columns, path, series).astype(np.float64) * slope + intercept
    else:
        for k, path in enumerate(series.files):
            ds = _load(path, series)
            stored = _checked(_pixels(ds, path, series)[0], rows, columns, path, series)
            slope, intercept = _rescale(ds, 0)
            volume[k] = stored.astype(np.float64) * slope + intercept
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(series.spacing)
    image.SetOrigin(series.origin)
    image.SetDirection(series.direction)
    log.info("read series %s: %s %dx%dx%d, spacing %s mm", series.series_uid, series.modality, columns, rows, slices,
             _fmt(series.spacing))
    return image


def _checked(frame: np.ndarray, rows: int, columns: int, path: Path, series: DicomSeries) -> np.ndarray:
    if frame.shape != (rows, columns):
        raise DicomError(path, f"series {series.series_uid}: a {frame.shape[1]}x{frame.shape[0]} image in a "
                               f"{columns}x{rows} series")
    return frame


def decode_series(series: DicomSeries) -> tuple[int, list[tuple[Path, str]]]:
    """Decode every frame of every file of a series (problems or not), for ``medseg inspect --decode``.

    Returns
    -------
    frames, failures
        The number of frames decoded, and (file, reason) for each file that failed.
    """
    decoded, failures = 0, []
    for path in series.files:
        try:
            ds = _load(path, series)
            _decode(ds, path, series)
            decoded += int(ds.get("NumberOfFrames", 1) or 1)
        except DicomError as exc:
            failures.append((path, exc.problem.removeprefix(f"series {series.series_uid}: ")))
    return decoded, failures


def describe_orientation(direction: Sequence[float]) -> str:
    """A plane name for a direction: ``axial``, ``coronal``, ``sagittal``, with ``oblique`` when the
    slice normal is more than 1 degree off the nearest patient axis."""
    normal = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2]
    axis = int(np.argmax(np.abs(normal)))
    plane = ("sagittal", "coronal", "axial")[axis]
    off = float(np.degrees(np.arccos(min(1.0, abs(normal[axis]) / max(np.linalg.norm(normal), 1e-12)))))
    return f"oblique {plane} ({off:.1f} degrees off)" if off > 1.0 else plane


def _vector(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def inspect_lines(scan: DicomScan, decode: bool = False) -> tuple[list[str], int]:
    """The ``medseg inspect`` report of a scan (no patient names, IDs or birth dates).

    Parameters
    ----------
    decode
        Also decode every frame of every series and report the files that fail.

    Returns
    -------
    lines, failures
        Report lines, and the number of files that failed to decode (0 without ``decode``).
    """
    lines = [f"{scan.root}: {len(scan.series)} series, {len(scan.skipped)} skipped file(s)"]
    failures = 0
    for number, series in enumerate(scan.series, 1):
        matrix = np.asarray(series.direction).reshape(3, 3)
        names = [UID(ts).name for ts in series.transfer_syntaxes]
        files = "1 multi-frame file" if series.multiframe else f"{len(series.files)} file(s)"
        lines += [
            f"series {number}: {series.series_uid}",
            f"  study          {series.study_uid}",
            f"  modality       {series.modality or '?'}",
            f"  description    {series.description!r}",
            f"  series number  {'-' if series.series_number is None else series.series_number}",
            f"  size           {' x '.join(map(str, series.size))} (columns x rows x slices), {files}",
            f"  spacing        {series.spacing[0]:.6g} x {series.spacing[1]:.6g} x {series.spacing[2]:.6g} mm",
            f"  origin         {_vector(series.origin)} mm (LPS)",
            f"  orientation    {describe_orientation(series.direction)}: row {_vector(matrix[:, 0])}, "
            f"column {_vector(matrix[:, 1])}, normal {_vector(matrix[:, 2])}",
            f"  transfer       {', '.join(f'{n} ({ts})' for n, ts in zip(names, series.transfer_syntaxes))}",
            f"  multi-frame    {'yes (enhanced)' if series.multiframe else 'no'}",
        ]
        lines.append("  problems       " + ("none" if not series.problems else f"{len(series.problems)}"))
        lines += [f"    - {p}" for p in series.problems]
        if series.notes:
            lines.append(f"  notes          {len(series.notes)}")
            lines += [f"    - {n}" for n in series.notes]
        if decode:
            frames, failed = decode_series(series)
            failures += len(failed)
            lines.append(f"  decoded        {frames} frame(s), {len(failed)} file(s) failed")
            lines += [f"    - {_relative(path, scan.root)}: {reason}" for path, reason in failed]
    if scan.notes:
        lines.append("notes")
        lines += [f"  - {n}" for n in scan.notes]
    if scan.skipped:
        lines.append(f"skipped {len(scan.skipped)} file(s)")
        lines += [f"  - {_relative(path, scan.root)}: {reason}" for path, reason in scan.skipped]
    return lines, failures


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root if root.is_dir() else root.parent))
    except ValueError:
        return str(path)
