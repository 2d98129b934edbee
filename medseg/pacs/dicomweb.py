"""``medseg pacs run``: one study from a DICOMweb server -> DICOM SEG stored back in the same study.

QIDO-RS finds the study's image series, WADO-RS streams the chosen series' instances into a
temporary folder (in their stored transfer syntax), :func:`medseg.pacs.job.segment_series_folder`
writes the SEG and STOW-RS stores it. Basic (``username``/``password``) or bearer-token
authentication; TLS certificates are verified unless ``verify=False`` (``--no-verify``), against
``ca_bundle`` when given. Temporary files are removed whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError

from medseg.errors import InputError, PacsError
from medseg.io.atomic import atomic_path
from medseg.io.dicom import NON_IMAGE_MODALITIES
from medseg.pacs.job import check_model, keep_values_out_of_logs, segment_series_folder

if TYPE_CHECKING:
    from requests.sessions import _Settings  # types-requests' TypedDict of the merged settings (stubs only)

__all__ = [
    "NON_IMAGE_MODALITIES",
    "RunResult",
    "SeriesInfo",
    "choose_series",
    "list_series",
    "make_session",
    "retrieve_series",
    "run_study",
    "store_seg",
]

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_QIDO_FIELDS = ["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                "NumberOfSeriesRelatedInstances"]


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study as QIDO-RS describes it."""

    series_uid: str
    modality: str
    number: int | None
    description: str
    instances: int | None

    def describe(self) -> str:
        """One line for error messages (UIDs, modality, description; no patient data)."""
        count = "?" if self.instances is None else self.instances
        return f"{self.series_uid} ({self.modality or '?'}, #{self.number}, {count} instances, {self.description!r})"


@dataclass(frozen=True)
class RunResult:
    """What ``medseg pacs run`` did."""

    study_uid: str
    source_series_uid: str
    instances: int
    seg_sop_instance_uid: str
    seg_series_instance_uid: str
    seg_copy: Path | None


