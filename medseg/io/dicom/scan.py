"""Finding DICOM image series: a folder tree, a DICOMDIR or a single file, headers only.

What PACS and CD/USB exports look like, and what this module does with it: a folder tree of mixed
studies and series, files with or without ``.dcm`` (``IM000001``), recognised by content; stray
non-DICOM files are skipped and listed in :attr:`DicomScan.skipped`; a DICOMDIR is read and its
references checked (``scan_dicom`` of a DICOMDIR file reads exactly the files it references).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import UID

from medseg.errors import DicomError, printable
from medseg.io.dicom.headers import Header, quiet_pydicom, read_header, short, sniff, walk
from medseg.io.dicom.series import DicomSeries, analyse
from medseg.io.image import image_suffix

log = logging.getLogger("medseg.io.dicom")

#: SOP classes that carry pixel data but are not image series medseg segments.
_NOT_IMAGES: dict[str, str] = {
    "1.2.840.10008.1.3.10": "a DICOMDIR",
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG (segmentation)",
    "1.2.840.10008.5.1.4.1.1.481.3": "a DICOM RT Structure Set",
}
#: Modality values (DICOM PS3.3 C.7.3.1.1.1 defined terms) of series that are results, documents,
#: waveforms or measurements, never image series to segment. RTDOSE has pixel data, but a dose grid.
NON_IMAGE_MODALITIES: frozenset[str] = frozenset({
    # segmentations, registrations, maps and radiotherapy objects
    "SEG", "REG", "FID", "RWV", "PLAN", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTINTENT", "RTSEGANN", "RTRAD",
    # documents, key objects, presentation states, hard copy
    "SR", "DOC", "KO", "PR", "HC",
    # waveforms
    "AU", "ECG", "EPS", "HD", "RESP",
    # measurements, surfaces and models
    "AR", "ASMT", "IOL", "KER", "LEN", "OAM", "OPV", "POS", "SMR", "SRF", "VA", "M3D", "OSS",
})


@dataclass
class DicomScan:
    """Result of :func:`scan_dicom`: the image series and the files that were skipped (with why)."""

    root: Path
    series: list[DicomSeries]
    skipped: list[tuple[Path, str]]
    notes: list[str] = field(default_factory=list)


def is_dicom_input(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is DICOM input: a DICOM file (DICOMDIR, ``.dcm``, ``IM000001``) or a folder
    holding DICOM files anywhere below it, and not a NIfTI / NRRD / MetaImage file or a folder of them.

    Only file headers are looked at; the search stops at the first DICOM file.
    """
    path = Path(path)
    if path.is_file():
        if image_suffix(path):
            return False
        kind, _ = sniff(path)
        return kind == "part10" or (kind == "raw" and read_header(path, raw=True)[0] is not None)
    if not path.is_dir():
        return False
    try:
        if any(p.is_file() and image_suffix(p) and not p.name.startswith(".") for p in path.iterdir()):
            return False
    except OSError:
        return False
    for file in walk(path):
        kind, _ = sniff(file)
        if kind == "part10" or (kind == "raw" and read_header(file, raw=True)[0] is not None):
            return True
    return False


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
        with quiet_pydicom():
            ds = pydicom.dcmread(dicomdir, force=True)
    except Exception as exc:  # noqa: BLE001
        return [], [(dicomdir, f"unreadable DICOMDIR ({short(exc)})")]
    found, missing = [], []
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [str(file_id)] if isinstance(file_id, str) else [str(p) for p in file_id]
        path = _resolve_ci(dicomdir.parent, parts)
        if path is None or not path.is_file():
            missing.append((dicomdir.parent.joinpath(*parts), f"referenced by {printable(dicomdir.name)} but missing"))
        else:
            found.append(path)
    return found, missing


def _is_dicomdir(path: Path) -> bool:
    return path.name.upper() == "DICOMDIR"


def scan_dicom(path: str | os.PathLike[str]) -> DicomScan:
    """Find the DICOM image series in a folder tree, a DICOMDIR or a single file (headers only).

    pydicom's warnings about header quirks (pydicom parses elements when they are first used) are kept
    off the console; ``--debug`` shows them.

    Raises
    ------
    DicomError
        The path does not exist, or no DICOM image was found (the message says what was seen).
    """
    with quiet_pydicom():
        return _scan(Path(path))


def _scan(root: Path) -> DicomScan:
    if not root.exists():
        raise DicomError(root, "no such file or folder")
    skipped: list[tuple[Path, str]] = []
    notes: list[str] = []
    if root.is_file() and _is_dicomdir(root):
        candidates, missing = _dicomdir_references(root)
        skipped.extend(missing)
        notes.append(f"{printable(root.name)}: {len(candidates)} referenced file(s)")
    elif root.is_file():
        candidates = [root]
    else:
        candidates = []
        for file in walk(root):
            if _is_dicomdir(file):
                referenced, missing = _dicomdir_references(file)
                skipped.extend(missing)
                notes.append(f"{printable(file.relative_to(root))}: {len(referenced)} referenced file(s), "
                             f"{len(missing)} missing")
                continue
            candidates.append(file)
    by_series: dict[str, list[Header]] = {}
    for file in candidates:
        kind, reason = sniff(file)
        if kind == "no":
            skipped.append((file, reason))
            continue
        header, reason = read_header(file, raw=kind == "raw")
        if header is None:
            skipped.append((file, reason))
            continue
        ds = header.ds
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
        modality = str(ds.get("Modality", "")).upper()
        sop_name = UID(sop_class).name if sop_class else "no SOP class"
        if sop_class in _NOT_IMAGES or modality in NON_IMAGE_MODALITIES:
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
    series = [analyse(uid, headers, root if root.is_dir() else root.parent) for uid, headers in by_series.items()]
    series.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else 1 << 30, s.series_uid))
    if skipped:
        reasons = Counter(reason.split(" (")[0] for _, reason in skipped)
        log.info("%s: skipped %d file(s): %s", printable(root), len(skipped), ", ".join(f"{n} {r}" for r, n in reasons.items()))
    if not series:
        detail = f"; skipped {len(skipped)} file(s), e.g. {printable(skipped[0][0].name)}: {skipped[0][1]}" if skipped else ""
        raise DicomError(root, f"no DICOM images found ({len(candidates)} file(s) looked at{detail})")
    log.info("%s: %d DICOM series (%s)", printable(root), len(series),
             ", ".join(f"{s.modality} {s.slices} slice(s)" for s in series))
    return DicomScan(root=root, series=series, skipped=skipped, notes=notes)
