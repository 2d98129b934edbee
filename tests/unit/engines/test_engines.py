"""medseg's training handlers and factories, each on tiny Ignite engines: the checkpoint/history recorder,
the deferred TensorBoard writer, the run budget, the progress logger, the ``run`` step (summary, rollback),
the LR schedule and the small config factories; and ``configs/train.json`` itself against MONAI's
train-workflow properties and safe mode."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events

from medseg.bundle.create import train_config
from medseg.bundle.safety import check_bundle, scan_bundle
from medseg.engines.budget import RunBudget
from medseg.engines.data import Split, case_items, drop_last, epoch_length
from medseg.engines.options import TrainOptions, check_options
from medseg.engines.parts import plan_value, poly_lr_schedule
from medseg.engines.progress import Pace, ProgressLogger
from medseg.engines.records import METRIC, RunRecorder
from medseg.engines.tensorboard import TensorBoardLog
from medseg.engines.training import SUMMARY_FILE, run_training
from medseg.engines.weights import ResumePoint, resume_point
from medseg.errors import InputError
from medseg.plan import Plan

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "bundles" / "ct_abdomen_phantom"


@pytest.fixture(scope="module")
def plan() -> Plan:
    return Plan.load(SHIPPED / "configs" / "plan.json")


class Evaluator(Engine):
    """Scores ``scores`` one after the other as the key metric, like MONAI's evaluator (``run(global_epoch)``)."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__(lambda engine, batch: None)
        self.scores = list(scores)
        self.state.key_metric_name = METRIC
        self.runs: list[int] = []

        @self.on(Events.COMPLETED)
        def score(engine: Engine) -> None:
            engine.state.metrics = {METRIC: self.scores.pop(0) if self.scores else float("nan")}

    def run(self, global_epoch: int = 1) -> Any:  # type: ignore[override]
        self.runs.append(global_epoch)
        return super().run([0], max_epochs=1)


class Trainer(Engine):
    """A trainer shaped like MONAI's: output ``[{"loss": ...}]``, ``network``, ``run()`` without arguments."""

    def __init__(self, network: torch.nn.Module, epoch_length: int = 4, max_epochs: int = 3,
                 fail_at: int | None = None) -> None:
        def step(engine: Engine, _batch: Any) -> list[dict[str, torch.Tensor]]:
            if fail_at is not None and engine.state.iteration >= fail_at:
                raise RuntimeError("simulated failure")
            return [{"loss": torch.tensor(1.0 / engine.state.iteration)}]

        super().__init__(step)
        self.network = network
        self.state.epoch_length, self.state.max_epochs = epoch_length, max_epochs

    def run(self) -> Any:  # type: ignore[override]
        return super().run(range(self.state.epoch_length), max_epochs=self.state.max_epochs)


def _parts(plan: Plan) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    return network, optimizer, poly_lr_schedule(optimizer, epochs=3)


def _validate_every_epoch(trainer: Engine, evaluator: Evaluator) -> None:
    """Like MONAI's ValidationHandler (attached when the trainer is built, before medseg's handlers)."""
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run(engine.state.epoch))


# ------------------------------------------------------------------------------ RunRecorder


def test_recorder_saves_last_every_epoch_and_the_model_only_on_a_better_validation(tmp_path: Path, plan: Plan) -> None:
    network, optimizer, scheduler = _parts(plan)
    evaluator = Evaluator([0.5, 0.3, 0.7])
    trainer = Trainer(network)
    _validate_every_epoch(trainer, evaluator)
    recorder = RunRecorder(tmp_path, network, optimizer, scheduler, evaluator, plan)
    assert list(tmp_path.iterdir()) == []  # nothing written when made or attached
    recorder.attach(trainer)
    saved_models: list[float] = []
    evaluator.add_event_handler(Events.COMPLETED, lambda _: saved_models.append(
        (tmp_path / "models" / "model.pt").stat().st_mtime_ns))
    trainer.run()

    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["trainer"] == {"epoch": 3, "iteration": 12, "epoch_length": 4, "max_epochs": 3}
    assert set(last) == {"network", "optimizer", "lr_scheduler", "trainer", "best"}
    assert last["best"]["metric"] == pytest.approx(0.7) and last["best"]["epoch"] == 3
    assert saved_models[0] == saved_models[1] < saved_models[2]  # 0.3 after 0.5 kept the model of epoch 1
    best = trainer.state.best_validation
    assert (best.metric, best.epoch, best.iteration) == (pytest.approx(0.7), 3, 12)
    assert trainer.state.checkpoint_saved
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in network.state_dict().items())
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3] and history["val_mean_dice"] == pytest.approx([0.5, 0.3, 0.7])
    assert (tmp_path / "curves.png").is_file()


