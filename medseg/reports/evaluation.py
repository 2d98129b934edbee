"""The files of an evaluation: ``metrics.csv``, ``summary.json``, ``lesions.csv`` and ``dice_boxplot.png``.

:func:`evaluate_folders` scores a folder of predictions against a folder of references
(:func:`medseg.metrics.evaluate.score_folders`) and writes the results, atomically and only once every
case has been scored, so an error leaves no output behind. It is the folder evaluation of
``medseg evaluate`` and of a bundle's ``configs/evaluate.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg.io.atomic import atomic_write_text
from medseg.metrics.evaluate import FolderEvaluation, metrics_csv, score_folders
from medseg.metrics.lesion_table import write_lesions_csv
from medseg.reports.figures import dice_boxplot_png

__all__ = ["evaluate_folders", "write_evaluation"]

log = logging.getLogger(__name__)


def write_evaluation(evaluation: FolderEvaluation, out_dir: str | os.PathLike[str], plots: bool = True) -> list[Path]:
    """Write ``metrics.csv`` and ``summary.json`` into ``out_dir`` (created if needed), ``lesions.csv``
    when lesion labels were scored, and with ``plots`` ``dice_boxplot.png`` (Dice per label over cases);
    returns the files written."""
    out_dir = Path(out_dir)
    csv_text = metrics_csv(evaluation.rows, evaluation.names)
    json_text = json.dumps(evaluation.summary(), indent=2, allow_nan=False) + "\n"
    atomic_write_text(out_dir / "metrics.csv", csv_text)
    atomic_write_text(out_dir / "summary.json", json_text)
    written = [out_dir / "metrics.csv", out_dir / "summary.json"]
    if evaluation.lesion_rows:
        written.append(write_lesions_csv(evaluation.lesion_rows, out_dir / "lesions.csv"))
    if plots and evaluation.rows:
        n = evaluation.cases
        written.append(dice_boxplot_png(evaluation.dice_by_label(), out_dir / "dice_boxplot.png",
                                        title=f"Dice per label ({n} case{'s' if n != 1 else ''})"))
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def evaluate_folders(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    labels: Mapping[int, str] | None = None,
    nsd_tolerance_mm: float = 1.0,
    lesion_labels: Sequence[int] | None = None,
    lesion_min_volume_ml: float = 0.0,
    plots: bool = True,
    label_map: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """Score ``pred_dir`` against ``ref_dir`` (:func:`medseg.metrics.evaluate.score_folders`, whose
    parameters these are) and write the results into ``out_dir`` (:func:`write_evaluation`).

    Returns
    -------
    dict
        The summary written to ``summary.json``.

    Raises
    ------
    InputError, ValueError
        As :func:`~medseg.metrics.evaluate.score_folders`; nothing is written when an error is raised.
    """
    evaluation = score_folders(pred_dir, ref_dir, labels=labels, nsd_tolerance_mm=nsd_tolerance_mm,
                               lesion_labels=lesion_labels, lesion_min_volume_ml=lesion_min_volume_ml,
                               label_map=label_map)
    write_evaluation(evaluation, out_dir, plots=plots)
    return evaluation.summary()
