"""``medseg pacs listen``: a DICOM storage SCP that segments each received series and forwards the SEG.

* Every storage SOP class is accepted in the uncompressed transfer syntaxes and in each compressed
  one that an installed pydicom pixel-data plugin decodes (JPEG, JPEG-LS, JPEG 2000, RLE, ...);
  C-ECHO answers too. With an allow list, other calling AE titles are rejected at association time;
  the called AE title must be the listener's.
* Each C-STORE is checked (decodable header; SOP Class / Instance, Series and Study UIDs present,
  valid and matching the request; pixel data present and, uncompressed, complete) and written to
  ``<storage>/incoming/<study>/<series>/<sop>.dcm`` through a temporary file, ``fsync``,
  ``os.replace`` and ``fsync`` of the folder, then recorded in the journal, and only then
  acknowledged (0x0000). A bad instance is answered with a failure status (0xC210 cannot understand,
  0xA900 data set does not match the SOP class) and its bytes go to ``<storage>/quarantine/`` with a
  ``.txt`` reason file.
* A worker thread runs a series once it has been quiet for ``idle_seconds``:
  :func:`medseg.pacs.job.segment_series_folder`, SEG kept in ``<storage>/results/<study>/<series>/``,
  C-STORE to the forward destination, ``done``. Failures are logged, the series is marked ``failed``
  (its instances stay on disk) and the listener goes on. Sends are retried with back-off.
* :class:`medseg.pacs.journal.Journal` records each step; see there for the restart semantics.

Logs name UIDs, modalities, counts and AE titles, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from medseg.errors import InputError, MedsegError, PacsError
from medseg.pacs.job import check_model, keep_values_out_of_logs, segment_series_folder
from medseg.pacs.journal import Journal, SeriesRecord

log = logging.getLogger(__name__)

#: C-STORE failure statuses (PS3.4 B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def check_ae_title(title: str, option: str) -> str:
    """A valid AE title (1-16 printable characters, no backslash; surrounding spaces removed).

    Raises
    ------
    InputError
        Empty, too long or with forbidden characters.
    """
    stripped = title.strip()
    if not _AE_TITLE.match(stripped):
        raise InputError(None, f"{option} {title!r}: an AE title is 1 to 16 printable characters, no backslash")
    return stripped


@dataclass(frozen=True)
class Destination:
    """Where SEGs are sent: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT``.

        Raises
        ------
        InputError
            Not of that form, bad AE title or port.
        """
        match = re.fullmatch(r"(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d+)", text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise InputError(None, f"--forward {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        return cls(check_ae_title(match["aet"], "--forward"), match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class ListenerConfig:
    """Settings of :class:`Listener` (the ``medseg pacs listen`` options)."""

    port: int
    ae_title: str
    model: Path
    forward: Destination
    allow: tuple[str, ...] = ()
    storage: Path = Path("medseg-listener")
    idle_seconds: float = 30.0
    bind: str = "0.0.0.0"
    device: str = "cpu"
    send_attempts: int = 5
    retry_seconds: float = 30.0


def supported_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes plus every compressed one an installed pydicom plugin can decode."""
    syntaxes = []
    for uid in ALL_TRANSFER_SYNTAXES:
        ts = UID(uid)
        if not ts.is_compressed:
            syntaxes.append(uid)
            continue
        try:
            if get_decoder(ts).is_available:
                syntaxes.append(uid)
        except NotImplementedError:
            pass
    return syntaxes


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


