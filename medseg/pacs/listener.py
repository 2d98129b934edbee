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
* A series is *complete*, and a worker thread segments it, once (1) no association that delivered
  an instance of it is still open (:class:`medseg.pacs.associations.OpenAssociations`; released,
  aborted, dropped by the peer or timed out after ``network_timeout`` seconds of silence all count as
  closed) and (2) it has been quiet for ``idle_seconds`` since the later of its last instance and the
  close of the last such association. Then :func:`medseg.pacs.job.segment_series_folder`, SEG kept
  as ``<storage>/results/<study>/<series>/rev<N>-<sop>.dcm``, C-STORE to the forward destination,
  ``done``. Failures are logged, the series is marked ``failed`` (its instances stay on disk) and the
  listener goes on. Sends are retried with back-off.
* New instances of a series whose SEG was sent (or is being sent) make it wait for completeness
  again; it then gets a new SEG built from all its instances that supersedes the first: revision 2, 3,
  ... (new SeriesInstanceUID and SOPInstanceUID, the SeriesDescription with `` (revision N: M
  instances)``). Instances arriving while a job runs make the job's SEG be discarded unsent; the
  series is segmented again once complete.
* :class:`medseg.pacs.journal.Journal` records each step; see there for the restart semantics (after
  a restart, a series not yet segmented is quiet from the restart).

Logs name UIDs, modalities, counts and AE titles, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # its UIDs are made at import time

from medseg.errors import InputError, MedsegError, PacsError
from medseg.pacs.associations import OpenAssociations
from medseg.pacs.durable import durable_move, durable_write, make_dirs_durable
from medseg.pacs.forward import Destination, check_ae_title, send_file
from medseg.pacs.instances import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    BadInstance,
    check_instance,
)
from medseg.pacs.job import check_model, keep_values_out_of_logs, referenced_instances, segment_series_folder
from medseg.pacs.journal import Journal, SeriesRecord

__all__ = [
    "Destination",
    "Listener",
    "ListenerConfig",
    "supported_transfer_syntaxes",
]

