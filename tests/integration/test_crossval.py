"""``medseg train --fold all``: five folds of one plan, every training case predicted once by the fold that held
it out, ``cv_summary.json`` equal to ``medseg evaluate`` of those predictions, and a stopped run continued."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.data.synthetic import write_dataset
from medseg.io.image import read_geometry
from medseg.metrics import score_folders
from medseg.plan import load_plan

pytestmark = pytest.mark.slow

#: bounded by iterations, never by minutes: a loaded machine makes it slower, not different
SHORT = ["--plan", "default", "--epochs", "1", "--max-iterations", "3", "--iterations-per-epoch", "3"]


def _train(data: Path, run: Path, folds: str, *extra: str) -> int:
    return main(["--quiet", "train", "--data", str(data / "dataset.json"), "--out", str(run), "--fold", folds,
                 *SHORT, *extra])


def _held_out(run: Path, fold: int) -> list[str]:
    return json.loads((run / f"fold_{fold}" / "split.json").read_text())["validation"]


def test_five_folds_predict_every_case_once_and_the_summary_is_evaluate_s(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset(data, modality="ct", cases=8, seed=3, size=32)
    training = sorted(p.name.removesuffix(".nii.gz") for p in (data / "labelsTr").iterdir())
    run = tmp_path / "run"
    assert _train(data, run, "all") == 0

    held = {fold: _held_out(run, fold) for fold in range(5)}
    assert sorted(c for cases in held.values() for c in cases) == training  # disjoint, and every case once
    plan = load_plan(run / "fold_0")
    for fold in range(1, 5):  # one plan for every fold
        assert load_plan(run / f"fold_{fold}").to_json() == plan.to_json()
        assert (run / f"fold_{fold}" / "models" / "model.pt").is_file()
    predictions = run / "cv" / "predictions"
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == [f"{c}_seg.nii.gz" for c in training]
    for case in training:  # each in its case's own grid
        assert read_geometry(predictions / f"{case}_seg.nii.gz").mismatch(
            read_geometry(data / "labelsTr" / f"{case}.nii.gz")) is None
    for fold, cases in held.items():
        record = json.loads((run / "cv" / f"fold_{fold}.json").read_text())
        assert [c["case"] for c in record["cases"]] == cases

    summary = json.loads((run / "cv_summary.json").read_text())
    assert sorted(summary["folds"]) == ["0", "1", "2", "3", "4"]
    assert summary["overall"]["cases"] == len(training)
    assert [summary["folds"][str(f)]["cases"] for f in range(5)] == [len(held[f]) for f in range(5)]
    evaluation = score_folders(predictions, data / "labelsTr", labels=plan.labels)
    for name, values in evaluation.dice_by_label().items():
        assert summary["overall"]["dice"][name] == pytest.approx(sum(values) / len(values), abs=1e-4), name


def test_a_stopped_run_continues_with_resume_and_redoes_only_what_is_unfinished(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset(data, modality="ct", cases=8, seed=4, size=32)
    run = tmp_path / "run"
    assert _train(data, run, "0,1") == 0
    assert sorted(p.name for p in run.iterdir()) == ["cv", "cv_summary.json", "fold_0", "fold_1"]
    assert json.loads((run / "cv_summary.json").read_text())["overall"]["cases"] == len(_held_out(run, 0)) + len(
        _held_out(run, 1))
    fold_0 = {p.name: p.stat().st_mtime_ns for p in (run / "cv" / "predictions").glob("*.nii.gz")
              if p.name.removesuffix("_seg.nii.gz") in _held_out(run, 0)}
    # fold 1 stopped before its first checkpoint: only its configs were written, its record not yet
    (run / "cv" / "fold_1.json").unlink()
    for part in ("models", "checkpoints", "train_summary.json", "split.json"):
        target = run / "fold_1" / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    assert _train(data, run, "all") == 2  # a non-empty folder needs --resume
    assert _train(data, run, "all", "--resume") == 0
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["overall"]["cases"] == 6 and sorted(summary["folds"]) == ["0", "1", "2", "3", "4"]
    assert {name: (run / "cv" / "predictions" / name).stat().st_mtime_ns for name in fold_0} == fold_0  # not redone
    assert (run / "fold_1" / "train_summary.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--fold", "7"], "--fold must be between 0 and 4"),
    (["--fold", "0,7"], "--fold: folds are 0-4"),
    (["--fold", "all"], "3 training case(s) make 3 folds (0-2); fold 4 does not exist"),
    (["--fold", "1,x"], "--fold takes a fold 0-4"),
    (["--fold", "all", "--resume"], "no fold_K folder of a cross-validation run here to resume"),
])
def test_fold_lists_are_checked_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          args: list[str], message: str) -> None:
    data = tmp_path / "data"
    write_dataset(data, modality="ct", cases=4, seed=5, size=32)
    run = tmp_path / "run"
    run.mkdir()
    code = main(["--quiet", "train", "--data", str(data / "dataset.json"), "--out", str(run), *SHORT, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(run.iterdir()) == []