def _redact(url: str) -> str:
    """``url`` without user:password@ (for messages)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _Session(requests.Session):
    """A session whose explicit ``verify`` (a CA bundle, or False) wins over REQUESTS_CA_BUNDLE /
    CURL_CA_BUNDLE: plain requests lets those variables override ``Session.verify`` (psf/requests#3829),
    which would silently ignore ``--ca-bundle`` and ``--no-verify``."""

    def merge_environment_settings(self, url: str | bytes | None, proxies: MutableMapping[str, str] | None,
                                   stream: bool | None, verify: bool | str | None,
                                   cert: str | tuple[str, str] | None) -> _Settings:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            settings["verify"] = self.verify
        return settings


def make_session(*, username: str | None = None, password: str | None = None, token: str | None = None,
                 verify: bool = True, ca_bundle: str | os.PathLike[str] | None = None) -> requests.Session:
    """A requests session carrying the authentication and TLS settings.

    Raises
    ------
    InputError
        Both basic and token authentication, a username without password (or the reverse), a
        missing CA bundle, ``ca_bundle`` together with ``verify=False``.
    """
    if token is not None and (username is not None or password is not None):
        raise InputError(None, "use either --username/--password or --token, not both")
    if (username is None) != (password is None):
        raise InputError(None, "--username and --password go together")
    if ca_bundle is not None and not verify:
        raise InputError(None, "use either --ca-bundle or --no-verify, not both")
    session = _Session()
    if username is not None:
        session.auth = (username, password or "")
    if token is not None:
        session.headers["Authorization"] = f"Bearer {token}"
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file():
            raise InputError(ca_bundle, "CA bundle not found")
        session.verify = os.fspath(ca_bundle)
    elif not verify:
        log.warning("TLS certificate verification is off (--no-verify): the server is not authenticated")
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        session.verify = False
    return session


@contextlib.contextmanager
def _peer_errors(url: str, action: str) -> Iterator[None]:
    """Turn what requests / dicomweb-client raise into a :class:`PacsError` naming the URL."""
    where = _redact(url)
    try:
        yield
    except requests.exceptions.HTTPError as exc:
        response = exc.response
        code = response.status_code if response is not None else 0
        reason = (response.reason if response is not None else "") or ""
        if code in (401, 403):
            hint = "authentication failed; check --username/--password or --token"
            raise PacsError(f"{where}: HTTP {code} {reason} while {action}: {hint}") from None
        if code == 404:
            raise PacsError(f"{where}: HTTP 404 Not Found while {action} (wrong URL or unknown UID?)") from None
        raise PacsError(f"{where}: HTTP {code} {reason} while {action}") from None
    except requests.exceptions.SSLError as exc:
        raise PacsError(f"{where}: TLS error while {action} ({_short(exc)}); for a private CA pass "
                        "--ca-bundle FILE") from None
    except requests.exceptions.ConnectionError as exc:
        raise PacsError(f"{where}: cannot connect while {action} ({_short(exc)})") from None
    except requests.exceptions.Timeout:
        raise PacsError(f"{where}: timed out while {action}") from None
    except requests.exceptions.RequestException as exc:
        raise PacsError(f"{where}: request failed while {action}: {_short(exc)}") from None
    except (ValueError, KeyError, InvalidDicomError) as exc:
        raise PacsError(f"{where}: unexpected response while {action}: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests / urllib3 exception, on one line."""
    text = str(exc)
    for marker in ("Caused by ", "NewConnectionError(", "SSLError("):
        if marker in text:
            text = text.split(marker, 1)[1]
    if "Connection refused" in text:
        return "connection refused"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "certificate verify failed"
    return " ".join(text.split())[:200]


def _value(entry: dict[str, Any], keyword: str) -> Any:
    """The first value of a DICOM JSON attribute (``None`` when absent)."""
    tag = tag_for_keyword(keyword)
    item = entry.get(f"{tag:08X}", {}) if tag is not None else {}
    values = item.get("Value") or [None]
    return values[0]


def list_series(client: DICOMwebClient, url: str, study_uid: str) -> list[SeriesInfo]:
    """QIDO-RS: the series of a study.

    Raises
    ------
    PacsError
        The server failed or does not know the study.
    """
    with _peer_errors(url, f"searching the series of study {study_uid}"):
        found = client.search_for_series(study_uid, fields=_QIDO_FIELDS)
    series = []
    for entry in found:
        uid = _value(entry, "SeriesInstanceUID")
        if not uid:
            continue
        number, count = _value(entry, "SeriesNumber"), _value(entry, "NumberOfSeriesRelatedInstances")
        series.append(SeriesInfo(str(uid), str(_value(entry, "Modality") or ""),
                                 None if number is None else int(number), str(_value(entry, "SeriesDescription") or ""),
                                 None if count is None else int(count)))
    if not series:
        raise PacsError(f"{_redact(url)}: study {study_uid} not found (QIDO-RS found no series in it)")
    return series


def choose_series(series: list[SeriesInfo], study_uid: str, *, series_uid: str | None = None,
                  modality: str | None = None) -> SeriesInfo:
    """The series to segment: ``series_uid`` if given, else the study's only image series (of ``modality``).

    Raises
    ------
    InputError
        ``series_uid`` is not in the study, no image series, or several candidates (all listed).
    """
    if series_uid is not None:
        for info in series:
            if info.series_uid == series_uid:
                return info
        listing = "; ".join(s.describe() for s in series)
        raise InputError(None, f"series {series_uid} is not in study {study_uid}; its series: {listing}")
    candidates = [s for s in series if s.modality.upper() not in NON_IMAGE_MODALITIES]
    if modality is not None:
        candidates = [s for s in candidates if s.modality.upper() == modality.upper()]
    if len(candidates) == 1:
        return candidates[0]
    kind = f"{modality.upper()} image series" if modality else "image series"
    if not candidates:
        listing = "; ".join(s.describe() for s in series)
        raise InputError(None, f"study {study_uid} holds no {kind}; its series: {listing}")
    listing = "; ".join(s.describe() for s in candidates)
    raise InputError(None, f"study {study_uid} holds {len(candidates)} {kind}, choose one with --series UID: {listing}")


def retrieve_series(client: DICOMwebClient, url: str, study_uid: str, series_uid: str, folder: Path) -> int:
    """WADO-RS: stream a series' instances into ``folder`` as ``<SOPInstanceUID>.dcm``; returns the count.

    Instances come in the transfer syntax the server stored (``transfer-syntax=*``), so
    compressed series are not transcoded by the server.

    Raises
    ------
    PacsError
        The server failed, or sent no instance.
    """
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    with _peer_errors(url, f"retrieving series {series_uid}"):
        for ds in client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),)):
            count += 1
            name = str(getattr(ds, "SOPInstanceUID", "") or f"instance{count:05d}")
            ds.save_as(folder / f"{_safe_name(name)}.dcm", enforce_file_format=True)
    if count == 0:
        raise PacsError(f"{_redact(url)}: WADO-RS returned no instance of series {series_uid}")
    log.info("retrieved %d instances of series %s", count, series_uid)
    return count


