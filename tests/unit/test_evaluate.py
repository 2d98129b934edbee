"""Tests of medseg.metrics.evaluate on small generated NIfTI / NRRD label maps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.metrics.evaluate import evaluate_folders, pair_cases
from medseg.metrics.overlap import EMPTY_CONVENTION

SPACING = (0.5, 1.0, 3.0)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degrees about z
ORIGIN = (10.0, -20.0, 5.0)
SHAPE = (16, 12, 6)
HEADER = "case,label,dice,iou,hd95_mm,assd_mm,nsd,vol_pred_ml,vol_ref_ml,label_name"


def _write(path: Path, labels: np.ndarray, spacing: tuple[float, ...] = SPACING) -> Path:
    """Write a label map given in index order (x, y, z) with an anisotropic, rotated grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.T))
    image.SetSpacing(spacing)
    image.SetDirection(DIRECTION)
    image.SetOrigin(ORIGIN)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _box(ranges: tuple[tuple[int, int], ...], value: int, out: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.uint8) if out is None else out
    out[tuple(slice(a, b) for a, b in ranges)] = value
    return out


def _strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"invalid JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path, dict[str, float]]:
    """Two cases; returns (pred_dir, ref_dir, expected dice of label 1 per case)."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    # case a: label 1 overlaps partly (pred 4x4x2=32, ref 4x4x2=32, overlap 2x4x2=16); label 2 perfect
    ref_a = _box(((2, 6), (2, 6), (1, 3)), 1)
    _box(((9, 13), (6, 10), (2, 5)), 2, ref_a)
    pred_a = _box(((4, 8), (2, 6), (1, 3)), 1)
    _box(((9, 13), (6, 10), (2, 5)), 2, pred_a)
    # case b: label 1 perfect, label 2 absent from both
    ref_b = _box(((3, 7), (3, 7), (2, 4)), 1)
    pred_b = ref_b.copy()
    _write(ref_dir / "a.nrrd", ref_a)
    _write(ref_dir / "b.nii.gz", ref_b)
    _write(pred_dir / "a_seg.nii.gz", pred_a)
    _write(pred_dir / "b.nrrd", pred_b)
    return pred_dir, ref_dir, {"a": 2 * 16 / 64, "b": 1.0}


def test_pair_cases(folders: tuple[Path, Path, dict[str, float]]) -> None:
    pred_dir, ref_dir, _ = folders
    pairs = pair_cases(pred_dir, ref_dir)
    assert [(c, p.name, r.name) for c, p, r in pairs] == [
        ("a", "a_seg.nii.gz", "a.nrrd"),
        ("b", "b.nrrd", "b.nii.gz"),
    ]


def test_evaluate_outputs(folders: tuple[Path, Path, dict[str, float]], tmp_path: Path) -> None:
    pred_dir, ref_dir, dice1 = folders
    out = tmp_path / "out"
    summary = evaluate_folders(pred_dir, ref_dir, out)

    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == HEADER
    rows = list(csv.DictReader(lines))
    assert len(rows) == 2 * 2  # 2 cases x foreground labels {1, 2}
    by_key = {(r["case"], int(r["label"])): r for r in rows}
    assert float(by_key["a", 1]["dice"]) == pytest.approx(dice1["a"])
    assert by_key["a", 1]["dice"] == "0.5"  # 6 significant digits, no padding
    assert float(by_key["a", 1]["vol_ref_ml"]) == pytest.approx(32 * 1.5 / 1000)
    assert by_key["a", 1]["label_name"] == "label_1"
    # label 2 absent from both maps of case b: the "both empty" convention
    assert [by_key["b", 2][k] for k in ("dice", "iou", "hd95_mm", "assd_mm", "nsd")] == ["1", "1", "0", "0", "1"]
    # a shift of 2 voxels along x (0.5 mm): Hausdorff 1 mm
    assert float(by_key["a", 1]["hd95_mm"]) == pytest.approx(1.0)

    on_disk = _strict_json(out / "summary.json")
    assert on_disk == summary
    assert summary["cases"] == 2
    assert summary["nsd_tolerance_mm"] == 1.0
    assert set(summary["labels"]) == {"1", "2"}
    assert summary["labels"]["1"]["name"] == "label_1"
    assert summary["labels"]["1"]["dice"]["mean"] == pytest.approx(np.mean(list(dice1.values())))
    assert summary["labels"]["1"]["dice"]["median"] == pytest.approx(np.median(list(dice1.values())))
    assert summary["labels"]["1"]["dice"]["std"] == pytest.approx(np.std(list(dice1.values())))
    assert summary["labels"]["2"]["dice"]["mean"] == pytest.approx(1.0)
    assert summary["mean_dice_foreground"] == pytest.approx((np.mean(list(dice1.values())) + 1.0) / 2)
    assert summary["empty_convention"] == EMPTY_CONVENTION
    assert sorted(p.name for p in out.iterdir()) == ["dice_boxplot.png", "metrics.csv", "summary.json"]  # no temporaries


def test_nan_written_and_summarised(tmp_path: Path) -> None:
    ref = _box(((2, 6), (2, 6), (1, 3)), 1)
    _box(((9, 12), (6, 9), (2, 4)), 2, ref)
    pred = _box(((2, 6), (2, 6), (1, 3)), 1)  # label 2 missed: hd95/assd NaN
    _write(tmp_path / "ref" / "c1.nii.gz", ref)
    _write(tmp_path / "pred" / "c1_seg.nii.gz", pred)
    _write(tmp_path / "ref" / "c2.nii.gz", _box(((2, 6), (2, 6), (1, 3)), 1))
    _write(tmp_path / "pred" / "c2_seg.nii.gz", _box(((2, 6), (2, 6), (1, 3)), 1))
    summary = evaluate_folders(
        tmp_path / "pred", tmp_path / "ref", tmp_path / "out", labels={0: "bg", 1: "liver", 2: "tumour"}
    )
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    missed = next(r for r in rows if r["case"] == "c1" and r["label"] == "2")
    assert missed["hd95_mm"] == "nan" and missed["assd_mm"] == "nan" and missed["dice"] == "0"
    assert missed["label_name"] == "tumour"
    stats = _strict_json(tmp_path / "out" / "summary.json")["labels"]["2"]
    assert stats["name"] == "tumour"
    assert stats["hd95_mm"] == {"mean": 0.0, "std": 0.0, "median": 0.0}  # NaN-aware: only c2 (both empty)
    assert stats["dice"]["mean"] == pytest.approx(0.5)
    assert summary["labels"]["1"]["dice"]["mean"] == 1.0


def test_all_nan_is_null(tmp_path: Path) -> None:
    _write(tmp_path / "ref" / "c.nrrd", _box(((2, 6), (2, 6), (1, 3)), 1))
    _write(tmp_path / "pred" / "c.nrrd", np.zeros(SHAPE, dtype=np.uint8))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out")
    assert summary["labels"]["1"]["hd95_mm"] == {"mean": None, "std": None, "median": None}
    assert _strict_json(tmp_path / "out" / "summary.json")["labels"]["1"]["hd95_mm"]["mean"] is None


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir())


def test_geometry_mismatch(folders: tuple[Path, Path, dict[str, float]], tmp_path: Path) -> None:
    pred_dir, ref_dir, _ = folders
    bad = _write(pred_dir / "b.nrrd", np.zeros(SHAPE, dtype=np.uint8), spacing=(0.5, 1.0, 2.5))
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        evaluate_folders(pred_dir, ref_dir, out)
    assert str(info.value).startswith(str(bad))
    assert "spacing" in str(info.value) and "b.nii.gz" in str(info.value)
    _assert_nothing_written(out)


def test_undeclared_label(folders: tuple[Path, Path, dict[str, float]], tmp_path: Path) -> None:
    pred_dir, ref_dir, _ = folders
    labels = {i: f"l{i}" for i in range(6)}
    pred = _box(((3, 7), (3, 7), (2, 4)), 1)
    pred[0, 0, 0] = 7
    bad = _write(pred_dir / "b.nrrd", pred)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"label value 7 not declared in labels \(0\.\.5\)") as info:
        evaluate_folders(pred_dir, ref_dir, out, labels=labels)
    assert str(info.value).startswith(str(bad))
    _assert_nothing_written(out)


def test_non_integer_label_map(folders: tuple[Path, Path, dict[str, float]], tmp_path: Path) -> None:
    pred_dir, ref_dir, _ = folders
    pred = _box(((3, 7), (3, 7), (2, 4)), 1).astype(np.float32)
    pred[1, 1, 1] = 0.5
    bad = _write(pred_dir / "b.nrrd", pred)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="non-integer value 0.5") as info:
        evaluate_folders(pred_dir, ref_dir, out)
    assert str(info.value).startswith(str(bad))
    _assert_nothing_written(out)  # case a was evaluated before b failed: still nothing written


def test_integral_float_label_map_accepted(folders: tuple[Path, Path, dict[str, float]], tmp_path: Path) -> None:
    pred_dir, ref_dir, _ = folders
    _write(pred_dir / "b.nrrd", _box(((3, 7), (3, 7), (2, 4)), 1).astype(np.float32))
    summary = evaluate_folders(pred_dir, ref_dir, tmp_path / "out")
    assert summary["labels"]["1"]["dice"]["mean"] == pytest.approx((0.5 + 1.0) / 2)


def test_missing_prediction(folders: tuple[Path, Path, dict[str, float]], tmp_path: Path) -> None:
    pred_dir, ref_dir, _ = folders
    (pred_dir / "b.nrrd").unlink()
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no prediction") as info:
        evaluate_folders(pred_dir, ref_dir, out)
    assert str(info.value).startswith(str(ref_dir / "b.nii.gz"))
    _assert_nothing_written(out)


def test_prediction_without_reference(folders: tuple[Path, Path, dict[str, float]], tmp_path: Path) -> None:
    pred_dir, ref_dir, _ = folders
    extra = _write(pred_dir / "zz_seg.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    with pytest.raises(InputError, match="no reference") as info:
        pair_cases(pred_dir, ref_dir)
    assert str(info.value).startswith(str(extra))


def test_no_pair_and_missing_folders(tmp_path: Path) -> None:
    _write(tmp_path / "ref" / "a.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    _write(tmp_path / "pred" / "x.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    with pytest.raises(InputError, match="no prediction matches a reference"):
        pair_cases(tmp_path / "pred", tmp_path / "ref")
    with pytest.raises(InputError, match="no such file or folder") as info:
        pair_cases(tmp_path / "nope", tmp_path / "ref")
    assert str(info.value).startswith(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        pair_cases(tmp_path / "pred", tmp_path / "empty")


def test_two_predictions_for_one_case(folders: tuple[Path, Path, dict[str, float]]) -> None:
    pred_dir, ref_dir, _ = folders
    _write(pred_dir / "a.nrrd", np.zeros(SHAPE, dtype=np.uint8))
    with pytest.raises(InputError, match="second prediction for case 'a'"):
        pair_cases(pred_dir, ref_dir)


def test_2d_cases(tmp_path: Path) -> None:
    ref = np.zeros((10, 8), dtype=np.uint8)
    ref[2:6, 2:6] = 3
    pred = np.zeros((10, 8), dtype=np.uint8)
    pred[2:6, 3:7] = 3
    for folder, arr in (("ref", ref), ("pred", pred)):
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
        image.SetSpacing((0.7, 2.0))
        (tmp_path / folder).mkdir()
        sitk.WriteImage(image, str(tmp_path / folder / "s.nrrd"))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out")
    assert list(summary["labels"]) == ["3"]
    assert summary["labels"]["3"]["dice"]["mean"] == pytest.approx(2 * 12 / 32)
    assert summary["labels"]["3"]["hd95_mm"]["mean"] == pytest.approx(2.0)
    assert not math.isnan(summary["mean_dice_foreground"])
