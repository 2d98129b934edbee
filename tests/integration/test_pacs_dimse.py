"""``medseg pacs listen`` as a subprocess: dcmtk's storescu plays the modality, a real Orthanc receives
the SEGs (it accepts C-STORE only from the listener's AE title)."""

from __future__ import annotations

import io
import os
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

from medseg.pacs.journal import Journal
from tests.integration.dimse import (
    MODALITY_AET,
    SECRETS,
    ListenerProcess,
    segs_in_study,
    state,
    storescu,
    uids,
    wait_for_seg,
    wait_for_state,
)
from tests.integration.orthanc import Orthanc, require_tools, small_series
from tests.tools import HANG_GUARD

pytestmark = [pytest.mark.pacs, require_tools("orthanc", "dicomweb", "storescu")]


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, untrained_run: Path):
    folder = tmp_path_factory.mktemp("listener")
    process = ListenerProcess(folder / "storage", untrained_run, orthanc, idle=2, log=folder / "listener.log")
    yield process
    if process.process.poll() is None:
        process.kill()


def test_series_is_stored_segmented_and_forwarded(listener: ListenerProcess, orthanc: Orthanc, tmp_path: Path) -> None:
    files = small_series(tmp_path / "ct", "ct", seed=3)
    study_uid, series_uid, _ = uids(files[0])
    result = storescu(listener.port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    # acknowledged means on disk: every instance is in the series folder the moment storescu returns
    stored = sorted(p.name for p in (listener.storage / "incoming" / study_uid / series_uid).glob("*.dcm"))
    assert stored == sorted(f"{uids(f)[2]}.dcm" for f in files)
    found = wait_for_seg(orthanc, study_uid, listener)
    assert len(found) == 1
    seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(found[0]["ID"])))
    assert seg.StudyInstanceUID == study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(files)
    wait_for_state(listener.storage, series_uid, "done", listener, timeout=HANG_GUARD)
    assert (listener.storage / "results" / study_uid / series_uid / f"rev1-{seg.SOPInstanceUID}.dcm").is_file()


def test_a_model_imported_from_nnunet_segments_and_forwards(orthanc: Orthanc, imported_runs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """``pacs listen`` with a bundle imported from nnU-Net (one model folder): the series is segmented and the SEG,
    its segments named by the model's labels, arrives in Orthanc."""
    files = small_series(tmp_path / "ct", "ct", seed=4)
    study_uid, series_uid, _ = uids(files[0])
    process = ListenerProcess(tmp_path / "storage", imported_runs["single"], orthanc, idle=1, log=tmp_path / "log")
    try:
        assert storescu(process.port, files).returncode == 0
        found = wait_for_seg(orthanc, study_uid, process)
        wait_for_state(process.storage, series_uid, "done", process, timeout=HANG_GUARD)
    finally:
        if process.process.poll() is None:
            assert process.terminate() == 0
    assert len(found) == 1
    seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(found[0]["ID"])))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"liver", "spleen"} and len(seg.SegmentSequence) >= 1


def test_unknown_calling_ae_is_rejected(listener: ListenerProcess, tmp_path: Path) -> None:
    files = small_series(tmp_path / "ct", "ct", seed=4)[:2]
    study_uid, _series_uid, _ = uids(files[0])
    result = storescu(listener.port, files, aet="INTRUDER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    assert not (listener.storage / "incoming" / study_uid).exists()
    assert "'INTRUDER'" in listener.log() and "rejected" in listener.log()


def test_bad_instances_are_quarantined_and_listener_keeps_serving(listener: ListenerProcess, orthanc: Orthanc,
                                                                   tmp_path: Path) -> None:
    """No pixel data, truncated pixel data: failure status, bytes and reason in quarantine/; a series
    with a missing slice: its job fails (logged, kept on disk); then a good RLE-compressed series is
    segmented and forwarded."""
    source = small_series(tmp_path / "ct", "ct", seed=5)[0]
    bad = []
    for name, edit in (("nopixels", lambda ds: delattr(ds, "PixelData")),
                       ("truncated", lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2]))):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        edit(ds)
        ds.save_as(tmp_path / f"{name}.dcm")
        bad.append(tmp_path / f"{name}.dcm")
    quarantine = listener.storage / "quarantine"
    for path, reason in zip(bad, ("no pixel data", "pixel data truncated")):
        before = set(quarantine.glob("*.txt"))
        result = storescu(listener.port, [path], MODALITY_AET, "-v")
        output = result.stdout + result.stderr
        assert result.returncode != 0 and "Store Response (Error: DataSetDoesNotMatchSOPClass)" in output, output
        (reason_file,) = set(quarantine.glob("*.txt")) - before
        assert reason in reason_file.read_text() and f"calling_ae: {MODALITY_AET}" in reason_file.read_text()
        assert reason_file.with_suffix(".dcm").read_bytes()[128:132] == b"DICM"
    study_uid, series_uid, _ = uids(bad[0])
    assert not (listener.storage / "incoming" / study_uid / series_uid).exists()

    # valid instances, but a slice is missing: the job fails, the series stays on disk as "failed"
    gap = small_series(tmp_path / "gap", "ct", seed=8)
    del gap[5]
    assert storescu(listener.port, gap).returncode == 0
    study_uid, series_uid, _ = uids(gap[0])
    deadline = time.monotonic() + HANG_GUARD
    while state(listener.storage, series_uid) != "failed":
        assert time.monotonic() < deadline, listener.log()[-3000:]
        time.sleep(0.2)
    assert f"series {series_uid}: job failed" in listener.log()
    assert len(list((listener.storage / "incoming" / study_uid / series_uid).glob("*.dcm"))) == len(gap)
    assert segs_in_study(orthanc, study_uid) == []

    good = small_series(tmp_path / "rle", "ct", seed=6, transfer_syntax=pydicom.uid.RLELossless)
    result = storescu(listener.port, good, MODALITY_AET, "-xr", "-v")  # -xr: propose RLE Lossless
    assert result.returncode == 0, result.stdout + result.stderr
    study_uid, series_uid, _ = uids(good[0])
    received = list((listener.storage / "incoming" / study_uid / series_uid).glob("*.dcm"))
    assert len(received) == len(good)
    assert {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in received} == {
        pydicom.uid.RLELossless}  # accepted and kept compressed
    assert len(wait_for_seg(orthanc, study_uid, listener)) == 1
    assert listener.process.poll() is None


