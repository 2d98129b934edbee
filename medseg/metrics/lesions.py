"""Lesion-wise (instance) evaluation of one label, after the BraTS 2023 lesion-wise metrics.

Both label maps are integer arrays in the same voxel grid, index order ``(x, y, z)`` (2D or 3D),
with the voxel spacing in millimetres in the same order (as in :mod:`medseg.metrics.overlap`).

Source checked: the BraTS 2023 lesion-wise metric description (Synapse discussion
``syn51156910`` thread 10357) and its reference implementation
(github.com/rachitsaluja/BraTS-2023-Metrics, ``get_LesionWiseScores`` / ``get_LesionWiseResults``).
This module is an independent implementation of the same definitions; where it deviates, it
says so below.

Definitions (:func:`lesion_wise`)
---------------------------------
1. **Components.** The voxels ``== label`` of the reference and of the prediction are split into
   connected components with full connectivity (26 in 3D, 8 in 2D; BraTS: 26).
2. **Reference lesions.** With ``dilation_mm == 0`` (the default) every reference component is
   one reference lesion. With ``dilation_mm > 0``, as in BraTS, reference components whose
   dilations (by the element of point 6) touch or overlap are grouped into one reference lesion;
   the reference voxels themselves are never changed.
3. **Matching.** A predicted component is matched to a reference lesion if it overlaps the
   lesion (``dilation_mm == 0``) or the lesion dilated by the element (``dilation_mm > 0``,
   BraTS). A reference lesion with at least one matched predicted component is a true positive
   (TP), otherwise a false negative (FN). A predicted component matched to no reference lesion
   is a false positive (FP). A predicted component may be matched to several reference lesions
   (one component bridging two lesions makes both TP, as in BraTS); a reference lesion split
   into several predicted components is one TP and none of the pieces is an FP.
4. **Per-lesion Dice and HD95** of a TP lesion: :func:`medseg.metrics.overlap.label_metrics`
   (MONAI-backed; Dice on voxel counts, HD95 = symmetric 95th-percentile Hausdorff distance in
   mm) between the binary mask of this reference lesion alone and the union of all the
   predicted components matched to it (whole components, also their parts lying over other
   reference lesions, as in BraTS), evaluated on the bounding box of those voxels, so that other
   lesions never leak in. An FN or FP lesion scores Dice 0 and HD95 ``hd95_penalty_mm``
   (BraTS: 374 mm, about the diagonal of the 240 x 240 x 155 1-mm BraTS grid).
5. **Case scores.** With ``N = TP + FN + FP``:
   ``lesion_dice = sum(Dice of the TP lesions) / N``;
   ``lesion_hd95_mm = (sum(HD95 of the TP lesions) + (FN + FP) * hd95_penalty_mm) / N``;
   ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
   ``f1 = 2 TP / (2 TP + FP + FN)`` (= ``2PR / (P + R)`` wherever that is defined).
   TP counts reference lesions (BraTS's ``Num_TP``), so the precision is "detected reference
   lesions / (detected reference lesions + false predicted components)".
6. **Dilation element** for ``dilation_mm = r``: every voxel offset ``d`` (in mm, per axis
   ``k_i * spacing_i``) with ``max |d_i| <= r`` and ``sum |d_i| <= 2 r``. On an isotropic 1-mm
   grid this equals BraTS's ``n = r`` iterations of the 3x3x3 18-connected element
   (``generate_binary_structure(3, 2)``; 3x3 in 2D): BraTS GLI, SSA and PED use ``n = 3``
   (``dilation_mm=3``), MEN and MET use ``n = 1`` (``dilation_mm=1``). BraTS dilates in voxels,
   this module in millimetres (identical on BraTS's 1-mm grids).
7. **Volume threshold** ``min_volume_ml``: a reference lesion (after grouping) smaller than the
   threshold is not scored at all (neither TP nor FN, no row), as in BraTS; the predicted
   components matched to it are absorbed (they are not FPs either). A predicted component smaller
   than the threshold is never counted as an FP, but still matches (and counts in the Dice of) a
   reference lesion it touches. BraTS 2023 thresholds 50 voxels (GLI, SSA, MEN, PED) and 2
   voxels (MET) of 1 mm^3, i.e. about 0.05 mL and 0.002 mL, and drops lesions ``<=`` the
   threshold (here: ``<``).

Conventions
-----------
* No scored reference lesion and no FP (nothing at all): TP = FN = FP = 0 and everything is
  perfect: precision 1, recall 1, f1 1, lesion_dice 1, lesion_hd95_mm 0 (BraTS: Dice 1, HD95 0).
* Reference lesions but no predicted lesion: precision 0 (recall 0, f1 0, lesion_dice 0,
  lesion_hd95_mm = penalty). Predicted lesions (FPs) but no reference lesion: recall 0
  (precision 0, f1 0, lesion_dice 0, lesion_hd95_mm = penalty). This is the empty convention of
  :mod:`medseg.metrics.overlap` (absent from exactly one side scores 0). No value is ever NaN.

Deviations from the BraTS 2023 code
-----------------------------------
* Default ``dilation_mm=0`` (matching by overlap); pass 3 or 1 to reproduce BraTS (point 6).
* The threshold is in mL with ``<`` (BraTS: voxels, ``<=``), and small predicted components are
  not FPs (BraTS 2023 counts every unmatched predicted component, whatever its size).
* HD95 comes from MONAI (edge voxels, unweighted distances between voxel centres); BraTS uses
  DeepMind's ``surface-distance`` (surfels weighted by area), which can differ slightly.
* BraTS reports no lesion-wise precision / recall / F1; they are defined in point 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.metrics.overlap import checked_non_negative, checked_spacing, label_metrics

__all__ = [
    "BRATS_HD95_PENALTY_MM",
    "LesionMatch",
    "LesionSummary",
    "connected_lesions",
    "instance_map",
    "lesion_wise",
]

#: BraTS 2023's HD95 for a missed or a false lesion, in mm.
BRATS_HD95_PENALTY_MM = 374.0

_REL_TOL = 1e-9  # volumes equal to the threshold up to rounding are kept


@dataclass(frozen=True)
class LesionMatch:
    """One reference lesion (TP or FN) or one unmatched predicted lesion (FP, ``ref_id`` None).

    ``ref_id`` numbers the scored reference lesions' groups (1.., raster order of their first
    component); ``pred_ids`` are the ids of the matched predicted components (as numbered by
    :func:`connected_lesions` of the prediction, full connectivity, no threshold). FN and FP rows
    hold Dice 0 and the HD95 penalty.
    """

    ref_id: int | None
    pred_ids: tuple[int, ...]
    ref_volume_ml: float
    pred_volume_ml: float
    dice: float
    hd95_mm: float


@dataclass(frozen=True)
class LesionSummary:
    """Lesion-wise scores of one label of one case (see the module docstring)."""

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    lesion_dice: float
    lesion_hd95_mm: float
    matches: tuple[LesionMatch, ...]


def _structure(ndim: int, connectivity: int | None) -> np.ndarray:
    """scipy structuring element of ``connectivity`` (6/18/26 in 3D, 4/8 in 2D; None: full)."""
    if connectivity is None:
        return ndimage.generate_binary_structure(ndim, ndim)
    ranks = {3: {6: 1, 18: 2, 26: 3}, 2: {4: 1, 8: 2}}[ndim]
    if connectivity not in ranks:
        raise ValueError(f"connectivity {connectivity} is not one of {sorted(ranks)} for {ndim}D")
    return ndimage.generate_binary_structure(ndim, ranks[connectivity])


def _voxel_ml(spacing: tuple[float, ...]) -> float:
    return math.prod(spacing) / 1000.0


def _keep(volume_ml: np.ndarray | float, min_volume_ml: float) -> np.ndarray | bool:
    return volume_ml >= min_volume_ml * (1.0 - _REL_TOL)


def _keep_all(volume_ml: np.ndarray, min_volume_ml: float) -> np.ndarray:
    """:func:`_keep` of an array of volumes: a boolean array."""
    return np.asarray(_keep(volume_ml, min_volume_ml), dtype=bool)


def connected_lesions(
    mask: np.ndarray,
    spacing: Sequence[float],
    min_volume_ml: float = 0.0,
    connectivity: int | None = None,
) -> tuple[np.ndarray, int]:
    """Label the connected components of a mask, dropping those smaller than ``min_volume_ml``.

    Parameters
    ----------
    mask
        2D or 3D array; every non-zero voxel is foreground.
    spacing
        Voxel size in mm along each array axis.
    min_volume_ml
        Components with a volume below this (in mL) are removed (set to 0).
    connectivity
        6, 18 or 26 in 3D, 4 or 8 in 2D; None (default) is full connectivity (26 / 8).

    Returns
    -------
    labels : numpy.ndarray
        int32 instance map of ``mask``'s shape: 0 background, components numbered ``1..n``
        consecutively in raster order (of the array index) of their first voxel.
    n : int
        Number of components kept.

    Raises
    ------
    ValueError
        If ``mask`` is not 2D/3D, ``spacing`` does not hold one positive value per axis,
        ``min_volume_ml`` is negative or not finite, or ``connectivity`` is not valid.
    """
    mask = np.asarray(mask)
    spacing_t = checked_spacing(mask.ndim, spacing)
    min_volume_ml = checked_non_negative("min_volume_ml", min_volume_ml)
    labels = np.zeros(mask.shape, dtype=np.int32)
    n = int(ndimage.label(mask != 0, structure=_structure(mask.ndim, connectivity), output=labels))
    if n == 0 or min_volume_ml == 0:
        return labels, n
    volumes = np.bincount(labels.reshape(-1), minlength=n + 1) * _voxel_ml(spacing_t)
    keep = _keep_all(volumes, min_volume_ml)
    keep[0] = False
    kept = int(np.count_nonzero(keep))
    if kept == n:
        return labels, n
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, kept + 1, dtype=np.int32)
    return lut[labels], kept


def instance_map(
    labels: np.ndarray,
    label_values: Sequence[int],
    spacing: Sequence[float],
    min_volume_ml: float = 0.0,
) -> np.ndarray:
    """One id per connected component (full connectivity) of the voxels holding any of ``label_values``.

    The given labels are merged first (a tumour made of labels 1, 2 and 3 is one instance), then
    split into connected components as :func:`connected_lesions` does.

    Parameters
    ----------
    labels
        Integer label map, 2D or 3D, index order ``(x, y, z)``.
    label_values
        The label values forming the lesions.
    spacing
        Voxel size in mm along each array axis.
    min_volume_ml
        Components below this volume (mL) are dropped (set to 0).

    Returns
    -------
    numpy.ndarray
        uint16 (uint32 beyond 65535 instances) map of ``labels``' shape: 0 background, instances
        ``1..n`` in raster order of their first voxel.

    Raises
    ------
    ValueError
        If ``label_values`` is empty, ``labels`` is not 2D/3D, ``spacing`` does not hold one
        positive value per axis, or ``min_volume_ml`` is negative or not finite.
    """
    values = [int(v) for v in label_values]
    if not values:
        raise ValueError("label_values is empty; give the label value(s) forming the lesions")
    labels = np.asarray(labels)
    out, n = connected_lesions(np.isin(labels, values), spacing, min_volume_ml)
    return out.astype(np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32)


def _dilation_element(spacing: tuple[float, ...], radius_mm: float) -> np.ndarray:
    """Offsets ``d`` (mm) with ``max|d_i| <= r`` and ``sum|d_i| <= 2r`` (module docstring, point 6)."""
    half = [int(math.floor(radius_mm / s * (1 + _REL_TOL))) for s in spacing]
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)]
    offsets = np.abs(np.stack(np.meshgrid(*axes, indexing="ij")))
    tol = radius_mm * _REL_TOL
    element: np.ndarray = (offsets.max(axis=0) <= radius_mm + tol) & (offsets.sum(axis=0) <= 2 * radius_mm + tol)
    return element


def _grow(box: tuple[slice, ...], margin: Sequence[int], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(max(b.start - m, 0), min(b.stop + m, size)) for b, m, size in zip(box, margin, shape, strict=True)
    )


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(
        slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(len(boxes[0]))
    )


def _group_by_dilation(
    ref_cc: np.ndarray, n: int, boxes: list[tuple[slice, ...]], element: np.ndarray, full: np.ndarray
) -> tuple[np.ndarray, int]:
    """Group reference components whose dilations connect; returns (group map, number of groups)."""
    margin = [s // 2 for s in element.shape]
    box = _grow(_union_box(boxes), margin, ref_cc.shape)
    crop = ref_cc[box]
    dilated = ndimage.binary_dilation(crop > 0, structure=element)
    dilated_cc, _ = ndimage.label(dilated, structure=full)
    inside = crop > 0
    group_of = np.zeros(n + 1, dtype=np.int64)
    group_of[crop[inside]] = dilated_cc[inside]  # a component lies in one dilated component
    # renumber the groups 1.. in the order of their first (lowest-numbered) component
    _, first = np.unique(group_of[1:], return_index=True)
    lut = np.zeros(int(group_of.max()) + 1, dtype=np.int32)
    lut[group_of[1:][np.sort(first)]] = np.arange(1, first.size + 1, dtype=np.int32)
    return lut[group_of][ref_cc], int(first.size)


def lesion_wise(
    pred: np.ndarray,
    ref: np.ndarray,
    label: int,
    spacing: Sequence[float],
    dilation_mm: float = 0.0,
    min_volume_ml: float = 0.0,
    hd95_penalty_mm: float = BRATS_HD95_PENALTY_MM,
) -> LesionSummary:
    """Lesion-wise TP/FP/FN, precision, recall, F1, Dice and HD95 of ``label`` (BraTS 2023 style).

    Parameters
    ----------
    pred, ref
        Label maps (integer arrays, 2D or 3D, same shape, index order ``(x, y, z)``).
    label
        The label value whose lesions are evaluated.
    spacing
        Voxel size in mm along each array axis.
    dilation_mm
        0: predicted components match the reference lesions they overlap. > 0: reference
        components within reach of each other are grouped, and predicted components match
        the dilated reference lesions (BraTS: 3 for GLI/SSA/PED, 1 for MEN/MET).
    min_volume_ml
        Reference lesions below this volume are not scored; predicted components below it are
        never FPs.
    hd95_penalty_mm
        HD95 of an FN or FP lesion (BraTS: 374).

    Returns
    -------
    LesionSummary
        Scores and one :class:`LesionMatch` per scored reference lesion (by ``ref_id``) then
        per FP (by predicted id). Definitions and conventions: module docstring.

    Raises
    ------
    ValueError
        If the shapes differ, the arrays are not 2D/3D, ``spacing`` does not hold one positive
        value per axis, or ``dilation_mm``, ``min_volume_ml`` or ``hd95_penalty_mm`` is negative
        or not finite.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    spacing_t = checked_spacing(pred.ndim, spacing)
    dilation_mm = checked_non_negative("dilation_mm", dilation_mm)
    min_volume_ml = checked_non_negative("min_volume_ml", min_volume_ml)
    penalty = checked_non_negative("hd95_penalty_mm", hd95_penalty_mm)
    voxel_ml = _voxel_ml(spacing_t)
    full = _structure(pred.ndim, None)

    ref_lab, n_ref = connected_lesions(ref == label, spacing_t)
    pred_lab, n_pred = connected_lesions(pred == label, spacing_t)
    ref_boxes = ndimage.find_objects(ref_lab, n_ref)
    element = _dilation_element(spacing_t, dilation_mm) if dilation_mm > 0 else None
    if element is not None and n_ref > 1:
        ref_lab, n_ref = _group_by_dilation(ref_lab, n_ref, ref_boxes, element, full)
        ref_boxes = ndimage.find_objects(ref_lab, n_ref)
    pred_boxes = ndimage.find_objects(pred_lab, n_pred)
    ref_volumes = np.bincount(ref_lab.reshape(-1), minlength=n_ref + 1) * voxel_ml
    pred_volumes = np.bincount(pred_lab.reshape(-1), minlength=n_pred + 1) * voxel_ml

    matched = _matched_components(ref_lab, ref_boxes, pred_lab, element)
    absorbed = np.zeros(n_pred + 1, dtype=bool)
    for ids in matched:
        absorbed[ids] = True

    rows: list[LesionMatch] = []
    for ref_id, (box, ids) in enumerate(zip(ref_boxes, matched, strict=True), start=1):
        ref_ml = float(ref_volumes[ref_id])
        if not _keep(ref_ml, min_volume_ml):
            continue
        if ids.size == 0:  # FN
            rows.append(LesionMatch(ref_id, (), ref_ml, 0.0, 0.0, penalty))
            continue
        union = _union_box([box, *(pred_boxes[i - 1] for i in ids)])
        p = np.isin(pred_lab[union], ids).astype(np.uint8)
        r = (ref_lab[union] == ref_id).astype(np.uint8)
        metrics = label_metrics(p, r, 1, spacing_t)
        pred_ml = float(pred_volumes[ids].sum())
        rows.append(LesionMatch(ref_id, tuple(int(i) for i in ids), ref_ml, pred_ml, metrics.dice, metrics.hd95_mm))
    for pred_id in range(1, n_pred + 1):  # FP: predicted lesions no scored or unscored reference lesion absorbed
        pred_ml = float(pred_volumes[pred_id])
        if not absorbed[pred_id] and _keep(pred_ml, min_volume_ml):
            rows.append(LesionMatch(None, (pred_id,), 0.0, pred_ml, 0.0, penalty))
    return _summary(rows, penalty)


