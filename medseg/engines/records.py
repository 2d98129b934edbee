"""What a training run records in its run folder: checkpoints and the loss / Dice history.

``checkpoints/last.pt`` (every epoch, for ``--resume``), ``models/model.pt`` (the best validation
mean Dice), ``history.json`` + ``curves.png``, each written atomically by :class:`RunRecorder`, an
Ignite handler; ``train_summary.json`` is written by :func:`medseg.engines.training.run_training`.

Why not MONAI's ``CheckpointSaver``: it writes non-atomically (``atomic=False``), names files
``<prefix>_<name>_<n>.pt`` (or one fixed name per kind), creates its folder when it is built (before
the run's inputs are checked), and forgets the best metric across ``--resume`` (a worse validation
after a resume would replace the best model).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from medseg.engines.distributed import is_main_process, mean_over_ranks
from medseg.engines.weights import ResumePoint
from medseg.errors import BundleError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.layout import LAST_CHECKPOINT, WEIGHTS_FILE
from medseg.plan import Plan
from medseg.reports.figures import training_curves_png

log = logging.getLogger("medseg.engines.training")

#: The validation's key metric (the name of MONAI's ``key_val_metric`` in ``configs/train.json``).
METRIC = "val_mean_dice"


def per_label_dice(evaluator: Engine, metric: str, labels: dict[int, str]) -> dict[str, float | None]:
    """Mean validation Dice per foreground label name, from the per-case details MONAI's ``MeanDice``
    keeps (``save_details``); ``None`` for a label absent from every validation case."""
    details = getattr(evaluator.state, "metric_details", {}).get(metric)
    names = [name for value, name in sorted(labels.items()) if value != 0]
    if details is None:
        return {}
    values = torch.as_tensor(details, dtype=torch.float64).reshape(-1, len(names))
    result: dict[str, float | None] = {}
    for column, name in enumerate(names):
        mean = float(torch.nanmean(values[:, column])) if values.shape[0] else math.nan
        result[name] = None if math.isnan(mean) else mean
    return result


@dataclass
class BestValidation:
    """The best validation of a run so far (kept in ``trainer.state.best_validation``)."""

    metric: float = -1.0
    epoch: int = 0
    iteration: int = 0
    per_label: dict[str, float | None] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float | None:
        """The best mean Dice, None before any validation gave one."""
        return self.metric if self.metric >= 0 else None


class RunRecorder:
    """What a training run records in its run folder, as an Ignite handler (attach it to the trainer).

    ``checkpoints/last.pt`` after every epoch (state dicts of network, optimiser and LR schedule, the
    trainer counters and the best validation, for ``--resume``); ``models/model.pt`` (the network's
    state dict) on a new best validation mean Dice of ``evaluator``; ``history.json`` + ``curves.png``
    after every validation and when training ends. Each file is written atomically (a temporary file
    in the same folder, then ``os.replace``), so a crash mid-write never leaves a corrupt checkpoint.
    Training on several processes, only the main one writes (the others hold the same weights, see
    :mod:`medseg.engines.distributed`) and the epoch's loss in the history is the mean over all processes.

    Made before anything is written: with ``resume`` (from :func:`medseg.engines.weights.resume_point`)
    the run's ``history.json`` is read here, and :meth:`attach` restores the trainer counters and the
    best validation. ``trainer.state.best_validation`` (:class:`BestValidation`) and
    ``trainer.state.checkpoint_saved`` (whether a failure from now on leaves a resumable run folder)
    tell :func:`medseg.engines.training.run_training` what happened.

    Raises
    ------
    BundleError
        ``resume`` with a ``history.json`` that is not a training history.
    """

    def __init__(self, bundle_root: str | os.PathLike[str], network: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                 evaluator: Engine, plan: Plan, resume: ResumePoint | None = None) -> None:
        self.run_dir = Path(bundle_root)
        self.network, self.optimizer, self.scheduler, self.evaluator = network, optimizer, lr_scheduler, evaluator
        self.labels = dict(plan.labels)
        self.resume = resume
        self.history = TrainingHistory.load(self.run_dir) if resume is not None else TrainingHistory()
        self.best = BestValidation()
        if resume is not None:
            self.best = BestValidation(resume.best_metric, resume.best_epoch, resume.best_iteration,
                                       dict(resume.best_per_label))
        self.trainer: Engine | None = None
        #: set once this run saved a checkpoint: from then on a failure leaves a resumable run folder
        self.saved = False

    @property
    def last_path(self) -> Path:
        return self.run_dir / LAST_CHECKPOINT

    @property
    def model_path(self) -> Path:
        return self.run_dir / WEIGHTS_FILE

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        trainer.state.best_validation = self.best  # type: ignore[attr-defined]  # Ignite's State takes custom attributes
        trainer.state.checkpoint_saved = False  # type: ignore[attr-defined]  # Ignite's State takes custom attributes
        if self.resume is not None:
            trainer.state.epoch, trainer.state.iteration = self.resume.epoch, self.resume.iteration
            log.info("resuming from epoch %d (best validation Dice so far %.4f)", self.resume.epoch,
                     self.resume.best_metric)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._add_loss)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._end_epoch)
        trainer.add_event_handler(Events.COMPLETED, lambda _: self._save_history())
        self.evaluator.add_event_handler(Events.COMPLETED, self.save_best)
        self.evaluator.add_event_handler(Events.COMPLETED, self._add_validation)

    def _end_epoch(self, engine: Engine) -> None:
        # the epoch's loss over every training process (the process's own with one)
        self.history.end_epoch(engine.state.epoch, loss=mean_over_ranks(self.history.pending_losses()))

    def _save_history(self) -> None:
        if is_main_process():
            self.history.save(self.run_dir)

    def _add_loss(self, engine: Engine) -> None:
        # Ignite types State.output as int; MONAI's trainer puts a list of per-sample dicts there
        self.history.add_loss(float(engine.state.output[0]["loss"]))  # type: ignore[index]

    def _add_validation(self, evaluator: Engine) -> None:
        assert self.trainer is not None
        self.history.add_validation(self.trainer.state.epoch, _key_metric(evaluator), self.run_dir,
                                    save=is_main_process())

    def _mark_saved(self) -> None:
        self.saved = True
        if self.trainer is not None:
            self.trainer.state.checkpoint_saved = True  # type: ignore[attr-defined]  # Ignite's State takes custom attributes

    def save_last(self, engine: Engine) -> None:
        best = self.best
        state = {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "trainer": {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                        "epoch_length": engine.state.epoch_length, "max_epochs": engine.state.max_epochs},
            "best": {"metric": best.metric, "epoch": best.epoch, "iteration": best.iteration,
                     "per_label": {k: (math.nan if v is None else float(v)) for k, v in best.per_label.items()}},
        }
        if is_main_process():  # the other training processes hold the same weights (DDP) and write nothing
            with atomic_path(self.last_path) as tmp:
                torch.save(state, tmp)
        self._mark_saved()

    def save_best(self, evaluator: Engine) -> None:
        assert self.trainer is not None, "attach the recorder to the trainer first"
        value = _key_metric(evaluator)
        if not math.isnan(value) and value > self.best.metric:
            self.best.metric, self.best.epoch = value, self.trainer.state.epoch
            self.best.iteration = self.trainer.state.iteration
            self.best.per_label = per_label_dice(evaluator, _metric_name(evaluator), self.labels)
            if is_main_process():  # every process saw the same (gathered) validation Dice and keeps the same best
                with atomic_path(self.model_path) as tmp:
                    torch.save(self.network.state_dict(), tmp)
            self._mark_saved()
            log.info("new best validation mean Dice %.4f at epoch %d (iteration %d) -> %s", value, self.best.epoch,
                     self.best.iteration, self.model_path)


def _metric_name(evaluator: Engine) -> str:
    return getattr(evaluator.state, "key_metric_name", None) or METRIC


def _key_metric(evaluator: Engine) -> float:
    """The evaluator's key metric (MONAI's ``key_val_metric``), NaN if it gave none."""
    return float(evaluator.state.metrics.get(_metric_name(evaluator), float("nan")))


@dataclass
class TrainingHistory:
    """Loss per epoch and validation mean Dice, saved as ``history.json`` and drawn as ``curves.png``
    (after every validation and at the end of training)."""

    epochs: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_epochs: list[int] = field(default_factory=list)
    val_dice: list[float] = field(default_factory=list)
    _pending: list[float] = field(default_factory=list, repr=False)

    def add_loss(self, value: float) -> None:
        self._pending.append(value)

    def pending_losses(self) -> list[float]:
        """The losses of the iterations of the epoch in progress."""
        return list(self._pending)

    def end_epoch(self, epoch: int, loss: float | None = None) -> float:
        """Close the epoch with ``loss`` (default: the mean of its iterations' losses); returns it."""
        if loss is None:
            loss = float(sum(self._pending) / len(self._pending)) if self._pending else float("nan")
        self._pending.clear()
        self.epochs.append(epoch)
        self.losses.append(loss)
        return loss

    def pending_loss(self) -> float:
        """Mean loss of the iterations of the epoch in progress (NaN before the first)."""
        return float(sum(self._pending) / len(self._pending)) if self._pending else float("nan")

    def add_validation(self, epoch: int, dice: float, run_dir: Path, save: bool = True) -> None:
        if self.val_epochs and self.val_epochs[-1] == epoch:  # the final validation repeats an epoch
            self.val_dice[-1] = dice
        else:
            self.val_epochs.append(epoch)
            self.val_dice.append(dice)
        if save:
            self.save(run_dir)

    def save(self, run_dir: Path) -> None:
        data = {"epoch": self.epochs, "loss": self.losses, "val_epoch": self.val_epochs, "val_mean_dice": self.val_dice}
        atomic_write_text(run_dir / "history.json", json.dumps(data, indent=1) + "\n")
        training_curves_png(self.epochs, self.losses, self.val_epochs, self.val_dice, run_dir / "curves.png")

    @classmethod
    def load(cls, run_dir: Path) -> TrainingHistory:
        """The history of the run being resumed (empty if it has none).

        Raises
        ------
        BundleError
            If ``history.json`` exists but is not a history written by training.
        """
        path = run_dir / "history.json"
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls([int(v) for v in data["epoch"]], [float(v) for v in data["loss"]],
                       [int(v) for v in data["val_epoch"]], [float(v) for v in data["val_mean_dice"]])
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"{path}: not a training history ({type(exc).__name__}); move it away to resume") from exc


def completed_epochs(iteration: int, epoch_length: int) -> int:
    """Whole epochs in ``iteration`` iterations (a run stopped mid-epoch has not completed that epoch)."""
    return iteration // epoch_length if epoch_length > 0 else 0
