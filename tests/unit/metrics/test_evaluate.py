"""Tests of medseg.metrics.evaluate (scoring) and medseg.reports.evaluation (its files) on small generated
NIfTI / NRRD label maps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.metrics.evaluate import pair_cases
from medseg.metrics.overlap import EMPTY_CONVENTION
from medseg.reports.evaluation import evaluate_folders

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


def test_predictions_of_nnunet_channel_files_pair_with_their_case(tmp_path: Path) -> None:
    """nnU-Net's raw layout: ``imagesTs/CASE_0000.nii.gz`` is predicted as ``CASE_0000_seg.nii.gz``, its reference
    is ``labelsTs/CASE.nii.gz``; an exact name still wins."""
    for name in ("ct_006", "ct_007", "x_0000"):
        _write(tmp_path / "ref" / f"{name}.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    for name in ("ct_006_0000", "ct_007_0000", "x_0000"):
        _write(tmp_path / "pred" / f"{name}_seg.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    pairs = pair_cases(tmp_path / "pred", tmp_path / "ref")
    assert [(c, p.name, r.name) for c, p, r in pairs] == [
        ("ct_006", "ct_006_0000_seg.nii.gz", "ct_006.nii.gz"), ("ct_007", "ct_007_0000_seg.nii.gz", "ct_007.nii.gz"),
        ("x_0000", "x_0000_seg.nii.gz", "x_0000.nii.gz")]


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
    with pytest.raises(InputError, match=r"non-integer value 0\.5") as info:
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


# --------------------------------------------------------------------------------------------
# label maps that are not label maps, label sets that differ, label mappings, label sources
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "name", "value", "fragment"), [
    ("pred", "b_seg.nii.gz", np.nan, "NaN"),  # SimpleITK reads NaN in NIfTI as 0: checked on the stored values
    ("pred", "b_seg.nii.gz", np.inf, "NaN or infinite"),
    ("pred", "b.nrrd", -np.inf, "infinite"),
    ("ref", "b.nii.gz", np.nan, "NaN"),
    ("pred", "b.nrrd", 2.5, "non-integer value 2.5"),
])
def test_nan_infinite_or_fractional_voxels_are_refused_naming_the_file(
        folders: tuple[Path, Path, dict[str, float]], tmp_path: Path, side: str, name: str, value: float,
        fragment: str) -> None:
    pred_dir, ref_dir, _ = folders
    (pred_dir / "b.nrrd").unlink()
    (ref_dir / "b.nii.gz").unlink()
    good = _box(((3, 7), (3, 7), (2, 4)), 1).astype(np.float32)
    bad = good.copy()
    bad[3:7, 3:7, 2:4] = value  # the whole structure: read as 0 it would look like an empty prediction
    pred, ref = (bad, good) if side == "pred" else (good, bad)
    pred_path = _write(pred_dir / (name if side == "pred" else "b_seg.nii.gz"), pred)
    ref_path = _write(ref_dir / (name if side == "ref" else "b.nii.gz"), ref)
    target = pred_path if side == "pred" else ref_path
    out = tmp_path / "out"
    with pytest.raises(InputError, match=fragment) as info:
        evaluate_folders(pred_dir, ref_dir, out)
    message = str(info.value)  # NaN/Inf: refused by the reader (every image); fractions: not a label map
    assert message.startswith(str(target)) and ("not a label map" in message or "NaN or infinite" in message)
    _assert_nothing_written(out)


def test_differing_label_sets_warn_and_a_label_map_renames_prediction_values(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ref = _box(((2, 8), (2, 8), (1, 4)), 5)  # the reference has one lesion label, 5
    pred = ref.copy()
    pred[2:5] = np.where(pred[2:5] == 5, 6, 0)  # the model splits it into 6 and 7
    pred[5:8] = np.where(pred[5:8] == 5, 7, 0)
    _write(tmp_path / "ref" / "c.nii.gz", ref)
    _write(tmp_path / "pred" / "c_seg.nii.gz", pred)
    with caplog.at_level("WARNING", logger="medseg"):
        summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out1")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("6, 7 occur in the predictions but in no reference" in w and "--label-map" in w for w in warnings)
    assert any("5 occur in the references but in no prediction" in w for w in warnings)
    assert summary["labels"]["5"]["dice"]["mean"] == 0.0

    caplog.clear()
    names = {0: "background", 5: "lesion"}
    with caplog.at_level("WARNING", logger="medseg"):
        summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out2", labels=names,
                                   label_map={6: 5, 7: 5})
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert summary["labels"]["5"]["dice"]["mean"] == pytest.approx(1.0)
    assert summary["labels"]["5"]["name"] == "lesion"
    # without the mapping, the undeclared prediction values are refused and the mapping is suggested
    with pytest.raises(InputError, match=r"label value 6 not declared.*--label-map"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out3", labels=names)


BUNDLE = Path(__file__).resolve().parents[3] / "bundles" / "ct_abdomen_phantom"


@pytest.mark.parametrize("source", ["bundle", "plan", "labels_only_msd", "labels_only_v2", "dataset"])
def test_cli_evaluate_takes_labels_from_any_source(folders: tuple[Path, Path, dict[str, float]], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str], source: str) -> None:
    from medseg.cli import main

    pred_dir, ref_dir, _ = folders
    paths = {
        "bundle": BUNDLE,
        "plan": BUNDLE / "configs" / "plan.json",
        "labels_only_msd": tmp_path / "msd.json",
        "labels_only_v2": tmp_path / "v2.json",
        "dataset": tmp_path / "data" / "dataset.json",
    }
    (tmp_path / "msd.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "spleen"}}))
    (tmp_path / "v2.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({  # a dataset.json whose files are elsewhere
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "training": [{"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz"}]}))
    out = tmp_path / "out"
    assert main(["--quiet", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", str(paths[source]),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    summary = _strict_json(out / "summary.json")
    assert summary["labels"]["1"]["name"] == "liver" and summary["labels"]["2"]["name"] == "spleen"
    assert "liver" in capsys.readouterr().out


def test_cli_evaluate_label_map_and_a_bad_one(folders: tuple[Path, Path, dict[str, float]], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.cli import main

    pred_dir, ref_dir, dice1 = folders
    out = tmp_path / "out"
    # mapping 2 -> 1 merges the second structure into the first in the predictions
    assert main(["--quiet", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out),
                 "--label-map", "2=1"]) == 0
    summary = _strict_json(out / "summary.json")
    assert summary["labels"]["1"]["dice"]["mean"] < np.mean(list(dice1.values()))
    with pytest.raises(SystemExit) as excinfo:
        main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out), "--label-map", "6:5"])
    assert excinfo.value.code == 2 and "PRED=REF" in capsys.readouterr().err
