"""Exceptions raised by medseg.

Every error a user can cause is a :class:`MedsegError`; the CLI prints its message as
``medseg: error: <message>`` and exits with :attr:`MedsegError.exit_code` (2 for bad input,
1 for internal failures).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

__all__ = [
    "BundleError",
    "DicomError",
    "InputError",
    "MedsegError",
    "PacsError",
    "one_line",
    "printable",
    "root_cause",
    "unwrapped",
]


def printable(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """``path`` as it may be shown on one line of a message.

    A name of printable text is returned unchanged. Any other (a newline, a control or format
    character, bytes that are not UTF-8, which Python holds as surrogate escapes) is shown as a
    quoted Python string literal: ``'scan_\\xff\\xfe.nii.gz'``, ``'a\\nb.nii.gz'``, so a hostile
    file name can neither break a message into several lines nor hide what it is.
    """
    text = os.fsdecode(os.fspath(path))
    if text.isprintable():  # surrogate escapes (undecodable bytes) are not printable
        return text
    shown = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (os.fsdecode's surrogate escape)
            shown.append(f"\\x{code - 0xDC00:02x}")
        elif char in "\\'" or not char.isprintable():
            shown.append(repr(char)[1:-1] if char != "'" else "\\'")
        else:
            shown.append(char)
    return "'" + "".join(shown) + "'"


def one_line(message: object, limit: int | None = None) -> str:
    """``str(message)`` on one line: line breaks and runs of white space become single spaces (library
    messages often span lines); cut to ``limit`` characters, ending in ``...``, if given."""
    text = " ".join(str(message).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def root_cause(exc: BaseException) -> BaseException:
    """The first :class:`MedsegError` in the chain of causes of ``exc`` (``exc`` included), else the
    innermost exception of the chain: what a wrapper (MONAI's ``Compose``, its config parser) hides.

    The chain is followed as Python prints it: ``__cause__``, else ``__context__`` unless it was
    suppressed (``raise ... from None``).
    """
    seen: set[int] = set()
    while id(exc) not in seen and not isinstance(exc, MedsegError):
        seen.add(id(exc))
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            break
        exc = inner
    return exc


@contextlib.contextmanager
def unwrapped(wrap: Callable[[BaseException], MedsegError]) -> Iterator[None]:
    """Run the block; a :class:`MedsegError` raised in it, or hidden in the cause chain of a wrapper's
    exception (MONAI's ``Compose``, its config parser and runner), is raised as it is, any other
    exception becomes ``wrap(<its root cause>)`` (chained to the original)."""
    try:
        yield
    except MedsegError:
        raise
    except Exception as exc:
        cause = root_cause(exc)
        if isinstance(cause, MedsegError):
            raise cause from exc
        raise wrap(cause) from exc


class MedsegError(Exception):
    """Base class of medseg's errors; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(MedsegError):
    """Bad user input: a missing, unreadable, corrupt or inconsistent file or folder.

    The message always names the file first: ``<path>: <problem>``, the path made printable on one
    line by :func:`printable` (:attr:`path` keeps it as given).
    """

    exit_code = 2

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{printable(self.path)}: {problem}")


class DicomError(InputError):
    """A DICOM file or series that cannot be used (missing pixel data, unsupported syntax, ...)."""


class BundleError(MedsegError):
    """A bundle or run folder whose configuration is missing, invalid or refused."""

    exit_code = 2


class PacsError(MedsegError):
    """A PACS peer refused, failed or could not be reached."""
