"""The segmentation job shared by the DICOMweb client and the DIMSE listener: one series folder -> one SEG."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import pydicom

from medseg.errors import MedsegError

log = logging.getLogger(__name__)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class _RedactValues(logging.Filter):
    """Replace quoted values in pydicom's log messages ("Invalid value for VR PN: '<name>'")."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "'" in message or '"' in message:
            record.msg, record.args = _QUOTED.sub("<value not logged>", message), None
        return True


def keep_values_out_of_logs() -> None:
    """pydicom reports invalid element values (a malformed PatientName included) with the value in the
    log and in a warning; a PACS process must not write patient data into its logs. Also quiets
    highdicom's per-module INFO lines. Idempotent."""
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _RedactValues) for f in logger.filters):
        logger.addFilter(_RedactValues())
    warnings.filterwarnings("ignore", message=r"Invalid value for VR")
    # highdicom logs every module it copies into the SEG at INFO (a dozen lines per job)
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger("highdicom").getEffectiveLevel()))


def check_model(model: str | os.PathLike[str]) -> None:
    """Build the bundle's inference pipeline once (safe mode, plan, weights: what every job builds), so
    that a bad ``--model`` fails before any DICOM traffic.

    Raises
    ------
    BundleError
        Missing folder, plan or weights, weights that do not fit the plan's network, a config refused by
        safe mode.
    """
    from medseg.bundle.pipeline import inference_pipeline

    inference_pipeline(model).predictor()


def segment_series_folder(model: str | os.PathLike[str], series_dir: str | os.PathLike[str],
                          out_dir: str | os.PathLike[str], *, series_uid: str | None = None,
                          device: str = "cpu", revision: int = 1) -> Path:
    """Segment the DICOM series in ``series_dir`` with ``model`` and write a DICOM SEG into ``out_dir``.

    Calls :func:`medseg.bundle.pipeline.predict_dicom` with ``fmt="dicom-seg"``.

    Parameters
    ----------
    model
        Run folder or bundle (``medseg train --out``).
    series_dir
        Folder holding the instances of the series (other series may be present when ``series_uid``
        names the one to segment).
    out_dir
        Folder for the SEG file.
    series_uid
        SeriesInstanceUID to segment; ``None``: the folder's only image series.
    device
        Torch device of the inference.
    revision
        Revision number of this SEG of the series (1: the first). From 2 on, the SeriesDescription
        gets a revision note (:func:`revision_description`); every SEG has its own new
        SeriesInstanceUID and SOPInstanceUID either way.

    Returns
    -------
    Path
        The DICOM SEG file.

    Raises
    ------
    DicomError
        Unusable series (see :func:`medseg.io.dicom.select_series`).
    BundleError
        Bad run folder.
    MedsegError
        The prediction wrote no DICOM SEG file.
    """
    from medseg.bundle.pipeline import InferenceOptions, predict_dicom

    def described(default: str, instances: int) -> str:
        return revision_description(default or "segmentation", revision, instances)

    outputs = predict_dicom(model, series_dir, out_dir, InferenceOptions(device=device), fmt="dicom-seg",
                            series_uid=series_uid, seg_description=described if revision > 1 else None)
    segs = [Path(p) for p in outputs if Path(p).is_file()]
    if len(segs) != 1:
        raise MedsegError(f"{out_dir}: expected one DICOM SEG file from the prediction, got {len(segs)}")
    log.info("SEG written: %s", segs[0].name)
    return segs[0]


def revision_description(description: str, revision: int, instances: int) -> str:
    """``description`` plus `` (revision N: M instances)``, the description shortened to keep the
    note within the 64 characters of a SeriesDescription (LO)."""
    note = f" (revision {revision}: {instances} instances)"
    return description[: max(0, 64 - len(note))].rstrip() + note


def referenced_instances(seg: pydicom.Dataset) -> int:
    """Number of source instances a SEG references (all items of its ReferencedSeriesSequence)."""
    return sum(len(item.get("ReferencedInstanceSequence", [])) for item in seg.get("ReferencedSeriesSequence", []))
