"""The listener journal's completeness and revision rules, without a network (times are given)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from medseg.pacs.journal import Journal


@pytest.fixture
def journal(tmp_path: Path):
    opened = Journal(tmp_path / "journal.sqlite")
    yield opened
    opened.close()


def receive(journal: Journal, series: str, count: int, start: int = 0, now: float = 0.0) -> list[str]:
    return [journal.record_instance("9.9", series, f"{series}.{i}", "CT", now=now) for i in range(start, start + count)]


def test_quiet_time_runs_from_the_later_of_last_instance_and_association_close(journal: Journal) -> None:
    receive(journal, "1.1", 3, now=100)
    assert journal.next_due(5, now=104) is None
    assert journal.next_due(5, now=105).series_uid == "1.1"
    journal.touch(["1.1"], now=110)  # the association that delivered them closed later
    assert journal.next_due(5, now=114) is None
    assert journal.next_due(5, now=115).series_uid == "1.1"
    journal.touch(["1.1"], now=90)  # an older close never shortens the wait
    assert journal.get("1.1").quiet_since == 110


def test_busy_series_are_never_due_but_others_are(journal: Journal) -> None:
    receive(journal, "1.1", 2, now=0)
    receive(journal, "1.2", 2, now=1)
    assert journal.next_due(1, busy={"1.1"}, now=50).series_uid == "1.2"
    assert journal.next_due(1, busy={"1.1", "1.2"}, now=50) is None


def test_instances_for_a_sent_series_make_a_revision_that_survives_a_restart(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    receive(journal, "1.1", 4, now=0)
    journal.mark_running("1.1")
    assert journal.mark_sending("1.1", tmp_path / "rev1.dcm", "5.1", "6.1", revision=1)
    # an instance arrives while revision 1 is being sent: the send goes on, the series reopens after it
    assert receive(journal, "1.1", 2, start=4, now=10) == ["revision", "added"]
    assert journal.get("1.1").state == "sending"
    journal.mark_done("1.1")
    record = journal.get("1.1")
    assert (record.state, record.revision, record.instances, record.quiet_since) == ("received", 1, 6, 10)
    journal.close()

    journal = Journal(tmp_path / "journal.sqlite")  # restart: the revision count is kept
    (pending,) = journal.recover(now=20)
    assert pending.revision == 1 and pending.quiet_since == 20  # quiet from the restart
    assert journal.next_due(5, now=24) is None
    journal.mark_running("1.1")
    assert journal.mark_sending("1.1", tmp_path / "rev2.dcm", "5.2", "6.2", revision=2)
    journal.mark_done("1.1")
    assert receive(journal, "1.1", 1, start=6, now=30) == ["revision"]  # a done series reopens
    assert journal.get("1.1").revision == 2
    journal.close()


def test_instances_arriving_during_the_job_discard_its_seg(journal: Journal, tmp_path: Path) -> None:
    receive(journal, "1.1", 3, now=0)
    journal.mark_running("1.1")
    assert receive(journal, "1.1", 2, start=3, now=5) == ["reopened", "added"]
    assert not journal.mark_sending("1.1", tmp_path / "partial.dcm", "5.1", "6.1", revision=1)
    record = journal.get("1.1")
    assert (record.state, record.revision, record.seg_path, record.instances) == ("received", 0, None, 5)


def test_a_failed_job_reopened_by_new_instances_is_not_a_revision(journal: Journal) -> None:
    receive(journal, "1.1", 3, now=0)
    journal.mark_running("1.1")
    journal.mark_failed("1.1", "a slice is missing")
    assert receive(journal, "1.1", 1, start=3, now=5) == ["reopened"]
    assert journal.get("1.1").state == "received" and journal.get("1.1").revision == 0


def test_restart_puts_running_jobs_back_and_makes_received_series_quiet_from_now(journal: Journal,
                                                                                 tmp_path: Path) -> None:
    receive(journal, "1.1", 2, now=0)
    receive(journal, "1.2", 2, now=0)
    receive(journal, "1.3", 2, now=0)
    journal.mark_running("1.1")
    journal.mark_running("1.3")
    assert journal.mark_sending("1.3", tmp_path / "seg.dcm", "5.3", "6.3", revision=1)
    pending = {r.series_uid: r for r in journal.recover(now=1000)}
    assert {uid: r.state for uid, r in pending.items()} == {"1.1": "received", "1.2": "received", "1.3": "sending"}
    assert pending["1.1"].quiet_since == pending["1.2"].quiet_since == 1000
    assert journal.next_due(30, now=1010).series_uid == "1.3"  # the send is due at once
    journal.mark_done("1.3")
    assert journal.next_due(30, now=1029) is None
    assert journal.next_due(30, now=1030).series_uid in ("1.1", "1.2")


def test_adopting_files_the_journal_lacks(journal: Journal) -> None:
    assert journal.adopt("9.9", "1.1", ["1.1.0", "1.1.1"], now=7) == 2
    assert journal.get("1.1").instances == 2 and journal.get("1.1").quiet_since == 7
    receive(journal, "1.2", 2, now=0)
    journal.mark_running("1.2")
    journal.mark_sending("1.2", "seg.dcm", "5", "6", revision=1)
    journal.mark_done("1.2")
    assert journal.adopt("9.9", "1.2", ["1.2.0", "1.2.1", "1.2.9"], now=8) == 1  # one file was never journalled
    assert journal.get("1.2").state == "received" and journal.instances_of("1.2") == {"1.2.0", "1.2.1", "1.2.9"}


def test_a_journal_of_the_previous_format_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with sqlite3.connect(path) as db:  # the schema medseg wrote before the revision columns
        db.executescript("""
            CREATE TABLE series (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
                modality TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, instances INTEGER NOT NULL DEFAULT 0,
                first_received REAL NOT NULL, last_received REAL NOT NULL, runs INTEGER NOT NULL DEFAULT 0,
                sends INTEGER NOT NULL DEFAULT 0,
                next_attempt REAL NOT NULL DEFAULT 0, reopen INTEGER NOT NULL DEFAULT 0, seg_path TEXT,
                seg_sop_uid TEXT, seg_series_uid TEXT, error TEXT, updated REAL NOT NULL);
            CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, received REAL NOT NULL);
            INSERT INTO series VALUES ('1.1', '9.9', 'CT', 'done', 2, 0, 3, 1, 1, 0, 0, 'seg.dcm', '5', '6', NULL, 3);
            INSERT INTO series VALUES ('1.2', '9.9', 'CT', 'received', 2, 0, 4, 0, 0, 0, 0, NULL, NULL, NULL, NULL, 4);
        """)
    journal = Journal(path)
    assert journal.get("1.1").revision == 1 and journal.get("1.2").revision == 0
    assert journal.get("1.2").quiet_since == 4
    assert journal.record_instance("9.9", "1.1", "1.1.new", "CT", now=9) == "revision"
    journal.close()
