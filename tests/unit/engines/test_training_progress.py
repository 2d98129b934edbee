"""Training progress, time budget and run-folder rollback, on Ignite engines driven by a fake clock.

Every duration here is simulated: an iteration advances the clock by a fixed amount, so what the
tests assert (where training stops, what the log says) depends on iteration counts, not on the
machine's speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from ignite.engine import Engine, Events

from medseg.engines.budget import FINISH_SECONDS, VALIDATION_MARGIN, FinalValidation, IterationLimit, TimeBudget
from medseg.engines.progress import Pace, ProgressLog, Schedule, duration
from medseg.engines.records import completed_epochs
from medseg.engines.rundir import RunFolderGuard


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Evaluator(Engine):
    """An evaluator over one validation case, run like MONAI's (``run(global_epoch)``)."""

    def run(self, global_epoch: int = 1) -> object:  # type: ignore[override]
        return super().run([0], max_epochs=1)


def simulate(*, epochs: int = 100, epoch_length: int = 10, val_interval: int = 2, iteration_s: float = 1.0,
             validation_s: float = 6.0, save_s: float = 0.5, budget_s: float | None = None, started: float = 0.0,
             probe_s: float | None = None, max_iterations: int | None = None, log_every: int = 5,
             slow_after: int | None = None):
    """A trainer and an evaluator wired like medseg's (validation and checkpoint at epoch ends, then
    the timers, the budget last, a final validation on COMPLETED); returns what happened."""
    clock = FakeClock()
    clock.now = 0.0

    def step(engine: Engine, _batch: object) -> float:
        slow = slow_after is not None and engine.state.iteration > slow_after
        clock.advance(iteration_s * (3 if slow else 1))
        return 0.5

    trainer = Engine(step)
    evaluator = Evaluator(lambda engine, batch: clock.advance(
        validation_s * (3 if slow_after is not None and trainer.state.iteration > slow_after else 1)))
    validated_at: list[int] = []
    evaluator.add_event_handler(Events.STARTED, lambda _: validated_at.append(trainer.state.iteration))
    # like MONAI's ValidationHandler and RunCheckpoints.save_last (attached when the trainer is built)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=val_interval), lambda _: evaluator.run(trainer.state.epoch))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: clock.advance(save_s))
    schedule = Schedule(epoch_length, epochs, val_interval, max_iterations)
    pace = Pace(started, clock)
    pace.attach(trainer, evaluator)
    pace.validation_estimate = probe_s
    ProgressLog(pace, schedule, log_every, budget_s).attach(trainer, lambda engine: float(engine.state.output))
    limit = IterationLimit(max_iterations) if max_iterations else None
    if limit:
        limit.attach(trainer)
    pace.attach_last(trainer, evaluator)
    budget = TimeBudget(budget_s, pace, schedule) if budget_s else None
    if budget:
        budget.attach(trainer)
    FinalValidation(evaluator, pace).attach(trainer)
    trainer.run(range(epoch_length), max_epochs=epochs)
    return trainer, budget, limit, validated_at, clock.now


def test_budget_includes_the_final_validation() -> None:
    """1 s iterations, 6 s validations, 0.5 s checkpoints, 10 iterations per epoch, validation every
    2 epochs, a 100 s budget: training stops at the last iteration after which one more iteration
    and the final validation (with its margin) would no longer fit, and the run, final validation
    included, ends within the budget."""
    trainer, budget, _, validated_at, end = simulate(budget_s=100.0, probe_s=6.0)
    assert budget is not None and budget.stopped
    # epochs 1-6 (60 iterations, 3 validations, 6 saves) take 60 + 18 + 3 = 81 s; after iteration 69 it
    # is 90 s, and iteration 70 (1 s) with its epoch end (0.5 s save) + the reserve for the final
    # validation (1.25 * 6 s + 0.5 s + 2 s = 10 s) would end at 101.5 s: it stops after iteration 69.
    assert trainer.state.iteration == 69
    assert completed_epochs(trainer.state.iteration, 10) == 6
    assert validated_at == [20, 40, 60, 69]  # the final validation saw the last weights
    assert end <= 100.0 - FINISH_SECONDS
    assert end == 96.0  # 90 s + the final validation: it did not stop much earlier either
    assert 90.0 + 1.0 + 0.5 + VALIDATION_MARGIN * 6.0 + 0.5 + FINISH_SECONDS > 100.0


def test_budget_counts_data_loading_before_training_and_stops_mid_epoch() -> None:
    """The budget starts with the run (data loading), not with the first iteration: 30 s already
    spent leaves 70 s, and the stop falls in the middle of epoch 5."""
    trainer, budget, _, validated_at, end = simulate(budget_s=100.0, probe_s=6.0, started=-30.0)
    assert budget is not None and budget.stopped
    # after iteration 46: 30 + 46 + 2 * 6 + 4 * 0.5 = 90 s; one more (1 s) + 10 s reserve > 100 s
    assert trainer.state.iteration == 46
    assert completed_epochs(trainer.state.iteration, 10) == 4  # epoch 5 was cut short: not completed
    assert validated_at == [20, 40, 46]
    assert end + 30.0 <= 100.0


