"""Score a folder of predicted label maps against a folder of reference label maps.

Cases are paired by name (see :func:`pair_cases`); every pair must share one voxel grid. All
pairs are validated before any metric is computed. :func:`score_folders` computes; the files
(``metrics.csv``, ``summary.json``, ...) are written by :func:`medseg.reports.evaluation.evaluate_folders`.
Metric definitions and the empty-mask convention are those of :mod:`medseg.metrics.overlap`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medseg.errors import InputError
from medseg.io.image import case_name, list_images, read_geometry
from medseg.labels import is_lesion_name
from medseg.metrics.labelmaps import describe_values, label_values, read_label_map
from medseg.metrics.lesion_table import lesion_rows
from medseg.metrics.lesions import lesion_wise
from medseg.metrics.overlap import (
    EMPTY_CONVENTION,
    METRIC_FIELDS,
    LabelMetrics,
    both_empty_metrics,
    checked_non_negative,
    label_metrics,
)

log = logging.getLogger(__name__)

#: Columns of ``metrics.csv``, in order.
CSV_COLUMNS: tuple[str, ...] = ("case", "label", *METRIC_FIELDS, "label_name")
#: Metrics summarised per label in ``summary.json``.
SUMMARY_METRICS: tuple[str, ...] = ("dice", "iou", "hd95_mm", "assd_mm", "nsd")
#: Suffix a prediction may carry after the case name (``<case>_seg.nii.gz``).
PRED_SUFFIX = "_seg"
#: Channel suffix of a one-channel image in nnU-Net's raw layout (``imagesTs/CASE_0000.nii.gz``, whose label map
#: is ``labelsTs/CASE.nii.gz``): a prediction ``CASE_0000_seg.<ext>`` pairs with the reference ``CASE.<ext>``.
CHANNEL_SUFFIX = "_0000"


def pair_cases(pred_dir: str | os.PathLike[str], ref_dir: str | os.PathLike[str]) -> list[tuple[str, Path, Path]]:
    """Pair each prediction with its reference by case name.

    A prediction ``<case>_seg.<ext>`` or ``<case>.<ext>`` matches the reference ``<case>.<ext'>``
    (any image endings); an exact name match wins over stripping ``_seg``, which wins over stripping ``_0000_seg``
    (the prediction of nnU-Net's one-channel ``imagesTs/<case>_0000.<ext>``).

    Returns
    -------
    list of (case, prediction path, reference path)
        Sorted by case name.

    Raises
    ------
    InputError
        A folder is missing or holds no image; two references (or two predictions) share a case
        name; no prediction matches any reference; a prediction has no reference; a reference has
        no prediction.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds = list_images(pred_dir)
    refs: dict[str, Path] = {}
    for ref in list_images(ref_dir):
        case = case_name(ref)
        if case in refs:
            raise InputError(ref, f"two references for case '{case}' (also {refs[case].name}); keep one")
        refs[case] = ref

    matched: dict[str, Path] = {}
    unmatched: list[Path] = []
    for pred in preds:
        name = case_name(pred)
        case: str | None = name if name in refs else None
        if case is None and name.endswith(PRED_SUFFIX) and name[: -len(PRED_SUFFIX)] in refs:
            case = name[: -len(PRED_SUFFIX)]
        if case is None and name.endswith(CHANNEL_SUFFIX + PRED_SUFFIX) and \
                name[: -len(CHANNEL_SUFFIX + PRED_SUFFIX)] in refs:  # nnU-Net's imagesTs/CASE_0000 vs labelsTs/CASE
            case = name[: -len(CHANNEL_SUFFIX + PRED_SUFFIX)]
        if case is None:
            unmatched.append(pred)
            continue
        if case in matched:
            raise InputError(pred, f"a second prediction for case '{case}' (also {matched[case].name}); keep one")
        matched[case] = pred

    if not matched:
        raise InputError(
            pred_dir,
            f"no prediction matches a reference in {ref_dir} "
            f"(expected <case>{PRED_SUFFIX}.<ext> or <case>.<ext> for a reference <case>.<ext>)",
        )
    if unmatched:
        raise InputError(
            unmatched[0],
            f"no reference for this prediction in {ref_dir} (expected {_expected_ref(unmatched[0])})"
            + _and_more(unmatched[1:]),
        )
    missing = [ref for case, ref in sorted(refs.items()) if case not in matched]
    if missing:
        raise InputError(
            missing[0],
            f"no prediction for this reference in {pred_dir}; a missing prediction would bias the means"
            + _and_more(missing[1:]),
        )
    return [(case, matched[case], refs[case]) for case in sorted(matched)]


def _expected_ref(pred: Path) -> str:
    name = case_name(pred)
    base = name.removesuffix(PRED_SUFFIX)
    return f"{base}.<ext>"


def _and_more(paths: list[Path], shown: int = 5) -> str:
    if not paths:
        return ""
    names = ", ".join(p.name for p in paths[:shown])
    extra = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"; same for {names}{extra}"


@dataclass
class FolderEvaluation:
    """What :func:`score_folders` measured: per-case, per-label metrics and lesion-wise scores.

    Attributes
    ----------
    cases
        Number of case pairs.
    rows
        ``(case, label, metrics)`` for every case and foreground label (both empty: :func:`both_empty_metrics`).
    names
        ``{label: name}`` of the labels reported.
    foreground
        The foreground labels reported, sorted.
    lesion_rows
        Rows of ``lesions.csv`` (:func:`medseg.metrics.lesions.lesion_rows`) of the reported lesion labels.
    nsd_tolerance_mm
        Tolerance of the normalised surface Dice.
    """

    cases: int
    rows: list[tuple[str, int, LabelMetrics]]
    names: dict[int, str]
    foreground: list[int]
    lesion_rows: list[dict[str, Any]]
    nsd_tolerance_mm: float

    def summary(self) -> dict[str, Any]:
        """The summary (``summary.json``): cases, per-label mean/std/median of :data:`SUMMARY_METRICS`, the
        foreground mean Dice, the empty-mask convention and, for lesion labels, lesion-wise totals."""
        summary = _summary(self.rows, self.names, self.foreground, self.cases, self.nsd_tolerance_mm)
        if self.lesion_rows:
            summary["lesions"] = _lesion_summary(self.lesion_rows, self.names)
        return summary

    def dice_by_label(self) -> dict[str, list[float]]:
        """``{label name: [Dice of each case]}`` over the foreground labels."""
        return {self.names[label]: [m.dice for _, lab, m in self.rows if lab == label] for label in self.foreground}


def score_folders(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    labels: Mapping[int, str] | None = None,
    nsd_tolerance_mm: float = 1.0,
    lesion_labels: Sequence[int] | None = None,
    lesion_min_volume_ml: float = 0.0,
    label_map: Mapping[int, int] | None = None,
) -> FolderEvaluation:
    """Compute per-case, per-label metrics of a folder of predictions against a folder of references,
    and lesion-wise scores (TP/FP/FN, F1, lesion-wise Dice; see :mod:`medseg.metrics.lesions`) of the
    lesion labels; nothing is written (:func:`medseg.reports.evaluation.evaluate_folders` writes them).

    Parameters
    ----------
    pred_dir, ref_dir
        Folders of predicted and reference label maps, paired by :func:`pair_cases`.
    labels
        ``{value: name}`` of the labels to evaluate (0, the background, is always allowed and
        never reported). Without it: the sorted union of the non-zero values of all cases, named
        ``label_<n>``.
    nsd_tolerance_mm
        Tolerance of the normalised surface Dice, in mm.
    lesion_labels
        Labels evaluated lesion by lesion; default: labels whose name is a lesion, tumour,
        neoplasm, mass or metastasis.
    lesion_min_volume_ml
        Connected components smaller than this are ignored in the lesion-wise evaluation.
    label_map
        ``{prediction value: reference value}`` applied to every prediction before it is checked
        and compared (e.g. ``{6: 5, 7: 5}`` when the model splits a reference label in two).
        A warning names the labels that occur only in the predictions or only in the references.

    Raises
    ------
    InputError
        Any error of :func:`pair_cases`; an unreadable image; a pair whose grids differ; a label
        map with non-integral, NaN, infinite or negative values (see
        :func:`medseg.metrics.labelmaps.read_label_map`); with ``labels``, a value (of a prediction
        after ``label_map``) not declared in it.
    ValueError
        If ``nsd_tolerance_mm`` is negative or not finite, or ``labels`` or ``label_map`` has a
        negative value.
    """
    checked_non_negative("nsd_tolerance_mm", nsd_tolerance_mm)
    declared: dict[int, str] | None = None
    if labels is not None:
        declared = {int(k): str(v) for k, v in labels.items()}
        if any(k < 0 for k in declared):
            raise ValueError(f"label values must be >= 0, got {sorted(declared)}")
    mapping = {int(k): int(v) for k, v in (label_map or {}).items()}
    if any(k < 0 or v < 0 for k, v in mapping.items()):
        raise ValueError(f"a label mapping needs values >= 0, got {mapping}")

    pairs = pair_cases(pred_dir, ref_dir)
    spacings = pair_spacings(pairs)
    log.info("evaluating %d case(s) from %s against %s", len(pairs), pred_dir, ref_dir)

    # per case: metrics of the labels present in the prediction or the reference, and lesion-wise
    # scores of the lesion labels (explicit, or named like lesions in the declared labels)
    results: dict[str, dict[int, LabelMetrics]] = {}
    seen: set[int] = set()
    in_preds: set[int] = set()
    in_refs: set[int] = set()
    hint = "; rename prediction values with a label mapping (--label-map PRED=REF)" if declared is not None else ""
    lesion_candidates = list(lesion_labels) if lesion_labels is not None else [
        k for k, name in (declared or {}).items() if k != 0 and is_lesion_name(name)]
    lesion_rows_: list[dict[str, Any]] = []
    progress = tqdm(pairs, desc="evaluate", unit="case", disable=not sys.stderr.isatty())
    for case, pred, ref in progress:
        pred_labels = read_label_map(pred, declared, mapping, hint)
        ref_labels = read_label_map(ref, declared)
        spacing = spacings[case]
        pred_values, ref_values = set(label_values(pred_labels)) - {0}, set(label_values(ref_labels)) - {0}
        in_preds |= pred_values
        in_refs |= ref_values
        present = sorted(pred_values | ref_values)
        seen.update(present)
        results[case] = {
            label: label_metrics(pred_labels, ref_labels, label, spacing, nsd_tolerance_mm) for label in present
        }
        for label in lesion_candidates:
            result = lesion_wise(pred_labels, ref_labels, label, spacing, min_volume_ml=lesion_min_volume_ml)
            lesion_rows_.append(lesion_rows(case, label, result))
        log.debug("%s: labels %s", case, present)

    _warn_label_sets(in_preds, in_refs)
    names = declared if declared is not None else {label: f"label_{label}" for label in sorted(seen)}
    foreground = sorted(label for label in names if label != 0)
    if not foreground:
        log.warning("no foreground label in any prediction or reference: metrics.csv has no rows")
    rows: list[tuple[str, int, LabelMetrics]] = [
        (case, label, results[case].get(label, both_empty_metrics())) for case in results for label in foreground
    ]
    lesion_rows_ = [row for row in lesion_rows_ if int(row["label"]) in foreground]  # as metrics.csv
    return FolderEvaluation(len(pairs), rows, dict(names), foreground, lesion_rows_, float(nsd_tolerance_mm))


def pair_spacings(pairs: list[tuple[str, Path, Path]]) -> dict[str, tuple[float, ...]]:
    """The spacing of every case of :func:`pair_cases`, once a cheap header-only check found each pair on one grid.

    Raises
    ------
    InputError
        A pair whose grids differ; an unreadable header.
    """
    spacings: dict[str, tuple[float, ...]] = {}
    for case, pred, ref in pairs:
        ref_geometry = read_geometry(ref)
        difference = ref_geometry.mismatch(read_geometry(pred))
        if difference is not None:
            raise InputError(pred, f"grid does not match its reference {ref.name}: {difference}")
        spacings[case] = ref_geometry.spacing
    return spacings


def _warn_label_sets(in_preds: set[int], in_refs: set[int]) -> None:
    """One warning per direction when the predictions' and the references' label sets differ
    (over all cases: a label absent from one case is an ordinary miss)."""
    only_pred, only_ref = sorted(in_preds - in_refs), sorted(in_refs - in_preds)
    if only_pred:
        log.warning("label(s) %s occur in the predictions but in no reference: all their voxels count as false "
                    "positives; if the model numbers labels differently, map them (--label-map PRED=REF)",
                    describe_values(only_pred))
    if only_ref:
        log.warning("label(s) %s occur in the references but in no prediction: all their voxels count as misses",
                    describe_values(only_ref))


def _lesion_summary(rows: list[dict[str, Any]], names: Mapping[int, str]) -> dict[str, Any]:
    """Per lesion label: lesion counts summed over cases, and mean/std/median of the case scores."""
    out: dict[str, Any] = {}
    for label in sorted({int(r["label"]) for r in rows}):
        mine = [r for r in rows if int(r["label"]) == label]
        out[str(label)] = {
            "name": names.get(label, f"label_{label}"),
            "tp": sum(int(r["tp"]) for r in mine), "fp": sum(int(r["fp"]) for r in mine),
            "fn": sum(int(r["fn"]) for r in mine),
            **{key: _stats([float(r[key]) for r in mine])
               for key in ("precision", "recall", "f1", "lesion_dice", "lesion_hd95_mm")},
        }
    return out


def _stats(values: list[float]) -> dict[str, float | None]:
    """NaN-aware mean, std (population) and median; None where every value is NaN."""
    data = np.asarray(values, dtype=np.float64)
    finite = data[~np.isnan(data)]
    if finite.size == 0:
        return {"mean": None, "std": None, "median": None}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "median": float(np.median(finite))}


