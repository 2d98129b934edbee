"""Checks of a received C-STORE data set before the listener keeps it, and the C-STORE statuses it answers."""

from __future__ import annotations

import re

import pydicom
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DOES_NOT_MATCH_SOP_CLASS",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "BadInstance",
    "check_instance",
]

#: C-STORE statuses (PS3.4 B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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
    pixel_keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if pixel_keyword is None:
        raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS, "no pixel data (not an image instance)")
    if "Rows" not in ds or "Columns" not in ds:
        raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS, "pixel data without Rows / Columns")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if pixel_keyword == "PixelData" and syntax is not None and not UID(syntax).is_compressed:
        try:
            expected = get_expected_length(ds, unit="bytes")
        except Exception:  # noqa: BLE001 - missing BitsAllocated, SamplesPerPixel, ...
            raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS, "incomplete image pixel description") from None
        if len(ds.PixelData) < expected:
            raise BadInstance(STATUS_DOES_NOT_MATCH_SOP_CLASS,
                              f"pixel data truncated ({len(ds.PixelData)} of {expected} bytes)")
    return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"]