def _matched_components(ref_lab: np.ndarray, ref_boxes: Sequence[tuple[slice, ...] | None], pred_lab: np.ndarray,
                        element: np.ndarray | None) -> list[np.ndarray]:
    """The predicted component ids that touch each reference lesion (or its dilation), scored or not."""
    matched: list[np.ndarray] = []
    for ref_id, box in enumerate(ref_boxes, start=1):
        assert box is not None, "connected-component labels are consecutive"
        if element is None:
            zone = ref_lab[box] == ref_id
        else:
            box = _grow(box, [s // 2 for s in element.shape], ref_lab.shape)
            zone = ndimage.binary_dilation(ref_lab[box] == ref_id, structure=element)
        ids = np.unique(pred_lab[box][zone])
        matched.append(ids[ids > 0])
    return matched


def _summary(rows: list[LesionMatch], penalty: float) -> LesionSummary:
    """TP/FP/FN counts and the lesion-wise scores of the matches (FN and FP lesions score Dice 0, HD95 ``penalty``)."""
    tp = sum(1 for m in rows if m.ref_id is not None and m.pred_ids)
    fn = sum(1 for m in rows if m.ref_id is not None and not m.pred_ids)
    fp = sum(1 for m in rows if m.ref_id is None)
    n = tp + fn + fp
    if n == 0:
        return LesionSummary(0, 0, 0, 1.0, 1.0, 1.0, 1.0, 0.0, ())
    tp_rows = [m for m in rows if m.ref_id is not None and m.pred_ids]
    return LesionSummary(
        tp=tp,
        fp=fp,
        fn=fn,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        f1=2 * tp / (2 * tp + fp + fn),
        lesion_dice=math.fsum(m.dice for m in tp_rows) / n,
        lesion_hd95_mm=(math.fsum(m.hd95_mm for m in tp_rows) + (fn + fp) * penalty) / n,
        matches=tuple(rows),
    )
