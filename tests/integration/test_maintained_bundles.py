"""The bundles shipped in bundles/: complete, safe-mode clean, verified, and their weights segment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.bundle.safety import scan_bundle
from medseg.bundle.verify import verify_bundle
from medseg.cli import main
from medseg.data.synthetic import write_dataset
from medseg.io.image import read_geometry, to_array

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").exists())


def test_there_are_a_ct_and_an_mr_bundle() -> None:
    modalities = {json.loads((b / "configs" / "plan.json").read_text())["modality"] for b in BUNDLES}
    assert {"CT", "MR"} <= modalities


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_bundle_is_complete_safe_and_verified(bundle: Path) -> None:
    """A bundle of medseg select: five folds (each a trained bundle of its own; a pair's other run's five folds in
    ``members/``), the selection and postprocessing with their out-of-fold figures, held-out test figures in the
    metadata and the README."""
    for name in ("inference.json", "evaluate.json", "logging.conf", "plan.json", "postprocessing.json",
                 "selection.json"):
        assert (bundle / "configs" / name).is_file(), name
    for fold in range(5):
        for name in ("configs/train.json", "configs/multi_gpu_train.json", "configs/plan.json", "models/model.pt"):
            assert (bundle / f"fold_{fold}" / name).is_file(), (fold, name)
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["folds"] == [0, 1, 2, 3, 4] and inference["inferer"]["members"] == 5
    assert scan_bundle(bundle) == []
    assert any(line.startswith("weights: the fold ensemble's models load") for line in verify_bundle(bundle))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["name"] == bundle.name
    assert meta["eval_metrics"]["mean_dice_test"] > 0.8
    cv = json.loads((bundle / "cv_summary.json").read_text())
    chosen = json.loads((bundle / "configs" / "selection.json").read_text())["chosen"]
    assert meta["eval_metrics"]["oof_mean_dice"] == pytest.approx(chosen["oof_mean_dice"], abs=1e-4)
    assert cv["overall"]["cases"] == 18 and sorted(cv["folds"]) == ["0", "1", "2", "3", "4"]
    if "members" in chosen:  # a pair: the other run's folds copied in, and what the MONAI door (own folds) scores
        assert chosen["oof_mean_dice"] > cv["overall"]["mean_dice"]  # the pair won over this run alone
        for member in chosen["members"][1:]:
            for fold in range(5):
                assert (bundle / "members" / member / f"fold_{fold}" / "models" / "model.pt").is_file(), (member, fold)
        assert 0.8 < meta["eval_metrics"]["mean_dice_test_monai_door"] <= meta["eval_metrics"]["mean_dice_test"]
    else:
        assert meta["eval_metrics"]["oof_mean_dice"] == pytest.approx(cv["overall"]["mean_dice"], abs=1e-4)
    assert all(segment["snomed"]["code"] for segment in meta["segments"].values())
    readme = (bundle / "docs" / "README.md").read_text()
    for heading in ("## Data", "## Labels and measured metrics", "## Cross-validation and selection", "## Training"):
        assert heading in readme
    assert f"{meta['eval_metrics']['mean_dice_test']:.3f}" in readme
    records = [p.read_text() for p in [*bundle.rglob("*.json"), *bundle.rglob("*.csv"), *bundle.rglob("*.md")]]
    assert not [r for r in records if "/tmp/" in r or "/work/" in r]  # no local paths of the machine it was built on


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_committed_weights_segment_new_phantoms(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Phantoms of an unseen seed: the committed model still segments them (Dice well above chance)."""
    plan = json.loads((bundle / "configs" / "plan.json").read_text())
    data = write_dataset(tmp_path / "data", modality=plan["modality"].lower(), cases=4, seed=9999, size=96)
    preds = tmp_path / "preds"
    assert main(["predict", "--model", str(bundle), "--input", str(data.parent / "imagesTs"), "--output", str(preds)]) == 0
    image = next((data.parent / "imagesTs").iterdir())
    out = preds / image.name.replace(".nii.gz", "_seg.nii.gz")
    assert read_geometry(out).mismatch(read_geometry(image)) is None
    assert set(np.unique(to_array(sitk.ReadImage(str(out)))).tolist()) <= set(range(6))
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(preds), "--ref", str(data.parent / "labelsTs"), "--labels", str(data),
                 "--out", str(tmp_path / "eval")]) == 0
    mean = float(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1])
    assert mean > 0.7
