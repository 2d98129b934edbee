"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Cases are paired by name (see :func:`pair_cases`); every pair must share one voxel grid. All
pairs are validated before any metric is computed, and the outputs (``metrics.csv`` and
``summary.json``) are written atomically only once every case has been evaluated, so an error
leaves no output behind. Metric definitions and the empty-mask convention are those of
:mod:`medseg.metrics.overlap`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medseg.bundle.codes import is_lesion_name
from medseg.errors import InputError
from medseg.io.atomic import atomic_write_text
from medseg.io.image import case_name, list_images, read_geometry, read_image, to_array
from medseg.metrics.lesions import lesion_rows, lesion_wise, write_lesions_csv
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
_CHUNK = 1 << 24


def pair_cases(pred_dir: str | os.PathLike[str], ref_dir: str | os.PathLike[str]) -> list[tuple[str, Path, Path]]:
    """Pair each prediction with its reference by case name.

    A prediction ``<case>_seg.<ext>`` or ``<case>.<ext>`` matches the reference ``<case>.<ext'>``
    (any image endings); an exact name match wins over stripping ``_seg``.

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
    base = name[: -len(PRED_SUFFIX)] if name.endswith(PRED_SUFFIX) else name
    return f"{base}.<ext>"


def _and_more(paths: list[Path], shown: int = 5) -> str:
    if not paths:
        return ""
    names = ", ".join(p.name for p in paths[:shown])
    extra = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"; same for {names}{extra}"


def evaluate_folders(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    labels: Mapping[int, str] | None = None,
    nsd_tolerance_mm: float = 1.0,
    lesion_labels: Sequence[int] | None = None,
    lesion_min_volume_ml: float = 0.0,
    plots: bool = True,
) -> dict[str, Any]:
    """Compute per-case, per-label metrics and write ``metrics.csv``, ``summary.json``, for lesion
    labels ``lesions.csv`` (lesion-wise TP/FP/FN, F1, lesion-wise Dice; see
    :mod:`medseg.metrics.lesions`), and ``dice_boxplot.png`` (Dice per label over cases).

    Parameters
    ----------
    pred_dir, ref_dir
        Folders of predicted and reference label maps, paired by :func:`pair_cases`.
    out_dir
        Output folder (created if needed).
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
    plots
        Write ``dice_boxplot.png``.

    Returns
    -------
    dict
        The summary written to ``summary.json``.

    Raises
    ------
    InputError
        Any error of :func:`pair_cases`; an unreadable image; a pair whose grids differ; a label
        map with non-integral, non-finite or negative values; with ``labels``, a value not
        declared in it. Nothing is written when an error is raised.
    ValueError
        If ``nsd_tolerance_mm`` is negative or not finite, or ``labels`` has a negative key.
    """
    checked_non_negative("nsd_tolerance_mm", nsd_tolerance_mm)
    declared: dict[int, str] | None = None
    if labels is not None:
        declared = {int(k): str(v) for k, v in labels.items()}
        if any(k < 0 for k in declared):
            raise ValueError(f"label values must be >= 0, got {sorted(declared)}")
    out_dir = Path(out_dir)

    pairs = pair_cases(pred_dir, ref_dir)
    for _case, pred, ref in pairs:  # cheap header-only check of every pair before any pixel is read
        ref_geometry = read_geometry(ref)
        difference = ref_geometry.mismatch(read_geometry(pred))
        if difference is not None:
            raise InputError(pred, f"grid does not match its reference {ref.name}: {difference}")
    log.info("evaluating %d case(s) from %s against %s", len(pairs), pred_dir, ref_dir)

    # per case: metrics of the labels present in the prediction or the reference, and lesion-wise
    # scores of the lesion labels (explicit, or named like lesions in the declared labels)
    results: dict[str, dict[int, LabelMetrics]] = {}
    seen: set[int] = set()
    lesion_candidates = list(lesion_labels) if lesion_labels is not None else [
        k for k, name in (declared or {}).items() if k != 0 and is_lesion_name(name)]
    lesion_rows_: list[dict[str, Any]] = []
    progress = tqdm(pairs, desc="evaluate", unit="case", disable=not sys.stderr.isatty())
    for case, pred, ref in progress:
        ref_image = read_image(ref)
        pred_labels = as_label_map(pred, to_array(read_image(pred)), declared)
        ref_labels = as_label_map(ref, to_array(ref_image), declared)
        spacing = ref_image.GetSpacing()
        present = sorted((set(_values(pred_labels)) | set(_values(ref_labels))) - {0})
        seen.update(present)
        results[case] = {
            label: label_metrics(pred_labels, ref_labels, label, spacing, nsd_tolerance_mm) for label in present
        }
        for label in lesion_candidates:
            result = lesion_wise(pred_labels, ref_labels, label, spacing, min_volume_ml=lesion_min_volume_ml)
            lesion_rows_.append(lesion_rows(case, label, result))
        log.debug("%s: labels %s", case, present)

    names = declared if declared is not None else {label: f"label_{label}" for label in sorted(seen)}
    foreground = sorted(label for label in names if label != 0)
    if not foreground:
        log.warning("no foreground label in any prediction or reference: metrics.csv has no rows")

    rows: list[tuple[str, int, LabelMetrics]] = [
        (case, label, results[case].get(label, both_empty_metrics())) for case in results for label in foreground
    ]
    summary = _summary(rows, names, foreground, len(pairs), nsd_tolerance_mm)
    lesion_rows_ = [row for row in lesion_rows_ if int(row["label"]) in foreground]  # as metrics.csv
    if lesion_rows_:
        summary["lesions"] = _lesion_summary(lesion_rows_, names)

    csv_text = _csv_text(rows, names)
    json_text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    atomic_write_text(out_dir / "metrics.csv", csv_text)
    atomic_write_text(out_dir / "summary.json", json_text)
    written = [out_dir / "metrics.csv", out_dir / "summary.json"]
    if lesion_rows_:
        written.append(write_lesions_csv(lesion_rows_, out_dir / "lesions.csv"))
    if plots and rows:
        from medseg.reports.figures import dice_boxplot_png

        by_label = {names[label]: [m.dice for _, lab, m in rows if lab == label] for label in foreground}
        written.append(dice_boxplot_png(by_label, out_dir / "dice_boxplot.png",
                                        title=f"Dice per label ({len(pairs)} case{'s' if len(pairs) != 1 else ''})"))
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return summary


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


def _values(labels: np.ndarray) -> list[int]:
    """The distinct values of an integer label map (bincount when small, unique otherwise)."""
    if labels.size == 0:
        return []
    top = int(labels.max())
    if top >= 65536 or labels.dtype == np.uint64:  # bincount cannot take uint64
        return [int(v) for v in np.unique(labels)]
    flat = labels.reshape(-1)
    counts = np.zeros(top + 1, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):  # chunks bound the temporary intp copy bincount makes
        counts += np.bincount(flat[start : start + _CHUNK], minlength=top + 1)
    return [int(v) for v in np.flatnonzero(counts)]


def as_label_map(path: Path, array: np.ndarray, declared: Mapping[int, str] | None) -> np.ndarray:
    """Check that ``array`` is a label map (non-negative integers, declared labels) and return it as ints.

    Raises
    ------
    InputError
        Non-integral, non-finite or negative values, or a value not in ``declared``.
    """
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputError(path, "not a label map: holds NaN or infinite values")
        if not np.all(array == np.round(array)):
            bad = float(array[array != np.round(array)].flat[0])
            raise InputError(path, f"not a label map: holds non-integer value {bad:g}")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise InputError(path, f"not a label map: pixel type {array.dtype} is not integer")
    if array.size and int(array.min()) < 0:
        raise InputError(path, f"not a label map: holds negative value {int(array.min())}")
    if declared is not None:
        allowed = set(declared) | {0}
        undeclared = [v for v in _values(array) if v not in allowed]
        if undeclared:
            raise InputError(path, f"label value {undeclared[0]} not declared in labels ({_describe(allowed)})")
    return array


def _describe(values: Iterable[int]) -> str:
    """``0..5`` for a contiguous run, else ``0, 1, 3``."""
    ordered = sorted(values)
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}..{ordered[-1]}"
    return ", ".join(str(v) for v in ordered)


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


def _csv_text(rows: list[tuple[str, int, LabelMetrics]], names: Mapping[int, str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for case, label, metrics in rows:
        writer.writerow([case, label, *(_fmt(getattr(metrics, f)) for f in METRIC_FIELDS), names[label]])
    return buffer.getvalue()
