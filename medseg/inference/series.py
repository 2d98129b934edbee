"""Prediction of one DICOM series: NIfTI, DICOM SEG or RTSTRUCT output.

The series is read in modality units with its exact geometry (:func:`medseg.io.dicom.read_series`) and
predicted from memory like any image (:meth:`medseg.inference.predictor.Predictor.predict_image`): it is
never written to a temporary file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import BundleError, DicomError, InputError
from medseg.inference.predictor import LabelMapPredictor, check_fit
from medseg.io.image import SourceImage, label_map_name, write_label_map
from medseg.layout import META_FILE
from medseg.logs import held_info
from medseg.plan import Plan

__all__ = ["DICOM_OUTPUT_FORMATS", "bundle_metadata", "dicom_case_name", "predict_series"]

log = logging.getLogger(__name__)

#: Output formats of :func:`predict_series`: the output's kind and file ending (:func:`label_map_name`).
DICOM_OUTPUT_FORMATS: dict[str, tuple[str, str]] = {"nifti": ("seg", ".nii.gz"), "dicom-seg": ("seg", ".dcm"),
                                                    "rtstruct": ("rtstruct", ".dcm")}


def dicom_case_name(description: str, series_uid: str) -> str:
    """File-name stem for the outputs of a DICOM series: its SeriesDescription made file-safe
    (letters, digits, ``.``, ``_``, ``-``; at most 64 characters), else its SeriesInstanceUID.
    Never patient data."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", description or "").strip("._-")[:64].rstrip("._-")
    return name or series_uid


