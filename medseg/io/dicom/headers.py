"""Recognising DICOM files and reading their headers without their pixel data.

A file is DICOM when it has ``DICM`` after the 128-byte preamble, or is a data set without preamble
that pydicom reads and that holds UIDs. Headers are read up to the pixel data; the pixel data's
presence and length are checked from its element header, so truncation is found without reading it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medseg import errors

log = logging.getLogger("medseg.io.dicom")

PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_MAGIC = ((b"\x89PNG", "PNG image"), (b"%PDF", "PDF document"), (b"PK\x03\x04", "ZIP archive"),
          (b"\xff\xd8\xff", "JPEG image"), (b"GIF8", "GIF image"), (b"MZ", "Windows program"),
          (b"\x1f\x8b", "gzip file"), (b"\x7fELF", "program"))
#: pydicom's loggers: header quirks (``warn_and_log``) and the decoders' per-plugin tracebacks
_PYDICOM_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base")


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Keep pydicom's own log records (a traceback per failing decoder plugin, header quirks) off the
    console while medseg reads: medseg reports what failed itself, on one line. With medseg's log at
    DEBUG (``--debug``) they pass."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    drop = _Drop()
    loggers = [logging.getLogger(name) for name in _PYDICOM_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """The whole message of ``exc`` on one line (pydicom's "raised by all available plugins:" lists the
    plugins' reasons on the lines after it); cut at ``limit`` characters if given."""
    return errors.one_line(exc, limit) or type(exc).__name__


def short(exc: BaseException) -> str:
    """A short reason for a header that could not be read (one line, at most 160 characters)."""
    return one_line(exc, 160)


def sniff(path: Path) -> tuple[str, str]:
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


def looks_like_uid(value: object) -> bool:
    return isinstance(value, str) and bool(value) and UID(value).is_valid


def walk(root: Path) -> Iterable[Path]:
    """Every file below ``root`` (sorted, recursive; hidden folders such as ``.git`` skipped)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            yield Path(folder) / name


@dataclass
class Header:
    """A DICOM file's data set read up to its pixel data, and what is wrong with that pixel data."""

    path: Path
    ds: Dataset
    transfer_syntax: str
    pixel_problem: str | None


def _pixel_problem(fp: BinaryIO, ds: Dataset, size: int, implicit: bool, little: bool) -> str | None:
    """After a header-only read (``fp`` at the pixel data element, or at the end): the problem with
    the pixel data, or None. Detects a missing element and truncation without reading the pixels."""
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return "no pixel data"
    endian = "<" if little else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group << 16 | element) not in PIXEL_TAGS:
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


def read_header(path: Path, raw: bool = False) -> tuple[Header | None, str]:
    """Read the header of ``path`` (no pixel data); (header, "") or (None, reason)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fp, quiet_pydicom():
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
            return None, f"unreadable DICOM ({short(exc)})"
        return None, f"unreadable DICOM ({type(exc).__name__}: {short(exc)})"
    if raw and not (looks_like_uid(ds.get("SOPInstanceUID")) or looks_like_uid(ds.get("SeriesInstanceUID"))):
        return None, "not DICOM"
    if ts is None:
        ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return Header(path, ds, str(ts), problem), ""


def decodable(ts: UID) -> bool:
    """Whether an installed pydicom pixel-data plugin decodes transfer syntax ``ts``."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False