def test_recorder_resumes_the_counters_and_keeps_the_best_of_the_earlier_run(tmp_path: Path, plan: Plan) -> None:
    network, optimizer, scheduler = _parts(plan)
    (tmp_path / "history.json").write_text(json.dumps({"epoch": [1], "loss": [0.9], "val_epoch": [1],
                                                       "val_mean_dice": [0.8]}))
    point = ResumePoint(epoch=1, iteration=4, epoch_length=4, best_metric=0.8, best_epoch=1, best_iteration=4)
    evaluator = Evaluator([0.6, 0.9])
    trainer = Trainer(network, max_epochs=3)
    _validate_every_epoch(trainer, evaluator)
    RunRecorder(tmp_path, network, optimizer, scheduler, evaluator, plan, resume=point).attach(trainer)
    assert (trainer.state.epoch, trainer.state.iteration) == (1, 4)
    trainer.run()
    assert trainer.state.iteration == 12 and evaluator.runs == [2, 3]
    best = trainer.state.best_validation
    assert (best.metric, best.epoch) == (pytest.approx(0.9), 3)  # 0.6 < 0.8 of the earlier run: not a new best
    assert json.loads((tmp_path / "history.json").read_text())["epoch"] == [1, 2, 3]


# ------------------------------------------------------------------------------ TensorBoardLog, budget, progress


def test_tensorboard_log_opens_its_file_only_when_the_engine_starts(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    handler = TensorBoardLog(logs, tag_name="train_loss", output_transform=lambda output: output[0]["loss"])
    engine = Engine(lambda engine, batch: [{"loss": torch.tensor(0.5)}])
    handler.attach(engine)
    assert not logs.exists()  # MONAI's handler alone would have written its event file by now
    engine.run(range(3), max_epochs=2)
    assert len(list(logs.glob("events.out.tfevents.*"))) == 1
    engine.run(range(3), max_epochs=3)  # a second start (an evaluator's next validation): the same writer
    handler.close()
    assert len(list(logs.glob("events.out.tfevents.*"))) == 1


def test_run_budget_stops_at_max_iterations_and_says_so(tmp_path: Path, plan: Plan) -> None:
    trainer = Trainer(torch.nn.Linear(2, 2), epoch_length=4, max_epochs=5)
    evaluator = Evaluator([])
    RunBudget(Pace(), evaluator, val_interval=1, max_iterations=6).attach(trainer)
    trainer.run()
    assert trainer.state.iteration == 6 and trainer.state.stopped_by == "max_iterations"

    full = Trainer(torch.nn.Linear(2, 2), epoch_length=2, max_epochs=2)
    RunBudget(Pace(), Evaluator([]), val_interval=1).attach(full)
    full.run()
    assert full.state.iteration == 4 and full.state.stopped_by == "epochs"
    with pytest.raises(ValueError, match="max_minutes"):
        RunBudget(Pace(), evaluator, max_minutes=0)


def test_progress_logger_logs_iterations_epochs_and_validations(plan: Plan, caplog: pytest.LogCaptureFixture) -> None:
    network, optimizer, _ = _parts(plan)
    evaluator = Evaluator([0.25])
    trainer = Trainer(network, epoch_length=4, max_epochs=1)
    _validate_every_epoch(trainer, evaluator)
    ProgressLogger(Pace(), evaluator, plan, every=2, val_interval=1, optimizer=optimizer).attach(trainer)
    with caplog.at_level(logging.INFO, logger="medseg.engines.training"):
        trainer.run()
    lines = [r.getMessage() for r in caplog.records if r.name == "medseg.engines.training"]
    assert lines[0].startswith("epoch 1/1 iteration 2/4 (50%): loss ")
    assert lines[1].startswith("validation at epoch 1 (iteration 4): mean Dice 0.2500")
    assert lines[2].startswith("epoch 1/1 done, iteration 4/4 (100%): loss ") and " lr 1.00e-03 " in lines[2]


# ------------------------------------------------------------------------------ run_training


def _split() -> Split:
    return Split(0, [], [])


def test_run_training_writes_split_and_summary_and_validates_the_final_weights(tmp_path: Path, plan: Plan) -> None:
    network, optimizer, scheduler = _parts(plan)
    evaluator = Evaluator([0.4, 0.6])
    trainer = Trainer(network, epoch_length=4, max_epochs=2)
    budget = RunBudget(Pace(), evaluator, val_interval=2, max_iterations=6)
    RunRecorder(tmp_path, network, optimizer, scheduler, evaluator, plan).attach(trainer)
    budget.attach(trainer)
    summary = run_training(trainer, evaluator, _split(), tmp_path, pace=budget.pace,
                           options=TrainOptions(max_iterations=6))
    assert evaluator.runs == [2]  # stopped at 6 (mid-epoch 2): the final weights validated once
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == summary
    assert (summary["iterations"], summary["epochs_completed"], summary["stopped_by"]) == (6, 1, "max_iterations")
    assert summary["best_val_mean_dice"] == pytest.approx(0.4) and summary["best_iteration"] == 6
    assert summary["options"]["max_iterations"] == 6 and "network" not in summary["options"]
    assert json.loads((tmp_path / "split.json").read_text()) == {"fold": 0, "training": [], "validation": []}


def test_run_training_keeps_the_last_weights_when_no_validation_gave_a_dice(tmp_path: Path, plan: Plan) -> None:
    network = torch.nn.Linear(2, 2)
    trainer = Trainer(network, epoch_length=2, max_epochs=1)
    summary = run_training(trainer, Evaluator([]), _split(), tmp_path)
    assert summary["best_val_mean_dice"] is None
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in network.state_dict().items())


