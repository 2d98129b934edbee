"""Structure report of a folder of predicted label maps over their images.

:func:`build_report` pairs every prediction with its image, measures each structure (volume,
intensity statistics, :mod:`medseg.reports.stats`), draws an overlay per case
(:mod:`medseg.reports.figures`) and writes ``structures.csv``, ``structures.json``,
``<case>.png`` and one self-contained ``report.html`` (:mod:`medseg.reports.html`).

Every input is checked (folders, pairing, grids, readable pixels, label maps) and every case is
measured and drawn before the first file is written, so a bad input leaves no output behind.
The overlays are kept in memory (a few hundred KB per case) until then. Each file is written
atomically; ``report.html`` is written last.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from tqdm import tqdm

from medseg.errors import InputError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.geometry import Geometry
from medseg.io.image import case_name, list_images, read_geometry, read_image, to_array
from medseg.metrics.evaluate import PRED_SUFFIX
from medseg.metrics.labelmaps import read_label_map
from medseg.reports.figures import render_overlay
from medseg.reports.html import write_report_html
from medseg.reports.stats import (
    STAT_COLUMNS,
    empty_statistics,
    structure_statistics,
    unit_for_modality,
)

__all__ = [
    "CT_MIN_HU",
    "CT_WINDOW",
    "LabelSummary",
    "ReportFiles",
    "ReportSummary",
    "Statistics",
    "build_report",
    "guess_modality",
    "pair_predictions",
]

log = logging.getLogger(__name__)

#: Display window of CT overlays (HU): abdominal soft tissue, level 40, width 400.
CT_WINDOW: tuple[float, float] = (-160.0, 240.0)
#: An image whose minimum is below this is taken as CT in HU (air is -1000 HU; MR signal is >= 0).
CT_MIN_HU = -500.0
_MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR"}


class Statistics(TypedDict):
    """Mean, population std, median, min and max of the finite values; all None when there is none."""

    mean: float | None
    std: float | None
    median: float | None
    min: float | None
    max: float | None


class LabelSummary(TypedDict):
    """One label over the report's cases: an entry of ``labels`` in ``structures.json``.

    ``volume_ml`` and ``mean_intensity`` are over the cases where the structure is present; the
    intensity only if those cases share one ``unit`` (else ``"mixed"`` and no statistics).
    """

    name: str
    cases_present: int
    cases: int
    volume_ml: Statistics
    mean_intensity: Statistics
    unit: str


@dataclass(frozen=True)
class ReportFiles:
    """The files :func:`build_report` wrote (absolute paths)."""

    csv: Path
    json: Path
    html: Path
    png: tuple[Path, ...]


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`build_report` measured and wrote."""

    cases: int
    case_names: tuple[str, ...]
    #: ``"CT"``, ``"MR"`` or ``"mixed"`` over the cases
    modality: str
    #: ``{str(label value): summary}``, as in ``structures.json``
    labels: dict[str, LabelSummary]
    out_dir: Path
    files: ReportFiles


def guess_modality(image: np.ndarray) -> str:
    """``"CT"`` if the image's minimum is below :data:`CT_MIN_HU` (air in HU), else ``"MR"``."""
    return "CT" if image.size and float(np.nanmin(image)) < CT_MIN_HU else "MR"


