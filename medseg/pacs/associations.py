"""Which open DICOM associations delivered instances of which series (the listener's completeness rule).

A series is not segmented while any association that delivered an instance of it is open. An
association counts as closed once the listener saw it end (``EVT_RELEASED`` or ``EVT_ABORTED``, both
fired by the association's own thread after its last C-STORE was handled) or once that thread has
ended for any other reason (a peer that dropped the TCP connection, a network timeout, an abort the
events did not report): :meth:`OpenAssociations.prune` finds those. The state lives in memory only:
after a restart no association is open, and the journal makes replayed series quiet from the restart.
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = [
    "OpenAssociations",
]


class _Association(Protocol):
    def is_alive(self) -> bool: ...


class OpenAssociations:
    """Thread-safe map from open associations to the series they delivered instances of.

    ``lock`` is held by callers that must decide atomically (the worker: "is this series free?" and
    "mark it running"; the C-STORE handler: "this association delivers to that series").
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._series: dict[_Association, set[str]] = {}

    def delivered(self, assoc: _Association, series_uid: str) -> None:
        """``assoc`` delivered (or is about to deliver) an instance of ``series_uid``."""
        with self.lock:
            self._series.setdefault(assoc, set()).add(series_uid)

    def closed(self, assoc: _Association) -> set[str]:
        """``assoc`` ended; returns the series it had delivered to (empty if none or already closed)."""
        with self.lock:
            return self._series.pop(assoc, set())

    def prune(self) -> set[str]:
        """Forget associations whose thread has ended without a close event; returns their series."""
        with self.lock:
            ended = [assoc for assoc in self._series if not assoc.is_alive()]
            series: set[str] = set()
            for assoc in ended:
                series |= self.closed(assoc)
            return series

    def busy(self) -> set[str]:
        """Series that an association still open delivered instances of."""
        with self.lock:
            return set().union(*self._series.values()) if self._series else set()

    def count(self) -> int:
        """Number of open associations that delivered at least one instance."""
        with self.lock:
            return len(self._series)

    def __repr__(self) -> str:
        return f"OpenAssociations({self.count()} open, {len(self.busy())} series busy)"