def test_run_training_failing_before_its_first_checkpoint_removes_what_it_wrote(tmp_path: Path, plan: Plan) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "plan.json").write_text("{}")
    network, optimizer, scheduler = _parts(plan)
    evaluator = Evaluator([])
    trainer = Trainer(network, epoch_length=4, fail_at=2)
    RunRecorder(bundle, network, optimizer, scheduler, evaluator, plan).attach(trainer)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_training(trainer, evaluator, _split(), bundle)
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")) == ["configs", "configs/plan.json"]

    late = Trainer(network, epoch_length=2, fail_at=3)  # fails in epoch 2, after the checkpoint of epoch 1
    RunRecorder(bundle, network, optimizer, scheduler, evaluator, plan).attach(late)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_training(late, evaluator, _split(), bundle)
    assert (bundle / "checkpoints" / "last.pt").is_file() and (bundle / "split.json").is_file()


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume_without_training(tmp_path: Path,
                                                                                      plan: Plan) -> None:
    network, optimizer, scheduler = _parts(plan)
    first = Trainer(network, epoch_length=2, max_epochs=2)
    RunRecorder(tmp_path, network, optimizer, scheduler, Evaluator([0.5, 0.6]), plan).attach(first)
    first.run()  # the checkpoint of epoch 2 written; "killed" before run_training's summary
    checkpoint = (tmp_path / "checkpoints" / "last.pt").read_bytes()

    network, optimizer, scheduler = _parts(plan)
    point = resume_point(tmp_path, network, optimizer, scheduler, resume=True, epochs=2)
    assert point is not None and (point.epoch, point.iteration) == (2, 4)
    evaluator = Evaluator([0.55])
    trainer = Trainer(network, epoch_length=2, max_epochs=2)
    RunRecorder(tmp_path, network, optimizer, scheduler, evaluator, plan, resume=point).attach(trainer)
    summary = run_training(trainer, evaluator, Split(0, [], [], resumed=True), tmp_path)
    assert (summary["iterations"], summary["iterations_this_run"], summary["stopped_by"]) == (4, 0, "epochs")
    assert evaluator.runs == [2]  # the final weights validated, nothing trained
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == checkpoint

    with pytest.raises(InputError, match="already trained 2 epochs; pass a larger --epochs"):  # finished now
        resume_point(tmp_path, *_parts(plan), resume=True, epochs=2)
    with pytest.raises(InputError, match="already trained 4 iterations; pass a larger --max-iterations"):
        resume_point(tmp_path, *_parts(plan), resume=True, epochs=5, max_iterations=4)

    # continued to 3 epochs and stopped in epoch 3: the summary of epoch 2 is gone, so the next --resume continues
    network, optimizer, scheduler = _parts(plan)
    point = resume_point(tmp_path, network, optimizer, scheduler, resume=True, epochs=3)
    failing = Trainer(network, epoch_length=2, max_epochs=3, fail_at=5)
    RunRecorder(tmp_path, network, optimizer, scheduler, Evaluator([]), plan, resume=point).attach(failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_training(failing, Evaluator([]), Split(0, [], [], resumed=True), tmp_path)
    assert not (tmp_path / SUMMARY_FILE).exists()
    assert resume_point(tmp_path, *_parts(plan), resume=True, epochs=3) is not None


# ------------------------------------------------------------------------------ factories


def test_poly_schedule_decays_per_epoch_and_follows_a_new_epoch_count_on_resume() -> None:
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1.0)
    scheduler = poly_lr_schedule(optimizer, epochs=4)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [(1 - min(e, 3) / 4) ** 0.9 for e in range(6)]
    assert seen == pytest.approx(expected) and seen[-1] > 0  # never 0, unlike torch's PolynomialLR

    resumed_optimizer = torch.optim.AdamW(network.parameters(), lr=1.0)
    resumed = poly_lr_schedule(resumed_optimizer, epochs=10)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx((1 - 7 / 10) ** 0.9)
    with pytest.raises(ValueError):
        poly_lr_schedule(optimizer, epochs=0)


