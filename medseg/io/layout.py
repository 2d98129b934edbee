"""Where the pixel bytes of an NRRD or MetaImage file are, and whether there are enough of them.

ITK allocates the whole image the header declares before it reads a byte of pixel data: a header
claiming 100000 x 100000 x 100000 voxels asks for 2 PB, a ``.mhd`` whose ``.raw`` is missing or
short fails with no useful message. :func:`check_pixel_bytes` compares what the header declares
with the bytes on disk first (``stat`` only; nothing is decompressed):

* raw data: the data file(s) must hold at least the declared bytes after the header;
* zlib / gzip data: deflate cannot compress more than 1032:1, so compressed data shorter than
  1/1032 of the declared bytes is truncated or lies about the size;
* text (``ascii``) data needs at least two characters per value, hex two per byte.

:func:`compressed_data_length` decompresses the data to its end to say how short a truncated
compressed file is, once ITK has failed to read it.
"""

from __future__ import annotations

import bz2
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import InputError, printable

__all__ = [
    "MAX_DEFLATE_RATIO",
    "PixelLayout",
    "check_geometry_fields",
    "check_pixel_bytes",
    "compressed_data_length",
    "pixel_layout",
]

#: The largest expansion of deflate (zlib, gzip) data: 258 bytes from a 2-bit code, about 1032:1.
MAX_DEFLATE_RATIO = 1032
_HEADER_LIMIT = 1 << 20  # NRRD / MetaImage headers are text; ITK metadata makes them a few kB


@dataclass(frozen=True)
class PixelLayout:
    """The pixel data an image header points at.

    Attributes
    ----------
    kind
        ``"NRRD"`` or ``"MetaImage"``.
    files
        The data file(s), in order; the header file itself for attached data.
    references
        The data file names exactly as the header writes them (empty for attached data).
    offset
        Bytes before the pixel data in each data file (the header's own length for attached data,
        plus any byte skip); -1 when the data is the last bytes of the file.
    encoding
        ``"raw"``, ``"zlib"``, ``"gzip"``, ``"bzip2"``, ``"text"``, ``"hex"`` or another NRRD encoding name.
    attached
        Whether the data follows the header in the same file.
    fields
        The header's fields as written, ``(name, value)`` in order.
    """

    kind: str
    files: tuple[Path, ...]
    references: tuple[str, ...]
    offset: int
    encoding: str
    attached: bool
    fields: tuple[tuple[str, str], ...] = ()


def _header_text(path: Path) -> bytes:
    with open(path, "rb") as fp:
        return fp.read(_HEADER_LIMIT)


def _pattern_files(base: Path, spec: str, what: str, path: Path) -> tuple[list[Path], list[str]]:
    """Files of a ``"name%03d.raw first last step"`` data file pattern (MetaImage and NRRD)."""
    parts = spec.split()
    try:
        first, last = int(parts[1]), int(parts[2])
        step = int(parts[3]) if len(parts) > 3 else 1
    except (IndexError, ValueError):
        raise InputError(path, f"{what} {spec!r} is neither a file name, LIST nor a numbered pattern") from None
    if step == 0 or (last - first) / step > 1_000_000:
        raise InputError(path, f"{what} {spec!r} numbers an impossible range of files")
    try:
        names = [parts[0] % i for i in range(first, last + (1 if step > 0 else -1), step)]
    except (TypeError, ValueError):
        raise InputError(path, f"{what} {spec!r}: {parts[0]!r} is not a pattern for one file number") from None
    return [base / n for n in names], names


def _metaimage(path: Path, head: bytes) -> PixelLayout:
    fields: dict[str, str] = {}
    written: list[tuple[str, str]] = []  # as written, in order
    position = 0
    lines = head.split(b"\n")
    for index, raw in enumerate(lines):  # noqa: B007 - index is read after the loop
        position += len(raw) + 1
        key, sep, value = raw.decode("utf-8", "surrogateescape").partition("=")
        if not sep:
            continue
        written.append((key.strip(), value.strip()))
        key = key.strip().lower()
        fields[key] = value.strip()
        if key == "elementdatafile":
            break
    else:
        raise InputError(path, "not a MetaImage file: the header has no ElementDataFile line")
    reference = fields["elementdatafile"]
    compressed = fields.get("compresseddata", "false").lower() == "true"
    binary = fields.get("binarydata", "true").lower() == "true"
    encoding = "zlib" if compressed else "raw" if binary else "text"
    base = path.parent
    if reference.upper() == "LOCAL":
        return PixelLayout("MetaImage", (path,), (), position, encoding, True, tuple(written))
    try:
        skip = int(fields.get("headersize", "0"))
    except ValueError:
        raise InputError(path, f"HeaderSize {fields['headersize']!r} is not a number") from None
    if reference.upper().startswith("LIST"):
        names = [line.decode("utf-8", "surrogateescape").strip() for line in lines[index + 1 :] if line.strip()]
    elif "%" in reference:
        files, names = _pattern_files(base, reference, "ElementDataFile", path)
        return PixelLayout("MetaImage", tuple(files), tuple(names), skip, encoding, False, tuple(written))
    else:
        names = [reference]
    return PixelLayout("MetaImage", tuple(base / n for n in names), tuple(names), skip, encoding, False,
                       tuple(written))


