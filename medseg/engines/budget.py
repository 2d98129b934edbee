"""When a training run stops: epochs, ``--max-iterations``, or a time budget that includes the final validation.

:class:`TimeBudget` checks after every iteration (and after every epoch end) whether one more
iteration -- with the epoch end and scheduled validation it may complete -- *and then* the final
validation still fit in the budget, using the slowest recent durations :class:`~medseg.engines.progress.Pace`
measured (a validation is estimated by :func:`probe_validation` until one has been timed). If not,
it stops the trainer, and :class:`FinalValidation` validates the weights reached. A sudden slow-down
after the last check (another process taking the CPU) can still make a run overrun by a little.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events

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
        if elapsed + self.next_step(engine.state.iteration) + self.reserve() > self.seconds:
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
