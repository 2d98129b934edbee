"""``medseg train --network dynunet`` end to end: the plan names the architecture, the bundle builds it, and
``medseg predict`` blends the DynUNet's features instead of the class logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import medseg.inference.inferer as inferer_module
from medseg.cli import main
from medseg.data.synthetic import write_dataset
from medseg.inference.memory import estimate_slab_bytes
from medseg.io.image import read_geometry
from medseg.networks import build_network, split_pointwise_head
from medseg.plan import load_plan

pytestmark = pytest.mark.slow

#: an atlas of 20 structures (the phantoms hold labels 0-5; 6-19 are declared but absent): more classes than
#: the DynUNet's 16 first-level feature channels, so that blending features is the cheaper path
CLASSES = 20


def test_train_dynunet_then_predict_blends_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = write_dataset(tmp_path / "data", modality="ct", cases=4, seed=7, size=32)
    meta = json.loads(dataset.read_text())
    meta["labels"].update({str(k): f"structure {k}" for k in range(6, CLASSES)})
    dataset.write_text(json.dumps(meta))
    run = tmp_path / "run"
    # bounded by iterations, never by minutes: a loaded machine makes it slower, not different
    assert main(["--quiet", "train", "--data", str(dataset), "--out", str(run), "--network", "dynunet",
                 "--patch-size", "32,32,16", "--epochs", "1", "--max-iterations", "2", "--val-interval", "1"]) == 0

    plan = load_plan(run)
    saved = json.loads((run / "configs" / "plan.json").read_text())["network"]
    assert saved["name"] == "dynunet" and saved["filters"][0] == 16 and "channels" not in saved
    assert plan.num_classes == CLASSES
    split = split_pointwise_head(build_network(plan))
    assert split is not None and split[2] == 16 < CLASSES

    calls: list[tuple[dict, Any]] = []
    original = inferer_module.slab_sliding_window

    def spy(inputs: torch.Tensor, **kwargs: Any) -> Any:  # records what SlabInferer asks and gets
        result = original(inputs, **kwargs)
        calls.append((kwargs, result))
        return result

    monkeypatch.setattr(inferer_module, "slab_sliding_window", spy)
    images = dataset.parent / "imagesTs"
    preds = tmp_path / "preds"
    assert main(["--quiet", "predict", "--model", str(run), "--input", str(images), "--output", str(preds)]) == 0
    for image in images.iterdir():
        out = preds / image.name.replace(".nii.gz", "_seg.nii.gz")
        assert read_geometry(out).mismatch(read_geometry(image)) is None

    assert calls, "medseg predict did not go through SlabInferer"
    for kwargs, result in calls:
        assert kwargs["head"] is not None and kwargs["feature_channels"] == 16
        assert result.buffer_channels == 16  # blended: 16 features per voxel, not 20 class logits
    spatial = (96, 96, 64)
    common = {"roi_size": plan.patch_size, "num_classes": CLASSES, "overlap": plan.overlap,
              "sw_batch_size": plan.sw_batch_size}
    assert estimate_slab_bytes(spatial, feature_channels=16, **common) < estimate_slab_bytes(spatial, **common)