def pair_predictions(pred_dir: str | os.PathLike[str], images_dir: str | os.PathLike[str]
                     ) -> list[tuple[str, Path, Path]]:
    """Pair each prediction ``<case>_seg.<ext>`` or ``<case>.<ext>`` with the image ``<case>.<ext'>``.

    An exact name match wins over stripping ``_seg`` (as :func:`medseg.metrics.evaluate.pair_cases`).
    Images without a prediction are allowed (and left out of the report).

    Returns
    -------
    list of (case, prediction, image), sorted by case.

    Raises
    ------
    InputError
        A folder is missing or holds no image file; two images (or two predictions) for one case;
        a prediction without an image.
    """
    pred_dir, images_dir = Path(pred_dir), Path(images_dir)
    images: dict[str, Path] = {}
    for image in list_images(images_dir):
        case = case_name(image)
        if case in images:
            raise InputError(image, f"two images for case '{case}' (also {images[case].name}); keep one")
        images[case] = image
    image_files = {p.resolve() for p in images.values()}
    preds = [p for p in list_images(pred_dir) if p.resolve() not in image_files]  # one folder for both
    if not preds:
        raise InputError(pred_dir, "no predictions in this folder (only the images themselves)")
    matched: dict[str, Path] = {}
    for pred in preds:
        name = case_name(pred)
        found = name if name in images else None
        if found is None and name.endswith(PRED_SUFFIX) and name[: -len(PRED_SUFFIX)] in images:
            found = name[: -len(PRED_SUFFIX)]
        if found is None:
            base = name[: -len(PRED_SUFFIX)] if name.endswith(PRED_SUFFIX) else name
            raise InputError(pred, f"no image for this prediction in {images_dir} (expected {base}.<ext>)")
        if found in matched:
            raise InputError(pred, f"a second prediction for case '{found}' (also {matched[found].name}); keep one")
        matched[found] = pred
    unused = len(images) - len(matched)
    if unused:
        log.info("%d image(s) in %s have no prediction and are not in the report", unused, images_dir)
    return [(case, matched[case], images[case]) for case in sorted(matched)]


def _stats(values: list[float]) -> Statistics:
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size == 0:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None}
    return {"mean": float(data.mean()), "std": float(data.std()), "median": float(np.median(data)),
            "min": float(data.min()), "max": float(data.max())}


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csv_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def build_report(pred_dir: str | os.PathLike[str], images_dir: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str], labels: Mapping[int, str] | None = None,
                 modality: str | None = None) -> ReportSummary:
    """Measure and draw every predicted structure; write a CSV, a JSON, overlays and an HTML report.

    Parameters
    ----------
    pred_dir
        Predicted label maps ``<case>_seg.<ext>`` or ``<case>.<ext>`` (see :func:`pair_predictions`).
    images_dir
        The images ``<case>.<ext>``; each prediction must share its image's grid.
    out_dir
        Output folder (created if needed): ``structures.csv`` (columns
        :data:`~medseg.reports.stats.STAT_COLUMNS`, one row per case and label), ``structures.json``
        (those rows, the cases and a per-label summary: in how many cases each structure is present,
        and its volume and mean intensity over those cases), ``<case>.png`` and ``report.html``.
    labels
        ``{value: name}`` of the labels (0, background, is never reported); every declared label
        gets a row in every case (0 mL when absent), and a value not declared is an error. Default:
        the labels found in any prediction, named ``label_<n>``.
    modality
        ``"CT"`` (intensities in HU, overlays in the window :data:`CT_WINDOW`) or ``"MR"``
        (arbitrary units, 1st-99th percentile window). Default: guessed per case with
        :func:`guess_modality`.

    Returns
    -------
    ReportSummary
        The cases, their modality, the per-label summary and the files written.

    Raises
    ------
    InputError
        A folder is missing; no prediction; a prediction without image; an unreadable image; a
        prediction whose grid differs from its image's; a prediction that is not a map of
        non-negative integers (or holds an undeclared label); ``out_dir`` is a file. Nothing is
        written then.
    ValueError
        ``modality`` is not CT or MR, or ``labels`` has a negative key.
    """
    fixed_modality, declared = _checked_options(modality, labels)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    pairs = pair_predictions(pred_dir, images_dir)
    geometries = _checked_grids(pairs)
    log.info("report on %d case(s) from %s over %s", len(pairs), pred_dir, images_dir)
    cases = _measure_cases(pairs, geometries, declared, fixed_modality)

    names = declared if declared is not None else {v: f"label_{v}" for v in sorted(cases.seen)}
    foreground = sorted(names)
    if not foreground:
        log.warning("no structure in any prediction: structures.csv has no rows")
    rows: list[dict[str, Any]] = []
    for info in cases.info:  # one row per case and label, absent labels included
        case = info["case"]
        by_label = {row["label"]: row for row in cases.rows[case]}
        for label in foreground:
            rows.append(by_label.get(label) or empty_statistics(label, names[label], info["unit"], case))
    modalities = sorted({info["modality"] for info in cases.info})
    out_dir = out_dir.resolve()
    summary = ReportSummary(
        cases=len(cases.info),
        case_names=tuple(info["case"] for info in cases.info),
        modality=modalities[0] if len(modalities) == 1 else "mixed",
        labels=_label_summary(rows, names, foreground, len(cases.info)),
        out_dir=out_dir,
        files=ReportFiles(out_dir / "structures.csv", out_dir / "structures.json", out_dir / "report.html",
                          tuple(out_dir / f"{info['case']}.png" for info in cases.info)),
    )
    _write_report(Path(pred_dir).name, summary, cases, rows)
    return summary


