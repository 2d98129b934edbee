"""The DIMSE listener's job journal: one row per series, in SQLite (WAL, ``synchronous=FULL``).

States of a series::

    received --(quiet for idle seconds)--> running --(SEG written)--> sending --(C-STORE ok)--> done
        ^                                    |                          |
        |                                    +--> failed                +--> sending (retry later) / failed
        +---- new instances of a done / failed series reopen it

Every transition is a committed (fsynced) transaction. On start, :meth:`Journal.recover` puts
series that were ``running`` when the process died back to ``received`` (the job runs again; nothing
was sent yet), and ``sending`` series are sent again *with the same SEG file*: the only window for a
duplicate is a crash between the peer's C-STORE success and the ``done`` commit, and the resent SEG
has the same SOPInstanceUID, which a PACS stores once.

The journal holds UIDs, counts, times and error messages, never patient data.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STATES = ("received", "running", "sending", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid     TEXT PRIMARY KEY,
    study_uid      TEXT NOT NULL,
    modality       TEXT NOT NULL DEFAULT '',
    state          TEXT NOT NULL,
    instances      INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received  REAL NOT NULL,
    runs           INTEGER NOT NULL DEFAULT 0,
    sends          INTEGER NOT NULL DEFAULT 0,
    next_attempt   REAL NOT NULL DEFAULT 0,
    reopen         INTEGER NOT NULL DEFAULT 0,
    seg_path       TEXT,
    seg_sop_uid    TEXT,
    seg_series_uid TEXT,
    error          TEXT,
    updated        REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid    TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    received   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series (state, last_received);
"""


@dataclass(frozen=True)
class SeriesRecord:
    """One series as the journal knows it."""

    series_uid: str
    study_uid: str
    modality: str
    state: str
    instances: int
    first_received: float
    last_received: float
    runs: int
    sends: int
    next_attempt: float
    reopen: bool
    seg_path: str | None
    seg_sop_uid: str | None
    seg_series_uid: str | None
    error: str | None


