"""``medseg train --fold all``: five folds of one plan, every training case predicted once by the fold that held
it out, ``cv_summary.json`` equal to ``medseg evaluate`` of those predictions, and a stopped run continued;
``medseg select``: the best run's folds as an ensemble bundle with the postprocessing that helped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.bundle.selection import ensemble_inference_config
from medseg.bundle.verify import verify_bundle
from medseg.cli import main
from medseg.data.synthetic import write_dataset
from medseg.errors import BundleError
from medseg.inference.postprocess import PostprocessingRules, apply_rules, read_rules
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
    assert _train(data, run, "0,1,2") == 0
    assert sorted(p.name for p in run.iterdir()) == ["cv", "cv_summary.json", "fold_0", "fold_1", "fold_2"]
    assert json.loads((run / "cv_summary.json").read_text())["overall"]["cases"] == sum(
        len(_held_out(run, f)) for f in range(3))
    fold_0 = {p.name: p.stat().st_mtime_ns for p in (run / "cv" / "predictions").glob("*.nii.gz")
              if p.name.removesuffix("_seg.nii.gz") in _held_out(run, 0)}
    # fold 1 stopped before its first checkpoint: only its configs were written, its record not yet
    (run / "cv" / "fold_1.json").unlink()
    for part in ("models", "checkpoints", "train_summary.json", "split.json"):
        target = run / "fold_1" / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    # fold 2 stopped after its last checkpoint (at --max-iterations), before its summary and record
    (run / "cv" / "fold_2.json").unlink()
    (run / "fold_2" / "train_summary.json").unlink()
    checkpoint = (run / "fold_2" / "checkpoints" / "last.pt").read_bytes()

    assert _train(data, run, "all") == 2  # a non-empty folder needs --resume
    assert _train(data, run, "all", "--resume") == 0
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["overall"]["cases"] == 6 and sorted(summary["folds"]) == ["0", "1", "2", "3", "4"]
    assert {name: (run / "cv" / "predictions" / name).stat().st_mtime_ns for name in fold_0} == fold_0  # not redone
    assert (run / "fold_1" / "train_summary.json").is_file()
    finished = json.loads((run / "fold_2" / "train_summary.json").read_text())  # finished, not trained again
    assert (finished["iterations"], finished["iterations_this_run"], finished["resumed"]) == (3, 0, True)
    assert finished["stopped_by"] == json.loads((run / "fold_1" / "train_summary.json").read_text())["stopped_by"]
    assert (run / "fold_2" / "checkpoints" / "last.pt").read_bytes() == checkpoint
    assert json.loads((run / "cv" / "fold_2.json").read_text())["fold"] == 2


def test_folds_train_in_parallel_one_process_per_device_and_resume_so(tmp_path: Path) -> None:
    """``--device cpu,cpu``: two processes take the folds; the run is the same kind of run (one plan, every fold's
    record and held-out predictions, the summary), and continues with --resume in parallel too."""
    data = tmp_path / "data"
    write_dataset(data, modality="ct", cases=8, seed=6, size=32)
    training = sorted(p.name.removesuffix(".nii.gz") for p in (data / "labelsTr").iterdir())
    run = tmp_path / "run"
    assert _train(data, run, "0,1", "--device", "cpu,cpu") == 0
    assert sorted(json.loads((run / "cv_summary.json").read_text())["folds"]) == ["0", "1"]
    assert _train(data, run, "all", "--device", "cpu,cpu", "--resume") == 0

    plan = load_plan(run / "fold_0")
    for fold in range(5):
        assert load_plan(run / f"fold_{fold}").to_json() == plan.to_json()
        record = json.loads((run / "cv" / f"fold_{fold}.json").read_text())
        assert record["device"] == "cpu" and [c["case"] for c in record["cases"]] == _held_out(run, fold)
        assert json.loads((run / f"fold_{fold}" / "train_summary.json").read_text())["iterations"] == 3
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["overall"]["cases"] == len(training)
    assert sorted(p.name for p in (run / "cv" / "predictions").glob("*.nii.gz")) == [f"{c}_seg.nii.gz" for c in training]


@pytest.mark.parametrize("args, message", [
    (["--fold", "7"], "--fold must be between 0 and 4"),
    (["--fold", "0,7"], "--fold: folds are 0-4"),
    (["--fold", "all"], "3 training case(s) make 3 folds (0-2); fold 4 does not exist"),
    (["--fold", "1,x"], "--fold takes a fold 0-4"),
    (["--fold", "all", "--resume"], "no fold_K folder of a cross-validation run here to resume"),
    (["--fold", "0", "--device", "cpu,cpu"], "several devices train the folds of --fold all (or a list) in parallel"),
    (["--fold", "0,1", "--device", "cpu,gpu"], "--device must be cpu or cuda, got 'gpu'"),
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


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_select_makes_the_best_run_an_ensemble_bundle_that_both_doors_run(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    write_dataset(data, modality="ct", cases=8, seed=6, size=32)
    longer, shorter = tmp_path / "longer", tmp_path / "shorter"
    assert _train(data, longer, "all") == 0
    assert main(["--quiet", "train", "--data", str(data / "dataset.json"), "--out", str(shorter), "--fold", "0,1",
                 "--plan", "default", "--epochs", "1", "--max-iterations", "1", "--iterations-per-epoch", "1"]) == 0
    capsys.readouterr()
    assert main(["--quiet", "select", str(shorter), str(longer)]) == 0
    selection = json.loads((longer / "configs" / "selection.json").read_text())
    means = {Path(r["run"]).name: r["oof_mean_dice"] for r in selection["runs"]}
    best = max(means, key=lambda name: means[name])
    assert selection["chosen"]["run"] == str(tmp_path / best)
    chosen = tmp_path / best
    rules = read_rules(chosen / "configs" / "postprocessing.json")
    assert rules.evidence["cases"] == json.loads((chosen / "cv_summary.json").read_text())["overall"]["cases"]
    assert selection["chosen"]["oof_mean_dice_postprocessed"] >= selection["chosen"]["oof_mean_dice"] - 1e-9

    out = tmp_path / "ensemble"
    assert main(["--quiet", "predict", "--model", str(chosen), "--input", str(data / "imagesTs"),
                 "--output", str(out)]) == 0
    door = tmp_path / "door"
    assert main(["--quiet", "bundle", "run", str(chosen), "--set", f"dataset_dir={data}",
                 "--set", f"output_dir={door}"]) == 0
    cases = sorted(p.name for p in out.glob("*.nii.gz"))
    assert cases == sorted(p.name for p in door.glob("*.nii.gz")) and len(cases) == 2
    for name in cases:
        labels = _labels(out / name)
        np.testing.assert_array_equal(labels, _labels(door / name))  # one pipeline, two doors
        assert read_geometry(out / name).mismatch(read_geometry(data / "imagesTs" / name.replace("_seg", ""))) is None
        for value in rules.largest_component_labels:  # the chosen postprocessing ran
            np.testing.assert_array_equal(apply_rules(labels, PostprocessingRules(largest_component_labels=(value,))),
                                          labels)

    # the bundle verifies (every fold's weights load) and its evaluate config scores the ensemble on labelsTs
    lines = verify_bundle(chosen)
    assert any(line.startswith("weights: the fold ensemble's models load") for line in lines)
    evaluation = tmp_path / "evaluation"
    assert main(["--quiet", "bundle", "run", str(chosen), "--config", "evaluate", "--set", f"dataset_dir={data}",
                 "--set", f"output_dir={evaluation}"]) == 0
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["cases"] == 2
    for name in cases:
        np.testing.assert_array_equal(_labels(evaluation / "predictions" / name), _labels(out / name))
    capsys.readouterr()
    assert main(["--quiet", "bundle", "export", str(chosen), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"not one network: export a fold's bundle, e.g. {chosen / 'fold_0'}"), err
    assert not list(chosen.glob("models/model.ts*"))
    weights = next(chosen.glob("fold_*/models/model.pt"))
    weights.rename(weights.with_suffix(".moved"))
    with pytest.raises(BundleError, match=r"model\.pt"):
        verify_bundle(chosen)
    weights.with_suffix(".moved").rename(weights)

    # the ensemble machinery with one member and no rules is exactly that fold's own bundle
    config = ensemble_inference_config([1], postprocessing=False)
    (chosen / "configs" / "inference.json").write_text(json.dumps(config))
    one, fold_1 = tmp_path / "one", tmp_path / "fold_1"
    assert main(["--quiet", "predict", "--model", str(chosen), "--input", str(data / "imagesTs"), "--output", str(one)]) == 0
    assert main(["--quiet", "predict", "--model", str(chosen / "fold_1"), "--input", str(data / "imagesTs"),
                 "--output", str(fold_1)]) == 0
    for name in cases:
        np.testing.assert_array_equal(_labels(one / name), _labels(fold_1 / name))


def test_select_refuses_a_folder_that_is_no_cross_validation_run(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "plain").mkdir()
    assert main(["--quiet", "select", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"medseg: error: {tmp_path / 'plain'}: no finished fold (cv/fold_K.json) here: train it with " \
                          "medseg train --fold all"
    assert main(["--quiet", "select", str(tmp_path / "missing")]) == 2
    assert "no such cross-validation run folder" in capsys.readouterr().err
    assert list((tmp_path / "plain").iterdir()) == []


def test_select_ensembles_two_configurations_and_predict_runs_the_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs of other spacings and patches: their out-of-fold pair ensemble is scored; when it wins (forced
    here by scoring the single runs 0), the chosen run becomes a bundle of both, self-contained, that
    ``medseg predict`` runs as the pair while the MONAI door runs the run's own folds."""
    from medseg.bundle import selection
    from medseg.bundle.ensembles import read_ensemble
    from medseg.bundle.pipeline import inference_pipeline
    from medseg.inference.configurations import ConfigurationEnsemble

    data = tmp_path / "data"
    write_dataset(data, modality="ct", cases=8, seed=7, size=32)
    fine, coarse = tmp_path / "fine", tmp_path / "coarse"
    assert _train(data, fine, "0,1") == 0
    assert _train(data, coarse, "0,1", "--spacing", "3,3,3", "--patch-size", "16,16,16") == 0
    assert load_plan(fine / "fold_0").target_spacing != load_plan(coarse / "fold_0").target_spacing
    real = selection._oof_score
    monkeypatch.setattr(selection, "_oof_score", lambda run: (0.0, real(run)[1]))
    capsys.readouterr()
    assert main(["--quiet", "select", str(fine), str(coarse)]) == 0
    chosen = json.loads((fine / "configs" / "selection.json").read_text())
    [pair] = chosen["pairs"]
    assert pair["runs"] == [str(fine), str(coarse)] and chosen["chosen"]["members"] == pair["runs"]
    predictions = fine / "cv" / "ensembles" / "coarse"
    held = _held_out(fine, 0) + _held_out(fine, 1)
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == sorted(f"{c}_seg.nii.gz" for c in held)
    # the pair's out-of-fold Dice is medseg evaluate's of those predictions (Dice 1 where a label is absent from both)
    references = tmp_path / "references"
    references.mkdir()
    for case in held:
        shutil.copy(data / "labelsTr" / f"{case}.nii.gz", references)
    evaluation = score_folders(predictions, references, labels=load_plan(fine / "fold_0").labels)
    per_label = [float(np.mean(values)) for values in evaluation.dice_by_label().values()]
    assert pair["oof_mean_dice"] == pytest.approx(float(np.mean(per_label)), abs=1e-4)

    members, rules = read_ensemble(fine)
    assert members == [(fine / "members" / "coarse").resolve()]
    assert any("members/coarse: folds 0, 1" in line for line in verify_bundle(fine))
    shutil.rmtree(coarse)  # the bundle is self-contained: the other run's folder is no longer needed
    out, door = tmp_path / "pair", tmp_path / "door"
    assert main(["--quiet", "predict", "--model", str(fine), "--input", str(data / "imagesTs"), "--output", str(out)]) == 0
    ensemble = ConfigurationEnsemble([inference_pipeline(fine).predictor(), inference_pipeline(members[0]).predictor()],
                                     rules)
    assert main(["--quiet", "bundle", "run", str(fine), "--set", f"dataset_dir={data}", "--set", f"output_dir={door}"]) == 0
    for image in sorted((data / "imagesTs").glob("*.nii.gz")):
        name = image.name.replace(".nii.gz", "_seg.nii.gz")
        labels = _labels(out / name)
        np.testing.assert_array_equal(labels, ensemble.infer(ensemble.load(image)))
        assert read_geometry(out / name).mismatch(read_geometry(image)) is None
    # the MONAI door: the run's own folds with their own rules
    own = tmp_path / "own"
    (fine / "configs" / "ensemble.json").rename(tmp_path / "ensemble.json")
    assert main(["--quiet", "predict", "--model", str(fine), "--input", str(data / "imagesTs"), "--output", str(own)]) == 0
    for name in (p.name for p in own.glob("*.nii.gz")):
        np.testing.assert_array_equal(_labels(own / name), _labels(door / name))
    assert any((_labels(own / p.name) != _labels(p)).any() for p in out.glob("*.nii.gz"))  # the pair is not one run

    # an ensemble file pointing outside the bundle is refused before any input is read
    (tmp_path / "ensemble.json").write_text(json.dumps({"format": "medseg-ensemble/1", "members": ["../data"]}))
    (tmp_path / "ensemble.json").rename(fine / "configs" / "ensemble.json")
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["--quiet", "predict", "--model", str(fine), "--input", str(data / "imagesTs"), "--output", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "member '../data' is not a folder inside the bundle" in err and len(err.strip().splitlines()) == 1
    assert not refused.exists()
