"""Tests of medseg.metrics.lesions (BraTS-2023-style lesion-wise metrics) on hand-made cases."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from scipy import ndimage

from medseg.metrics import lesions as lesions_module
from medseg.metrics.lesion_table import LESION_COLUMNS, lesion_rows, write_lesions_csv
from medseg.metrics.lesions import (
    LesionMatch,
    connected_lesions,
    instance_map,
    lesion_wise,
)
from medseg.metrics.overlap import label_metrics

ISO = (1.0, 1.0, 1.0)
PENALTY = 374.0
SHAPE = (48, 32, 32)


def _box(out: np.ndarray, *ranges: tuple[int, int], value: int = 1) -> np.ndarray:
    out[tuple(slice(a, b) for a, b in ranges)] = value
    return out


def _sphere(out: np.ndarray, centre: tuple[int, ...], radius: float, value: int = 1) -> np.ndarray:
    grid = np.indices(out.shape)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    out[dist2 <= radius**2] = value
    return out


def _three_lesions() -> tuple[np.ndarray, np.ndarray]:
    """Reference: sphere A, cube B (6^3), sphere C; prediction: A exactly, B shifted by 3 voxels
    along x, and a false-positive blob far from everything. Label 2 (label 1 is decoy)."""
    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    _sphere(ref, (8, 8, 8), 4, value=2)
    _box(ref, (20, 26), (4, 10), (4, 10), value=2)
    _sphere(ref, (38, 24, 24), 3, value=2)
    _sphere(pred, (8, 8, 8), 4, value=2)
    _box(pred, (23, 29), (4, 10), (4, 10), value=2)
    _box(pred, (6, 9), (24, 27), (24, 27), value=2)  # FP (predicted id 2 in raster order)
    _box(pred, (40, 44), (2, 6), (2, 6), value=1)  # another label: ignored
    return pred, ref


def test_three_lesions_hand_computed() -> None:
    pred, ref = _three_lesions()
    s = lesion_wise(pred, ref, 2, ISO)
    assert (s.tp, s.fn, s.fp) == (2, 1, 1)
    assert s.precision == pytest.approx(2 / 3)
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 / 3)
    # cube B shifted by half its width: |P∩R| = 3*6*6 = 108 of 216 + 216 voxels
    d2 = 2 * 108 / (216 + 216)
    assert d2 == 0.5
    assert s.lesion_dice == pytest.approx((1.0 + d2) / 4)
    # HD95 of B: the 36 voxels of each outer x-face are 3 mm from the other box's nearest edge
    # voxel, nothing is farther, so both directed 95th percentiles are 3 mm
    hd2 = 3.0
    assert s.lesion_hd95_mm == pytest.approx((0.0 + hd2 + PENALTY + PENALTY) / 4)

    rows = {m.ref_id: m for m in s.matches}
    assert [m.ref_id for m in s.matches] == [1, 2, 3, None]
    assert rows[1].dice == 1.0 and rows[1].hd95_mm == 0.0
    assert rows[2].dice == pytest.approx(d2) and rows[2].hd95_mm == pytest.approx(hd2)
    assert rows[2].ref_volume_ml == pytest.approx(216 / 1000) and rows[2].pred_volume_ml == pytest.approx(0.216)
    assert rows[3] == LesionMatch(3, (), rows[3].ref_volume_ml, 0.0, 0.0, PENALTY)
    assert rows[None].pred_ids == (2,) and rows[None].ref_volume_ml == 0.0
    assert rows[None].pred_volume_ml == pytest.approx(27 / 1000)
    assert (rows[None].dice, rows[None].hd95_mm) == (0.0, PENALTY)

    penalty = lesion_wise(pred, ref, 2, ISO, hd95_penalty_mm=100.0)
    assert penalty.lesion_hd95_mm == pytest.approx((0.0 + hd2 + 200.0) / 4)


def test_one_lesion_dice_matches_monai() -> None:
    pred, ref = _three_lesions()
    s = lesion_wise(pred, ref, 2, ISO)
    ref_lab, _ = connected_lesions(ref == 2, ISO)
    pred_lab, _ = connected_lesions(pred == 2, ISO)
    lesion = next(m for m in s.matches if m.ref_id == 2)
    y = torch.from_numpy((ref_lab == 2)[None, None].astype(np.float32))
    y_pred = torch.from_numpy(np.isin(pred_lab, lesion.pred_ids)[None, None].astype(np.float32))
    expected = float(compute_dice(y_pred, y, include_background=True)[0, 0])
    assert lesion.dice == pytest.approx(expected)


def test_split_prediction_is_one_true_positive() -> None:
    ref = _box(np.zeros((16, 10, 10), np.uint8), (2, 12), (2, 8), (2, 8))
    pred = np.zeros_like(ref)
    _box(pred, (2, 6), (2, 8), (2, 8))
    _box(pred, (8, 12), (2, 8), (2, 8))  # two voxels gap: a second component
    assert connected_lesions(pred, ISO)[1] == 2
    s = lesion_wise(pred, ref, 1, ISO)
    assert (s.tp, s.fn, s.fp) == (1, 0, 0)
    assert s.precision == s.recall == s.f1 == 1.0
    (match,) = s.matches
    assert match.pred_ids == (1, 2)
    assert match.dice == pytest.approx(2 * 288 / (288 + 360))
    assert match.pred_volume_ml == pytest.approx(0.288)
    assert lesion_rows("c", 1, s)["n_pred"] == 2


def test_bridging_prediction_makes_both_lesions_true_positive() -> None:
    # documented (as in BraTS): the whole bridging component counts in each lesion's Dice
    ref = np.zeros((16, 10, 10), np.uint8)
    _box(ref, (2, 6), (2, 8), (2, 8))
    _box(ref, (8, 12), (2, 8), (2, 8))
    pred = _box(np.zeros_like(ref), (2, 12), (2, 8), (2, 8))
    s = lesion_wise(pred, ref, 1, ISO)
    assert (s.tp, s.fn, s.fp) == (2, 0, 0)
    assert [m.pred_ids for m in s.matches] == [(1,), (1,)]
    for m in s.matches:
        assert m.dice == pytest.approx(2 * 144 / (144 + 360))
    assert s.lesion_dice == pytest.approx(2 * 144 / (144 + 360))
    row = lesion_rows("c", 1, s)
    assert (row["n_ref"], row["n_pred"]) == (2, 1)


def test_no_lesions_anywhere_is_perfect() -> None:
    empty = np.zeros((8, 8, 8), np.uint8)
    other = _box(empty.copy(), (1, 3), (1, 3), (1, 3), value=1)  # label 1 only; evaluate label 2
    for pred, ref in ((empty, empty), (other, other)):
        s = lesion_wise(pred, ref, 2, ISO)
        assert (s.tp, s.fp, s.fn) == (0, 0, 0)
        assert (s.precision, s.recall, s.f1, s.lesion_dice, s.lesion_hd95_mm) == (1.0, 1.0, 1.0, 1.0, 0.0)
        assert s.matches == ()


def test_empty_prediction_is_all_false_negatives() -> None:
    pred, ref = _three_lesions()
    s = lesion_wise(np.zeros_like(pred), ref, 2, ISO)
    assert (s.tp, s.fp, s.fn) == (0, 0, 3)
    assert (s.precision, s.recall, s.f1, s.lesion_dice) == (0.0, 0.0, 0.0, 0.0)
    assert s.lesion_hd95_mm == PENALTY
    # and only false positives: recall 0 by the same convention
    s = lesion_wise(pred, np.zeros_like(ref), 2, ISO)
    assert (s.tp, s.fp, s.fn) == (0, 3, 0)
    assert (s.precision, s.recall, s.f1, s.lesion_dice, s.lesion_hd95_mm) == (0.0, 0.0, 0.0, 0.0, PENALTY)


def test_anisotropic_volumes_and_min_volume_on_both_sides() -> None:
    spacing = (0.7, 0.7, 3.0)  # 1.47 mm^3 per voxel
    ref = np.zeros((30, 30, 12), np.uint8)
    _box(ref, (2, 12), (2, 12), (2, 6))  # 400 voxels = 0.588 mL
    pred = ref.copy()
    ref[25, 25, 10] = 1  # a 1-voxel reference speck (0.00147 mL), missed
    pred[25, 2, 10] = 1  # a 1-voxel predicted speck far from everything
    pred[20, 20, 2:4] = 1  # a 2-voxel predicted blob (0.00294 mL)

    s = lesion_wise(pred, ref, 1, spacing)
    assert (s.tp, s.fn, s.fp) == (1, 1, 2)
    big = s.matches[0]
    assert big.ref_volume_ml == pytest.approx(400 * 0.7 * 0.7 * 3.0 / 1000)
    assert big.ref_volume_ml == pytest.approx(0.588)
    assert big.pred_volume_ml == pytest.approx(0.588)
    assert s.matches[1].ref_volume_ml == pytest.approx(0.00147)

    s = lesion_wise(pred, ref, 1, spacing, min_volume_ml=0.002)  # specks out, 2-voxel blob stays
    assert (s.tp, s.fn, s.fp) == (1, 0, 1)
    s = lesion_wise(pred, ref, 1, spacing, min_volume_ml=0.00294)  # a volume equal to the threshold stays
    assert (s.tp, s.fn, s.fp) == (1, 0, 1)
    s = lesion_wise(pred, ref, 1, spacing, min_volume_ml=0.01)
    assert (s.tp, s.fn, s.fp) == (1, 0, 0)
    assert (s.lesion_dice, s.lesion_hd95_mm, s.f1) == (1.0, 0.0, 1.0)

    labels, n = connected_lesions(pred, spacing)
    assert n == 3 and labels.dtype == np.int32
    labels, n = connected_lesions(pred, spacing, min_volume_ml=0.002)
    assert n == 2 and sorted(np.unique(labels)) == [0, 1, 2]
    assert np.count_nonzero(labels) == 402


def test_small_reference_lesion_absorbs_its_prediction() -> None:
    # a reference lesion below the threshold is not scored, and its prediction is no FP (BraTS)
    ref = np.zeros((20, 10, 10), np.uint8)
    _box(ref, (2, 8), (2, 8), (2, 8))  # 216 voxels
    _box(ref, (14, 16), (4, 6), (4, 6))  # 8 voxels
    pred = ref.copy()
    _box(pred, (13, 17), (3, 7), (3, 7))  # 64 voxels over the small one
    s = lesion_wise(pred, ref, 1, ISO, min_volume_ml=0.01)
    assert (s.tp, s.fn, s.fp) == (1, 0, 0)
    assert [m.ref_id for m in s.matches] == [1]


def test_dilation_matches_near_misses_and_groups_close_lesions() -> None:
    ref = np.zeros((30, 12, 12), np.uint8)
    _box(ref, (2, 6), (4, 8), (4, 8))
    pred = _box(np.zeros_like(ref), (8, 12), (4, 8), (4, 8))  # 2 voxels (1 mm) gap: x 6, 7 empty
    s = lesion_wise(pred, ref, 1, ISO)
    assert (s.tp, s.fn, s.fp) == (0, 1, 1)
    s = lesion_wise(pred, ref, 1, ISO, dilation_mm=3)
    assert (s.tp, s.fn, s.fp) == (1, 0, 0)
    assert s.matches[0].dice == 0.0 and s.matches[0].hd95_mm == pytest.approx(6.0)
    # far away (gap 12 mm): no match even with dilation
    far = _box(np.zeros_like(ref), (18, 22), (4, 8), (4, 8))
    assert lesion_wise(far, ref, 1, ISO, dilation_mm=3).fp == 1

    # two reference components 4 voxels apart: one lesion with a 3 mm dilation, two without
    ref2 = ref.copy()
    _box(ref2, (10, 14), (4, 8), (4, 8))
    ref2[25, 5, 5] = 1  # far away: its own lesion
    pred2 = ref2.copy()
    pred2[25, 5, 5] = 0
    assert lesion_wise(pred2, ref2, 1, ISO).tp == 2
    s = lesion_wise(pred2, ref2, 1, ISO, dilation_mm=3)
    assert (s.tp, s.fn, s.fp) == (1, 1, 0)
    assert s.matches[0].ref_volume_ml == pytest.approx(0.128) and s.matches[0].dice == 1.0
    assert s.matches[1].ref_id == 2 and s.matches[1].ref_volume_ml == pytest.approx(0.001)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("n", [1, 3])
def test_dilation_element_equals_brats_iterations_on_1mm(ndim: int, n: int) -> None:
    element = lesions_module._dilation_element((1.0,) * ndim, float(n))
    point = np.zeros((2 * n + 3,) * ndim, bool)
    point[(n + 1,) * ndim] = True
    brats = ndimage.binary_dilation(point, ndimage.generate_binary_structure(ndim, 2), iterations=n)
    assert np.array_equal(ndimage.binary_dilation(point, element), brats)


def test_instance_map_3d_and_2d() -> None:
    labels = np.zeros((20, 12, 12), np.uint8)
    _box(labels, (1, 4), (1, 4), (1, 4), value=1)
    _box(labels, (4, 6), (1, 4), (1, 4), value=2)  # touches label 1: same instance
    _box(labels, (10, 12), (5, 7), (5, 7), value=2)
    labels[12, 7, 7] = 1  # diagonal neighbour of the previous box: same instance (26-connectivity)
    _box(labels, (16, 19), (8, 11), (8, 11), value=3)  # not a lesion label
    labels[18, 1, 1] = 2
    out = instance_map(labels, (1, 2), ISO)
    assert out.dtype == np.uint16 and out.shape == labels.shape
    assert sorted(np.unique(out)) == [0, 1, 2, 3]
    assert np.all(out[np.isin(labels, (0, 3))] == 0)
    assert len({int(out[2, 2, 2]), int(out[5, 2, 2])}) == 1
    assert out[12, 7, 7] == out[10, 5, 5]
    assert len({int(out[2, 2, 2]), int(out[10, 5, 5]), int(out[18, 1, 1])}) == 3
    assert instance_map(labels, (1, 2), ISO, min_volume_ml=0.005).max() == 2  # the 1-voxel one dropped

    flat = np.zeros((10, 10), np.int32)
    flat[1, 1] = flat[2, 2] = 5  # diagonal: one instance with 8-connectivity
    flat[6:9, 6:9] = 5
    out2 = instance_map(flat, [5], (0.5, 0.5))
    assert sorted(np.unique(out2)) == [0, 1, 2] and out2[1, 1] == out2[2, 2]
    assert connected_lesions(flat, (0.5, 0.5), connectivity=4)[1] == 3
    with pytest.raises(ValueError):
        instance_map(flat, [], (0.5, 0.5))


def test_2d_lesion_wise() -> None:
    ref = np.zeros((20, 20), np.uint8)
    ref[2:6, 2:6] = 1
    ref[12:16, 12:16] = 1
    pred = ref.copy()
    pred[12:16, 12:16] = 0
    s = lesion_wise(pred, ref, 1, (0.5, 0.5))
    assert (s.tp, s.fn, s.fp) == (1, 1, 0)
    assert s.matches[0].ref_volume_ml == pytest.approx(16 * 0.25 / 1000)


def test_invalid_inputs_raise_value_error() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        lesion_wise(a, np.zeros((4, 4, 5), np.uint8), 1, ISO)
    for spacing in ((1.0, 1.0), (1.0, 0.0, 1.0), (1.0, math.nan, 1.0), (1.0, -1.0, 1.0)):
        with pytest.raises(ValueError, match="spacing"):
            lesion_wise(a, a, 1, spacing)
        with pytest.raises(ValueError, match="spacing"):
            connected_lesions(a, spacing)
    with pytest.raises(ValueError, match="2D or 3D"):
        lesion_wise(np.zeros(4), np.zeros(4), 1, (1.0,))
    for kwargs in ({"dilation_mm": -1}, {"min_volume_ml": math.inf}, {"hd95_penalty_mm": math.nan}):
        with pytest.raises(ValueError):
            lesion_wise(a, a, 1, ISO, **kwargs)
    with pytest.raises(ValueError, match="connectivity"):
        connected_lesions(a, ISO, connectivity=8)


def test_lesion_rows_and_csv(tmp_path: Path) -> None:
    pred, ref = _three_lesions()
    s = lesion_wise(pred, ref, 2, ISO)
    row = lesion_rows("case_001", 2, s)
    assert tuple(row) == LESION_COLUMNS
    assert (row["n_ref"], row["n_pred"]) == (3, 3)
    nan_row = dict(row, case="case_002", precision=math.nan, tp=np.int64(0))
    path = write_lesions_csv([row, nan_row], tmp_path / "out" / "lesions.csv")
    assert path == tmp_path / "out" / "lesions.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(LESION_COLUMNS)
    assert lines[1] == "case_001,2,2,1,1,0.666667,0.666667,0.666667,0.375,187.75,3,3"
    parsed = list(csv.DictReader(lines))
    assert parsed[1]["precision"] == "nan" and parsed[1]["tp"] == "0"
    assert [p.name for p in path.parent.iterdir()] == ["lesions.csv"]  # no temporary left behind

    with pytest.raises(ValueError, match="missing"):
        write_lesions_csv([{k: v for k, v in row.items() if k != "f1"}], tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


def test_label_metrics_agrees_on_isolated_lesion() -> None:
    # the per-lesion values equal label_metrics on the lesion pair alone (no other lesion leaks in)
    pred, ref = _three_lesions()
    s = lesion_wise(pred, ref, 2, ISO)
    only_ref = _box(np.zeros(SHAPE, np.uint8), (20, 26), (4, 10), (4, 10))
    only_pred = _box(np.zeros(SHAPE, np.uint8), (23, 29), (4, 10), (4, 10))
    m = label_metrics(only_pred, only_ref, 1, ISO)
    lesion = next(x for x in s.matches if x.ref_id == 2)
    assert (lesion.dice, lesion.hd95_mm) == pytest.approx((m.dice, m.hd95_mm))
