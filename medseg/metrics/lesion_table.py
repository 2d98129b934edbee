"""``lesions.csv``: one row per case and lesion label, from :func:`medseg.metrics.lesions.lesion_wise`."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io.atomic import atomic_path
from medseg.metrics.lesions import LesionSummary

__all__ = ["LESION_COLUMNS", "lesion_rows", "write_lesions_csv"]

#: Columns of ``lesions.csv``, in order.
LESION_COLUMNS: tuple[str, ...] = (
    "case",
    "label",
    "tp",
    "fp",
    "fn",
    "precision",
    "recall",
    "f1",
    "lesion_dice",
    "lesion_hd95_mm",
    "n_ref",
    "n_pred",
)


def lesion_rows(case: str, label: int, summary: LesionSummary) -> dict[str, Any]:
    """One ``lesions.csv`` row (keys :data:`LESION_COLUMNS`) of a case's label.

    ``n_ref`` is the number of scored reference lesions (TP + FN); ``n_pred`` the number of
    predicted lesions that count: the distinct components matched to a scored reference lesion
    plus the FPs.
    """
    ref_rows = [m for m in summary.matches if m.ref_id is not None]
    matched_pred = {i for m in ref_rows for i in m.pred_ids}
    return {
        "case": str(case),
        "label": int(label),
        "tp": summary.tp,
        "fp": summary.fp,
        "fn": summary.fn,
        "precision": summary.precision,
        "recall": summary.recall,
        "f1": summary.f1,
        "lesion_dice": summary.lesion_dice,
        "lesion_hd95_mm": summary.lesion_hd95_mm,
        "n_ref": len(ref_rows),
        "n_pred": len(matched_pred) + summary.fp,
    }


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.6g}"
    return str(value)


def write_lesions_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write ``lesions.csv`` atomically: header :data:`LESION_COLUMNS`, one line per row.

    Floats are written with 6 significant digits, NaN as ``nan``, integers as integers.

    Parameters
    ----------
    rows
        Mappings with exactly the keys of :data:`LESION_COLUMNS` (e.g. from :func:`lesion_rows`).
    path
        Output file; its folder is created if needed.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If a row lacks a column or holds an unknown key (nothing is written).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LESION_COLUMNS)
    expected = set(LESION_COLUMNS)
    for index, row in enumerate(rows):
        keys = set(row)
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(keys - expected)
            raise ValueError(f"lesions.csv row {index}: missing columns {missing}, unknown keys {extra}")
        writer.writerow([_cell(row[column]) for column in LESION_COLUMNS])
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path
