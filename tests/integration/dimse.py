"""Helpers for the DIMSE listener tests: ``medseg pacs listen`` as a subprocess, dcmtk's storescu, a
pynetdicom modality that holds its association open between instances, and what Orthanc received."""

from __future__ import annotations

import io
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from tests.integration.orthanc import STORESCU, Orthanc, free_port
from tests.tools import HANG_GUARD

LISTENER_AET, MODALITY_AET = "MEDSEG", "CT_MODALITY"
SECRETS = ("Phantom", "PHANTOM001", "Synthetic")  # the synthetic patient's name and ID must never be logged


class ListenerProcess:
    """``python -m medseg pacs listen`` on a free port of 127.0.0.1, logging into ``log``."""

    def __init__(self, storage: Path, model: Path, orthanc: Orthanc, idle: float, log: Path) -> None:
        self.port, self.storage, self.log_path = free_port(), storage, log
        command = [sys.executable, "-m", "medseg", "pacs", "listen", "--port", str(self.port), "--bind", "127.0.0.1",
                   "--ae-title", LISTENER_AET, "--model", str(model), "--allow", MODALITY_AET,
                   "--forward", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--storage", str(storage),
                   "--idle-seconds", str(idle)]
        with open(log, "ab") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + HANG_GUARD
        while "listening as" not in self.log():
            assert self.process.poll() is None, f"listener exited with {self.process.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no clean-up at all
        self.process.wait(timeout=30)


def storescu(port: int, files: list[Path], aet: str = MODALITY_AET, *options: str) -> subprocess.CompletedProcess[str]:
    assert STORESCU, "dcmtk's storescu is required (scripts/install_system_deps.sh)"
    return subprocess.run([STORESCU, *options, "-aet", aet, "-aec", LISTENER_AET, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)


class Modality:
    """A modality as a pynetdicom SCU in the test process: one association, C-STOREs with pauses in
    between (the association stays open), then ``end``: ``"release"``, ``"abort"`` (A-ABORT) or
    ``"drop"`` (the TCP connection is closed without release or abort, as by a crashed sender)."""

    def __init__(self, port: int, aet: str = MODALITY_AET) -> None:
        self.port, self.aet = port, aet
        self.wake = threading.Event()  # set: pauses end at once


    def send(self, files: list[Path], *, pause: float = 0.0, pause_every: int = 0, end: str = "release") -> None:
        datasets = [pydicom.dcmread(f) for f in files]
        ae = AE(ae_title=self.aet)
        for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", self.port, ae_title=LISTENER_AET)
        assert assoc.is_established, "the listener refused the association"
        for index, ds in enumerate(datasets):
            if pause_every and index and index % pause_every == 0:
                self.wake.wait(pause)  # longer than --idle-seconds, the association open
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, f"C-STORE {index} answered {status}"
        if end == "release":
            assoc.release()
        elif end == "abort":
            assoc.abort()
        elif end == "drop":
            raw = assoc.dul.socket.socket
            raw.shutdown(socket.SHUT_RDWR)
            raw.close()
            assoc.join(30)  # our side's association thread notices the closed connection and ends
        else:
            raise ValueError(end)
        assert not assoc.is_established


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def segs_in_study(orthanc: Orthanc, study_uid: str) -> list[dict]:
    query = {"StudyInstanceUID": study_uid, "Modality": "SEG"}
    return orthanc.rest("POST", "/tools/find", json={"Level": "Instance", "Expand": True, "Query": query}).json()


def read_segs(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    """The SEGs Orthanc holds for a study, oldest SeriesDescription first (revision notes sort last)."""
    segs = [pydicom.dcmread(io.BytesIO(orthanc.instance_file(found["ID"])))
            for found in segs_in_study(orthanc, study_uid)]
    return sorted(segs, key=lambda seg: (len(seg.SeriesDescription), seg.SeriesDescription))


def referenced_sops(seg: pydicom.Dataset) -> list[str]:
    """The SOPInstanceUIDs a SEG references (every item of every referenced series)."""
    return [item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence]


def wait_for_seg(orthanc: Orthanc, study_uid: str, listener: ListenerProcess, timeout: float = HANG_GUARD,
                 count: int = 1) -> list[dict]:
    """Poll Orthanc until the study holds ``count`` SEGs (or more)."""
    deadline = time.monotonic() + timeout
    while len(found := segs_in_study(orthanc, study_uid)) < count:
        assert listener.process.poll() is None, listener.log()
        assert time.monotonic() < deadline, f"{len(found)} of {count} SEGs in Orthanc:\n{listener.log()[-4000:]}"
        time.sleep(0.5)
    return found


def state(storage: Path, series_uid: str) -> str | None:
    with sqlite3.connect(storage / "journal.sqlite") as db:
        row = db.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
    return None if row is None else row[0]


def wait_for_state(storage: Path, series_uid: str, wanted: str, listener: ListenerProcess,
                   timeout: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + timeout
    while state(storage, series_uid) != wanted:
        assert listener.process.poll() is None, listener.log()[-4000:]
        assert time.monotonic() < deadline, f"series {series_uid} not {wanted}:\n{listener.log()[-4000:]}"
        time.sleep(0.2)