def bundle_metadata(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (an empty dict if the run folder has none).

    Raises
    ------
    BundleError
        If the file exists but is not a JSON object.
    """
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        log.warning("%s: no metadata.json; segment names come from the plan", path.parent)
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return meta


def predict_series(plan: Plan, load_predictor: Callable[[], LabelMapPredictor], run_dir: str | os.PathLike[str],
                   input_path: str | os.PathLike[str], output_dir: str | os.PathLike[str], *, fmt: str = "nifti",
                   series_uid: str | None = None, modality: str | None = None, min_slices: int = 1,
                   description: str | None = None, overwrite: bool = False, strict: bool = False,
                   seg_description: Callable[[str, int], str] | None = None) -> list[Path]:
    """Segment one DICOM series (chosen by :func:`medseg.io.dicom.select_series`) of a folder with the
    :class:`Predictor` that ``load_predictor`` makes for ``plan`` (called once everything is checked).

    The series is predicted from memory and written into ``output_dir`` as
    :func:`~medseg.io.image.label_map_name` of its name (the series' description made file-safe, else
    its SeriesInstanceUID):

    * ``fmt="nifti"``: ``<name>_seg.nii.gz``, a label map in the series' geometry;
    * ``fmt="dicom-seg"``: ``<name>_seg.dcm``, one DICOM SEG (:func:`medseg.io.dicom_seg.write_dicom_seg`);
    * ``fmt="rtstruct"``: ``<name>_rtstruct.dcm``, one RT structure set (:func:`medseg.io.rtstruct.write_rtstruct`).

    Segment names and codes come from ``run_dir``'s ``configs/metadata.json`` ``"segments"``; the
    algorithm is identified as ``medseg <bundle name>`` with the bundle's version. ``seg_description``:
    the output's SeriesDescription from the writer's default and the number of source instances (None:
    the default). Everything is checked before the prediction, including whether the model fits the
    series (:func:`check_fit`: its Modality and spacing against the plan; a warning per problem, an
    error with ``strict``); a failure leaves no output (and no new empty ``output_dir``).

    Returns
    -------
    list of Path
        The written file.

    Raises
    ------
    DicomError
        No DICOM image, no or an ambiguous series choice (the candidates are listed), a series with
        blocking problems, unreadable or truncated files, missing pixel data, NaN voxels.
    InputError
        Unknown ``fmt``, an output that exists (unless ``overwrite``), a 2D model, a model of several input
        channels (a series is one); with ``strict``, a series the model does not fit; from the predictor,
        bad options.
    BundleError
        Bad run folder, or segments without SNOMED CT codes for ``fmt="dicom-seg"``.
    """
    from medseg.io import dicom

    if fmt not in DICOM_OUTPUT_FORMATS:
        raise InputError(None, f"--format must be one of {', '.join(DICOM_OUTPUT_FORMATS)}, got {fmt!r}")
    if plan.num_channels > 1:
        names = ", ".join(c.name for c in plan.input_channels)
        raise InputError(Path(run_dir), f"takes {plan.num_channels} input channels ({names}) and a DICOM series is "
                                        "one image; predict the channel files instead (--input a folder of "
                                        "CASE_0000.nii.gz, CASE_0001.nii.gz, ...)")
    with held_info():  # the scan's and reader's notes are printed only once the series has been read
        scan = dicom.scan_dicom(input_path)
        series = dicom.select_series(scan, series_uid=series_uid, modality=modality, min_slices=min_slices,
                                     description=description)
        if plan.dims != 3:
            raise InputError(Path(run_dir), f"is a {plan.dims}D model; DICOM series need a 3D model")
        meta = bundle_metadata(run_dir)
        segments = None
        if fmt != "nifti":
            from medseg.io.dicom_seg import segment_descriptions

            segments = segment_descriptions(meta, plan.labels, require_codes=fmt == "dicom-seg",
                                            source=Path(run_dir) / META_FILE)
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise InputError(output_dir, "exists and is not a folder")
        case = dicom_case_name(series.description, series.series_uid)
        target = output_dir / label_map_name(case, DICOM_OUTPUT_FORMATS[fmt][1], DICOM_OUTPUT_FORMATS[fmt][0])
        if target.exists() and not overwrite:
            raise InputError(target, "already exists; pass --overwrite to replace it")
        what = f"series {series.series_uid} ({series.modality}, {series.size[2]} slices)"
        source = SourceImage.from_image(dicom.read_series(series), case)
        check_fit(plan, Path(input_path), source.geometry, source.voxels().T, series.modality, strict, subject=what)
        sources = dicom.source_datasets(series, pixels=False) if fmt != "nifti" else []
    log.info("%s: %s -> %s", Path(input_path), what, target)
    predictor = load_predictor()
    created_dir = not output_dir.exists()
    try:
        try:
            loaded = predictor.load(source)
            source.drop_pixels()  # preprocessed: the label map needs only its grid
            labels = predictor.infer(loaded)
            del loaded
        except InputError as exc:  # names the series' case name; the user knows the folder and the series
            raise DicomError(Path(input_path), f"{what}: {exc.problem}") from exc
        if fmt == "nifti":
            write_label_map(labels, source, target)
        else:
            _write_dicom(fmt, labels, sources, segments or {}, target, meta, run_dir, seg_description)
    except BaseException:
        if created_dir and output_dir.exists() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    return [target]


def _write_dicom(fmt: str, labels: np.ndarray, sources: list[Any], segments: dict[int, Any], target: Path,
                 meta: dict[str, Any],
                 run_dir: str | os.PathLike[str], seg_description: Callable[[str, int], str] | None) -> Path:
    """The DICOM SEG or RTSTRUCT of ``labels`` (index order ``(x, y, z)`` of the series)."""
    from medseg.io.dicom_seg import SEG_SERIES_DESCRIPTION, write_dicom_seg
    from medseg.io.rtstruct import RTSTRUCT_SERIES_DESCRIPTION, write_rtstruct

    writer, description = ((write_dicom_seg, SEG_SERIES_DESCRIPTION) if fmt == "dicom-seg"
                           else (write_rtstruct, RTSTRUCT_SERIES_DESCRIPTION))
    if seg_description is not None:
        description = seg_description(description, len(sources))
    bundle_name = str(meta.get("name") or Path(run_dir).resolve().name)
    # (x, y, z) index order -> (slices, rows, columns) of the source instances
    return writer(np.ascontiguousarray(labels.transpose(2, 1, 0)), sources, segments, target,
                  algorithm_name=f"medseg {bundle_name}", algorithm_version=str(meta.get("version") or "unknown"),
                  series_description=description)
