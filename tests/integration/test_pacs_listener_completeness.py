"""The listener's completeness rule against a real Orthanc: a series is segmented only once every
association that delivered to it has ended and it has been quiet for ``--idle-seconds`` since;
late instances produce a revision SEG that supersedes the first; SIGKILL loses nothing and sends
no partial SEG.

The modalities are pynetdicom SCUs in the test process (:class:`tests.integration.dimse.Modality`)
that pause between instances for longer than the quiet time while their association stays open.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pynetdicom import AE

from medseg.pacs.forward import Destination
from medseg.pacs.listener import Listener, ListenerConfig
from tests.integration.dimse import (
    LISTENER_AET,
    MODALITY_AET,
    SECRETS,
    ListenerProcess,
    Modality,
    read_segs,
    referenced_sops,
    segs_in_study,
    state,
    uids,
    wait_for_seg,
    wait_for_state,
)
from tests.integration.orthanc import Orthanc, free_port, require_tools, small_series
from tests.tools import HANG_GUARD

pytestmark = [pytest.mark.pacs, require_tools("orthanc", "dicomweb")]
IDLE = 1.0
PAUSE = 2.5 * IDLE  # a sender's pause between instances, its association open: well past the quiet time


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, untrained_run: Path):
    folder = tmp_path_factory.mktemp("listener")
    process = ListenerProcess(folder / "storage", untrained_run, orthanc, idle=IDLE, log=folder / "listener.log")
    yield process
    if process.process.poll() is None:
        assert process.terminate() == 0
    assert not [s for s in SECRETS if s in process.log()]


def sop_uids(files: list[Path]) -> list[str]:
    return sorted(uids(f)[2] for f in files)


def test_concurrent_slow_senders_get_one_complete_seg_per_series(listener: ListenerProcess, orthanc: Orthanc,
                                                                 tmp_path: Path) -> None:
    """Three modalities at once, each pausing 2.5 quiet times after every 4th instance with its
    association open, then ending it by release, by A-ABORT and by dropping the connection: each
    series gets exactly one SEG, referencing all 12 instances."""
    series = {end: small_series(tmp_path / end, "ct", seed=seed) for seed, end in
              enumerate(("release", "abort", "drop"), start=20)}
    with ThreadPoolExecutor(len(series)) as pool:
        sent = [pool.submit(Modality(listener.port).send, files, pause=PAUSE, pause_every=4, end=end)
                for end, files in series.items()]
        for future in sent:
            future.result(timeout=HANG_GUARD)
    for files in series.values():
        study_uid, series_uid, _ = uids(files[0])
        wait_for_seg(orthanc, study_uid, listener)
        wait_for_state(listener.storage, series_uid, "done", listener)
    time.sleep(3 * IDLE)  # a second SEG of any series would be under way by now
    for end, files in series.items():
        study_uid, series_uid, _ = uids(files[0])
        segs = read_segs(orthanc, study_uid)
        assert len(segs) == 1, f"{end}: {len(segs)} SEGs for one series\n{listener.log()[-4000:]}"
        assert segs[0].ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        assert sorted(referenced_sops(segs[0])) == sop_uids(files), f"{end}: the SEG misses instances"
    assert "revision 2" not in listener.log() and "discarded" not in listener.log()


def test_instances_after_the_seg_make_a_revision_from_all_instances(listener: ListenerProcess, orthanc: Orthanc,
                                                                     tmp_path: Path) -> None:
    """8 of 12 slices, then the SEG is sent; the other 4 arrive later (with a pause, association
    open): a second SEG with its own SeriesInstanceUID, the revision note in its SeriesDescription,
    referencing all 12. The first stays, as a PACS keeps what it got."""
    files = small_series(tmp_path / "ct", "ct", seed=30)
    study_uid, series_uid, _ = uids(files[0])
    Modality(listener.port).send(files[:8], end="abort")
    wait_for_seg(orthanc, study_uid, listener)
    wait_for_state(listener.storage, series_uid, "done", listener)
    (first,) = read_segs(orthanc, study_uid)
    assert sorted(referenced_sops(first)) == sop_uids(files[:8])

    Modality(listener.port).send(files[8:], pause=PAUSE, pause_every=2, end="release")
    wait_for_seg(orthanc, study_uid, listener, count=2)
    wait_for_state(listener.storage, series_uid, "done", listener)
    time.sleep(3 * IDLE)
    first, second = read_segs(orthanc, study_uid)
    assert second.SeriesInstanceUID != first.SeriesInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesDescription == f"{first.SeriesDescription} (revision 2: 12 instances)"
    assert sorted(referenced_sops(second)) == sop_uids(files)
    assert len(segs_in_study(orthanc, study_uid)) == 2
    log = listener.log()
    assert f"series {series_uid}: SEG revision 2 (series {second.SeriesInstanceUID}, 12 instances) supersedes " \
           f"revision 1 (series {first.SeriesInstanceUID})" in log
    assert "discarded" not in log


def test_sigkill_during_a_job_then_restart_sends_one_complete_seg(orthanc: Orthanc, untrained_run: Path,
                                                                 tmp_path: Path) -> None:
    """The listener is killed while the series' job runs; the restart segments it again and sends
    one SEG referencing every instance; nothing half-made is left or sent."""
    storage = tmp_path / "storage"
    files = small_series(tmp_path / "ct", "ct", seed=40)
    study_uid, series_uid, _ = uids(files[0])
    first = ListenerProcess(storage, untrained_run, orthanc, idle=IDLE, log=tmp_path / "first.log")
    Modality(first.port).send(files)
    deadline = time.monotonic() + HANG_GUARD
    while (now := state(storage, series_uid)) != "running":  # one read per look: the job may start between two
        assert now == "received", first.log()[-3000:]
        assert time.monotonic() < deadline, first.log()[-3000:]
        time.sleep(0.02)
    first.kill()
    assert state(storage, series_uid) == "running", "the job ended before the kill; nothing was tested"
    assert segs_in_study(orthanc, study_uid) == []

    second = ListenerProcess(storage, untrained_run, orthanc, idle=IDLE, log=tmp_path / "second.log")
    wait_for_seg(orthanc, study_uid, second)
    wait_for_state(storage, series_uid, "done", second)
    time.sleep(3 * IDLE)
    assert second.terminate() == 0
    (seg,) = read_segs(orthanc, study_uid)
    assert sorted(referenced_sops(seg)) == sop_uids(files)  # 0 lost instances
    assert "revision" not in seg.SeriesDescription
    results = storage / "results" / study_uid / series_uid
    assert sorted(p.name for p in results.iterdir()) == [f"rev1-{seg.SOPInstanceUID}.dcm"]  # no partial output
    assert sorted(p.stem for p in (storage / "incoming" / study_uid / series_uid).glob("*.dcm")) == sop_uids(files)
    assert "sent SEG" not in first.log()


def test_sigkill_while_a_sender_holds_its_association_then_it_reconnects(orthanc: Orthanc, untrained_run: Path,
                                                                        tmp_path: Path) -> None:
    """A sender delivered half a series and holds its association open; the listener is killed.
    After the restart the half series is quiet from the restart, not due at once: the sender that
    reconnects and delivers the rest in time gets one SEG of the whole series."""
    storage = tmp_path / "storage"
    files = small_series(tmp_path / "ct", "ct", seed=50)
    study_uid, series_uid, _ = uids(files[0])
    first = ListenerProcess(storage, untrained_run, orthanc, idle=IDLE, log=tmp_path / "first.log")
    sender = Modality(first.port)
    with ThreadPoolExecutor(1) as pool:
        # the 7th C-STORE waits (up to 50 s): the association is open, the series busy, when the kill comes
        holding = pool.submit(sender.send, files[:7], pause=50, pause_every=6, end="release")
        deadline = time.monotonic() + HANG_GUARD
        while len(list((storage / "incoming" / study_uid / series_uid).glob("*.dcm"))) < 6:
            assert time.monotonic() < deadline, first.log()[-3000:]
            time.sleep(0.05)
        time.sleep(3 * IDLE)  # the old rule (quiet since the last instance) would have run the job now
        assert state(storage, series_uid) == "received"
        first.kill()
        sender.wake.set()
        with pytest.raises(Exception):  # noqa: B017 - the listener is gone: the 7th C-STORE cannot succeed
            holding.result(timeout=HANG_GUARD)
    time.sleep(2 * IDLE)  # the instances are older than the quiet time when the restart comes

    second = ListenerProcess(storage, untrained_run, orthanc, idle=4 * IDLE, log=tmp_path / "second.log")
    assert "quiet from this restart" in second.log()
    Modality(second.port).send(files[6:], pause=PAUSE, pause_every=3, end="release")
    wait_for_seg(orthanc, study_uid, second)
    wait_for_state(storage, series_uid, "done", second)
    assert second.terminate() == 0
    (seg,) = read_segs(orthanc, study_uid)
    assert sorted(referenced_sops(seg)) == sop_uids(files)
    assert "revision 2" not in second.log() and "discarded" not in second.log()


def test_a_silent_association_is_aborted_and_no_longer_holds_its_series(untrained_run: Path, tmp_path: Path) -> None:
    """A sender that stops sending without ending its association: after ``network_timeout`` the
    listener aborts it, and the series is complete (in-process listener; nothing to forward to)."""
    config = ListenerConfig(port=free_port(), ae_title=LISTENER_AET, model=untrained_run,
                            forward=Destination("NOBODY", "127.0.0.1", free_port()), allow=(MODALITY_AET,),
                            storage=tmp_path / "storage", idle_seconds=0.5, bind="127.0.0.1", send_attempts=1,
                            network_timeout=4.0)
    listener = Listener(config)
    listener.start()
    try:
        files = small_series(tmp_path / "ct", "ct", seed=60)
        _, series_uid, _ = uids(files[0])
        ae = AE(ae_title=MODALITY_AET)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
        assoc = ae.associate("127.0.0.1", config.port, ae_title=LISTENER_AET)
        assert assoc.is_established
        for path in files:
            assert assoc.send_c_store(path).Status == 0x0000
        time.sleep(1.5)  # silent, association open: the series must wait
        assert state(config.storage, series_uid) == "received"
        deadline = time.monotonic() + HANG_GUARD
        while state(config.storage, series_uid) in ("received", "running", "sending"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert assoc.is_aborted  # by the listener, after 4 s of silence
        assert state(config.storage, series_uid) == "failed"  # segmented; the send found nobody
        assert len(list((config.storage / "results").glob(f"*/{series_uid}/rev1-*.dcm"))) == 1
    finally:
        listener.stop(wait=True, timeout=120)
