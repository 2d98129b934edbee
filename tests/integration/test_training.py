"""Training runs: run-folder contents, resume after a crash, 2D data, evaluation and the demo."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.cli import main
from medseg.data.synthetic import write_dataset
from medseg.io.image import read_geometry, to_array

pytestmark = pytest.mark.slow


def _medseg() -> list[str]:
    exe = Path(sys.executable).with_name("medseg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "medseg"]


def test_trained_run_folder_is_self_contained_and_segments(tmp_path: Path, trained_run: Path, ct_dataset: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The run folder holds plan, weights (a plain state dict), checkpoints and TensorBoard events,
    and predicting + evaluating the held-out cases gives a mean Dice far above chance."""
    plan = json.loads((trained_run / "configs" / "plan.json").read_text())
    assert plan["labels"]["5"] == "lesion" and plan["dims"] == 3
    state = torch.load(trained_run / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert (trained_run / "checkpoints" / "last.pt").exists()
    assert list((trained_run / "logs").glob("events.out.tfevents.*"))
    summary = json.loads((trained_run / "train_summary.json").read_text())
    assert summary["best_val_mean_dice"] > 0.5

    preds = tmp_path / "preds"
    assert main(["predict", "--model", str(trained_run), "--input", str(ct_dataset.parent / "imagesTs"),
                 "--output", str(preds)]) == 0
    for image in (ct_dataset.parent / "imagesTs").iterdir():
        out = preds / image.name.replace(".nii.gz", "_seg.nii.gz")
        assert read_geometry(out).mismatch(read_geometry(image)) is None
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(preds), "--ref", str(ct_dataset.parent / "labelsTs"),
                 "--labels", str(ct_dataset), "--out", str(tmp_path / "eval")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("mean Dice: ")
    assert float(last.split(": ")[1]) > 0.6
    with open(tmp_path / "eval" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows} == {"1", "2", "3", "4", "5"}
    assert all(float(r["hd95_mm"]) >= 0 for r in rows if r["hd95_mm"] != "nan")


def test_resume_after_sigkill_continues_from_last_checkpoint(tmp_path: Path, ct_dataset: Path) -> None:
    """Kill a training process hard after its first checkpoint; --resume picks up at that epoch."""
    run = tmp_path / "run"
    args = ["train", "--data", str(ct_dataset), "--out", str(run), "--epochs", "200", "--val-interval", "2",
            "--patch-size", "32,32,16"]
    process = subprocess.Popen([*_medseg(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert last.exists(), "training wrote no checkpoint"
    epoch = torch.load(last, weights_only=True)["trainer"]["epoch"]
    assert epoch >= 1

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    resumed = subprocess.run([*_medseg(), *args[:5], "--epochs", str(epoch + 2), "--resume", "--val-interval", "2"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from epoch {epoch}" in resumed.stderr
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["epochs_completed"] == epoch + 2
    assert torch.load(last, weights_only=True)["trainer"]["epoch"] == epoch + 2
    assert (run / "models" / "model.pt").exists()


def test_2d_dataset_trains_2d_unet_and_predicts_2d(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path / "data2d", modality="ct", cases=8, seed=5, size=96, dims=2)
    run = tmp_path / "run2d"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "40", "--max-minutes", "0.75",
                 "--val-interval", "5"]) == 0
    plan = json.loads((run / "configs" / "plan.json").read_text())
    assert plan["dims"] == 2 and len(plan["patch_size"]) == 2
    preds = tmp_path / "preds"
    assert main(["predict", "--model", str(run), "--input", str(data.parent / "imagesTs"), "--output", str(preds)]) == 0
    for image in (data.parent / "imagesTs").iterdir():
        out = preds / image.name.replace(".nii.gz", "_seg.nii.gz")
        assert read_geometry(out, dims=2).mismatch(read_geometry(image)) is None
        assert to_array(sitk.ReadImage(str(out))).ndim == 2
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(preds), "--ref", str(data.parent / "labelsTs"), "--labels", str(data),
                 "--out", str(tmp_path / "eval")]) == 0
    mean = float(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1])
    assert mean > 0.4  # a random label map scores < 0.1 here


def test_mr_dataset_trains_with_mr_preset(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "mr", modality="mr", cases=6, seed=2, size=64)
    run = tmp_path / "run_mr"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "2", "--val-interval", "1",
                 "--patch-size", "32,32,16"]) == 0
    plan = json.loads((run / "configs" / "plan.json").read_text())
    assert plan["modality"] == "MR" and plan["intensity"]["preset"] == "mr"
    preds = tmp_path / "preds"
    assert main(["predict", "--model", str(run), "--input", str(data.parent / "imagesTs"), "--output", str(preds)]) == 0
    labels = np.unique(to_array(sitk.ReadImage(str(next(preds.iterdir())))))
    assert set(labels.tolist()) <= set(range(6))


def test_demo_end_to_end_prints_mean_dice_last(tmp_path: Path) -> None:
    """A shortened `medseg demo`: same path as `make demo`, last line `mean Dice: 0.xxx`; a rerun
    replaces the earlier demo, a foreign folder is refused."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [*_medseg(), "demo", "--out", str(out), "--minutes", "0.4", "--cases", "6"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("mean Dice: 0.") or last == "mean Dice: 1.000"
    assert (out / "evaluation" / "metrics.csv").exists() and (out / "run" / "models" / "model.pt").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    refused = subprocess.run([*_medseg(), "demo", "--out", str(foreign)], capture_output=True, text=True, env=env,
                             timeout=120)
    assert refused.returncode == 2 and "medseg: error:" in refused.stderr
    assert (foreign / "thesis.tex").read_text() == "precious"
