"""Progress of a training run, through standard ``logging`` (so it shows in a log file, not only on a terminal).

:class:`Pace` times the parts of a run on one clock (iterations with their data loading, epoch ends
with their checkpoint saves, validations with their handlers); :class:`ProgressLog` logs every N
iterations and at each epoch end the epoch and iteration counts, the loss, the elapsed time and an
ETA by iterations (and by the time budget when one is set); :func:`log_validation` logs each
validation's Dice per label and duration; :class:`ProgressLogger` attaches them to MONAI's
trainer and evaluator (the handler ``configs/train.json`` names). :mod:`medseg.engines.budget`
decides on the same measurements when to stop.

Why not MONAI's ``StatsHandler``: it logs the loss of single iterations without the counts, ETA or
time budget a user of a long run needs; ``train#handlers`` may add it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from ignite.engine import Engine, Events

from medseg.engines.records import per_label_dice
from medseg.plan import Plan

log = logging.getLogger("medseg.engines.training")

Clock = Callable[[], float]


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m`` (``?`` for an unknown duration)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


@dataclass(frozen=True)
class Schedule:
    """How long the run is meant to go: the trainer stops at ``target_iteration`` (the epochs, or
    ``--max-iterations`` if smaller) unless a time budget stops it first."""

    epoch_length: int
    max_epochs: int
    val_interval: int
    max_iterations: int | None = None

    @property
    def target_iteration(self) -> int:
        total = self.max_epochs * self.epoch_length
        return total if self.max_iterations is None else min(total, self.max_iterations)

    def validates_after(self, iteration: int) -> bool:
        """Whether the epoch end reached at ``iteration`` (a multiple of the epoch length) runs a validation."""
        return iteration % self.epoch_length == 0 and (iteration // self.epoch_length) % self.val_interval == 0

    def remaining(self, iteration: int) -> tuple[int, int, int]:
        """Iterations, epoch ends and validations (the final one included) left after ``iteration``."""
        target = self.target_iteration
        left = max(0, target - iteration)
        ends = list(range((iteration // self.epoch_length + 1) * self.epoch_length, target + 1, self.epoch_length))
        validations = sum(self.validates_after(i) for i in ends)
        if left and not self.validates_after(target):
            validations += 1  # the final validation after the last iteration
        return left, len(ends), validations


class Pace:
    """Durations measured on the trainer and its evaluator with ``clock`` (seconds).

    ``iteration_s``: recent iterations, data loading and per-iteration handlers included, epoch ends
    excluded; ``epoch_end_s``: recent epoch ends without their validation (checkpoint saves, LR
    step); ``validation_s``: every validation, evaluator handlers included. ``validation_estimate``
    stands in for a validation until one has been timed (a probe on one case, see
    :func:`medseg.engines.budget.probe_validation`).

    The machine's load changes while a run goes on (other processes share the CPU), so
    :meth:`validation` scales the last measured validation by how much slower the recent
    iterations are than the iterations around that measurement.
    """

    def __init__(self, started: float | None = None, clock: Clock = time.monotonic, window: int = 20) -> None:
        self.clock = clock
        self.started = clock() if started is None else started
        self.iteration_s: deque[float] = deque(maxlen=window)
        self.epoch_end_s: deque[float] = deque(maxlen=window)
        self.validation_s: list[float] = []
        self.validation_estimate: float | None = None
        self.validated_at: int | None = None  # trainer iteration of the last validation
        self._first_iterations: list[float] = []  # the run's first iterations: the probe's load reference
        self._validation_reference: float | None = None  # recent iteration time when the last validation ran
        self._mark: float | None = None
        self._validation_started: float | None = None
        self._validation_in_epoch_end = 0.0
        self._attached: set[tuple[str, int]] = set()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def _once(self, phase: str, engine: Engine) -> bool:
        """True the first time ``phase`` is attached to ``engine`` (several handlers share one Pace)."""
        key = (phase, id(engine))
        if key in self._attached:
            return False
        self._attached.add(key)
        return True

    def attach(self, trainer: Engine, evaluator: Engine) -> None:
        """Attach the timers that must run first (attach :meth:`attach_last` after every other handler);
        a second call for the same engines does nothing."""
        if not self._once("first", trainer):
            return
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        evaluator.add_event_handler(Events.STARTED, lambda _: self._evaluation_started(trainer))

    def attach_last(self, trainer: Engine, evaluator: Engine) -> None:
        """Attach the timers that close an epoch end and a validation, after their other handlers
        (once: a second call for the same engines does nothing)."""
        if not self._once("last", trainer):
            return
        evaluator.add_event_handler(Events.COMPLETED, self._evaluation_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, _: Engine) -> None:
        self._mark = self.clock()
        self._validation_in_epoch_end = 0.0

    def _iteration_completed(self, _: Engine) -> None:
        now = self.clock()
        if self._mark is not None:
            self.iteration_s.append(now - self._mark)
            if len(self._first_iterations) < 6:
                self._first_iterations.append(now - self._mark)
        self._mark = now

    def _epoch_completed(self, _: Engine) -> None:
        if self._mark is not None:
            self.epoch_end_s.append(max(0.0, self.clock() - self._mark - self._validation_in_epoch_end))

    def _evaluation_started(self, trainer: Engine) -> None:
        self._validation_started = self.clock()
        self.validated_at = trainer.state.iteration
        self._validation_reference = self.recent_iteration()

    def _evaluation_completed(self, _: Engine) -> None:
        if self._validation_started is not None:
            took = self.clock() - self._validation_started
            self.validation_s.append(took)
            self._validation_in_epoch_end += took
            self._validation_started = None

    # ------------------------------------------------------------------ estimates

    def iteration_mean(self) -> float | None:
        return sum(self.iteration_s) / len(self.iteration_s) if self.iteration_s else None

    def iteration_max(self) -> float | None:
        return max(self.iteration_s) if self.iteration_s else None

    def epoch_end_max(self) -> float:
        return max(self.epoch_end_s) if self.epoch_end_s else 0.0

    def recent_iteration(self, count: int = 5) -> float | None:
        """Mean of the last ``count`` iterations (follows the machine's load)."""
        recent = list(self.iteration_s)[-count:]
        return sum(recent) / len(recent) if recent else None

    def validation(self) -> float | None:
        """One validation now: the last one timed (else the probe's estimate), scaled up by how much
        slower the recent iterations are than those around that measurement; ``None`` if unknown."""
        if self.validation_s:
            seconds, reference = self.validation_s[-1], self._validation_reference
        elif self.validation_estimate is not None:
            seconds = self.validation_estimate
            warm = self._first_iterations[1:] or self._first_iterations  # the very first one warms up
            reference = sum(warm) / len(warm) if warm else None
        else:
            return None
        now = self.recent_iteration()
        if reference is None or now is None or reference <= 0:
            return seconds
        return seconds * max(1.0, now / reference)

    def eta(self, iteration: int, schedule: Schedule) -> float | None:
        """Seconds until the run reaches its target iteration, final validation included (``None``
        before the first iteration has been timed)."""
        per_iteration = self.iteration_mean()
        if per_iteration is None:
            return None
        left, ends, validations = schedule.remaining(iteration)
        epoch_end = sum(self.epoch_end_s) / len(self.epoch_end_s) if self.epoch_end_s else 0.0
        return left * per_iteration + ends * epoch_end + validations * (self.validation() or 0.0)


class ProgressLog:
    """Log a progress line every ``every`` iterations and at each epoch end.

    A line holds the epoch and iteration counts, the mean loss since the previous line, the elapsed
    time (from the start of the run, data loading included), the ETA by iterations and, with a time
    budget, the time left in the budget::

        epoch 3/40 iteration 50/800 (6%): loss 0.5123 | elapsed 1m02s | ETA 9m10s by iterations, 6m58s by the 8.0 min budget
        epoch 3/40 done, iteration 60/800 (7%): loss 0.4821 lr 1.95e-03 | elapsed 1m12s | ETA 9m00s by iterations, ...
    """

    def __init__(self, pace: Pace, schedule: Schedule, every: int, budget_s: float | None = None,
                 learning_rate: Callable[[], float] | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.pace, self.schedule, self.every, self.budget_s = pace, schedule, every, budget_s
        self.learning_rate = learning_rate
        self._losses: list[float] = []
        self._epoch_losses: list[float] = []

    def attach(self, trainer: Engine, loss: Callable[[Engine], float]) -> None:
        def collect(engine: Engine) -> None:
            value = loss(engine)
            self._losses.append(value)
            self._epoch_losses.append(value)

        trainer.add_event_handler(Events.ITERATION_COMPLETED, collect)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.log_iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.log_epoch)

    def _eta(self, iteration: int) -> str:
        eta = self.pace.eta(iteration, self.schedule)
        text = f"ETA {duration(eta)} by iterations" + ("" if self.pace.validation() is not None
                                                       else " (validation not timed yet)")
        if self.budget_s is not None:
            text += f", {duration(self.budget_s - self.pace.elapsed())} by the {self.budget_s / 60:.1f} min budget"
        return text

    def _counts(self, engine: Engine, done: bool = False) -> str:
        target = self.schedule.target_iteration
        return (f"epoch {engine.state.epoch}/{self.schedule.max_epochs}{' done,' if done else ''} iteration "
                f"{engine.state.iteration}/{target} ({100 * engine.state.iteration // max(1, target)}%):")

    def log_iteration(self, engine: Engine) -> None:
        if engine.state.iteration % self.schedule.epoch_length == 0:
            return  # the epoch line follows
        loss = sum(self._losses) / len(self._losses) if self._losses else math.nan
        self._losses.clear()
        log.info("%s loss %.4f | elapsed %s | %s", self._counts(engine), loss, duration(self.pace.elapsed()),
                 self._eta(engine.state.iteration))

    def log_epoch(self, engine: Engine) -> None:
        loss = sum(self._epoch_losses) / len(self._epoch_losses) if self._epoch_losses else math.nan
        self._epoch_losses.clear()
        self._losses.clear()
        lr = f" lr {self.learning_rate():.2e}" if self.learning_rate is not None else ""
        log.info("%s loss %.4f%s | elapsed %s | %s", self._counts(engine, done=True), loss, lr,
                 duration(self.pace.elapsed()), self._eta(engine.state.iteration))


def log_validation(trainer: Engine, mean: float, per_label: dict[str, float | None], seconds: float | None) -> None:
    """One line per validation: where in training, mean Dice, Dice per label, duration."""
    labels = ", ".join(f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in per_label.items())
    log.info("validation at epoch %d (iteration %d): mean Dice %.4f%s%s", trainer.state.epoch, trainer.state.iteration,
             mean, f" ({labels})" if labels else "", "" if seconds is None else f" in {duration(seconds)}")


def iteration_loss(engine: Any) -> float:
    """The loss of the iteration just completed (MONAI decollates the output into a list of dicts)."""
    return float(engine.state.output[0]["loss"])


class ProgressLogger:
    """Progress of MONAI's trainer and its evaluator through ``logging`` (an Ignite handler: attach it
    to the trainer): a line every ``every`` iterations and at each epoch end (:class:`ProgressLog`),
    one per validation (:func:`log_validation`), a progress bar on a terminal.

    ``pace`` (shared with :class:`medseg.engines.budget.RunBudget`) times the run; the schedule
    (epochs, iterations per epoch) is read from the trainer when attached, ``val_interval``,
    ``max_iterations`` and ``max_minutes`` are the run's options (for the ETA). Attach it after the
    handlers whose time belongs to an epoch end or a validation (checkpoints, history).

    Raises
    ------
    ValueError
        If ``every`` is below 1.
    """

    def __init__(self, pace: Pace, evaluator: Engine, plan: Plan, every: int = 10, val_interval: int = 1,
                 max_iterations: int | None = None, max_minutes: float | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.pace, self.evaluator, self.labels = pace, evaluator, dict(plan.labels)
        self.every, self.val_interval, self.max_iterations = every, val_interval, max_iterations
        self.budget_s = None if max_minutes is None else max_minutes * 60
        self.optimizer = optimizer

    def _learning_rate(self) -> float:
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[0]["lr"])

    def attach(self, trainer: Engine) -> None:
        schedule = Schedule(trainer.state.epoch_length, trainer.state.max_epochs, self.val_interval,
                            self.max_iterations)
        self.pace.attach(trainer, self.evaluator)
        ProgressLog(self.pace, schedule, self.every, self.budget_s,
                    self._learning_rate if self.optimizer is not None else None).attach(trainer, iteration_loss)
        if sys.stderr.isatty():
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False).attach(trainer, output_transform=iteration_loss)
        self.pace.attach_last(trainer, self.evaluator)
        self.evaluator.add_event_handler(Events.COMPLETED, lambda engine: self._log_validation(trainer, engine))

    def _log_validation(self, trainer: Engine, evaluator: Engine) -> None:
        name = getattr(evaluator.state, "key_metric_name", None) or "val_mean_dice"
        log_validation(trainer, float(evaluator.state.metrics.get(name, float("nan"))),
                       per_label_dice(evaluator, name, self.labels),
                       self.pace.validation_s[-1] if self.pace.validation_s else None)