def _summary(
    rows: list[tuple[str, int, LabelMetrics]],
    names: Mapping[int, str],
    foreground: list[int],
    n_cases: int,
    nsd_tolerance_mm: float,
) -> dict[str, Any]:
    per_label: dict[str, Any] = {}
    for label in foreground:
        metrics = [m for _, lab, m in rows if lab == label]
        entry: dict[str, Any] = {"name": names[label]}
        for field in SUMMARY_METRICS:
            entry[field] = _stats([getattr(m, field) for m in metrics])
        per_label[str(label)] = entry
    dice_means = [e["dice"]["mean"] for e in per_label.values() if e["dice"]["mean"] is not None]
    return {
        "cases": n_cases,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "labels": per_label,
        "mean_dice_foreground": float(np.mean(dice_means)) if dice_means else None,
        "empty_convention": EMPTY_CONVENTION,
    }


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6g}"


def metrics_csv(rows: list[tuple[str, int, LabelMetrics]], names: Mapping[int, str]) -> str:
    """The text of ``metrics.csv``: :data:`CSV_COLUMNS`, one line per case and label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for case, label, metrics in rows:
        writer.writerow([case, label, *(_fmt(getattr(metrics, f)) for f in METRIC_FIELDS), names[label]])
    return buffer.getvalue()
