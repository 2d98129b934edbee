"""Per-label overlap and surface metrics between a predicted and a reference label map.

Both label maps are integer arrays in the same voxel grid, index order ``(x, y, z)`` (2D or 3D),
with the voxel spacing in millimetres in the same order. Surface distances come from MONAI
(``compute_hausdorff_distance``, ``compute_average_surface_distance``, ``compute_surface_dice``),
computed in millimetres by passing the spacing; they are evaluated on the bounding box of
``pred ∪ ref`` for the label, padded with one background voxel on every side, which gives exactly
the edges (and distances) of the full grid at a fraction of the cost.

Definitions
-----------
* ``dice`` = 2|P∩R| / (|P|+|R|), ``iou`` = |P∩R| / |P∪R| (voxel counts).
* ``hd95_mm``: symmetric 95th-percentile Hausdorff distance: the larger of the two directed
  95th percentiles (pred→ref edge voxels, ref→pred edge voxels), MONAI's ``directed=False``.
* ``assd_mm``: average symmetric surface distance: the mean of all edge-voxel distances of
  both directions pooled together (MONAI's ``symmetric=True``).
* ``nsd``: normalised surface Dice at ``nsd_tolerance_mm``: the fraction of the edge voxels of
  both masks whose distance to the other mask's edge is <= the tolerance.
* ``vol_pred_ml`` / ``vol_ref_ml``: voxel count x prod(spacing) / 1000.

Edge voxels are the mask voxels removed by a binary erosion (voxels on the grid border count as
edge voxels); distances are Euclidean between voxel centres.

Empty-mask convention (used by every medseg metric output)
----------------------------------------------------------
* Both masks empty: dice 1, iou 1, hd95 0, assd 0, nsd 1 (a correctly predicted absence).
* Exactly one mask empty: dice 0, iou 0, hd95 NaN, assd NaN, nsd 0 (distances are undefined).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_hausdorff_distance,
    compute_surface_dice,
)

__all__ = [
    "EMPTY_CONVENTION",
    "METRIC_FIELDS",
    "LabelMetrics",
    "both_empty_metrics",
    "checked_non_negative",
    "checked_spacing",
    "label_metrics",
]

#: One sentence for reports (e.g. ``summary.json``) stating the empty-mask convention.
EMPTY_CONVENTION = (
    "If a label is absent from both prediction and reference: dice=1, iou=1, hd95=0, assd=0, nsd=1; "
    "if it is absent from exactly one of them: dice=0, iou=0, hd95=NaN, assd=NaN, nsd=0."
)

#: Names of the metrics in :class:`LabelMetrics`, in output order.
METRIC_FIELDS: tuple[str, ...] = ("dice", "iou", "hd95_mm", "assd_mm", "nsd", "vol_pred_ml", "vol_ref_ml")


@dataclass(frozen=True)
class LabelMetrics:
    """Metrics of one label of one case (distances in mm, volumes in mL; see the module docstring)."""

    dice: float
    iou: float
    hd95_mm: float
    assd_mm: float
    nsd: float
    vol_pred_ml: float
    vol_ref_ml: float

    def as_dict(self) -> dict[str, float]:
        """The metrics as a plain ``{name: value}`` dict in :data:`METRIC_FIELDS` order."""
        return asdict(self)


def both_empty_metrics() -> LabelMetrics:
    """The metrics of a label absent from both prediction and reference (the empty convention)."""
    return LabelMetrics(1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0)


def label_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    label: int,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
) -> LabelMetrics:
    """Compute Dice, IoU, HD95, ASSD, NSD and volumes of ``label`` in ``pred`` against ``ref``.

    Parameters
    ----------
    pred, ref
        Label maps (integer arrays, 2D or 3D, same shape, index order ``(x, y, z)``).
    label
        The label value to evaluate.
    spacing
        Voxel size in mm along each array axis.
    nsd_tolerance_mm
        Tolerance of the normalised surface Dice, in mm.

    Returns
    -------
    LabelMetrics
        With the empty-mask convention of the module docstring.

    Raises
    ------
    ValueError
        If the shapes differ, the arrays are not 2D/3D, ``spacing`` does not have one positive
        value per axis, or the tolerance is negative or not finite.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    spacing_t = checked_spacing(pred.ndim, spacing)
    tolerance = checked_non_negative("nsd_tolerance_mm", nsd_tolerance_mm)
    return _mask_metrics(pred == label, ref == label, spacing_t, tolerance)


def checked_spacing(ndim: int, spacing: Sequence[float]) -> tuple[float, ...]:
    """``spacing`` as floats, after checking the grid is 2D/3D with one positive finite value per axis.

    Raises
    ------
    ValueError
        Otherwise.
    """
    if ndim not in (2, 3):
        raise ValueError(f"label maps must be 2D or 3D, got {ndim}D")
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(f"spacing {spacing_t} must hold one positive value per axis ({ndim})")
    return spacing_t


def checked_non_negative(name: str, value: float) -> float:
    """``value`` as a float; ValueError unless finite and >= 0."""
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def _mask_metrics(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...], tol: float) -> LabelMetrics:
    """Metrics of two boolean masks (validated inputs)."""
    n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    voxel_ml = math.prod(spacing) / 1000.0
    vol_pred, vol_ref = n_pred * voxel_ml, n_ref * voxel_ml
    if n_pred == 0 and n_ref == 0:
        return both_empty_metrics()
    if n_pred == 0 or n_ref == 0:
        return LabelMetrics(0.0, 0.0, math.nan, math.nan, 0.0, vol_pred, vol_ref)

    inter = int(np.count_nonzero(p & r))
    dice = 2.0 * inter / (n_pred + n_ref)
    iou = inter / (n_pred + n_ref - inter)

    p_crop, r_crop = _crop_to_union(p, r)
    # MONAI layout: one-hot, batch-first (B=1, C=1, *spatial); the single channel is the label,
    # so include_background=True keeps it (the default False would drop only channel 0 of C>1).
    y_pred = torch.from_numpy(p_crop[None, None].astype(np.float32))
    y = torch.from_numpy(r_crop[None, None].astype(np.float32))
    spacing_list = list(spacing)
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated argument internally; not actionable for our users
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, directed=False, spacing=spacing_list
        )
        assd = compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=spacing_list
        )
        nsd = compute_surface_dice(y_pred, y, class_thresholds=[tol], include_background=True, spacing=spacing_list)
    return LabelMetrics(
        dice=dice,
        iou=iou,
        hd95_mm=float(hd95[0, 0]),
        assd_mm=float(assd[0, 0]),
        nsd=float(nsd[0, 0]),
        vol_pred_ml=vol_pred,
        vol_ref_ml=vol_ref,
    )


def _crop_to_union(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of ``p | r`` and pad one background voxel on every side.

    The padding reproduces the full grid's edges exactly, also for masks touching the grid border
    (MONAI's erosion treats outside-the-grid as background).
    """
    union = p | r
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        slices.append(slice(int(hits[0]), int(hits[-1]) + 1))
    box = tuple(slices)
    return np.pad(p[box], 1), np.pad(r[box], 1)
