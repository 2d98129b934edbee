"""What a training run records in its run folder: checkpoints, the loss / Dice history, the summary.

``checkpoints/last.pt`` (every epoch, for ``--resume``), ``models/model.pt`` (the best validation
mean Dice), ``history.json`` + ``curves.png`` and ``train_summary.json``; each written atomically.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ignite.engine import Engine

from medseg.errors import BundleError
from medseg.io.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


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


class RunCheckpoints:
    """Saves ``checkpoints/last.pt`` after every epoch and ``models/model.pt`` on a new best validation
    Dice, each atomically (a crash mid-write never leaves a corrupt checkpoint for ``--resume``)."""

    def __init__(self, run_dir: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, trainer: Engine, metric: str,
                 labels: dict[int, str]) -> None:
        self.run_dir = run_dir
        self.network, self.optimizer, self.scheduler, self.trainer = network, optimizer, scheduler, trainer
        self.metric = metric
        self.labels = labels
        self.best_metric = -1.0
        self.best_epoch = 0
        self.best_iteration = 0
        self.best_per_label: dict[str, float | None] = {}
        #: set once this run saved a checkpoint: from then on a failure leaves a resumable run folder
        self.saved = False

    def restore_best(self, metric: float, epoch: int, iteration: int, per_label: dict[str, float | None]) -> None:
        """The best validation of the run being resumed."""
        self.best_metric, self.best_epoch, self.best_iteration = metric, epoch, iteration
        self.best_per_label = dict(per_label)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def model_path(self) -> Path:
        return self.run_dir / "models" / "model.pt"

    def save_last(self, engine: Engine) -> None:
        state = {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "trainer": {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                        "epoch_length": engine.state.epoch_length, "max_epochs": engine.state.max_epochs},
            "best": {"metric": self.best_metric, "epoch": self.best_epoch, "iteration": self.best_iteration,
                     "per_label": {k: (math.nan if v is None else float(v)) for k, v in self.best_per_label.items()}},
        }
        with atomic_path(self.last_path) as tmp:
            torch.save(state, tmp)
        self.saved = True

    def save_best(self, evaluator: Engine) -> None:
        value = float(evaluator.state.metrics.get(self.metric, float("nan")))
        if value == value and value > self.best_metric:  # NaN-safe
            self.best_metric, self.best_epoch = value, self.trainer.state.epoch
            self.best_iteration = self.trainer.state.iteration
            self.best_per_label = per_label_dice(evaluator, self.metric, self.labels)
            with atomic_path(self.model_path) as tmp:
                torch.save(self.network.state_dict(), tmp)
            self.saved = True
            log.info("new best validation mean Dice %.4f at epoch %d (iteration %d) -> %s", value, self.best_epoch,
                     self.best_iteration, self.model_path)


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

    def end_epoch(self, epoch: int) -> float:
        loss = float(sum(self._pending) / len(self._pending)) if self._pending else float("nan")
        self._pending.clear()
        self.epochs.append(epoch)
        self.losses.append(loss)
        return loss

    def pending_loss(self) -> float:
        """Mean loss of the iterations of the epoch in progress (NaN before the first)."""
        return float(sum(self._pending) / len(self._pending)) if self._pending else float("nan")

    def add_validation(self, epoch: int, dice: float, run_dir: Path) -> None:
        if self.val_epochs and self.val_epochs[-1] == epoch:  # the final validation repeats an epoch
            self.val_dice[-1] = dice
        else:
            self.val_epochs.append(epoch)
            self.val_dice.append(dice)
        self.save(run_dir)

    def save(self, run_dir: Path) -> None:
        from medseg.reports.figures import training_curves_png

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
