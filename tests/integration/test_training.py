"""Training runs: run-folder contents, resume after a crash, 2D data, evaluation and the demo."""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.bundle.create import local_paths
from medseg.bundle.training import TrainOptions, train
from medseg.bundle.verify import verify_bundle
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
            "--patch-size", "32,32,16"]  # a patch chosen by hand: the default plan
    process = subprocess.Popen([*_medseg(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 1800  # a hang guard only: a slow machine waits longer, it does not fail
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
                             capture_output=True, text=True, env=env, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from epoch {epoch}" in resumed.stderr
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["epochs_completed"] == epoch + 2
    assert summary["iterations"] == (epoch + 2) * summary["epoch_length"]
    assert summary["iterations_this_run"] == 2 * summary["epoch_length"]
    meta = json.loads((run / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.2.0" and meta["changelog"]["0.2.0"].split(": ", 1)[1].startswith("continued (--resume)")
    assert torch.load(last, weights_only=True)["trainer"]["epoch"] == epoch + 2
    assert (run / "models" / "model.pt").exists()


def test_2d_dataset_trains_2d_unet_and_predicts_2d(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bounded by epochs (100 iterations), never by minutes: a loaded machine takes longer, the model is the same."""
    data = write_dataset(tmp_path / "data2d", modality="ct", cases=8, seed=5, size=96, dims=2)
    run = tmp_path / "run2d"
    assert main(["train", "--plan", "default",
                 "--data", str(data), "--out", str(run), "--epochs", "5", "--val-interval", "5"]) == 0
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
    assert mean > 0.5  # a random label map scores < 0.1 here


def test_mr_dataset_trains_with_mr_preset(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "mr", modality="mr", cases=6, seed=2, size=64)
    run = tmp_path / "run_mr"
    assert main(["train", "--plan", "default", "--data", str(data), "--out", str(run), "--epochs", "2", "--val-interval", "1",
                 "--patch-size", "32,32,16"]) == 0
    plan = json.loads((run / "configs" / "plan.json").read_text())
    assert plan["modality"] == "MR" and plan["intensity"]["preset"] == "mr"
    preds = tmp_path / "preds"
    assert main(["predict", "--model", str(run), "--input", str(data.parent / "imagesTs"), "--output", str(preds)]) == 0
    labels = np.unique(to_array(sitk.ReadImage(str(next(preds.glob("*_seg.nii.gz"))))))
    assert set(labels.tolist()) <= set(range(6))


def test_demo_plans_for_its_time_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``medseg demo`` by default: the planner plans for the --minutes budget (the lean U-Net with a
    pointwise head, AdamW for a short budget); bounded here by 4 iterations. ``--plan auto`` without a
    budget is refused before anything is written."""
    from medseg.demo import run_demo
    from medseg.plan import Plan

    result = run_demo(tmp_path / "demo", minutes=2, cases=6, max_iterations=4)
    plan = Plan.load(tmp_path / "demo" / "run" / "configs" / "plan.json")
    assert plan.planned and plan.network.name == "unet_head" and plan.planning["optimizer"]["name"] == "AdamW"
    assert plan.planning["time_budget_hours"] == pytest.approx(2 / 60)
    assert 0 < result["train"]["iterations"] <= 4 and 0.0 <= result["mean_dice"] <= 1.0
    assert main(["demo", "--out", str(tmp_path / "none"), "--plan", "auto", "--minutes", "0"]) == 2
    assert "--plan auto plans for the time budget" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_demo_end_to_end_prints_mean_dice_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shortened `medseg demo`: same path as `make demo`, bounded by 3 epochs (no time budget), last
    line `mean Dice: 0.xxx`; a foreign folder is refused and left as it was."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--cases", "6", "--epochs", "3", "--minutes", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("mean Dice: ")
    assert float(last.split(": ")[1]) > 0.2  # 3 epochs of 20 iterations; a random label map scores < 0.1
    assert (out / "evaluation" / "metrics.csv").exists() and (out / "run" / "models" / "model.pt").exists()
    summary = json.loads((out / "run" / "train_summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["stopped_by"] == "epochs"

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert main(["demo", "--out", str(foreign)]) == 2
    assert "medseg: error:" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    assert (foreign / "thesis.tex").read_text() == "precious"


# ------------------------------------------------------------------------------ bad input writes nothing


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would run os.system
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 small CT phantoms (64 voxels in-plane): quick to validate."""
    return write_dataset(tmp_path_factory.mktemp("data") / "small", modality="ct", cases=6, seed=4, size=64)


def _bad_weights(kind: str, folder: Path, marker: Path) -> Path:
    weights = folder / "evil.pt"
    if kind == "pickle payload":
        with open(weights, "wb") as f:
            pickle.dump({"network": _Payload(marker)}, f)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(weights))
    elif kind == "truncated":
        torch.save({"weight": torch.zeros(64, 64)}, weights)
        weights.write_bytes(weights.read_bytes()[:300])
    elif kind == "not a checkpoint":
        weights.write_text("hello\n")
    return weights  # "missing": never written


@pytest.mark.parametrize("kind", ["pickle payload", "torchscript", "truncated", "not a checkpoint", "missing"])
def test_bad_init_weights_exit_2_with_one_line_and_write_nothing(kind: str, tmp_path: Path, small_ct: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PWNED"
    weights = _bad_weights(kind, tmp_path, marker)
    run = tmp_path / "RUN"
    code = main(["train", "--plan", "default",
                 "--data", str(small_ct), "--out", str(run), "--epochs", "1", "--init-weights", str(weights)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"medseg: error: {weights}: "), err
    assert not run.exists()
    assert not marker.exists(), "the pickled payload ran"


def test_bad_init_weights_leave_existing_folders_as_they_were(tmp_path: Path, small_ct: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Weights of another architecture are found out only once the plan is known (after the data
    was read): still nothing is written, neither in a bundle trained in place nor in an empty --out."""
    bundle = tmp_path / "bundle"
    assert main(["--quiet", "bundle", "init", "--data", str(small_ct), "--out", str(bundle), "--patch-size", "32,32,16"]) == 0
    before = {p.relative_to(bundle): p.read_bytes() if p.is_file() else None for p in bundle.rglob("*")}
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Conv2d(1, 1, 3).state_dict(), other)
    capsys.readouterr()
    code = main(["--quiet", "train", "--bundle", str(bundle), "--data", str(small_ct), "--epochs", "1",
                 "--init-weights", str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no tensor matches this network" in err[0]
    assert {p.relative_to(bundle): p.read_bytes() if p.is_file() else None for p in bundle.rglob("*")} == before

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--quiet", "train", "--plan", "default", "--data", str(small_ct), "--out", str(empty), "--epochs", "1",
                 "--init-weights", str(_bad_weights("pickle payload", tmp_path, tmp_path / "PWNED"))]) == 2
    assert empty.is_dir() and not any(empty.iterdir())
    assert not (tmp_path / "PWNED").exists()


def test_resume_from_a_pickled_checkpoint_exits_2_and_changes_nothing(tmp_path: Path, small_ct: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.data.datalist import load_datalist, split_cases

    run, marker = tmp_path / "run", tmp_path / "PWNED"
    assert main(["--quiet", "bundle", "init", "--data", str(small_ct), "--out", str(run), "--patch-size", "32,32,16"]) == 0
    training, validation = split_cases(load_datalist(small_ct).training, 0)
    (run / "split.json").write_text(json.dumps({"fold": 0, "training": [c.name for c in training],
                                                "validation": [c.name for c in validation]}))
    (run / "checkpoints").mkdir()
    with open(run / "checkpoints" / "last.pt", "wb") as f:
        pickle.dump({"network": _Payload(marker)}, f)
    before = {p.relative_to(run): p.read_bytes() if p.is_file() else None for p in run.rglob("*")}
    capsys.readouterr()
    code = main(["--quiet", "train", "--data", str(small_ct), "--out", str(run), "--resume", "--epochs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "last.pt: cannot resume from this checkpoint" in err[0], err
    assert not marker.exists()
    assert {p.relative_to(run): p.read_bytes() if p.is_file() else None for p in run.rglob("*")} == before


def test_a_failure_before_the_first_checkpoint_removes_what_the_run_wrote(
        tmp_path: Path, small_ct: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The run folder (configs, split.json) is written, then the trainer fails: the folder goes."""
    from monai.engines import SupervisedTrainer

    def broken(*args: object, **kwargs: object) -> None:
        assert (tmp_path / "RUN" / "configs" / "plan.json").exists() and (tmp_path / "RUN" / "split.json").exists()
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(SupervisedTrainer, "run", broken)
    dataset = sorted(p.relative_to(small_ct.parent) for p in small_ct.parent.rglob("*"))
    assert main(["--quiet", "train", "--plan", "default",
                 "--data", str(small_ct), "--out", str(tmp_path / "RUN"), "--epochs", "1"]) == 1
    assert "simulated failure" in capsys.readouterr().err
    assert not (tmp_path / "RUN").exists()
    assert sorted(p.relative_to(small_ct.parent) for p in small_ct.parent.rglob("*")) == dataset


@pytest.mark.parametrize("options, problem", [
    ({"epochs": 0}, "--epochs must be an integer of at least 1"),
    ({"val_interval": 0}, "--val-interval must be an integer of at least 1"),
    ({"max_minutes": -1.0}, "--max-minutes must be a positive number"),
    ({"max_minutes": float("nan")}, "--max-minutes must be a positive number"),
    ({"max_iterations": 0}, "--max-iterations must be an integer of at least 1"),
    ({"log_every": 0}, "--log-every must be an integer of at least 1"),
    ({"fold": 7}, "--fold must be between 0 and 4"),
    ({"batch_size": 0}, "--batch-size must be an integer of at least 1"),
    ({"learning_rate": 0.0}, "learning_rate must be a positive number"),
    ({"device": "tpu"}, "--device must be cpu or cuda"),
    ({"resume": True, "init_weights": "w.pt"}, "--init-weights starts a new run"),
])
def test_bad_options_are_refused_before_anything_is_read_or_written(options: dict, problem: str, tmp_path: Path,
                                                                     small_ct: Path) -> None:
    from medseg.errors import InputError

    run = tmp_path / "RUN"
    with pytest.raises(InputError, match=re.escape(problem)):
        train(small_ct, run, TrainOptions(**options))
    assert not run.exists()


def test_a_bad_option_is_one_error_line(tmp_path: Path, small_ct: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--plan", "default",
                 "--data", str(small_ct), "--out", str(tmp_path / "RUN"), "--max-minutes", "nan"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["medseg: error: --max-minutes must be a positive number, got nan"]
    assert not (tmp_path / "RUN").exists()


# ------------------------------------------------------------------------------ what a run records


def test_a_run_stopped_mid_epoch_counts_whole_epochs_logs_progress_and_records_the_bundle(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """30 iterations at 20 per epoch: 1 epoch completed (not 2), 30 iterations; a progress line every
    10 iterations; metadata (version, changelog, eval_metrics, data_source) and docs/README.md say
    what was trained, and `bundle verify` accepts the result."""
    data = write_dataset(tmp_path / "d2", modality="ct", cases=6, seed=1, size=64, dims=2)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="medseg"):
        summary = train(data, run, TrainOptions(epochs=5, max_iterations=30, val_interval=1, log_every=10))
    assert summary["iterations"] == 30 and summary["epoch_length"] == 20
    assert summary["epochs_completed"] == 1
    assert summary["stopped_by"] == "max_iterations" and not summary["stopped_by_time_budget"]
    assert json.loads((run / "train_summary.json").read_text())["epochs_completed"] == 1

    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in progress] == [
        "epoch 1/5 iteration 10/30 (33%)", "epoch 1/5 done, iteration 20/30 (66%)", "epoch 2/5 iteration 30/30 (100%)"]
    assert all("| elapsed " in line and "| ETA " in line and " loss " in line for line in progress)
    validations = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation at")]
    assert [v.split(":")[0] for v in validations] == ["validation at epoch 1 (iteration 20)",
                                                      "validation at epoch 2 (iteration 30)"]

    meta = json.loads((run / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.2.0" and list(meta["changelog"]) == ["0.2.0", "0.1.0"]
    entry = meta["changelog"]["0.2.0"]
    assert entry.startswith(f"{datetime.date.today().isoformat()}: trained 1 epoch (30 iterations of 20 per epoch, "
                            f"the last epoch partly)")
    names = ["liver", "spleen", "kidney", "bone", "lesion"]
    assert list(meta["eval_metrics"]) == ["val_mean_dice", *(f"val_dice_{n}" for n in names)]
    assert meta["eval_metrics"]["val_mean_dice"] == round(summary["best_val_mean_dice"], 4)
    assert meta["data_source"].startswith("MSD dataset") and not local_paths(meta["data_source"])
    assert str(tmp_path) not in (run / "configs" / "metadata.json").read_text()
    readme = (run / "docs" / "README.md").read_text()
    assert "Not trained yet" not in readme and readme.count("## Metrics") == 1
    assert "| 1 | liver |" in readme and f"**{summary['best_val_mean_dice']:.3f}**" in readme
    verify_bundle(run)
