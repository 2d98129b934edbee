"""Undo a training run's writes when it fails before it produced anything worth keeping."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


class RunFolderGuard:
    """Remember what exists under ``run_dir`` now; :meth:`rollback` removes only what was created since.

    A run folder that did not exist is removed whole (with the parent folders created for it); in
    one that existed (an empty ``--out``
    folder, a bundle trained in place, a run being resumed) only the new files and folders go.
    Files that existed are never removed (training replaces them atomically, so none is left half
    written).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.existed = run_dir.exists()
        #: the outermost folder that does not exist yet (``run_dir`` or a missing parent of it)
        self.top = run_dir
        while not self.top.parent.exists() and self.top.parent != self.top:
            self.top = self.top.parent
        self.before: frozenset[Path] = frozenset(run_dir.rglob("*")) if self.existed else frozenset()

    def created(self) -> list[Path]:
        """Paths created under ``run_dir`` since the guard was made, deepest first."""
        if not self.run_dir.exists():
            return []
        new = [p for p in self.run_dir.rglob("*") if p not in self.before]
        return sorted(new, key=lambda p: len(p.parts), reverse=True)

    def rollback(self) -> None:
        if not self.existed:
            shutil.rmtree(self.top, ignore_errors=True)
            log.debug("removed the run folder %s this failed run created", self.top)
            return
        for path in self.created():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        log.debug("removed what this failed run wrote in %s", self.run_dir)