class Journal:
    """Thread-safe journal of received series and their jobs (``<storage>/journal.sqlite``).

    Raises
    ------
    sqlite3.Error
        The database cannot be opened or written (callers report it).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # every commit fsyncs the write-ahead log
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @staticmethod
    def _record(row: sqlite3.Row | None) -> SeriesRecord | None:
        if row is None:
            return None
        return SeriesRecord(row["series_uid"], row["study_uid"], row["modality"], row["state"], row["instances"],
                            row["first_received"], row["last_received"], row["runs"], row["sends"],
                            row["next_attempt"], bool(row["reopen"]), row["seg_path"], row["seg_sop_uid"],
                            row["seg_series_uid"], row["error"])

    def get(self, series_uid: str) -> SeriesRecord | None:
        """The series' record, ``None`` if unknown."""
        with self._lock:
            row = self._db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return self._record(row)

    def all(self) -> list[SeriesRecord]:
        """Every series, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM series ORDER BY first_received").fetchall()
        return [r for r in map(self._record, rows) if r is not None]

    def counts(self) -> dict[str, int]:
        """Number of series per state."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM series GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {row["state"]: row["n"] for row in rows}

    def has_instance(self, sop_uid: str) -> bool:
        """Whether an instance with this SOPInstanceUID was recorded."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone() is not None

    def record_instance(self, study_uid: str, series_uid: str, sop_uid: str, modality: str = "",
                        now: float | None = None) -> str:
        """Record a received (and already durably written) instance.

        Returns
        -------
        str
            ``"new"`` (first instance of a new series), ``"added"``, ``"duplicate"`` (a SOP
            instance already recorded: a re-send; restarts the quiet timer of a series still being
            received, does not reopen a done one) or ``"reopened"`` (a new instance of a done or
            failed series: it is segmented again; if it arrives while the job runs, once the job ends).
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            known = db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone() is not None
            if known:
                if row is not None and row["state"] == "received":
                    db.execute("UPDATE series SET last_received = ?, updated = ? WHERE series_uid = ?",
                               (now, now, series_uid))
                return "duplicate"
            db.execute("INSERT INTO instances (sop_uid, series_uid, received) VALUES (?, ?, ?)",
                       (sop_uid, series_uid, now))
            if row is None:
                db.execute("INSERT INTO series (series_uid, study_uid, modality, state, instances, first_received, "
                           "last_received, updated) VALUES (?, ?, ?, 'received', 1, ?, ?, ?)",
                           (series_uid, study_uid, modality, now, now, now))
                return "new"
            state = row["state"]
            if state in ("running", "sending"):
                db.execute("UPDATE series SET instances = instances + 1, last_received = ?, reopen = 1, updated = ? "
                           "WHERE series_uid = ?", (now, now, series_uid))
                return "reopened"
            if state in ("done", "failed"):
                db.execute("UPDATE series SET state = 'received', instances = instances + 1, last_received = ?, "
                           "error = NULL, updated = ? WHERE series_uid = ?", (now, now, series_uid))
                return "reopened"
            db.execute("UPDATE series SET instances = instances + 1, last_received = ?, updated = ? "
                       "WHERE series_uid = ?", (now, now, series_uid))
            return "added"

    def adopt(self, study_uid: str, series_uid: str, sop_uids: list[str], last_received: float) -> None:
        """Record a series folder found on disk but missing from the journal (a crash between the
        instance's fsync and the journal commit); it is then segmented like any received series."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM series WHERE series_uid = ?", (series_uid,)).fetchone() is not None:
                return
            db.executemany("INSERT OR IGNORE INTO instances (sop_uid, series_uid, received) VALUES (?, ?, ?)",
                           [(sop, series_uid, last_received) for sop in sop_uids])
            db.execute("INSERT INTO series (series_uid, study_uid, state, instances, first_received, last_received, "
                       "updated) VALUES (?, ?, 'received', ?, ?, ?, ?)",
                       (series_uid, study_uid, len(sop_uids), last_received, last_received, time.time()))

    def recover(self) -> list[SeriesRecord]:
        """After a restart: ``running`` series go back to ``received`` (their job runs again),
        ``sending`` series are due at once. Returns the series still to do (received or sending)."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE series SET state = 'received', updated = ? WHERE state = 'running'", (now,))
            db.execute("UPDATE series SET next_attempt = 0, updated = ? WHERE state = 'sending'", (now,))
            rows = db.execute("SELECT * FROM series WHERE state IN ('received', 'sending') "
                              "ORDER BY last_received").fetchall()
        return [r for r in map(self._record, rows) if r is not None]

    def next_due(self, idle_seconds: float, now: float | None = None) -> SeriesRecord | None:
        """The oldest series whose job or send is due: received and quiet for ``idle_seconds``, or
        sending with its retry time reached."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM series WHERE (state = 'received' AND last_received <= ?) "
                "OR (state = 'sending' AND next_attempt <= ?) ORDER BY last_received LIMIT 1",
                (now - idle_seconds, now)).fetchone()
        return self._record(row)

    def mark_running(self, series_uid: str) -> None:
        """The job starts (committed before it starts)."""
        with self._transaction() as db:
            db.execute("UPDATE series SET state = 'running', runs = runs + 1, reopen = 0, error = NULL, updated = ? "
                       "WHERE series_uid = ?", (time.time(), series_uid))

    def mark_sending(self, series_uid: str, seg_path: str | os.PathLike[str], seg_sop_uid: str,
                     seg_series_uid: str) -> None:
        """The SEG is written (durably) and is to be sent; committed before the send."""
        with self._transaction() as db:
            db.execute("UPDATE series SET state = 'sending', seg_path = ?, seg_sop_uid = ?, seg_series_uid = ?, "
                       "next_attempt = 0, sends = 0, updated = ? WHERE series_uid = ?",
                       (os.fspath(seg_path), seg_sop_uid, seg_series_uid, time.time(), series_uid))

    def mark_send_failed(self, series_uid: str, error: str, retry_at: float | None) -> None:
        """A send failed: retried at ``retry_at``, or ``failed`` when ``None``."""
        now = time.time()
        with self._transaction() as db:
            if retry_at is None:
                self._finish(db, series_uid, "failed", error, now, sends=True)
            else:
                db.execute("UPDATE series SET sends = sends + 1, next_attempt = ?, error = ?, updated = ? "
                           "WHERE series_uid = ?", (retry_at, error, now, series_uid))

    def mark_done(self, series_uid: str) -> None:
        """The SEG was accepted by the destination (committed right after the C-STORE response)."""
        with self._transaction() as db:
            self._finish(db, series_uid, "done", None, time.time(), sends=True)

    def mark_failed(self, series_uid: str, error: str) -> None:
        """The job failed; the received instances stay on disk."""
        with self._transaction() as db:
            self._finish(db, series_uid, "failed", error, time.time(), sends=False)

    @staticmethod
    def _finish(db: sqlite3.Connection, series_uid: str, state: str, error: str | None, now: float,
                sends: bool) -> None:
        # instances that arrived while the job ran reopen the series once it ends
        db.execute("UPDATE series SET state = CASE WHEN reopen THEN 'received' ELSE ? END, reopen = 0, error = ?, "
                   f"sends = sends + {1 if sends else 0}, updated = ? WHERE series_uid = ?",
                   (state, error, now, series_uid))