def _nrrd(path: Path, head: bytes) -> PixelLayout:
    fields: dict[str, str] = {}
    written: list[tuple[str, str]] = []  # as written, in order
    position = 0
    lines = head.split(b"\n")
    attached_end = None
    list_names: list[str] | None = None
    for raw in lines[1:] if lines else []:
        position_next = position + len(raw) + 1
        text = raw.decode("utf-8", "surrogateescape").rstrip("\r")
        if list_names is not None:  # "data file: LIST": the rest of the header names the files
            if text.strip():
                list_names.append(text.strip())
            position = position_next
            continue
        if not text.strip():
            attached_end = position_next
            break
        position = position_next
        if text.startswith("#") or ":=" in text:
            continue
        key, sep, value = text.partition(":")
        if sep:
            written.append((key.strip(), value.strip()))
            key = key.strip().lower().replace(" ", "")
            fields[key] = value.strip()
            if key == "datafile" and value.strip().upper().startswith("LIST"):
                list_names = []
    header_length = len(lines[0]) + 1 + (attached_end if attached_end is not None else position)
    encoding = {"gz": "gzip", "bz2": "bzip2", "txt": "text", "ascii": "text"}.get(
        fields.get("encoding", "raw").lower(), fields.get("encoding", "raw").lower())
    try:
        byte_skip = int(fields.get("byteskip", "0"))
        line_skip = int(fields.get("lineskip", "0"))
    except ValueError:
        raise InputError(path, "NRRD 'byte skip' / 'line skip' is not a number") from None
    skip = -1 if byte_skip < 0 else byte_skip
    reference = fields.get("datafile")
    if reference is None:
        if attached_end is None:
            raise InputError(path, "NRRD header without data: no blank line after the header and no 'data file'")
        return PixelLayout("NRRD", (path,), (), -1 if skip < 0 else header_length + skip + line_skip, encoding, True,
                           tuple(written))
    base = path.parent
    if list_names is not None:
        names = list_names
    elif "%" in reference:
        files, names = _pattern_files(base, reference, "data file", path)
        return PixelLayout("NRRD", tuple(files), tuple(names), skip, encoding, False, tuple(written))
    else:
        names = [reference]
    return PixelLayout("NRRD", tuple(base / n for n in names), tuple(names), skip, encoding, False, tuple(written))


