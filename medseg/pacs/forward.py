"""Where the listener sends its SEGs (``AET@HOST:PORT``) and the C-STORE that sends one file there."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from medseg.errors import InputError, PacsError
from medseg.pacs.instances import STATUS_SUCCESS

__all__ = [
    "Destination",
    "check_ae_title",
    "send_file",
]

log = logging.getLogger(__name__)

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


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


def send_file(seg_path: Path, calling_ae: str, dest: Destination) -> None:
    """C-STORE one DICOM file to ``dest`` as ``calling_ae`` (in its own transfer syntax, else explicit
    or implicit VR little endian).

    Raises
    ------
    PacsError
        Unreadable file, no association (refused, rejected, aborted) or a failure status.
    """
    try:
        ds = pydicom.dcmread(seg_path)
    except Exception as exc:  # noqa: BLE001
        raise PacsError(f"{seg_path}: cannot read the SEG to send: {exc}") from None
    syntaxes = list(dict.fromkeys([str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian,
                                   ImplicitVRLittleEndian]))
    ae = AE(ae_title=calling_ae)
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