log = logging.getLogger(__name__)


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
    #: an association silent this long is aborted (it then no longer holds its series back)
    network_timeout: float = 60.0


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
        self.associations = OpenAssociations()
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
        if any(r.state == "received" for r in pending):
            log.info("series not yet segmented are quiet from this restart: each waits %g s (more if a sender "
                     "delivers to it again)", self.config.idle_seconds)
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.ae_title)
        syntaxes = supported_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:  # set in every context of pynetdicom's list
                ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        ae.network_timeout = self.config.network_timeout
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        else:
            log.warning("no --allow list: any calling AE title may store instances")
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed), (evt.EVT_CONN_CLOSE, self._on_connection_closed)]
        try:
            self._server = ae.start_server((self.config.bind, self.config.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            self.journal.close()
            raise PacsError(f"cannot listen on {self.config.bind}:{self.config.port}: {exc.strerror or exc}") from None
        self._worker = threading.Thread(target=self._work, name="medseg-pacs-worker", daemon=True)
        self._worker.start()
        log.info("listening as %s on %s:%d (%d transfer syntaxes), forwarding SEGs to %s, quiet time %g s after "
                 "the series' last instance and association, storage %s", self.ae_title, self.config.bind,
                 self.config.port, len(syntaxes), self.config.forward, self.config.idle_seconds, self.storage)

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting associations; with ``wait``, let a running job finish (up to ``timeout``)."""
        self._stop.set()
        self._wake.set()
        self._close_server()
        if wait and self._worker is not None:
            self._worker.join(timeout)
        if (self._worker is None or not self._worker.is_alive()) and self.journal is not None:
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

    def _on_closed(self, event: Any) -> None:
        """EVT_RELEASED / EVT_ABORTED (fired by the association's thread after its last C-STORE): the
        series it delivered to start their quiet time now. Under the associations' lock, so that the
        worker never sees such a series free before its quiet time was restarted."""
        with self.associations.lock:
            series = self.associations.closed(event.assoc)
            if series:
                self._touch(series, f"association from {str(event.assoc.requestor.ae_title).strip()} ended")

    def _on_connection_closed(self, event: Any) -> None:
        """EVT_CONN_CLOSE (the transport's thread): the worker looks for ended associations now."""
        self._wake.set()

    def _touch(self, series: set[str], why: str) -> None:
        try:
            assert self.journal is not None
            self.journal.touch(series)
        except Exception as exc:  # noqa: BLE001 - the quiet time then runs from the last instance
            log.error("journal write failed: %s", exc)
        log.debug("%s: %d series quiet from now", why, len(series))
        self._wake.set()

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
        # before the instance is journalled: the worker cannot take the series while this association is open
        self.associations.delivered(event.assoc, series)
        try:
            durable_write(self.incoming / study / series / f"{sop}.dcm", event.encoded_dataset())
            assert self.journal is not None
            outcome = self.journal.record_instance(study, series, sop, modality)
        except Exception as exc:  # noqa: BLE001 - disk full, journal locked, ...: the sender retries later
            log.error("instance %s of series %s from %s not stored: %s", sop, series, calling, exc)
            return STATUS_OUT_OF_RESOURCES
        if outcome == "new":
            log.info("series %s (%s, study %s): receiving from %s", series, modality or "?", study, calling)
        elif outcome == "revision":
            record = self.journal.get(series)
            done = record.revision if record is not None else 0
            log.warning("series %s: new instance after its SEG (revision %d) was sent or while it is being sent; "
                        "revision %d, built from all its instances, follows once the series is complete again",
                        series, done, done + 1)
        elif outcome == "reopened":
            log.warning("series %s: new instance while its job runs or after it failed; it is segmented again "
                        "once complete", series)
        else:
            log.debug("series %s: instance %s %s", series, sop, outcome)
        self._wake.set()
        return STATUS_SUCCESS

    def _quarantine(self, event: Any, calling: str, bad: BadInstance) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
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
        """Instance files on disk that the journal lacks (a crash between their fsync and the commit:
        never acknowledged, but kept and segmented); temporary files and job folders left by a crash."""
        assert self.journal is not None
        for tmp in [*self.incoming.glob("*/*/.*.tmp"), *self.results.glob("*/*/.*.tmp"),
                    *self.quarantine.glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)
        for run in self.results.glob("*/*/.run-*"):  # output folders of jobs killed half-way
            shutil.rmtree(run, ignore_errors=True)
        for folder in sorted(self.incoming.glob("*/*")):
            if not folder.is_dir():
                continue
            missing = {f.stem for f in folder.glob("*.dcm")} - self.journal.instances_of(folder.name)
            if missing:
                added = self.journal.adopt(folder.parent.name, folder.name, sorted(missing))
                log.warning("series %s: %d instances on disk but not in the journal; adopted", folder.name, added)

    # ----------------------------------------------------------------- jobs
    def _work(self) -> None:
        poll = max(0.2, min(2.0, self.config.idle_seconds / 4))
        while not self._stop.is_set():
            try:
                record = self._claim()
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
            except Exception as exc:  # the worker must survive anything
                log.error("series %s: internal error: %s: %s", record.series_uid, type(exc).__name__, exc)
                log.debug("traceback", exc_info=True)
                try:
                    assert self.journal is not None
                    self.journal.mark_failed(record.series_uid, f"internal error: {type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001
                    self._stop.wait(poll)
            finally:
                self.current = None

    def _claim(self) -> SeriesRecord | None:
        """The next due series (:meth:`Journal.next_due` minus the series an open association delivered
        to). A ``received`` one is marked ``running`` under the associations' lock, so that an instance
        of it either arrives before (the series is busy, not taken) or finds it running (its job's SEG
        is then discarded)."""
        assert self.journal is not None
        with self.associations.lock:
            ended = self.associations.prune()
            if ended:
                self._touch(ended, "association ended without release or abort event")
            record = self.journal.next_due(self.config.idle_seconds, self.associations.busy())
            if record is not None and record.state == "received":
                self.journal.mark_running(record.series_uid)
                record = self.journal.get(record.series_uid)
        return record

    def process(self, record: SeriesRecord) -> None:
        """Run one claimed series: the job (state running), then the send (state sending)."""
        current = self._run_job(record) if record.state == "running" else record
        if current is not None and current.state == "sending" and current.seg_path:
            self._send_seg(current)

    def _run_job(self, record: SeriesRecord) -> SeriesRecord | None:
        """Segment a running series into SEG revision ``record.revision + 1``; returns the series in
        state ``sending``, or ``None`` (job failed, or its SEG discarded because instances arrived)."""
        assert self.journal is not None
        uid, revision = record.series_uid, record.revision + 1
        folder = self.incoming / record.study_uid / uid
        out = self.results / record.study_uid / uid
        for stale in out.glob(f"rev{revision}-*.dcm"):  # this revision was never sent: a killed or discarded job's
            stale.unlink(missing_ok=True)
        log.info("series %s: complete (no open association, quiet for %g s), segmenting %d instances (%s, run %d)",
                 uid, self.config.idle_seconds, record.instances,
                 f"revision {revision}" if revision > 1 else "first SEG", record.runs)
        started = time.monotonic()
        work = out / f".run-{uuid.uuid4().hex[:8]}"
        try:
            seg_tmp = segment_series_folder(self.config.model, folder, work, series_uid=uid,
                                            device=self.config.device, revision=revision)
            seg = pydicom.dcmread(seg_tmp, stop_before_pixels=True)
            seg_path = out / f"rev{revision}-{seg.SOPInstanceUID}.dcm"
            durable_move(seg_tmp, seg_path)  # the run folder lies beside it: a rename
        except MedsegError as exc:
            self.journal.mark_failed(uid, str(exc))
            log.error("series %s: job failed: %s (instances kept in %s)", uid, exc, folder)
            return None
        except Exception as exc:
            self.journal.mark_failed(uid, f"internal error: {type(exc).__name__}: {exc}")
            log.error("series %s: job failed: internal error: %s: %s (instances kept in %s)", uid,
                      type(exc).__name__, exc, folder)
            log.debug("traceback", exc_info=True)
            return None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        count = referenced_instances(seg)
        if not self.journal.mark_sending(uid, seg_path, str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID),
                                         revision):
            seg_path.unlink(missing_ok=True)
            log.warning("series %s: instances arrived while the job ran; its SEG (%d instances) is discarded unsent, "
                        "the series is segmented again once complete", uid, count)
            return None
        log.info("series %s: SEG %s (revision %d, %d instances referenced) written in %.1f s", uid,
                 seg.SOPInstanceUID, revision, count, time.monotonic() - started)
        if revision > 1:
            log.warning("series %s: SEG revision %d (series %s, %d instances) supersedes revision %d (series %s)",
                        uid, revision, seg.SeriesInstanceUID, count, record.revision, record.seg_series_uid)
        return self.journal.get(uid)

    def _send_seg(self, record: SeriesRecord) -> None:
        """C-STORE the series' SEG; ``done``, or a retry later, or ``failed`` after the last attempt."""
        assert self.journal is not None and record.seg_path
        uid = record.series_uid
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
        log.info("series %s: sent SEG %s (series %s, revision %d) to %s", uid, record.seg_sop_uid,
                 record.seg_series_uid, record.revision, self.config.forward)

    def send(self, seg_path: Path) -> None:
        """C-STORE one file to the forward destination (:func:`medseg.pacs.forward.send_file`).

        Raises
        ------
        PacsError
            No association (refused, rejected, aborted) or a failure status.
        """
        send_file(seg_path, self.ae_title, self.config.forward)