@dataclass
class _Cases:
    """What :func:`_measure_cases` measured and drew, nothing written yet."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    pngs: dict[str, bytes] = field(default_factory=dict)
    info: list[dict[str, Any]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)


def _checked_options(modality: str | None,
                     labels: Mapping[int, str] | None) -> tuple[str | None, dict[int, str] | None]:
    """The modality (CT / MR or None: guessed per case) and the declared foreground labels.

    Raises ValueError for an unsupported modality or a negative label value."""
    fixed_modality: str | None = None
    if modality is not None:
        fixed_modality = _MODALITIES.get(str(modality).strip().upper())
        if fixed_modality is None:
            raise ValueError(f"modality {modality!r} is not supported; use 'CT' or 'MR'")
    declared: dict[int, str] | None = None
    if labels is not None:
        declared = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
        if any(k < 0 for k in declared):
            raise ValueError(f"label values must be >= 0, got {sorted(declared)}")
    return fixed_modality, declared


def _checked_grids(pairs: list[tuple[str, Path, Path]]) -> dict[str, Geometry]:
    """Header-only check of every (case, prediction, image) pair before any pixel is read.

    Raises InputError for a prediction whose grid differs from its image's."""
    geometries: dict[str, Geometry] = {}
    for case, pred, image_file in pairs:
        geometry = read_geometry(image_file)
        difference = geometry.mismatch(read_geometry(pred))
        if difference is not None:
            raise InputError(pred, f"grid does not match its image {image_file.name}: {difference}")
        geometries[case] = geometry
    return geometries


def _measure_cases(pairs: list[tuple[str, Path, Path]], geometries: Mapping[str, Geometry],
                   declared: dict[int, str] | None, fixed_modality: str | None) -> _Cases:
    """Statistics and the overlay PNG of every case (in memory).

    Raises InputError for an unreadable image or a prediction that is not a valid label map."""
    cases = _Cases()
    progress = tqdm(pairs, desc="report", unit="case", disable=not sys.stderr.isatty())
    for case, pred, image_path in progress:
        image = to_array(read_image(image_path))
        label_map = read_label_map(pred, declared)
        case_modality = fixed_modality or guess_modality(image)
        unit = unit_for_modality(case_modality)
        geometry = geometries[case]
        present = {int(v) for v in np.unique(label_map) if v != 0}
        cases.seen |= present
        names = declared if declared is not None else {v: f"label_{v}" for v in present}
        cases.rows[case] = structure_statistics(label_map, image, geometry.spacing, names, unit, case=case)
        window = CT_WINDOW if case_modality == "CT" else None
        cases.pngs[case], _ = render_overlay(image, label_map, geometry.spacing, names,
                                              f"{case} ({case_modality})", window, geometry)
        cases.info.append({"case": case, "image": str(image_path), "prediction": str(pred),
                           "modality": case_modality, "unit": unit, "size": list(geometry.size),
                           "spacing_mm": list(geometry.spacing)})
        log.debug("%s: %s, labels %s", case, case_modality, sorted(present))
    return cases


