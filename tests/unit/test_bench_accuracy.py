"""scripts/bench_accuracy.py and scripts/nnunet_peer.py without nnU-Net: the raw-layout conversion, the JSON
records, the plan comparison, bad input, and the budget trainer run against a stand-in for nnU-Net's base class."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest

from medseg.data.datalist import load_datalist
from medseg.data.synthetic import write_dataset
from tests.tools import load_script

bench = load_script("bench_accuracy")
peer = load_script("nnunet_peer")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 CT phantoms (32 voxels in-plane): 5 training, 1 labelled test case."""
    return write_dataset(tmp_path_factory.mktemp("data") / "ct", modality="ct", cases=6, seed=1, size=32)


def test_conversion_writes_nnunet_raw_layout(tiny_dataset: Path, tmp_path: Path) -> None:
    datalist = load_datalist(tiny_dataset)
    raw = peer.convert_dataset(datalist, tmp_path)

    assert raw.folder == tmp_path / "nnUNet_raw" / "Dataset901_MedsegSyntheticCt"
    names = [case.name for case in datalist.training]
    assert sorted(p.name for p in (raw.folder / "imagesTr").iterdir()) == sorted(f"{n}_0000.nii.gz" for n in names)
    assert sorted(p.name for p in (raw.folder / "labelsTr").iterdir()) == sorted(f"{n}.nii.gz" for n in names)
    test_names = [case.name for case in datalist.test]
    assert raw.test == test_names
    assert sorted(p.name for p in raw.images_ts.iterdir()) == [f"{n}_0000.nii.gz" for n in test_names]
    # medseg predicts the test images under their own names; both are scored against the same label maps
    assert sorted(p.name for p in raw.test_images.iterdir()) == [f"{n}.nii.gz" for n in test_names]
    assert sorted(p.name for p in raw.test_labels.iterdir()) == [f"{n}.nii.gz" for n in test_names]
    first = datalist.training[0]
    assert (raw.folder / "imagesTr" / f"{first.name}_0000.nii.gz").read_bytes() == first.image.read_bytes()

    description = json.loads((raw.folder / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "CT"}
    assert description["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "bone": 4, "lesion": 5}
    assert description["numTraining"] == len(names)
    assert description["file_ending"] == ".nii.gz"


def test_dataset_without_labelled_test_cases_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    datalist = load_datalist(tiny_dataset)
    for case in datalist.test:
        case.label = None
    with pytest.raises(ValueError, match="no test cases with reference label maps"):
        peer.convert_dataset(datalist, tmp_path)


def test_bad_input_is_one_message_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = bench.main(["--data", str(tmp_path / "missing" / "dataset.json"), "--compare-plans",
                       "--json", str(out / "bench.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bench_accuracy: error: ") and "no such file" in err and "Traceback" not in err
    assert list(out.iterdir()) == []  # the temporary work folder is gone, no JSON written


def test_nothing_to_do_is_a_usage_error(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--data", str(tiny_dataset), "--json", str(tmp_path / "b.json")])
    assert exc.value.code == 2


def test_systems_and_jobs_are_checked(tiny_dataset: Path, tmp_path: Path) -> None:
    args = bench.parse_args(["--data", str(tiny_dataset), "--json", str(tmp_path / "b.json"), "--minutes", "1",
                             "--systems", "default,planned,default", "--jobs", "2"])
    assert args.systems == ("default", "planned") and args.jobs == 2
    for bad in (["--systems", "planned,monai"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--data", str(tiny_dataset), "--json", str(tmp_path / "b.json"), "--minutes", "1", *bad])
    assert bench.core_sets(1, 1) == [None]  # one job: not pinned
    with pytest.raises(bench.BenchError, match="needs 20000 cores"):
        bench.core_sets(2, 10_000)


def _evaluation() -> dict:
    entry = {"dice": {"mean": 0.91}, "hd95_mm": {"mean": 3.5}}
    missed = {"dice": {"mean": 0.0}, "hd95_mm": {"mean": float("nan")}}  # label never predicted
    return {"cases": 3, "mean_dice_foreground": 0.455,
            "labels": {"1": {"name": "liver", **entry}, "2": {"name": "lesion", **missed}}}


def test_training_record_shape() -> None:
    run = {"iterations": 400, "seconds": 100.0, "preprocess_seconds": 4.04, "predict_seconds": 5.26,
           "stopped_by": "time budget"}
    record = bench.training_record("medseg", "ct", 5.0, 1, run, _evaluation())

    for key in ("system", "dataset", "minutes", "iterations", "seconds_per_iteration", "mean_dice", "dice", "hd95",
                "preprocess_seconds", "predict_seconds"):
        assert key in record
    assert record["system"] == "medseg" and record["dataset"] == "ct" and record["kind"] == "training"
    assert record["iterations"] == 400 and record["seconds_per_iteration"] == 0.25
    assert record["dice"] == {"liver": 0.91, "lesion": 0.0}
    assert record["hd95"] == {"liver": 3.5, "lesion": None}
    assert (record["preprocess_seconds"], record["predict_seconds"]) == (4.0, 5.3)
    assert record["stopped_by"] == "time budget"
    json.dumps(record, allow_nan=False)  # valid JSON: NaN became null
    lines = bench.table([record, bench.training_record("nnunet", "ct", 5.0, 1, dict(run, iterations=0), _evaluation())])
    assert "medseg" in lines and "nnunet" in lines and "liver" in lines


def test_plan_records_in_voxel_order_and_ratios() -> None:
    nnunet_plans = {
        "transpose_backward": [1, 0, 2],
        "configurations": {"3d_fullres": {
            "spacing": [0.8, 2.5, 0.8], "patch_size": [96, 48, 96], "batch_size": 2,
            "architecture": {"arch_kwargs": {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320]}}}},
    }
    nnunet = peer.plan_record(nnunet_plans)
    # array order (z, y, x) = (2.5, 0.8, 0.8) -> voxel order (x, y, z)
    assert nnunet["spacing"] == [0.8, 0.8, 2.5] and nnunet["patch_size"] == [96, 96, 48]
    assert (nnunet["configuration"], nnunet["batch_size"], nnunet["n_stages"]) == ("3d_fullres", 2, 5)

    medseg_plan = {"dims": 3, "target_spacing": [0.8, 0.8, 2.5], "patch_size": [128, 128, 48],
                   "network": {"name": "dynunet", "kernel_sizes": [[3, 3, 1]] * 5, "level_strides": [[1, 1, 1]] * 5}}
    medseg = bench.medseg_plan_record(medseg_plan)
    assert medseg["n_stages"] == 5 and medseg["batch_size"] == bench.MEDSEG_DEFAULT_BATCH
    assert medseg["precision"] == "float32"
    assert bench.medseg_plan_record({"target_spacing": [1, 1, 1], "patch_size": [64, 64, 32],
                                     "network": {"name": "unet", "channels": [16, 32, 64, 128]},
                                     "batch_size": 4, "configuration": "3d_fullres"})["n_stages"] == 4

    ratios = bench.plan_ratios({**medseg, "plan_and_preprocess_seconds": 10.0},
                               {**nnunet, "plan_and_preprocess_seconds": 40.0})
    assert ratios["spacing"] == [1.0, 1.0, 1.0]
    assert math.isclose(ratios["patch_volume"], 128 * 128 * 48 / (96 * 96 * 48), rel_tol=1e-3)
    assert ratios["plan_and_preprocess_seconds"] == 0.25


def test_medseg_plan_command() -> None:
    args = bench.medseg_plan_args(Path("d.json"), Path("b"), "cuda", memory_gb=8)
    assert args == ["plan", "--data", "d.json", "--out", "b", "--device", "cuda", "--memory-gb", "8"]
    assert bench.medseg_plan_args(Path("d.json"), Path("b"), "cpu", budget_minutes=30)[-2:] == ["--time-budget", "0.5"]
    assert bench.medseg_plan_args(Path("d.json"), Path("b"), "cpu", planner=False)[:2] == ["bundle", "init"]


# -- the trainer subclass, against a stand-in for nnU-Net's nnUNetTrainer -------------------------------------
class _StandInTrainer:
    """The parts of nnUNetTrainer the budget trainer relies on: the epoch loop calling train_step and
    validation_step, on_train_end saving checkpoint_final.pth."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: object = None) -> None:
        self.output_folder = plans["output_folder"]
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch, self.num_epochs = 250, 50, 1000
        self.current_epoch = 0
        self.saved: list[str] = []

    def print_to_log_file(self, *args: object, **kwargs: object) -> None:
        pass

    def on_train_epoch_start(self) -> None:
        pass

    def on_validation_epoch_start(self) -> None:
        pass

    def train_step(self, batch: dict) -> dict:
        return {}

    def validation_step(self, batch: dict) -> dict:
        return {}

    def on_train_end(self) -> None:
        self.saved.append("checkpoint_final.pth")

    def run_training(self) -> None:
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_train_epoch_start()
            for _ in range(self.num_iterations_per_epoch):
                self.train_step({})
            self.on_validation_epoch_start()
            for _ in range(self.num_val_iterations_per_epoch):
                self.validation_step({})
            self.current_epoch += 1
        self.on_train_end()


@pytest.fixture
def budget_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The written trainer module, imported with nnunetv2's base class replaced by the stand-in."""
    base = types.ModuleType("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
    base.nnUNetTrainer = _StandInTrainer  # type: ignore[attr-defined]
    for name in ("nnunetv2", "nnunetv2.training", "nnunetv2.training.nnUNetTrainer"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, base.__name__, base)
    path = peer.trainer_module_path(tmp_path / "nnunetv2")
    path.parent.mkdir(parents=True)
    path.write_text(peer.TRAINER_SOURCE)
    spec = importlib.util.spec_from_file_location("bench_budget_trainer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("MEDSEG_BENCH_EPOCH_ITERATIONS", "25")
    return module


def _trainer(module: types.ModuleType, folder: Path) -> object:
    return getattr(module, peer.TRAINER)({"output_folder": str(folder)}, "3d_fullres", 0, {})


def test_trainer_keeps_the_stock_schedule_in_small_epochs(budget_trainer: types.ModuleType, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_BENCH_MINUTES", "60")
    trainer = _trainer(budget_trainer, tmp_path)
    assert (trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (25, 5)
    assert trainer.num_epochs * trainer.num_iterations_per_epoch == 1000 * 250

    trainer.num_epochs = 2  # a run that ends by its epochs, well within the budget
    trainer.run_training()
    summary = json.loads((tmp_path / peer.TRAINER_SUMMARY).read_text())
    assert summary["iterations"] == 50 and summary["validation_iterations"] == 10
    assert summary["stopped_by"] == "epochs" and trainer.saved == ["checkpoint_final.pth"]


def test_trainer_stops_at_the_budget_with_a_final_checkpoint(budget_trainer: types.ModuleType, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(10**6))  # every reading of the clock is one second later
    monkeypatch.setattr(budget_trainer, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    monkeypatch.setenv("MEDSEG_BENCH_MINUTES", "1")
    trainer = _trainer(budget_trainer, tmp_path)
    trainer.run_training()

    summary = json.loads((tmp_path / peer.TRAINER_SUMMARY).read_text())
    assert summary["stopped_by"] == "time budget"
    assert 25 < summary["iterations"] < 60  # past the first epoch, stopped before the budget's end
    assert summary["budget_seconds"] == 60
    assert trainer.saved == ["checkpoint_final.pth"]  # what nnUNetv2_predict loads


def test_launcher_compiles() -> None:
    compile(peer.LAUNCHER, "<launcher>", "exec")


def test_folds_and_ensemble_are_checked(tiny_dataset: Path, tmp_path: Path) -> None:
    common = ["--data", str(tiny_dataset), "--json", str(tmp_path / "b.json")]
    args = bench.parse_args([*common, "--minutes", "1", "--folds", "5", "--ensemble"])
    assert args.folds == 5 and args.ensemble
    assert bench.parse_args([*common, "--minutes", "1"]).folds == 1
    for bad in (["--minutes", "1", "--ensemble"], ["--minutes", "1", "--folds", "6"], ["--folds", "5", "--compare-plans"]):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args([*common, *bad])
        assert exc.value.code == 2


def test_crossval_records_are_tabled_with_their_out_of_fold_and_test_figures() -> None:
    run = {"iterations": 2000, "seconds": 600.0, "preprocess_seconds": 0.0, "predict_seconds": 9.0, "folds": 5,
           "oof_mean_dice": 0.9512, "fold0_mean_dice": 0.9311, "ensemble": "5 folds + postprocessing",
           "postprocessing": "largest component of label 1"}
    record = bench.training_record("medseg", "ct", 2.0, 1, run, _evaluation())
    assert record["folds"] == 5 and record["mean_dice"] == 0.455 and record["oof_mean_dice"] == 0.9512
    single = bench.training_record("nnunet", "ct", 2.0, 1, dict(run, ensemble=None, postprocessing=None), _evaluation())
    lines = bench.table([record, single]).splitlines()
    header = next(i for i, line in enumerate(lines) if "OOF Dice" in line)
    medseg_row, nnunet_row = lines[header + 1].split(), lines[header + 2].split()
    assert medseg_row[:5] == ["medseg", "5", "0.951", "0.931", "0.455"]
    assert nnunet_row[:5] == ["nnunet", "5", "0.951", "0.931", "-"]  # no ensemble predicted


def test_trainer_validates_its_fold_only_when_asked(budget_trainer: types.ModuleType, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(_StandInTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: calls.append(save_probabilities), raising=False)
    trainer = _trainer(budget_trainer, tmp_path)
    trainer.perform_actual_validation()
    assert calls == []  # the benchmark's single fold: skipped
    monkeypatch.setenv("MEDSEG_BENCH_VALIDATE", "1")
    trainer.perform_actual_validation()
    assert calls == [False]  # cross-validation: nnU-Net's own validation of the held-out cases