def test_small_factories(plan: Plan) -> None:
    assert plan_value(plan, "patch_size") == list(plan.patch_size)
    assert plan_value(plan, "num_classes") == plan.num_classes
    with pytest.raises(ValueError, match="field must be one of"):
        plan_value(plan, "save")  # type: ignore[arg-type]
    assert drop_last(range(3), 2) and not drop_last(range(2), 2)
    assert epoch_length(range(5), minimum=20) == 20 and epoch_length(range(25), minimum=20) == 25
    assert epoch_length(range(5), 20, ResumePoint(1, 30, 30, 0.5, 1)) == 30  # a resumed run keeps its epoch length
    with pytest.raises(ValueError, match="part must be"):
        case_items(_split(), "test")  # type: ignore[arg-type]


@pytest.mark.parametrize("options, problem", [
    ({"seed": -1}, "--seed must be an integer of at least 0"),
    ({"resume": "yes"}, "--resume must be true or false"),
    ({"learning_rate": True}, "learning_rate must be a positive number"),
    ({"min_iterations_per_epoch": 0}, "min_iterations_per_epoch must be an integer of at least 1"),
])
def test_check_options_refuses_values_a_config_override_could_bring(options: dict, problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        check_options(TrainOptions(**options))


# ------------------------------------------------------------------------------ configs/train.json


def test_train_config_has_the_ids_and_references_of_monai_train_workflows() -> None:
    """The issue's named parts are ids of the config; MONAI's required train-workflow properties are
    there, and where the config refers to an optional one (``train#trainer#train_handlers``, the
    ``ValidationHandler``'s validator, ...) it refers to it by the id MONAI expects, compared as
    MONAI's ``ConfigWorkflow.check_properties`` compares it."""
    from monai.bundle import ConfigParser
    from monai.bundle.properties import TrainProperties
    from monai.utils import BundleProperty, BundlePropertyConfig

    config = train_config()
    assert "$" not in json.dumps(config)
    parser = ConfigParser(config)
    for part in ("network_def", "loss", "optimizer", "lr_scheduler", "train#preprocessing", "train#dataset",
                 "train#dataloader", "train#inferer", "train#handlers", "train#trainer", "validate#preprocessing",
                 "validate#evaluator", "validate#handlers", "initialize", "run", "finalize"):
        assert part in parser, part
    for name, prop in TrainProperties.items():
        pid, ref_id = prop[BundlePropertyConfig.ID], prop.get(BundlePropertyConfig.REF_ID)
        if prop.get(BundleProperty.REQUIRED, False):
            assert pid in parser, name
            continue
        if ref_id is None:
            continue
        if name in ("evaluator", "val_interval"):
            refs = [h.get(ref_id) for h in config["train"]["handlers"] if h["_target_"] == "ValidationHandler"]
        else:
            refs = [parser.get(ref_id, None)]
        assert refs and all(ref is None or ref == "@" + pid for ref in refs), (name, refs)
        if any(ref is not None for ref in refs):
            assert pid in parser, name


def test_safe_mode_accepts_medseg_train_config_with_overrides(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED / "fold_0" / "configs", bundle / "configs")  # a fold of the shipped ensemble: its train.json
    assert scan_bundle(bundle) == []
    weights = tmp_path / "w.pt"
    check_bundle(bundle, {"dataset_dir": str(tmp_path / "data"), "optimizer#lr": 0.001, "epochs": 2,
                          "init_weights": str(weights), "bundle_root": str(bundle)}, config="configs/train.json")
