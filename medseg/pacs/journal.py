"""The DIMSE listener's job journal: one row per series, in SQLite (WAL, ``synchronous=FULL``).

States of a series::

    received --(complete: no open association, quiet)--> running --(SEG written)--> sending --(C-STORE ok)--> done
        ^                                                   |                         |
        |                                                   +--> failed               +--> retry later / failed
        +---- new instances of a done / failed series reopen it (the next SEG is a revision if one was sent)
        +---- new instances while running: the job's SEG is discarded, never sent

``quiet_since`` is when the series' quiet time started: its last instance, the close of the last
association that delivered to it (:meth:`Journal.touch`), or the listener's restart, whichever is
latest. ``revision`` is the number of the last SEG that was committed for sending (0: none yet); the
next job builds revision ``revision + 1``, so a SEG made after instances arrived for a series whose
SEG was sent (or being sent) is revision 2, 3, ... and a restart keeps the count.

Every transition is a committed (fsynced) transaction. On start, :meth:`Journal.recover` puts
series that were ``running`` when the process died back to ``received`` (the job runs again with the
same revision number; nothing was sent yet), every ``received`` series is quiet from the restart,
and ``sending`` series are sent again *with the same SEG file*: the only window for a duplicate is a
crash between the peer's C-STORE success and the ``done`` commit, and the resent SEG has the same
SOPInstanceUID, which a PACS stores once.

The journal holds UIDs, counts, times and error messages, never patient data.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "STATES",
    "Journal",
    "SeriesRecord",
]

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
    updated        REAL NOT NULL,
    quiet_since    REAL NOT NULL DEFAULT 0,
    revision       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid    TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    received   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series (state, last_received);
"""
# columns added after the first release: (name, declaration, how existing rows are filled)
_ADDED_COLUMNS = (
    ("quiet_since", "REAL NOT NULL DEFAULT 0", "UPDATE series SET quiet_since = last_received"),
    ("revision", "INTEGER NOT NULL DEFAULT 0", "UPDATE series SET revision = 1 WHERE seg_path IS NOT NULL"),
)


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
    quiet_since: float = 0.0
    revision: int = 0


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
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns a journal written by an older medseg lacks."""
        with self._transaction() as db:
            have = {row["name"] for row in db.execute("PRAGMA table_info(series)")}
            for name, declaration, fill in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE series ADD COLUMN {name} {declaration}")
                    db.execute(fill)

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
                            row["seg_series_uid"], row["error"], row["quiet_since"], row["revision"])

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
        return dict.fromkeys(STATES, 0) | {row["state"]: row["n"] for row in rows}

    def has_instance(self, sop_uid: str) -> bool:
        """Whether an instance with this SOPInstanceUID was recorded."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone() is not None

    def instances_of(self, series_uid: str) -> set[str]:
        """The SOPInstanceUIDs recorded for a series."""
        with self._lock:
            rows = self._db.execute("SELECT sop_uid FROM instances WHERE series_uid = ?", (series_uid,)).fetchall()
        return {row["sop_uid"] for row in rows}

    def record_instance(self, study_uid: str, series_uid: str, sop_uid: str, modality: str = "",
                        now: float | None = None) -> str:
        """Record a received (and already durably written) instance; its series is quiet from ``now``.

        Returns
        -------
        str
            ``"new"`` (first instance of a new series), ``"added"``, ``"duplicate"`` (a SOP instance
            already recorded: a re-send; restarts the quiet time of a series still being received, does
            not reopen a done one), ``"revision"`` (the first new instance of a series whose SEG was
            sent or is being sent: once quiet again it gets a new SEG, revision ``revision + 1``) or
            ``"reopened"`` (the first new instance of a series whose job runs, whose running job's SEG
            is then discarded, or whose job failed: it is segmented again, same revision number).
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            return self._record_instance(db, study_uid, series_uid, sop_uid, modality, now)

    @staticmethod
    def _record_instance(db: sqlite3.Connection, study_uid: str, series_uid: str, sop_uid: str, modality: str,
                         now: float) -> str:
        row = db.execute("SELECT state, reopen, revision FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        known = db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone() is not None
        if known:
            if row is not None and row["state"] == "received":
                db.execute("UPDATE series SET quiet_since = MAX(quiet_since, ?), updated = ? WHERE series_uid = ?",
                           (now, now, series_uid))
            return "duplicate"
        db.execute("INSERT INTO instances (sop_uid, series_uid, received) VALUES (?, ?, ?)", (sop_uid, series_uid, now))
        if row is None:
            db.execute("INSERT INTO series (series_uid, study_uid, modality, state, instances, first_received, "
                       "last_received, quiet_since, updated) VALUES (?, ?, ?, 'received', 1, ?, ?, ?, ?)",
                       (series_uid, study_uid, modality, now, now, now, now))
            return "new"
        state, was_reopened, sent = row["state"], bool(row["reopen"]), row["revision"] > 0
        outcome = "added"
        if state in ("running", "sending"):
            reopen_sql = ", reopen = 1"
            if not was_reopened:
                outcome = "revision" if state == "sending" else "reopened"
        elif state in ("done", "failed"):
            reopen_sql = ", state = 'received', reopen = 0, error = NULL"
            outcome = "revision" if sent else "reopened"
        else:
            reopen_sql = ""
        db.execute(f"UPDATE series SET instances = instances + 1, last_received = ?, "  # noqa: S608 - fixed text
                   f"quiet_since = MAX(quiet_since, ?), updated = ?{reopen_sql} WHERE series_uid = ?",
                   (now, now, now, series_uid))
        return outcome

    def touch(self, series_uids: Iterable[str], now: float | None = None) -> None:
        """An association that delivered to these series closed: their quiet time starts (again) now."""
        now = time.time() if now is None else now
        uids = [(now, now, uid) for uid in series_uids]
        if not uids:
            return
        with self._transaction() as db:
            db.executemany("UPDATE series SET quiet_since = MAX(quiet_since, ?), updated = ? WHERE series_uid = ?",
                           uids)

    def adopt(self, study_uid: str, series_uid: str, sop_uids: Iterable[str], now: float | None = None) -> int:
        """Record instance files found on disk but missing from the journal (a crash between the
        instance's fsync and the journal commit: never acknowledged, but kept). They count as received
        ``now`` (a known series is reopened as by :meth:`record_instance`). Returns how many were new."""
        now = time.time() if now is None else now
        added = 0
        with self._transaction() as db:
            for sop in sop_uids:
                if self._record_instance(db, study_uid, series_uid, sop, "", now) != "duplicate":
                    added += 1
        return added

    def recover(self, now: float | None = None) -> list[SeriesRecord]:
        """After a restart: ``running`` series go back to ``received`` (their job runs again); every
        ``received`` series is quiet from ``now`` (no association survived the restart, but a sender
        cut off by it may reconnect); ``sending`` series are due at once. Returns the series still to
        do (received or sending)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("UPDATE series SET state = 'received', reopen = 0, updated = ? WHERE state = 'running'", (now,))
            db.execute("UPDATE series SET quiet_since = MAX(quiet_since, ?), updated = ? WHERE state = 'received'",
                       (now, now))
            db.execute("UPDATE series SET next_attempt = 0, updated = ? WHERE state = 'sending'", (now,))
            rows = db.execute("SELECT * FROM series WHERE state IN ('received', 'sending') "
                              "ORDER BY quiet_since").fetchall()
        return [r for r in map(self._record, rows) if r is not None]

    def next_due(self, idle_seconds: float, busy: Collection[str] = (), now: float | None = None
                 ) -> SeriesRecord | None:
        """The series whose job or send is due, oldest first: ``received``, not in ``busy`` (series an
        open association delivered to) and quiet for ``idle_seconds``; or ``sending`` with its retry
        time reached."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM series WHERE (state = 'received' AND quiet_since <= ?) "
                "OR (state = 'sending' AND next_attempt <= ?) "
                "ORDER BY CASE state WHEN 'sending' THEN next_attempt ELSE quiet_since END",
                (now - idle_seconds, now)).fetchall()
        for row in rows:
            if row["state"] == "sending" or row["series_uid"] not in busy:
                return self._record(row)
        return None

    def mark_running(self, series_uid: str) -> None:
        """The job starts (committed before it starts)."""
        with self._transaction() as db:
            db.execute("UPDATE series SET state = 'running', runs = runs + 1, reopen = 0, error = NULL, updated = ? "
                       "WHERE series_uid = ?", (time.time(), series_uid))

    def mark_sending(self, series_uid: str, seg_path: str | os.PathLike[str], seg_sop_uid: str,
                     seg_series_uid: str, revision: int) -> bool:
        """The SEG (revision ``revision``) is written durably and is to be sent; committed before the
        send. Returns ``False`` instead when instances arrived while the job ran: that SEG lacks them
        and is not to be sent; the series is ``received`` again (same revision number next time)."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT reopen FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is not None and row["reopen"]:
                db.execute("UPDATE series SET state = 'received', reopen = 0, updated = ? WHERE series_uid = ?",
                           (now, series_uid))
                return False
            db.execute("UPDATE series SET state = 'sending', seg_path = ?, seg_sop_uid = ?, seg_series_uid = ?, "
                       "revision = ?, next_attempt = 0, sends = 0, updated = ? WHERE series_uid = ?",
                       (os.fspath(seg_path), seg_sop_uid, seg_series_uid, revision, now, series_uid))
            return True

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
        # instances that arrived while the job ran or the SEG was sent reopen the series once it ends
        db.execute("UPDATE series SET state = CASE WHEN reopen THEN 'received' ELSE ? END, reopen = 0, error = ?, "
                   "sends = sends + ?, updated = ? WHERE series_uid = ?",
                   (state, error, 1 if sends else 0, now, series_uid))
