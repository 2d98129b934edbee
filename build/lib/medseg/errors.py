"""Exceptions raised by medseg.

Every error a user can cause is a :class:`MedsegError`; the CLI prints its message as
``medseg: error: <message>`` and exits with :attr:`MedsegError.exit_code` (2 for bad input,
1 for internal failures).
"""

from __future__ import annotations

import os


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

    The message always names the file first: ``<path>: <problem>``.
    """

    exit_code = 2

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")


class DicomError(InputError):
    """A DICOM file or series that cannot be used (missing pixel data, unsupported syntax, ...)."""


class BundleError(MedsegError):
    """A bundle or run folder whose configuration is missing, invalid or refused."""

    exit_code = 2


class PacsError(MedsegError):
    """A PACS peer refused, failed or could not be reached."""
