"""File names SimpleITK can open, whatever bytes the user's file name holds.

SimpleITK takes file names as UTF-8 ``std::string``: a name that is not valid UTF-8 (Python holds
its bytes as surrogate escapes, ``scan_\\udcff.nii.gz``) makes ``SetFileName`` throw a C++
exception nobody catches, and the process aborts (SIGABRT). Such names are given to ITK through a
temporary folder of symbolic links with plain names (reading) or written there and moved into place
(writing). A two-file format's data file keeps its name relative to its header.

What ITK prints and raises is made medseg's one line: :func:`quiet_native_stderr` silences its C++
readers' own output on file descriptor 2, :func:`itk_reason` keeps the useful line of its exceptions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from medseg.errors import InputError
from medseg.io.layout import pixel_layout, rename_data_file

__all__ = ["itk_readable", "itk_reason", "itk_safe", "itk_writable", "quiet_native_stderr"]


def itk_safe(path: str | os.PathLike[str]) -> bool:
    """Whether SimpleITK can take ``path`` as it is (it encodes as UTF-8)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@contextlib.contextmanager
def itk_readable(path: str | os.PathLike[str]) -> Iterator[str]:
    """A name under which SimpleITK can read the image file ``path`` (``str(path)`` when it is UTF-8).

    Raises
    ------
    InputError
        If ``path`` is a two-file image whose data file lies outside its header's folder (a link in a
        temporary folder cannot reach it under the same relative name).
    """
    path = Path(path)
    if itk_safe(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="medseg-read-") as tmp:
        link = Path(tmp) / ("image" + _suffix(path))
        os.symlink(os.path.abspath(path), link)
        layout = pixel_layout(path)
        if layout is not None and not layout.attached:
            for file, reference in zip(layout.files, layout.references, strict=True):
                if os.path.isabs(reference):
                    continue
                target = Path(tmp) / reference
                if ".." in Path(reference).parts:
                    raise InputError(path, "the file name is not valid UTF-8 and its data file lies outside its "
                                           "folder; rename the file (UTF-8) to read it")
                target.parent.mkdir(parents=True, exist_ok=True)
                if not os.path.lexists(target):
                    os.symlink(os.path.abspath(file), target)
        yield str(link)


@contextlib.contextmanager
def itk_writable(path: str | os.PathLike[str]) -> Iterator[str]:
    """A name SimpleITK can write to; the file(s) written there end up at ``path`` when the block ends.

    A ``.mhd`` / ``.nhdr`` written this way names its data file after ``path`` (``<stem>.zraw``, ...).
    On an exception nothing is moved.
    """
    path = Path(path)
    if itk_safe(path):
        yield str(path)
        return
    suffix = _suffix(path)
    stem = path.name[: -len(suffix)] if suffix else path.name
    with tempfile.TemporaryDirectory(prefix="medseg-write-") as tmp:
        written = Path(tmp) / ("image" + suffix)
        yield str(written)
        layout = pixel_layout(written)
        if layout is not None and not layout.attached:  # .mhd / .nhdr: <stem>.zraw, named in the header
            if len(layout.files) != 1:
                raise InputError(path, "cannot write a multi-file image under a file name that is not UTF-8")
            reference = layout.references[0]
            new_name = stem + reference[len("image"):] if reference.startswith("image") else f"{stem}_{reference}"
            written.write_bytes(rename_data_file(written.read_bytes(), layout.kind, os.fsencode(new_name)))
            shutil.move(str(layout.files[0]), str(path.parent / new_name))
        shutil.move(str(written), str(path))


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence what ITK's C++ readers print straight to file descriptor 2 (MetaIO, NIfTI warnings):
    medseg reports read failures itself, as one line.

    File descriptor 2 belongs to the process: readers in several threads (a caching dataset's pool)
    share one redirection, made by the first to enter and undone by the last to leave, so that a
    thread never saves the silenced descriptor as the one to restore.
    """
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            sys.stderr.flush()
            try:
                saved = os.dup(2)
            except OSError:  # no usable stderr: nothing to silence
                saved = -1
            if saved >= 0:
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, 2)
                finally:
                    os.close(devnull)
            _quiet_saved = saved
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved >= 0:
                os.dup2(_quiet_saved, 2)
                os.close(_quiet_saved)
                _quiet_saved = -1


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved = -1


def itk_reason(exc: BaseException) -> str:
    """The useful last line of an ITK exception (they carry file/line noise)."""
    text = str(exc).strip().splitlines()
    for line in reversed(text):
        line = line.strip()
        if line and not line.startswith(("Exception thrown in", "File ", "Line ")):
            return line.split("ERROR:")[-1].strip()[:200]
    return type(exc).__name__