def pixel_layout(path: str | os.PathLike[str]) -> PixelLayout | None:
    """Parse the header of an NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``) file;
    None for other files.

    Raises
    ------
    InputError
        Unreadable file, or a header that does not say where its data is.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".mha", ".mhd")):
            return _metaimage(path, _header_text(path))
        if name.endswith((".nrrd", ".nhdr")):
            head = _header_text(path)
            if not head.startswith(b"NRRD"):
                raise InputError(path, "not an NRRD file (it does not start with 'NRRD000')")
            return _nrrd(path, head)
    except OSError as exc:
        raise InputError(path, f"unreadable ({exc.strerror or exc})") from None
    return None


#: Header fields that hold the grid: (format, field name in lower case without spaces).
_GEOMETRY_FIELDS = {
    "MetaImage": {"offset", "position", "origin", "elementspacing", "elementsize", "transformmatrix", "rotation",
                  "orientation"},
    "NRRD": {"spaceorigin", "spacedirections", "spacings", "thicknesses"},
}
_NUMBER_SPLIT = re.compile(r"[\s,()]+")


def check_geometry_fields(path: str | os.PathLike[str], layout: PixelLayout) -> None:
    """Raise InputError if a grid field of the header (origin, spacing, direction) holds anything but
    finite numbers.

    ITK does not always refuse such a header: MetaIO reads ``Offset = nan 6 7`` as an origin of
    (0, 0, 0) and NRRD allows ``nan`` spacings (meaning "unknown"), so the grid ITK reports can be an
    invention. NRRD's ``none`` (an axis that is not spatial) is allowed.

    Raises
    ------
    InputError
        Naming the field and its value as written.
    """
    wanted = _GEOMETRY_FIELDS.get(layout.kind, set())
    for name, value in layout.fields:
        if name.lower().replace(" ", "") not in wanted:
            continue
        for token in _NUMBER_SPLIT.split(value):
            if not token or token.lower() == "none":
                continue
            try:
                number = float(token)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise InputError(path, f"{layout.kind} header field {name!r} = {value!r} is not finite numbers")


def _size_text(count: int) -> str:
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def check_pixel_bytes(path: str | os.PathLike[str], layout: PixelLayout, values: int, value_bytes: int,
                      declared: str) -> None:
    """Raise InputError unless the data files of ``layout`` can hold the pixel data the header declares.

    Parameters
    ----------
    values
        Values the header declares (voxels x components).
    value_bytes
        Bytes per value.
    declared
        What the header declares, for the message (e.g. ``"48 x 48 x 42 voxels of int16"``).

    Raises
    ------
    InputError
        A data file is missing or unreadable, raw data is shorter than declared, compressed data is
        too short to decompress to the declared size, text data has too few characters.
    """
    path = Path(path)
    needed = values * value_bytes
    total = 0
    for file, reference in zip(layout.files, layout.references or (None,) * len(layout.files), strict=True):
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise InputError(path, f"its data file {printable(reference or file.name)} is missing") from None
        except OSError as exc:
            raise InputError(path, f"its data file {printable(reference or file.name)} is unreadable "
                                   f"({exc.strerror or exc})") from None
        total += size if layout.offset < 0 else max(0, size - layout.offset)
    where = ("the file" if layout.attached else "its data file" if len(layout.files) == 1
             else f"its {len(layout.files)} data files together")
    if layout.encoding == "raw":
        if total < needed:
            raise InputError(path, f"pixel data is truncated: the header declares {declared} "
                                   f"({_size_text(needed)}), {where} holds only {_size_text(total)}"
                                   + (" (or the header's size is wrong)" if needed > 4 * total else ""))
    elif layout.encoding in ("zlib", "gzip"):
        if total * MAX_DEFLATE_RATIO + 4096 < needed:
            raise InputError(path, f"the header declares {declared} ({_size_text(needed)}), more than the "
                                   f"{_size_text(total)} of compressed data in {where} can hold: the file is "
                                   "truncated or its header is wrong")
    elif layout.encoding == "hex":
        if total < 2 * needed:
            raise InputError(path, f"pixel data is truncated: the header declares {declared}, "
                                   f"{where} holds {total} hex digits")
    elif layout.encoding == "text" and values > 0 and total < 2 * values - 1:  # a digit and a separator per value
        raise InputError(path, f"pixel data is truncated: the header declares {declared}, "
                               f"{where} holds {total} characters")


def compressed_data_length(layout: PixelLayout, limit: int) -> int | None:
    """Bytes the compressed data of ``layout`` decompresses to before it ends or breaks (counting
    stops past ``limit``), or None when it is not compressed or is split over several files."""
    if layout.encoding not in ("zlib", "gzip", "bzip2") or len(layout.files) != 1 or layout.offset < 0:
        return None
    decoder: Any
    if layout.encoding == "bzip2":
        decoder = bz2.BZ2Decompressor()
    else:  # zlib stream (MetaImage) or gzip member (NRRD): partial output even when the data breaks off
        decoder = zlib.decompressobj(zlib.MAX_WBITS | (16 if layout.encoding == "gzip" else 0))
    count = 0
    try:
        with open(layout.files[0], "rb") as fp:
            fp.seek(layout.offset)
            while count <= limit and not decoder.eof:
                chunk = fp.read(1 << 16)
                if not chunk:
                    break
                count += len(decoder.decompress(chunk))
    except (OSError, EOFError, zlib.error, ValueError):
        pass
    return count


_NRRD_RE = re.compile(rb"^(\s*data\s*file\s*:\s*)(.*)$", re.IGNORECASE | re.MULTILINE)
_META_RE = re.compile(rb"^(\s*ElementDataFile\s*=\s*)(.*)$", re.IGNORECASE | re.MULTILINE)


def rename_data_file(header: bytes, kind: str, new_name: bytes) -> bytes:
    """``header`` (the bytes of a ``.mhd`` / ``.nhdr`` with one data file) naming ``new_name`` as its data file.

    Raises
    ------
    ValueError
        If the header has no data file line.
    """
    pattern = _META_RE if kind == "MetaImage" else _NRRD_RE
    out, count = pattern.subn(lambda m: m.group(1) + new_name, header, count=1)
    if count != 1:
        raise ValueError(f"no data file line in the {kind} header")
    return out