class BadInstance(Exception):
    """A received instance that is refused (status and reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_instance(ds: pydicom.Dataset, sop_class_uid: str | None = None,
                   sop_instance_uid: str | None = None) -> tuple[str, str, str]:
    """Validate a received image instance; returns (study, series, SOP instance) UIDs.

    Raises
    ------
    BadInstance
        Undecodable header, a missing or malformed UID (they become folder names), UIDs that do not
        match the C-STORE request, missing or (uncompressed) truncated pixel data.
    """
    try:
        for elem in ds.iterall():  # parse every element now: a truncated or corrupt header fails here
            elem.value  # noqa: B018
        uids = {k: str(ds.get(k, "") or "").strip() for k in
                ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")}
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises for a corrupt data set
        raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"undecodable data set ({type(exc).__name__})") from None
    for keyword, value in uids.items():
        if not value:
            raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"no {keyword}")
        if len(value) > 64 or not _UID.match(value):
            raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"malformed {keyword}")
    if sop_instance_uid is not None and uids["SOPInstanceUID"] != str(sop_instance_uid).strip():
        raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID differs from the C-STORE request's")
    if sop_class_uid is not None and uids["SOPClassUID"] != str(sop_class_uid).strip():
        raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the C-STORE request's")
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS, "no pixel data (not an image instance)")
    if "Rows" not in ds or "Columns" not in ds:
        raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS, "pixel data without Rows / Columns")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if keyword == "PixelData" and syntax is not None and not UID(syntax).is_compressed:
        try:
            expected = get_expected_length(ds, unit="bytes")
        except Exception:  # noqa: BLE001 - missing BitsAllocated, SamplesPerPixel, ...
            raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS, "incomplete image pixel description") from None
        if len(ds.PixelData) < expected:
            raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS,
                              f"pixel data truncated ({len(ds.PixelData)} of {expected} bytes)")
    return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"]


class Listener:
    """The storage SCP, its journal and its worker thread.

    Parameters
    ----------
    config
        Port, AE titles, model, storage folder, quiet time.

    Raises
    ------
    InputError
        Bad AE titles or storage folder.
    """

    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self.ae_title = check_ae_title(config.ae_title, "--ae-title")
        self.allow = tuple(check_ae_title(t, "--allow") for t in config.allow)
        self.storage = Path(config.storage)
        if self.storage.exists() and not self.storage.is_dir():
            raise InputError(self.storage, "--storage exists and is not a folder")
        self.incoming = self.storage / "incoming"
        self.quarantine = self.storage / "quarantine"
        self.results = self.storage / "results"
        self.journal: Journal | None = None
        self._server: Any = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.current: str | None = None

    # ----------------------------------------------------------------- life cycle
    def start(self) -> None:
        """Check the model, open and replay the journal, start the worker and the SCP (non-blocking).

        Raises
        ------
        BundleError
            The model cannot be loaded.
        PacsError
            The port cannot be opened.
        """
        keep_values_out_of_logs()
        check_model(self.config.model)  # fail now, not at the first series
        make_dirs_durable(self.incoming)
        make_dirs_durable(self.quarantine)
        make_dirs_durable(self.results)
        self.journal = Journal(self.storage / "journal.sqlite")
        self._adopt_orphans()
        pending = self.journal.recover()
        counts = self.journal.counts()
        shown = ", ".join(f"{r.series_uid} {r.state}" for r in pending[:5]) + (", ..." if len(pending) > 5 else "")
        log.info("journal %s: %d series pending (%s), %d done, %d failed", self.journal.path, len(pending),
                 shown or "none", counts["done"], counts["failed"])
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.ae_title)
        syntaxes = supported_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        else:
            log.warning("no --allow list: any calling AE title may store instances")
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ACCEPTED, self._on_accepted)]
        try:
            self._server = ae.start_server((self.config.bind, self.config.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            self.journal.close()
            raise PacsError(f"cannot listen on {self.config.bind}:{self.config.port}: {exc.strerror or exc}") from None
        self._worker = threading.Thread(target=self._work, name="medseg-pacs-worker", daemon=True)
        self._worker.start()
        log.info("listening as %s on %s:%d (%d transfer syntaxes), forwarding SEGs to %s, quiet time %g s, storage %s",
                 self.ae_title, self.config.bind, self.config.port, len(syntaxes), self.config.forward,
                 self.config.idle_seconds, self.storage)

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting associations; with ``wait``, let a running job finish (up to ``timeout``)."""
        self._stop.set()
        self._wake.set()
        self._close_server()
        if wait and self._worker is not None:
            self._worker.join(timeout)
        if self._worker is None or not self._worker.is_alive():
            if self.journal is not None:
                self.journal.close()
                self.journal = None

    def serve_forever(self) -> None:
        """:meth:`start`, then serve until SIGTERM / SIGINT. The first signal stops accepting and lets a
        running job finish; a second one stops at once (that job runs again at the next start).

        Raises
        ------
        BundleError, PacsError
            See :meth:`start`.
        """
        force = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            if self._stop.is_set():
                force.set()
                return
            log.info("%s: shutting down%s", signal.Signals(signum).name,
                     f" after the job of series {self.current} (signal again to stop now)" if self.current else "")
            self._stop.set()
            self._wake.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self._stop.wait(0.5):
                pass
            self._close_server()
            while self._worker is not None and self._worker.is_alive() and not force.is_set():
                self._worker.join(0.5)
            if force.is_set() and self.current:
                log.warning("stopped during the job of series %s; it runs again at the next start", self.current)
            else:
                self.stop(wait=False)
            log.info("listener stopped")
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _close_server(self, grace: float = 10.0) -> None:
        """Stop accepting associations; give those in progress ``grace`` seconds to finish."""
        if self._server is None:
            return
        ae = self._server.ae
        self._server.shutdown()
        self._server = None
        deadline = time.monotonic() + grace
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        for assoc in ae.active_associations:
            log.warning("aborting the association from %s (instances not yet acknowledged are not kept)",
                        assoc.requestor.ae_title)
            assoc.abort()

    # ----------------------------------------------------------------- receiving
    def _on_accepted(self, event: Any) -> None:
        log.debug("association from %s at %s:%s", event.assoc.requestor.ae_title, event.assoc.requestor.address,
                  event.assoc.requestor.port)

    def _on_rejected(self, event: Any) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        why = ("calling AE title not in --allow" if self.allow and calling not in self.allow
               else f"called AE title not {self.ae_title}, or too many associations")
        log.warning("association from AE %r at %s rejected: %s", calling, event.assoc.requestor.address, why)

    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE: validate, write durably, journal, then acknowledge (or quarantine and fail)."""
        calling = str(event.assoc.requestor.ae_title)
        request = event.request
        try:
            try:
                ds = event.dataset
                ds.file_meta = event.file_meta
            except Exception as exc:  # noqa: BLE001
                raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"undecodable data set ({type(exc).__name__})") from None
            study, series, sop = check_instance(ds, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID)
        except BadInstance as bad:
            self._quarantine(event, calling, bad)
            return bad.status
        modality = str(ds.get("Modality", "") or "")
        try:
            durable_write(self.incoming / study / series / f"{sop}.dcm", event.encoded_dataset())
            assert self.journal is not None
            outcome = self.journal.record_instance(study, series, sop, modality)
        except Exception as exc:  # noqa: BLE001 - disk full, journal locked, ...: the sender retries later
            log.error("instance %s of series %s from %s not stored: %s", sop, series, calling, exc)
            return STATUS_OUT_OF_RESOURCES
        if outcome == "new":
            log.info("series %s (%s, study %s): receiving from %s", series, modality or "?", study, calling)
        elif outcome == "reopened":
            log.warning("series %s: new instance %s after its job started or ended; it is segmented again",
                        series, sop)
        else:
            log.debug("series %s: instance %s %s", series, sop, outcome)
        self._wake.set()
        return STATUS_SUCCESS

    def _quarantine(self, event: Any, calling: str, bad: BadInstance) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{uuid.uuid4().hex[:8]}"
        request = event.request
        try:
            data = event.encoded_dataset()
            durable_write(self.quarantine / f"{name}.dcm", data)
            durable_write(self.quarantine / f"{name}.txt", (
                f"reason: {bad.reason}\nstatus: 0x{bad.status:04X}\ncalling_ae: {calling}\n"
                f"peer: {event.assoc.requestor.address}\nsop_class_uid: {request.AffectedSOPClassUID}\n"
                f"sop_instance_uid: {request.AffectedSOPInstanceUID}\nreceived: {stamp}Z\nbytes: {len(data)}\n"
            ).encode())
            where = f"quarantined as {name}.dcm"
        except Exception as exc:  # noqa: BLE001 - quarantining must not crash the handler
            where = f"could not be quarantined ({exc})"
        log.warning("refused instance %s from %s: %s (status 0x%04X); %s", request.AffectedSOPInstanceUID, calling,
                    bad.reason, bad.status, where)

    def _adopt_orphans(self) -> None:
        """Series folders on disk that the journal lacks (crash between fsync and commit); temporary
        files and job folders left by a crash."""
        assert self.journal is not None
        for tmp in [*self.incoming.glob("*/*/.*.tmp"), *self.results.glob("*/*/.*.tmp"),
                    *self.quarantine.glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)
        for run in self.results.glob("*/*/.run-*"):  # output folders of jobs killed half-way
            shutil.rmtree(run, ignore_errors=True)
        for folder in sorted(self.incoming.glob("*/*")):
            if not folder.is_dir() or self.journal.get(folder.name) is not None:
                continue
            files = sorted(folder.glob("*.dcm"))
            if files:
                log.warning("series %s: on disk but not in the journal; adopting %d instances", folder.name, len(files))
                self.journal.adopt(folder.parent.name, folder.name, [f.stem for f in files],
                                   max(f.stat().st_mtime for f in files))

    # ----------------------------------------------------------------- jobs
    def _work(self) -> None:
        poll = max(0.2, min(2.0, self.config.idle_seconds / 4))
        while not self._stop.is_set():
            assert self.journal is not None
            try:
                record = self.journal.next_due(self.config.idle_seconds)
            except Exception as exc:  # noqa: BLE001
                log.error("journal read failed: %s", exc)
                record = None
            if record is None:
                self._wake.wait(poll)
                self._wake.clear()
                continue
            self.current = record.series_uid
            try:
                self.process(record)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                log.error("series %s: internal error: %s: %s", record.series_uid, type(exc).__name__, exc)
                log.debug("traceback", exc_info=True)
                try:
                    self.journal.mark_failed(record.series_uid, f"internal error: {type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001
                    self._stop.wait(poll)
            finally:
                self.current = None

    def process(self, record: SeriesRecord) -> None:
        """Run one due series: the job (state received), then the send (state sending)."""
        assert self.journal is not None
        uid = record.series_uid
        if record.state == "received":
            self.journal.mark_running(uid)
            folder = self.incoming / record.study_uid / uid
            log.info("series %s: quiet for %g s, segmenting %d instances (run %d)", uid, self.config.idle_seconds,
                     record.instances, record.runs + 1)
            started = time.monotonic()
            work = self.results / record.study_uid / uid / f".run-{uuid.uuid4().hex[:8]}"
            try:
                seg_tmp = segment_series_folder(self.config.model, folder, work, series_uid=uid,
                                                device=self.config.device)
                seg = pydicom.dcmread(seg_tmp, stop_before_pixels=True)
                seg_path = self.results / record.study_uid / uid / f"{seg.SOPInstanceUID}.dcm"
                durable_move(seg_tmp, seg_path)  # the run folder lies beside it: a rename
            except MedsegError as exc:
                self.journal.mark_failed(uid, str(exc))
                log.error("series %s: job failed: %s (instances kept in %s)", uid, exc, folder)
                return
            except Exception as exc:  # noqa: BLE001
                self.journal.mark_failed(uid, f"internal error: {type(exc).__name__}: {exc}")
                log.error("series %s: job failed: internal error: %s: %s (instances kept in %s)", uid,
                          type(exc).__name__, exc, folder)
                log.debug("traceback", exc_info=True)
                return
            finally:
                shutil.rmtree(work, ignore_errors=True)
            self.journal.mark_sending(uid, seg_path, str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID))
            log.info("series %s: SEG %s written in %.1f s", uid, seg.SOPInstanceUID, time.monotonic() - started)
            record = self.journal.get(uid) or record
        if record.state != "sending" or not record.seg_path:
            return
        try:
            self.send(Path(record.seg_path))
        except PacsError as exc:
            attempts = record.sends + 1
            retry_at = None
            if attempts < self.config.send_attempts:
                retry_at = time.time() + self.config.retry_seconds * 2 ** (attempts - 1)
            self.journal.mark_send_failed(uid, str(exc), retry_at)
            log.error("series %s: sending SEG %s failed (attempt %d of %d): %s%s", uid, record.seg_sop_uid, attempts,
                      self.config.send_attempts, exc,
                      f"; retry in {retry_at - time.time():.0f} s" if retry_at else "; giving up (state failed)")
            return
        self.journal.mark_done(uid)
        log.info("series %s: sent SEG %s (series %s) to %s", uid, record.seg_sop_uid, record.seg_series_uid,
                 self.config.forward)

    def send(self, seg_path: Path) -> None:
        """C-STORE one file to the forward destination.

        Raises
        ------
        PacsError
            No association (refused, rejected, aborted) or a failure status.
        """
        dest = self.config.forward
        try:
            ds = pydicom.dcmread(seg_path)
        except Exception as exc:  # noqa: BLE001
            raise PacsError(f"{seg_path}: cannot read the SEG to send: {exc}") from None
        syntaxes = list(dict.fromkeys([str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian,
                                       ImplicitVRLittleEndian]))
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(ds.SOPClassUID, syntaxes)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "aborted the association" if assoc.is_aborted \
                else "cannot be reached"
            raise PacsError(f"{dest}: {why}")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = int(status.get("Status", -1)) if status else -1
        if code == -1:
            raise PacsError(f"{dest}: no C-STORE response (timeout or aborted)")
        if code != STATUS_SUCCESS and not 0xB000 <= code <= 0xBFFF:
            raise PacsError(f"{dest}: C-STORE of the SEG failed with status 0x{code:04X}")
        if code != STATUS_SUCCESS:
            log.warning("%s: C-STORE of the SEG succeeded with warning status 0x%04X", dest, code)