def _write_report(title: str, summary: ReportSummary, cases: _Cases, rows: list[dict[str, Any]]) -> None:
    """Write the PNGs, ``structures.csv``, ``structures.json`` and ``report.html`` (each atomically)."""
    paths = summary.files
    document = {
        "columns": list(STAT_COLUMNS),
        "rows": [{k: _json_value(row[k]) for k in STAT_COLUMNS} for row in rows],
        "cases": cases.info,
        "labels": summary.labels,
        "modality": summary.modality,
    }
    json_text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    for info, png_path in zip(cases.info, paths.png, strict=True):
        with atomic_path(png_path) as tmp:
            tmp.write_bytes(cases.pngs[info["case"]])
    atomic_write_text(paths.csv, _csv_text(rows))
    atomic_write_text(paths.json, json_text)
    write_report_html(paths.html, f"Segmentation report: {title}",
                      _summary_table(summary.labels, len(cases.info)),
                      [{"case": info["case"], "png": cases.pngs[info["case"]],
                        "note": f"{info['modality']}, grid {' x '.join(map(str, info['size']))}, spacing "
                                f"{' x '.join(f'{s:.3g}' for s in info['spacing_mm'])} mm; "
                                f"prediction {Path(info['prediction']).name}",
                        "rows": [{k: v for k, v in row.items() if k != "case"} for row in rows
                                 if row["case"] == info["case"]]}
                       for info in cases.info],
                      intro=_INTRO)
    log.info("wrote the report of %d case(s) to %s", len(cases.info), paths.html)


_INTRO = ("Volumes in mL (voxel count x voxel volume); intensity statistics inside each structure "
          "(std: population standard deviation) in HU for CT, arbitrary units (a.u.) for MR. "
          "Overlays show slices through each structure's centre of mass, reoriented to the closest "
          "RAS axes: axial with anterior up and the patient's right on the image left (radiological "
          "convention), coronal and sagittal with superior up (sagittal: anterior on the left).")


def _label_summary(rows: list[dict[str, Any]], names: Mapping[int, str], foreground: list[int],
                   n_cases: int) -> dict[str, LabelSummary]:
    summary: dict[str, LabelSummary] = {}
    for label in foreground:
        mine = [r for r in rows if r["label"] == label]
        units = sorted({r["unit"] for r in mine})
        present = [r for r in mine if r["voxels"] > 0]
        summary[str(label)] = {
            "name": names[label],
            "cases_present": len(present),
            "cases": n_cases,
            # over the cases where the structure is present (absences are counted by cases_present);
            # the intensity only if those cases share one unit
            "volume_ml": _stats([r["volume_ml"] for r in present]),
            "mean_intensity": _stats([r["mean"] for r in present]) if len(units) == 1 else _stats([]),
            "unit": units[0] if len(units) == 1 else "mixed",
        }
    return summary


def _summary_table(label_summary: Mapping[str, LabelSummary], n_cases: int) -> list[dict[str, Any]]:
    table = []
    for label, entry in label_summary.items():
        volume, intensity = entry["volume_ml"], entry["mean_intensity"]
        table.append({
            "label": int(label), "name": entry["name"], "present in": f"{entry['cases_present']}/{n_cases}",
            "volume mL (mean)": volume["mean"], "volume mL (std)": volume["std"],
            "volume mL (median)": volume["median"], "mean intensity": intensity["mean"], "unit": entry["unit"],
        })
    return table


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(STAT_COLUMNS)
    for row in rows:
        writer.writerow([_csv_value(row[c]) for c in STAT_COLUMNS])
    return buffer.getvalue()
