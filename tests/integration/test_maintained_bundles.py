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
    for name in ("train.json", "multi_gpu_train.json", "inference.json", "evaluate.json", "logging.conf", "plan.json"):
        assert (bundle / "configs" / name).is_file(), name
    assert scan_bundle(bundle) == []
    verify_bundle(bundle)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"]["mean_dice_test"] > 0.8
    assert all(segment["snomed"]["code"] for segment in meta["segments"].values())
    readme = (bundle / "docs" / "README.md").read_text()
    for heading in ("## Data", "## Labels and measured metrics", "## Training"):
        assert heading in readme


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