def _safe_name(uid: str) -> str:
    """A file name from a UID (anything but digits and dots replaced)."""
    return "".join(c if c.isdigit() or c == "." else "_" for c in uid)[:64] or "instance"


def store_seg(client: DICOMwebClient, url: str, study_uid: str, seg_path: Path) -> pydicom.Dataset:
    """STOW-RS: store the SEG in its study; returns the SEG dataset.

    Raises
    ------
    PacsError
        The server failed or reports the instance as not stored.
    """
    seg = pydicom.dcmread(seg_path)
    with _peer_errors(url, f"storing the SEG in study {study_uid}"):
        response = client.store_instances([seg], study_instance_uid=study_uid)
    failed = getattr(response, "FailedSOPSequence", None) or []
    if failed:
        reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: 0x{int(item.get('FailureReason', 0)):04X}"
                            for item in failed)
        raise PacsError(f"{_redact(url)}: STOW-RS refused the SEG ({reasons})")
    stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in getattr(response, "ReferencedSOPSequence", [])}
    if stored and seg.SOPInstanceUID not in stored:
        raise PacsError(f"{_redact(url)}: STOW-RS did not confirm the SEG {seg.SOPInstanceUID}")
    return seg


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (so ``finally`` blocks remove temporary files) while inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_study(url: str, study_uid: str, model: str | os.PathLike[str], *, series_uid: str | None = None,
              modality: str | None = None, session: requests.Session | None = None,
              output: str | os.PathLike[str] | None = None, device: str = "cpu",
              timeout: float = 60.0) -> RunResult:
    """Segment one series of a study on a DICOMweb server and store the SEG back (STOW-RS).

    Parameters
    ----------
    url
        DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
    study_uid
        StudyInstanceUID.
    model
        Run folder or bundle.
    series_uid, modality
        Which series (default: the study's only image series).
    session
        Authentication / TLS settings (:func:`make_session`); default: no authentication, TLS verified.
    output
        Folder to keep a copy of the SEG in (``<SOPInstanceUID>.dcm``).
    device
        Torch device of the inference.
    timeout
        Seconds per HTTP request.

    Returns
    -------
    RunResult
        The UIDs of the stored SEG.

    Raises
    ------
    PacsError
        The server cannot be reached, refuses the credentials or the certificate, does not know the
        study, or refuses the SEG.
    InputError
        Malformed URL or UIDs, no unambiguous series (the candidates are listed).
    BundleError
        Bad run folder (checked before contacting the server).
    DicomError
        The retrieved series cannot be segmented.
    """
    keep_values_out_of_logs()
    logging.getLogger("retrying").setLevel(logging.ERROR)  # it logs each retried exception with a traceback
    try:
        client = DICOMwebClient(url.rstrip("/"), session=session or make_session(), timeout=timeout)
    except ValueError as exc:
        raise InputError(None, f"--url {_redact(url)}: not a DICOMweb URL ({exc}); "
                               "e.g. http://host:8042/dicom-web") from None
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)
    for name, uid in (("--study", study_uid), ("--series", series_uid)):
        if uid is not None and not (len(uid) <= 64 and _UID.match(uid)):
            raise InputError(None, f"{name} {uid!r} is not a valid DICOM UID")
    check_model(model)  # before any traffic: a bad run folder fails at once
    with _sigterm_as_interrupt():
        info = choose_series(list_series(client, url, study_uid), study_uid, series_uid=series_uid, modality=modality)
        log.info("study %s: segmenting series %s (%s, %s instances)", study_uid, info.series_uid, info.modality,
                 "?" if info.instances is None else info.instances)
        work = Path(tempfile.mkdtemp(prefix="medseg-pacs-"))
        try:
            count = retrieve_series(client, url, study_uid, info.series_uid, work / "series")
            seg_path = segment_series_folder(model, work / "series", work / "seg", series_uid=info.series_uid,
                                             device=device)
            seg = store_seg(client, url, study_uid, seg_path)
            copy = None
            if output is not None:
                copy = Path(output) / f"{seg.SOPInstanceUID}.dcm"
                with atomic_path(copy) as tmp:
                    shutil.copyfile(seg_path, tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("stored SEG %s (series %s) in study %s", seg.SOPInstanceUID, seg.SeriesInstanceUID, study_uid)
    return RunResult(study_uid, info.series_uid, count, str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID), copy)
