"""When a training run stops: epochs, ``--max-iterations``, or a time budget that includes the final validation.

:class:`TimeBudget` checks after every iteration (and after every epoch end) whether one more
iteration -- with the epoch end and scheduled validation it may complete -- *and then* the final
validation still fit in the budget, using the slowest recent durations :class:`~medseg.engines.progress.Pace`
measured (a validation is estimated by :func:`probe_validation` until one has been timed). If not,
it stops the trainer, and :class:`FinalValidation` validates the weights reached. A sudden slow-down
after the last check (another process taking the CPU) can still make a run overrun by a little.
:class:`RunBudget` attaches them to MONAI's trainer (the handler ``configs/train.json`` names).

Why not Ignite's ``Terminate``/``TimeLimit`` or MONAI's ``EarlyStopHandler``: a time limit there
stops when the time is up, without keeping back the final validation, and none stops mid-epoch at a
total iteration count that is kept across ``--resume``.

Training on several processes (:mod:`medseg.engines.distributed`): the time check is taken by every
process together (stop when any process's estimate no longer fits), so all stop after the same
iteration; epochs and ``--max-iterations`` stop them all at the same count anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events

from medseg.engines.distributed import any_rank
from medseg.engines.progress import Clock, Pace, Schedule, duration

log = logging.getLogger("medseg.engines.training")

#: A validation estimate is multiplied by this before it is reserved (validations vary a little).
VALIDATION_MARGIN = 1.25
#: Seconds reserved for writing the final model, history, summary and metadata after the last validation.
FINISH_SECONDS = 2.0


def _epoch_end(engine: Engine) -> bool:
    return engine.state.iteration % engine.state.epoch_length == 0


class TimeBudget:
    """Stop the trainer early enough that the run, final validation included, ends within ``seconds``
    of ``pace.started``.

    Attach it after every other trainer handler, so that its epoch-end check sees the epoch end's
    checkpoint and validation already done.
    """

    def __init__(self, seconds: float, pace: Pace, schedule: Schedule) -> None:
        if seconds <= 0:
            raise ValueError(f"the time budget must be positive, got {seconds}")
        self.seconds, self.pace, self.schedule = seconds, pace, schedule
        self.stopped = False

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._after_iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.check)

    def reserve(self) -> float:
        """Seconds kept back for the final validation and the final writes."""
        validation = self.pace.validation() or 0.0
        return VALIDATION_MARGIN * validation + self.pace.epoch_end_max() + FINISH_SECONDS

    def next_step(self, iteration: int) -> float:
        """Seconds the next iteration may take, with the epoch end (and validation) it may complete."""
        step = self.pace.iteration_max() or 0.0
        if (iteration + 1) % self.schedule.epoch_length == 0:
            step += self.pace.epoch_end_max()
            if self.schedule.validates_after(iteration + 1):
                step += VALIDATION_MARGIN * (self.pace.validation() or 0.0)
        return step

    def _after_iteration(self, engine: Engine) -> None:
        if not _epoch_end(engine):  # at an epoch end, check once the epoch-end handlers have run
            self.check(engine)

    def check(self, engine: Engine) -> None:
        if self.stopped or engine.state.iteration >= self.schedule.target_iteration:
            return
        elapsed = self.pace.elapsed()
        # every training process decides together (any_rank): all stop after the same iteration
        if any_rank(elapsed + self.next_step(engine.state.iteration) + self.reserve() > self.seconds):
            self.stopped = True
            log.info("time budget of %s: stopping after iteration %d (epoch %d) with %s elapsed; %s kept for "
                     "the final validation", duration(self.seconds), engine.state.iteration, engine.state.epoch,
                     duration(elapsed), duration(self.reserve()))
            engine.terminate()


class IterationLimit:
    """Stop the trainer after ``max_iterations`` iterations in total (counted across ``--resume``)."""

    def __init__(self, max_iterations: int) -> None:
        self.max_iterations = max_iterations
        self.stopped = False

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._after_iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.check)

    def _after_iteration(self, engine: Engine) -> None:
        if not _epoch_end(engine):  # an epoch end still saves its checkpoint and validates first
            self.check(engine)

    def check(self, engine: Engine) -> None:
        if not self.stopped and engine.state.iteration >= self.max_iterations:
            self.stopped = True
            log.info("--max-iterations %d reached (epoch %d)", self.max_iterations, engine.state.epoch)
            engine.terminate()


class FinalValidation:
    """Validate once more when the trainer ends (``COMPLETED``), unless the last validation already
    saw the final weights (``pace.validated_at`` is the trainer's iteration)."""

    def __init__(self, evaluator: Engine, pace: Pace) -> None:
        self.evaluator, self.pace = evaluator, pace

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        if trainer.state.iteration > 0 and self.pace.validated_at != trainer.state.iteration:
            self.evaluator.run(trainer.state.epoch)


class RunBudget:
    """When MONAI's trainer stops: an Ignite handler (attach it to the trainer after every other trainer
    handler) combining :class:`IterationLimit` (``max_iterations``) and :class:`TimeBudget`
    (``max_minutes``, keeping back time for the final validation of ``evaluator``, estimated at the
    start by :func:`probe_validation` on the first validation case). The final validation itself is
    run by :func:`medseg.engines.training.run_training` (:class:`FinalValidation`).

    Sets ``trainer.state.stopped_by`` (``"epochs"``, ``"max_iterations"`` or ``"time budget"``) when
    the trainer completes.

    Raises
    ------
    ValueError
        A ``max_minutes`` or ``max_iterations`` that is not positive.
    """

    def __init__(self, pace: Pace, evaluator: Engine, val_interval: int = 1, max_iterations: int | None = None,
                 max_minutes: float | None = None) -> None:
        if max_minutes is not None and not max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {max_minutes}")
        if max_iterations is not None and max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
        self.pace, self.evaluator, self.val_interval = pace, evaluator, val_interval
        self.max_iterations, self.max_minutes = max_iterations, max_minutes
        self.limit: IterationLimit | None = None
        self.budget: TimeBudget | None = None

    @property
    def stopped_by(self) -> str:
        if self.budget is not None and self.budget.stopped:
            return "time budget"
        return "max_iterations" if self.limit is not None and self.limit.stopped else "epochs"

    def attach(self, trainer: Engine) -> None:
        schedule = Schedule(trainer.state.epoch_length, trainer.state.max_epochs, self.val_interval,
                            self.max_iterations)
        self.pace.attach(trainer, self.evaluator)  # no-ops when ProgressLogger attached the timers already
        if self.max_iterations is not None:
            self.limit = IterationLimit(self.max_iterations)
            self.limit.attach(trainer)
        self.pace.attach_last(trainer, self.evaluator)
        if self.max_minutes is not None:
            self.budget = TimeBudget(self.max_minutes * 60, self.pace, schedule)
            trainer.add_event_handler(Events.STARTED, self._probe)
            self.budget.attach(trainer)
        trainer.add_event_handler(Events.COMPLETED, self._record)

    def _probe(self, _: Engine) -> None:
        evaluator: Any = self.evaluator
        dataset = evaluator.data_loader.dataset
        self.pace.validation_estimate = probe_validation(evaluator.network, evaluator.inferer, dataset[0]["image"],
                                                         len(dataset), evaluator.state.device, self.pace.clock)
        assert self.budget is not None
        log.info("time budget %s for the whole run, final validation included (one validation: about %s, "
                 "estimated from one case)", duration(self.budget.seconds), duration(self.pace.validation_estimate))

    def _record(self, trainer: Engine) -> None:
        trainer.state.stopped_by = self.stopped_by  # type: ignore[attr-defined]  # Ignite's State takes custom attributes


def probe_validation(network: torch.nn.Module, inferer: Callable[..., torch.Tensor], image: torch.Tensor,
                     cases: int, device: torch.device, clock: Clock = time.monotonic) -> float:
    """Estimate one validation (``cases`` cases) from the inference time of one case, before training."""
    was_training = network.training
    network.eval()
    started = clock()
    with torch.no_grad():
        inferer(image.unsqueeze(0).to(device), network)
    seconds = (clock() - started) * cases
    network.train(was_training)
    return seconds
