"""MLflow tracking of a training run (medseg.engines.tracking) through MONAI's MLFlowHandler, into a
local folder's SQLite store: the run, its parameters from the plan, per-epoch loss, learning rate and
validation Dice, the final validation included; the locations --mlflow takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events

from medseg.engines.tracking import MLflowTracking, check_tracking, tracking_location
from medseg.errors import InputError
from medseg.plan import Intensity, Plan

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'medseg[mlflow]') is in the test extra")


def _plan() -> Plan:
    return Plan(3, "CT", {0: "background", 1: "liver"}, (1.0, 1.0, 2.0), (32, 32, 16),
                Intensity("ct", -100.0, 300.0, 50.0, 60.0), configuration="3d_fullres")


def _engines() -> tuple[Engine, Engine]:
    weight = torch.nn.Parameter(torch.zeros(1))
    losses = iter([3.0, 1.0, 2.0, 0.0] * 3)
    trainer = Engine(lambda engine, batch: [{"loss": next(losses)}])
    trainer.optimizer = torch.optim.SGD([weight], lr=0.01)  # type: ignore[attr-defined]
    dice = iter([0.5, 0.7, 0.8])
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.COMPLETED)
    def score(engine: Engine) -> None:
        engine.state.metrics = {"val_mean_dice": next(dice)}

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine: Engine) -> None:
        evaluator.run([0])

    return trainer, evaluator


def test_a_run_is_tracked_in_a_local_folder(tmp_path: Path) -> None:
    trainer, evaluator = _engines()
    folder = tmp_path / "mlruns"
    tracking = MLflowTracking(str(folder), _plan(), evaluator, bundle_root=tmp_path / "RUN")
    tracking.attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    evaluator.run([0])  # the final validation, after the trainer completed
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("medseg")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "RUN" and run.info.status == "FINISHED"
    assert run.data.params["configuration"] == "3d_fullres" and run.data.params["patch_size"] == "[32, 32, 16]"

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert history("train_loss") == [(1, 2.0), (2, 1.0)]  # epoch means
    assert sorted(history("val_mean_dice")) == [(1, 0.5), (2, 0.7), (2, 0.8)]
    assert [step for step, _ in history("learning_rate")] == [1, 2]


def test_without_a_uri_nothing_is_attached(tmp_path: Path) -> None:
    trainer, evaluator = _engines()
    MLflowTracking(None, _plan(), evaluator).attach(trainer)
    trainer.run([0], max_epochs=1)
    assert not list(tmp_path.iterdir())


def test_locations_mlflow_takes(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking_location("file:///data/ml%20runs") == "/data/ml runs"
    assert tracking_location("runs/ml") == str(tmp_path / "runs" / "ml")
    assert tracking_location("https://mlflow.example.org:5000") == "https://mlflow.example.org:5000"
    for refused in ("sqlite:///x.db", "s3://bucket/runs"):
        with pytest.raises(InputError, match="--mlflow takes a tracking server"):
            check_tracking(refused)
    with pytest.raises(InputError, match="--mlflow takes a tracking server"):
        tracking_location("file:///data", file_uri=False)  # in a config a folder must be a path (safe mode)
    check_tracking(str(tmp_path / "runs"))
