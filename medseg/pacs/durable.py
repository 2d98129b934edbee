"""Crash-safe file writes for the DIMSE listener: a file is on disk (data and folder entry) when these return."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = [
    "durable_move",
    "durable_write",
    "make_dirs_durable",
]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of each folder it creates (the new entries survive a crash)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(folder.parent)


def durable_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it is on disk when this returns: temporary file in the same
    folder, fsync, ``os.replace``, fsync of the folder."""
    make_dirs_durable(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        durable_move(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def durable_move(source: Path, path: Path) -> None:
    """Move a finished file (on the same file system) to ``path`` so that it is on disk when this returns:
    fsync of the file, ``os.replace``, fsync of the folder."""
    make_dirs_durable(path.parent)
    with open(source, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(source, path)
    _fsync_dir(path.parent)
