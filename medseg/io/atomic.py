"""Atomic output: write into a temporary folder beside the target, then ``os.replace``.

A failure (or Ctrl-C) while writing leaves no partial output file behind, and an existing file
is only replaced once the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write_text",
]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path with the same file name as ``target``; move it into place on success.

    Every file the writer creates in the temporary folder is moved beside ``target`` (so
    two-file formats such as MetaImage ``.mhd`` + ``.raw`` work too). On an exception the
    temporary folder is removed and the exception propagates.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp_dir / target.name
        produced = sorted(tmp_dir.iterdir(), key=lambda p: p.name == target.name)
        # the named file last, so that a header never points at a data file not yet in place
        for item in produced:
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)
