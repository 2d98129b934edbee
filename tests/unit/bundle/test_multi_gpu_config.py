"""configs/multi_gpu_train.json: written with every bundle, layered on train.json, clean in safe mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.bundle.confinement import merged_config
from medseg.bundle.runner import config_layers
from medseg.bundle.safety import check_bundle, scan_bundle
from medseg.bundle.train_config import multi_gpu_parts
from medseg.layout import META_FILE

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").exists())


def test_written_bundle_layers_multi_gpu_train_on_train_and_passes_safe_mode(untrained_run: Path,
                                                                             ct_dataset: Path) -> None:
    configs = untrained_run / "configs"
    assert json.loads((configs / "multi_gpu_train.json").read_text()) == multi_gpu_parts()
    layers = config_layers(untrained_run, "multi_gpu_train")
    assert [p.name for p in layers] == ["train.json", "multi_gpu_train.json"]
    assert scan_bundle(untrained_run) == []
    check_bundle(untrained_run, {"dataset_dir": str(ct_dataset), "bundle_root": str(untrained_run)}, config=layers)
    merged = merged_config(layers, untrained_run / META_FILE, {}, untrained_run)
    train = merged["train"]
    assert train["dataloader"]["shuffle"] is False and train["dataloader"]["sampler"] in ("@train#sampler", "@train::sampler")
    assert train["trainer"]["network"] == "@ddp_network"
    assert merged["ddp_network"]["network"] == "@network"  # optimiser, evaluator, checkpoints: the bare network
    assert merged["validate"]["evaluator"]["network"] == "@network"
    assert train["handlers"][-1]["_target_"] == "medseg.engines.distributed.ReplicaCheck"
    assert [item["_target_"] for item in merged["initialize"][-2:]] == ["medseg.engines.distributed.init_distributed",
                                                                       "monai.utils.set_determinism"]
    assert merged["finalize"][-1]["_target_"] == "medseg.engines.distributed.close_distributed"


@pytest.mark.parametrize("bundle", SHIPPED, ids=[b.name for b in SHIPPED])
def test_shipped_bundles_carry_the_current_multi_gpu_config(bundle: Path) -> None:
    """The shipped bundles are fold ensembles: each fold is trained by its own configs."""
    folds = sorted(bundle.glob("fold_*/configs/multi_gpu_train.json"))
    assert len(folds) == 5
    for path in folds:
        assert json.loads(path.read_text()) == multi_gpu_parts(), path