def test_budget_follows_a_slower_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """After iteration 30 everything becomes 3x slower (another process takes the CPU), long after
    the one-case probe and before any validation was timed: the validation estimate is scaled by
    the recent iterations' slow-down, and the run still ends within the budget. Without that
    scaling the same run overruns."""
    args = {"budget_s": 150.0, "probe_s": 6.0, "slow_after": 30, "val_interval": 10}
    trainer, budget, _, validated_at, end = simulate(**args)
    assert budget is not None and budget.stopped and validated_at == [trainer.state.iteration]
    assert end <= 150.0

    monkeypatch.setattr(Pace, "recent_iteration", lambda self, count=5: None)  # no load scaling
    _, _, _, _, unscaled_end = simulate(**args)
    assert unscaled_end > 150.0


def test_iteration_limit_stops_mid_epoch_and_validates_the_last_weights() -> None:
    trainer, _, limit, validated_at, _ = simulate(max_iterations=34)
    assert limit is not None and limit.stopped
    assert trainer.state.iteration == 34 and trainer.state.epoch == 4  # epoch 4 started ...
    assert completed_epochs(trainer.state.iteration, 10) == 3  # ... but only 3 were completed
    assert validated_at == [20, 34]


def test_iteration_limit_at_an_epoch_end_keeps_the_epoch_end() -> None:
    trainer, _, _, validated_at, _ = simulate(max_iterations=40)
    assert trainer.state.iteration == 40 and validated_at == [20, 40]  # no second validation of the same weights


def test_progress_log_every_n_iterations_with_eta(caplog: pytest.LogCaptureFixture) -> None:
    """A line every 5 iterations and at each epoch end, with counts, loss, elapsed time and ETAs."""
    with caplog.at_level(logging.INFO, logger="medseg.engines.training"):
        simulate(epochs=2, epoch_length=20, val_interval=2, budget_s=600.0, probe_s=6.0, log_every=5)
    lines = [r.getMessage() for r in caplog.records if r.name == "medseg.engines.training"]
    progress = [line for line in lines if line.startswith("epoch ")]
    assert len(progress) == 8  # iterations 5, 10, 15, (20: epoch line), 25, 30, 35, (40: epoch line)
    # after 5 of 40 iterations (5 s): 35 iterations + 1 epoch end (0.5 s) + 1 validation (6 s) left
    assert progress[0] == ("epoch 1/2 iteration 5/40 (12%): loss 0.5000 | elapsed 5s | "
                           "ETA 41s by iterations, 9m55s by the 10.0 min budget")
    assert progress[3].startswith("epoch 1/2 done, iteration 20/40 (50%): loss 0.5000 |")
    assert progress[-1].startswith("epoch 2/2 done, iteration 40/40 (100%)") and "ETA 0s by iterations" in progress[-1]


def test_progress_log_says_when_validation_is_not_timed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="medseg.engines.training"):
        simulate(epochs=1, epoch_length=10, val_interval=1, log_every=5)
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1 iteration 5/10"))
    assert "ETA 5s by iterations (validation not timed yet)" in first and "budget" not in first


def test_schedule_counts_what_is_left() -> None:
    schedule = Schedule(epoch_length=20, max_epochs=10, val_interval=5, max_iterations=150)
    assert schedule.target_iteration == 150
    # from 0: 150 iterations, epoch ends at 20..140 (7), validation after epoch 5 and the final one at 150
    assert schedule.remaining(0) == (150, 7, 2)
    assert schedule.remaining(150) == (0, 0, 0)
    assert Schedule(20, 10, 5).remaining(180) == (20, 1, 1)  # epoch 10 validates: no extra final one


def test_duration_format() -> None:
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600, 7380)] == ["0s", "59s", "1m01s", "59m59s", "1h00m", "2h03m"]
    assert duration(float("nan")) == "?"


def test_guard_removes_a_new_run_folder_and_its_new_parents(tmp_path: Path) -> None:
    run = tmp_path / "new" / "deeper" / "run"
    guard = RunFolderGuard(run)
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "plan.json").write_text("{}")
    guard.rollback()
    assert not (tmp_path / "new").exists() and tmp_path.exists()


def test_guard_keeps_an_existing_folder_and_its_files(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "configs" / "metadata.json").write_text("mine")
    guard = RunFolderGuard(bundle)
    (bundle / "split.json").write_text("{}")
    (bundle / "logs").mkdir()
    (bundle / "logs" / "events").write_text("x")
    (bundle / "models" / "model.pt").write_text("w")
    (bundle / "configs" / "metadata.json").write_text("replaced")  # replaced files stay (written atomically)
    guard.rollback()
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")) == [
        "configs", "configs/metadata.json", "models"]
