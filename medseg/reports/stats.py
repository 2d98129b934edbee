"""Per-structure statistics of a label map over its image: volume and intensity inside each label.

Definitions (one row per foreground label, see :data:`STAT_COLUMNS`):

* ``voxels``: number of voxels with that label value;
* ``volume_ml``: ``voxels`` times the voxel volume (product of the spacing, mm^3) / 1000. A 2D
  image has no slice thickness, so its ``volume_ml`` is NaN (``voxels`` counts the pixels);
* ``mean``, ``std`` (population standard deviation, ``ddof=0``), ``min``, ``max``: of the image
  values inside the label, NaN when the label is empty;
* ``unit``: the intensity unit, ``"HU"`` for CT and ``"a.u."`` (arbitrary units) otherwise.

Arrays are in the same index order (medseg's ``(x, y, z)``); only their shapes must match.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["STAT_COLUMNS", "empty_statistics", "structure_statistics", "unit_for_modality"]

#: Columns of a statistics row (and of ``structures.csv``), in order.
STAT_COLUMNS: tuple[str, ...] = ("case", "label", "label_name", "volume_ml", "voxels", "mean", "std", "min", "max", "unit")


def unit_for_modality(modality: str | None) -> str:
    """``"HU"`` for CT, ``"a.u."`` for anything else (MR, unknown)."""
    return "HU" if modality is not None and str(modality).strip().upper() == "CT" else "a.u."


def empty_statistics(label: int, name: str, unit: str, case: str = "") -> dict[str, Any]:
    """The row of a label that is absent: 0 voxels, 0 mL, NaN intensity statistics."""
    return {"case": case, "label": int(label), "label_name": name, "volume_ml": 0.0, "voxels": 0,
            "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "unit": unit}


def structure_statistics(labels: np.ndarray, image: np.ndarray, spacing: Sequence[float],
                         label_names: Mapping[int, str], unit: str, *, case: str = "") -> list[dict[str, Any]]:
    """Volume and intensity statistics of every foreground label present in ``labels`` or declared in ``label_names``.

    Parameters
    ----------
    labels
        Integer label map (non-negative); 0 is background and never reported.
    image
        Intensities, same shape as ``labels``.
    spacing
        Voxel spacing in mm, one value per axis of ``labels``.
    label_names
        ``{value: name}``; a declared label that is absent gets a row with 0 voxels, 0 mL and NaN
        statistics; a present label that is not declared is named ``label_<n>``. A key 0 is ignored.
    unit
        Intensity unit written into every row (``"HU"`` for CT, ``"a.u."`` otherwise).
    case
        Written into the ``case`` column.

    Returns
    -------
    list of dict
        One row per label (keys :data:`STAT_COLUMNS`), sorted by label value.

    Raises
    ------
    ValueError
        Shapes differ, ``spacing`` has the wrong length or a non-positive value, or ``labels``
        is not a map of non-negative integers.
    """
    labels = np.asarray(labels)
    image = np.asarray(image)
    if labels.shape != image.shape:
        raise ValueError(f"label map shape {labels.shape} differs from image shape {image.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != labels.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing} must hold {labels.ndim} positive values")
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"label map of type {labels.dtype} does not hold integers")
        labels = labels.astype(np.int64)
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"label map holds negative value {int(labels.min())}")

    voxel_mm3 = float(np.prod(spacing)) if labels.ndim == 3 else math.nan
    present = [int(v) for v in np.unique(labels) if v != 0] if labels.size else []
    names = {int(k): str(v) for k, v in label_names.items() if int(k) != 0}
    rows: list[dict[str, Any]] = []
    for label in sorted(set(present) | set(names)):
        name = names.get(label, f"label_{label}")
        if label not in present:
            row = empty_statistics(label, name, unit, case)
            row["volume_ml"] = 0.0 if labels.ndim == 3 else math.nan
            rows.append(row)
            continue
        values = image[labels == label].astype(np.float64)
        rows.append({
            "case": case, "label": label, "label_name": name,
            "volume_ml": values.size * voxel_mm3 / 1000.0, "voxels": int(values.size),
            "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()), "unit": unit,
        })
    return rows
