"""Evaluation outputs people read: lesions.csv, instance maps, box plot, training curves, study report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medseg.cli import main
from medseg.io.image import read_geometry, to_array

LESION = 5


def _write_like(reference: Path, array_xyz: np.ndarray, out: Path) -> None:
    ref = sitk.ReadImage(str(reference))
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.T.astype(np.uint8)))
    image.CopyInformation(ref)
    sitk.WriteImage(image, str(out), useCompression=True)


def test_evaluate_writes_lesion_wise_csv_and_boxplot(tmp_path: Path, ct_dataset: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """References vs predictions in which the first case misses one lesion and gains a false one."""
    ref_dir = ct_dataset.parent / "labelsTs"
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    refs = sorted(ref_dir.iterdir())
    expected = {}
    for index, ref in enumerate(refs):
        labels = to_array(sitk.ReadImage(str(ref))).copy()
        components, n = ndimage.label(labels == LESION, structure=np.ones((3, 3, 3)))
        fp = fn = 0
        if index == 0:
            labels[components == 1] = 1  # lesion 1 missed (painted as liver)
            free = np.argwhere(labels == 0)
            x, y, z = free[len(free) // 2]
            labels[max(0, x - 2):x + 2, max(0, y - 2):y + 2, max(0, z - 1):z + 1] = LESION  # a false positive
            fn, fp = 1, 1
        expected[ref.name.replace(".nii.gz", "")] = (n - fn, fp, fn)
        _write_like(ref, labels, pred_dir / ref.name.replace(".nii.gz", "_seg.nii.gz"))
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", str(ct_dataset),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lesions TP" in printed
    with open(out / "lesions.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:12] == ["case", "label", "tp", "fp", "fn", "precision", "recall", "f1",
                                          "lesion_dice", "lesion_hd95_mm", "n_ref", "n_pred"]
        rows = {r["case"]: r for r in reader}
    for case, (tp, fp, fn) in expected.items():
        assert (int(rows[case]["tp"]), int(rows[case]["fp"]), int(rows[case]["fn"])) == (tp, fp, fn), case
        assert rows[case]["label"] == str(LESION)
    first = rows[sorted(rows)[0]]
    assert float(first["f1"]) < 1.0 and float(first["lesion_dice"]) < 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lesions"][str(LESION)]["fp"] == 1 and summary["lesions"][str(LESION)]["fn"] == 1
    png = out / "dice_boxplot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_predict_instances_and_training_curves(tmp_path: Path, trained_run: Path, ct_dataset: Path) -> None:
    history = json.loads((trained_run / "history.json").read_text())
    assert len(history["loss"]) == len(history["epoch"]) >= 2 and history["val_mean_dice"]
    assert (trained_run / "curves.png").read_bytes()[:4] == b"\x89PNG"

    image = sorted((ct_dataset.parent / "imagesTs").iterdir())[0]
    out = tmp_path / "out"
    assert main(["predict", "--model", str(trained_run), "--input", str(image), "--output", str(out), "--instances"]) == 0
    semantic = out / image.name.replace(".nii.gz", "_seg.nii.gz")
    instances = out / image.name.replace(".nii.gz", "_instances.nii.gz")
    assert read_geometry(instances).mismatch(read_geometry(image)) is None
    labels = to_array(sitk.ReadImage(str(semantic)))
    ids = to_array(sitk.ReadImage(str(instances)))
    _, n = ndimage.label(labels == LESION, structure=np.ones((3, 3, 3)))
    assert n >= 1 and int(ids.max()) == n and len(np.unique(ids)) == n + 1
    assert np.array_equal(ids > 0, labels == LESION)


@pytest.mark.slow
def test_report_command_writes_tables_pictures_and_html(tmp_path: Path, trained_run: Path, ct_dataset: Path) -> None:
    images = ct_dataset.parent / "imagesTs"
    preds = tmp_path / "preds"
    assert main(["predict", "--model", str(trained_run), "--input", str(images), "--output", str(preds)]) == 0
    out = tmp_path / "report"
    assert main(["report", "--pred", str(preds), "--images", str(images), "--out", str(out),
                 "--labels", str(trained_run)]) == 0
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html
    with open(out / "structures.csv") as f:
        rows = list(csv.DictReader(f))
    cases = {p.name.replace(".nii.gz", "") for p in images.iterdir()}
    assert {r["case"] for r in rows} == cases
    liver = [r for r in rows if r["label_name"] == "liver"]
    assert all(r["unit"] == "HU" and 60 < float(r["mean"]) < 140 and float(r["volume_ml"]) > 1 for r in liver)
    for case in cases:
        assert (out / f"{case}.png").exists() and case in html
    shutil.rmtree(preds)
