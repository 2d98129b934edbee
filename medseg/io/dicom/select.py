"""Choosing the one series to segment among those a scan found."""

from __future__ import annotations

import re
from collections.abc import Sequence

from medseg.errors import DicomError, InputError
from medseg.io.dicom.scan import DicomScan
from medseg.io.dicom.series import DicomSeries, refuse_problems


def _rule_text(series_uid: str | None, modality: str | None, min_slices: int, description: str | None) -> str:
    parts: list[str] = []
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
    refuse_problems(chosen)
    return chosen