def test_logs_hold_no_patient_data(listener: ListenerProcess) -> None:
    """Runs after the tests above: the log has seen series, rejections and quarantines."""
    log = listener.log()
    assert "sent SEG" in log and "quarantined" in log
    assert not [s for s in SECRETS if s in log]
    assert listener.terminate() == 0
    assert "listener stopped" in listener.log()


def test_restart_after_sigkill_sends_exactly_once(orthanc: Orthanc, untrained_run: Path, tmp_path: Path) -> None:
    """SIGKILL after the series was received but before its job ran (long quiet time); a restart
    with a short quiet time segments and forwards it once; another restart sends nothing."""
    storage = tmp_path / "storage"
    files = small_series(tmp_path / "ct", "ct", seed=7)
    study_uid, series_uid, _ = uids(files[0])

    first = ListenerProcess(storage, untrained_run, orthanc, idle=3600, log=tmp_path / "first.log")
    assert storescu(first.port, files).returncode == 0
    assert len(list((storage / "incoming" / study_uid / series_uid).glob("*.dcm"))) == len(files)
    assert state(storage, series_uid) == "received"
    first.kill()

    second = ListenerProcess(storage, untrained_run, orthanc, idle=1, log=tmp_path / "second.log")
    assert len(wait_for_seg(orthanc, study_uid, second)) == 1
    deadline = time.monotonic() + HANG_GUARD
    while state(storage, series_uid) != "done":
        assert time.monotonic() < deadline, second.log()[-3000:]
        time.sleep(0.2)
    assert second.terminate() == 0

    third = ListenerProcess(storage, untrained_run, orthanc, idle=1, log=tmp_path / "third.log")
    assert ": 0 series pending (none), 1 done" in third.log()
    time.sleep(4)  # four quiet times: a series still pending would have been run by now
    assert third.terminate() == 0
    assert len(segs_in_study(orthanc, study_uid)) == 1
    assert "1 series pending" in second.log() and "sent SEG" in second.log()
    assert "sent SEG" not in first.log() + third.log()

    # the one window left: killed after Orthanc acknowledged the SEG but before "done" was committed.
    # The restart sends the same file again; its SOPInstanceUID is unchanged, so the PACS keeps one SEG.
    with sqlite3.connect(storage / "journal.sqlite") as db:
        db.execute("UPDATE series SET state = 'sending' WHERE series_uid = ?", (series_uid,))
    fourth = ListenerProcess(storage, untrained_run, orthanc, idle=1, log=tmp_path / "fourth.log")
    deadline = time.monotonic() + HANG_GUARD
    while state(storage, series_uid) != "done":
        assert time.monotonic() < deadline, fourth.log()[-3000:]
        time.sleep(0.2)
    assert fourth.terminate() == 0
    assert "segmenting" not in fourth.log() and "sent SEG" in fourth.log()
    assert len(segs_in_study(orthanc, study_uid)) == 1
    text = first.log() + second.log() + third.log() + fourth.log()
    assert not [s for s in SECRETS if s in text]


def test_journal_replays_interrupted_jobs(tmp_path: Path) -> None:
    """What a restart finds: a job killed while running runs again; a SEG killed while being sent
    is sent again (same file, same SOPInstanceUID); done series stay done; a re-sent instance of a
    done series does not reopen it, a new instance does."""
    journal = Journal(tmp_path / "journal.sqlite")
    for series in ("1.1", "1.2", "1.3"):
        assert journal.record_instance("9.9", series, f"{series}.1", "CT", now=0) == "new"
        assert journal.record_instance("9.9", series, f"{series}.2", "CT", now=1) == "added"
        journal.mark_running(series)
    journal.mark_sending("1.2", tmp_path / "seg.dcm", "5.5", "6.6", revision=1)
    journal.mark_sending("1.3", tmp_path / "seg3.dcm", "7.7", "8.8", revision=1)
    journal.mark_done("1.3")
    journal.close()

    journal = Journal(tmp_path / "journal.sqlite")  # the restart
    pending = {r.series_uid: r for r in journal.recover()}
    assert set(pending) == {"1.1", "1.2"}
    assert pending["1.1"].state == "received" and pending["1.1"].runs == 1
    assert pending["1.2"].state == "sending" and pending["1.2"].seg_sop_uid == "5.5"
    assert journal.next_due(idle_seconds=5, now=3).series_uid == "1.2"  # the interrupted send is due at once
    assert journal.record_instance("9.9", "1.3", "1.3.1", "CT") == "duplicate"
    assert journal.get("1.3").state == "done"
    assert journal.record_instance("9.9", "1.3", "1.3.3", "CT") == "revision"
    assert journal.get("1.3").state == "received"
    journal.close()
    assert os.path.getsize(tmp_path / "journal.sqlite") > 0
