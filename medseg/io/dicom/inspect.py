"""The ``medseg inspect`` report of a DICOM scan: what the headers say, "unknown" where they say nothing.

No patient names, IDs or birth dates are ever printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import UID

from medseg.errors import printable
from medseg.io.dicom.pixels import decode_series
from medseg.io.dicom.scan import DicomScan
from medseg.io.dicom.series import DicomSeries


def describe_orientation(direction: Sequence[float]) -> str:
    """A plane name for a direction: ``axial``, ``coronal``, ``sagittal``, with ``oblique`` when the
    slice normal is more than 1 degree off the nearest patient axis."""
    normal = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2]
    axis = int(np.argmax(np.abs(normal)))
    plane = ("sagittal", "coronal", "axial")[axis]
    off = float(np.degrees(np.arccos(min(1.0, abs(normal[axis]) / max(np.linalg.norm(normal), 1e-12)))))
    return f"oblique {plane} ({off:.1f} degrees off)" if off > 1.0 else plane


def _vector(values: Sequence[float] | np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _number(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.6g}"


def _geometry_lines(series: DicomSeries) -> list[str]:
    spacing = series.spacing
    lines = [f"  spacing        {_number(spacing[0])} x {_number(spacing[1])} x {_number(spacing[2])} mm"
             + ("" if None not in spacing else " (unknown: not in the headers)")]
    if series.origin is None:
        lines.append("  origin         unknown (no usable ImagePositionPatient)")
    else:
        lines.append(f"  origin         {_vector(series.origin)} mm (LPS)")
    if series.orientations > 1:
        lines.append(f"  orientation    mixed: {series.orientations} different orientations (see problems)")
    elif series.direction is None:
        lines.append("  orientation    unknown (no usable ImageOrientationPatient)")
    else:
        matrix = np.asarray(series.direction).reshape(3, 3)
        lines.append(f"  orientation    {describe_orientation(series.direction)}: row {_vector(matrix[:, 0])}, "
                     f"column {_vector(matrix[:, 1])}, normal {_vector(matrix[:, 2])}")
    return lines


def _frames_text(series: DicomSeries) -> tuple[str, str]:
    """(the files part of the size line, the multi-frame line)."""
    if not series.multiframe:
        return f"{len(series.files)} file(s)", "no"
    frames = series.size[2]
    if series.enhanced:
        return f"1 multi-frame file of {frames} frames", f"yes, enhanced: {frames} frames with per-frame position"
    return f"1 multi-frame file of {frames} frames", f"yes: {frames} frames, no per-frame position"


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
    lines = [f"{printable(scan.root)}: {len(scan.series)} series, {len(scan.skipped)} skipped file(s)"]
    failures = 0
    for number, series in enumerate(scan.series, 1):
        names = [UID(ts).name for ts in series.transfer_syntaxes]
        files, multiframe = _frames_text(series)
        lines += [
            f"series {number}: {series.series_uid}",
            f"  study          {series.study_uid}",
            f"  modality       {series.modality or '?'}",
            f"  description    {series.description!r}",
            f"  series number  {'-' if series.series_number is None else series.series_number}",
            f"  size           {' x '.join(map(str, series.size))} (columns x rows x slices), {files}",
            *_geometry_lines(series),
            f"  transfer       {', '.join(f'{n} ({ts})' for n, ts in zip(names, series.transfer_syntaxes))}",
            f"  multi-frame    {multiframe}",
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
        return printable(path.relative_to(root if root.is_dir() else root.parent))
    except ValueError:
        return printable(path)
