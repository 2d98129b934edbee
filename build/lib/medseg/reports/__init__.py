"""Reports on segmentations: per-structure statistics, overlay figures and a self-contained HTML page.

* :func:`build_report`: a folder of predictions over their images -> ``structures.csv``,
  ``structures.json``, one overlay PNG per case and ``report.html``;
* :func:`dice_boxplot_png`, :func:`training_curves_png`: figures for evaluation and training runs;
* :func:`overlay_png`, :func:`structure_statistics`, :func:`write_report_html`: the pieces.
"""

from medseg.reports.figures import (
    dice_boxplot_png,
    overlay_png,
    render_overlay,
    training_curves_png,
)
from medseg.reports.html import write_report_html
from medseg.reports.report import build_report
from medseg.reports.stats import STAT_COLUMNS, structure_statistics

__all__ = [
    "STAT_COLUMNS",
    "build_report",
    "dice_boxplot_png",
    "overlay_png",
    "render_overlay",
    "structure_statistics",
    "training_curves_png",
    "write_report_html",
]
