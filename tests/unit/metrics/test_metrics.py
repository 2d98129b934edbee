"""Tests of medseg.metrics.overlap against hand-computed values and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medseg.metrics.overlap import LabelMetrics, label_metrics

SPACING = (0.5, 1.0, 3.0)  # anisotropic, index order (x, y, z)


def _box(shape: tuple[int, ...], *ranges: tuple[int, int], value: int = 1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int16)
    out[tuple(slice(a, b) for a, b in ranges)] = value
    return out


def _brute_force(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...], tol: float) -> tuple[float, float, float]:
    """HD95, ASSD and NSD from edge voxels and all pairwise distances (independent of MONAI)."""

    def edge_coords(mask: np.ndarray) -> np.ndarray:
        edges = mask & ~ndimage.binary_erosion(mask, border_value=0)
        return np.argwhere(edges) * np.asarray(spacing)

    ep, er = edge_coords(p), edge_coords(r)
    d = cdist(ep, er)
    d_pr, d_rp = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.quantile(d_pr, 0.95), np.quantile(d_rp, 0.95))
    assd = np.concatenate([d_pr, d_rp]).mean()
    nsd = (np.sum(d_pr <= tol) + np.sum(d_rp <= tol)) / (d_pr.size + d_rp.size)
    return float(hd95), float(assd), float(nsd)


def test_identical_masks() -> None:
    ref = _box((12, 10, 8), (2, 8), (3, 7), (1, 5), value=3)
    m = label_metrics(ref.copy(), ref, 3, SPACING)
    assert (m.dice, m.iou, m.hd95_mm, m.assd_mm, m.nsd) == (1.0, 1.0, 0.0, 0.0, 1.0)
    assert m.vol_pred_ml == m.vol_ref_ml == pytest.approx(6 * 4 * 4 * 0.5 * 1.0 * 3.0 / 1000)


def test_plates_apart_along_thick_axis() -> None:
    # single-slice plates 3 slices apart along z (3 mm): every edge voxel is exactly 9 mm away
    shape = (10, 8, 8)
    pred = _box(shape, (2, 7), (1, 6), (1, 2))
    ref = _box(shape, (2, 7), (1, 6), (4, 5))
    m = label_metrics(pred, ref, 1, SPACING)
    assert m.hd95_mm == pytest.approx(9.0)
    assert m.assd_mm == pytest.approx(9.0)
    assert m.dice == 0.0 and m.nsd == 0.0
    assert label_metrics(pred, ref, 1, SPACING, nsd_tolerance_mm=9.0).nsd == pytest.approx(1.0)


def test_cubes_apart_along_thin_axis_hand_computed() -> None:
    # two 4x4x4-voxel boxes, the second starting g=7 voxels further along x (0.5 mm).
    n, g, a = 4, 7, 1
    shape = (a + g + n + 2, n + 2, n + 2)
    pred = _box(shape, (a, a + n), (1, 1 + n), (1, 1 + n))
    ref = _box(shape, (a + g, a + g + n), (1, 1 + n), (1, 1 + n))
    # Edge voxels of the first box at x-offset i (0..n-1): n*n on the two end faces, a ring of
    # 4(n-1) in between; each is nearest to the facing end face of the other box, straight along x,
    # i.e. (g - i) * 0.5 mm away. By symmetry the other direction gives the same distances.
    distances = np.concatenate(
        [np.full(n * n if i in (0, n - 1) else 4 * (n - 1), (g - i) * SPACING[0]) for i in range(n)]
    )
    expected_hd95 = float(np.quantile(distances, 0.95))
    expected_assd = float(distances.mean())
    m = label_metrics(pred, ref, 1, SPACING)
    assert m.hd95_mm == pytest.approx(expected_hd95, abs=1e-5)
    assert m.assd_mm == pytest.approx(expected_assd, abs=1e-5)
    assert m.hd95_mm <= g * SPACING[0] + 1e-6  # never beyond the plain Hausdorff distance (the shift)
    assert (m.dice, m.iou, m.nsd) == (0.0, 0.0, 0.0)


def test_one_voxel_shift_along_thick_axis() -> None:
    shape = (12, 10, 10)
    ref = _box(shape, (2, 9), (2, 8), (2, 6))
    pred = _box(shape, (2, 9), (2, 8), (3, 7))  # shifted by one 3 mm slice
    tight = label_metrics(pred, ref, 1, SPACING, nsd_tolerance_mm=1.0)
    loose = label_metrics(pred, ref, 1, SPACING, nsd_tolerance_mm=3.1)
    assert tight.hd95_mm == pytest.approx(3.0)
    assert tight.nsd < 1.0
    assert loose.nsd == pytest.approx(1.0)
    assert tight.dice == pytest.approx(2 * 3 / (4 + 4))  # 3 of 4 slices overlap
    hd95, assd, nsd = _brute_force(pred == 1, ref == 1, SPACING, 1.0)
    assert (tight.hd95_mm, tight.assd_mm, tight.nsd) == pytest.approx((hd95, assd, nsd), abs=1e-5)


def test_overlapping_boxes_dice_iou_volumes() -> None:
    shape = (10, 7, 4)
    pred = _box(shape, (0, 6), (0, 4), (0, 3), value=2)  # 72 voxels
    ref = _box(shape, (3, 9), (1, 5), (0, 3), value=2)  # 72 voxels, overlap 3*3*3 = 27
    m = label_metrics(pred, ref, 2, SPACING)
    assert m.dice == pytest.approx(2 * 27 / (72 + 72))
    assert m.iou == pytest.approx(27 / (72 + 72 - 27))
    assert m.vol_pred_ml == pytest.approx(72 * 1.5 / 1000)
    assert m.vol_ref_ml == pytest.approx(72 * 1.5 / 1000)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dims", [2, 3])
def test_random_blobs_match_brute_force(seed: int, dims: int) -> None:
    # blobs touch the grid border too: voxels on the border are edge voxels
    rng = np.random.default_rng(seed)
    shape = (24, 20, 9)[:dims]
    spacing = SPACING[:dims]
    pred = (ndimage.gaussian_filter(rng.random(shape), 2) > 0.5).astype(np.uint8) * 4
    ref = (ndimage.gaussian_filter(rng.random(shape), 2) > 0.5).astype(np.uint8) * 4
    assert (pred == 4).any() and (ref == 4).any()
    m = label_metrics(pred, ref, 4, spacing, nsd_tolerance_mm=1.5)
    hd95, assd, nsd = _brute_force(pred == 4, ref == 4, spacing, 1.5)
    assert m.hd95_mm == pytest.approx(hd95, abs=1e-4)
    assert m.assd_mm == pytest.approx(assd, abs=1e-4)
    assert m.nsd == pytest.approx(nsd, abs=1e-6)
    inter = np.sum((pred == 4) & (ref == 4))
    assert m.dice == pytest.approx(2 * inter / (np.sum(pred == 4) + np.sum(ref == 4)))


def test_2d_shift() -> None:
    spacing = (0.8, 2.0)
    ref = _box((12, 12), (2, 8), (2, 6))
    pred = _box((12, 12), (2, 8), (3, 7))  # one 2 mm pixel along y
    m = label_metrics(pred, ref, 1, spacing, nsd_tolerance_mm=2.0)
    assert m.hd95_mm == pytest.approx(2.0)
    assert m.nsd == pytest.approx(1.0)
    assert m.dice == pytest.approx(2 * 18 / 48)
    assert m.vol_ref_ml == pytest.approx(24 * 0.8 * 2.0 / 1000)


def test_empty_conventions() -> None:
    shape = (6, 6, 6)
    empty = np.zeros(shape, dtype=np.uint8)
    full = _box(shape, (1, 4), (1, 4), (1, 4))
    both = label_metrics(empty, empty, 1, SPACING)
    assert both == LabelMetrics(1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0)
    for pred, ref in ((empty, full), (full, empty)):
        m = label_metrics(pred, ref, 1, SPACING)
        assert (m.dice, m.iou, m.nsd) == (0.0, 0.0, 0.0)
        assert math.isnan(m.hd95_mm) and math.isnan(m.assd_mm)
        assert m.vol_pred_ml + m.vol_ref_ml == pytest.approx(27 * 1.5 / 1000)


def test_other_labels_are_ignored() -> None:
    ref = _box((8, 8, 4), (1, 4), (1, 4), (0, 2), value=1)
    ref[5:7, 5:7, :] = 2
    pred = ref.copy()
    pred[pred == 2] = 0  # label 2 missed entirely; label 1 perfect
    assert label_metrics(pred, ref, 1, SPACING).dice == 1.0
    assert label_metrics(pred, ref, 2, SPACING).dice == 0.0


def test_bad_arguments() -> None:
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        label_metrics(a, np.zeros((4, 4, 5), dtype=np.uint8), 1, SPACING)
    with pytest.raises(ValueError, match="spacing"):
        label_metrics(a, a, 1, (1.0, 1.0))
    with pytest.raises(ValueError, match="nsd_tolerance_mm"):
        label_metrics(a, a, 1, SPACING, nsd_tolerance_mm=-1.0)
