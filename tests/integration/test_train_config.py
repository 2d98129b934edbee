"""``configs/train.json`` is the pipeline: an override reaches the object the trainer uses through both
doors (``python -m monai.bundle run``, ``medseg bundle run --set``), ``medseg train`` and MONAI's runner
train identical weights, and a failure while the config builds its parts leaves no trace.

Training is bounded by iterations (a few), never by minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg.cli import main
from medseg.data.synthetic import write_dataset

pytestmark = pytest.mark.slow

#: the same environment for both doors: one thread each, so that both compute in the same order
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 small CT phantoms (4 for training: 3 train, 1 validation); returns dataset.json."""
    return write_dataset(tmp_path_factory.mktemp("data") / "small", modality="ct", cases=6, seed=4, size=64)


def _bundle(folder: Path, data: Path) -> Path:
    assert main(["--quiet", "bundle", "init", "--data", str(data), "--out", str(folder), "--patch-size", "32,32,16"]) == 0
    return folder


def _medseg() -> list[str]:
    exe = Path(sys.executable).with_name("medseg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "medseg"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=1800)  # a hang guard only


def _lr_of_the_saved_optimizer(bundle: Path) -> tuple[float, float]:
    group = torch.load(bundle / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    return group["initial_lr"], group["lr"]


def test_an_optimizer_override_reaches_the_optimizer_the_trainer_steps(tmp_path: Path, data: Path) -> None:
    """``--optimizer#lr 0.001`` (MONAI's runner) and ``--set optimizer#lr=0.001`` (medseg bundle run, safe
    mode): the optimizer state saved in checkpoints/last.pt after one epoch of 2 iterations has lr
    0.001 (with 1 epoch the polynomial decay keeps it), not the config's 0.002."""
    via_monai = _bundle(tmp_path / "monai", data)
    assert json.loads((via_monai / "configs" / "train.json").read_text())["learning_rate"] == 0.002
    result = _run(sys.executable, "-m", "monai.bundle", "run", "--config_file", str(via_monai / "configs" / "train.json"),
                  "--bundle_root", str(via_monai), "--dataset_dir", str(data.parent), "--optimizer#lr", "0.001",
                  "--epochs", "1", "--min_iterations_per_epoch", "2", "--val_interval", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _lr_of_the_saved_optimizer(via_monai) == (0.001, 0.001)
    assert torch.load(via_monai / "checkpoints" / "last.pt", weights_only=True)["trainer"]["iteration"] == 2

    via_medseg = _bundle(tmp_path / "medseg", data)
    assert main(["--quiet", "bundle", "run", str(via_medseg), "--config", "train", "--set", f"dataset_dir={data.parent}",
                 "--set", "optimizer#lr=0.001", "--set", "epochs=1", "--set", "min_iterations_per_epoch=2",
                 "--set", "val_interval=1"]) == 0
    assert _lr_of_the_saved_optimizer(via_medseg) == (0.001, 0.001)
    meta = json.loads((via_medseg / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.2.0" and "trained 1 epoch (2 iterations of 2 per epoch)" in meta["changelog"]["0.2.0"]


def test_medseg_train_and_monai_runner_train_identical_weights(tmp_path: Path, data: Path) -> None:
    """``medseg train --bundle B1`` and ``python -m monai.bundle run`` on an identical copy B2, same
    seed, CPU, 3 iterations: every tensor of models/model.pt is equal, and so is the history."""
    b1 = _bundle(tmp_path / "cli", data)
    b2 = tmp_path / "monai"
    shutil.copytree(b1, b2)
    cli = _run(*_medseg(), "--quiet", "train", "--bundle", str(b1), "--data", str(data), "--epochs", "1",
               "--max-iterations", "3", "--seed", "7")
    assert cli.returncode == 0, cli.stderr[-3000:]
    monai = _run(sys.executable, "-m", "monai.bundle", "run", "--config_file", str(b2 / "configs" / "train.json"),
                 "--bundle_root", str(b2), "--dataset_dir", str(data), "--epochs", "1", "--max_iterations", "3",
                 "--seed", "7")
    assert monai.returncode == 0, monai.stderr[-3000:]
    a = torch.load(b1 / "models" / "model.pt", weights_only=True)
    b = torch.load(b2 / "models" / "model.pt", weights_only=True)
    assert list(a) == list(b) and a
    unequal = [key for key in a if not torch.equal(a[key], b[key])]
    assert not unequal, unequal
    summaries = [json.loads((bundle / "train_summary.json").read_text()) for bundle in (b1, b2)]
    assert summaries[0]["iterations"] == summaries[1]["iterations"] == 3
    assert summaries[0]["best_val_mean_dice"] == summaries[1]["best_val_mean_dice"]
    assert (b1 / "history.json").read_text() == (b2 / "history.json").read_text()
    assert (b1 / "split.json").read_text() == (b2 / "split.json").read_text()


def test_a_failure_while_the_config_builds_its_parts_leaves_no_trace(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``medseg train`` wrote the new bundle, then building ``train#preprocessing`` fails: the run folder
    goes; with ``--bundle`` the bundle is left byte for byte as it was (nothing is written while the
    parts are built)."""
    from medseg.engines import data as engine_data

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated failure while building")

    monkeypatch.setattr(engine_data, "augmentation", broken)
    run = tmp_path / "RUN"
    assert main(["--quiet", "train", "--plan", "default", "--data", str(data), "--out", str(run), "--epochs", "1",
                 "--patch-size", "32,32,16"]) == 1
    assert "simulated failure while building" in capsys.readouterr().err
    assert not run.exists()

    bundle = _bundle(tmp_path / "bundle", data)
    before = {p.relative_to(bundle): p.read_bytes() if p.is_file() else None for p in bundle.rglob("*")}
    assert main(["--quiet", "train", "--bundle", str(bundle), "--data", str(data), "--epochs", "1"]) == 1
    assert {p.relative_to(bundle): p.read_bytes() if p.is_file() else None for p in bundle.rglob("*")} == before
