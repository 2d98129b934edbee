"""The ``run`` step of ``configs/train.json``: run MONAI's trainer built by the config, validate the
final weights, write the summary; a failure before the first checkpoint removes what the run wrote.

Run folder (a MONAI bundle) after training::

    RUN_DIR/models/model.pt        network state dict of the best validation (RunRecorder)
    RUN_DIR/checkpoints/last.pt    state dicts of network, optimiser, LR schedule and trainer (for --resume)
    RUN_DIR/logs/                  TensorBoard event files (TensorBoardLog)
    RUN_DIR/split.json             training / validation case names (written here)
    RUN_DIR/history.json, curves.png   loss per epoch and validation Dice (RunRecorder)
    RUN_DIR/train_summary.json     epochs and iterations done, best validation Dice, time, why training stopped,
                                   training processes (``processes``)

Training on several processes (``torchrun``, :mod:`medseg.engines.distributed`), only the main
process writes these files; the others wait for it at the end.

Every part the config builds (options, dataset, ``--init-weights``, ``--resume`` state, images) is
checked and loaded while MONAI resolves the arguments of :func:`run_training`, before it writes
anything. Recording the result in the bundle's metadata and docs is the config's ``finalize`` step
(:mod:`medseg.bundle.training`), which reads ``train_summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine

from medseg.data.datalist import Datalist
from medseg.engines.budget import FinalValidation
from medseg.engines.data import SPLIT_FILE, Split
from medseg.engines.distributed import barrier, is_main_process, unwrap, world_size
from medseg.engines.options import TrainOptions
from medseg.engines.progress import Pace, duration
from medseg.engines.records import BestValidation, completed_epochs
from medseg.engines.rundir import RunFolderGuard
from medseg.engines.weights import InitialWeights
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.layout import SUMMARY_FILE, WEIGHTS_FILE
from medseg.logs import release_held

__all__ = ["SUMMARY_FILE", "run_training"]

log = logging.getLogger(__name__)


def run_training(trainer: Engine, evaluator: Engine, split: Split, bundle_root: str | os.PathLike[str],
                 pace: Pace | None = None, options: TrainOptions | None = None,
                 initial_weights: InitialWeights | None = None, datalist: Datalist | None = None) -> dict[str, Any]:
    """Write ``split.json`` (a new run), run ``trainer`` (MONAI's ``SupervisedTrainer`` with medseg's
    handlers), validate the final weights with ``evaluator`` unless the last validation saw them,
    keep the last weights as ``models/model.pt`` if no validation gave a Dice, and write
    ``train_summary.json``; returns the summary.

    ``pace`` is the run's clock (started with the config); ``options``, ``initial_weights`` and
    ``datalist`` describe the run in the summary.

    Raises
    ------
    Exception
        Whatever stops training. Before the trainer saved a checkpoint
        (``trainer.state.checkpoint_saved``, set by :class:`~medseg.engines.records.RunRecorder`),
        everything this call created in ``bundle_root`` is removed first
        (:class:`~medseg.engines.rundir.RunFolderGuard`); after it, the run folder is kept for ``--resume``.
    """
    release_held()  # every part is built, every input checked: what the checks noted may be shown now
    run_dir = Path(bundle_root)
    pace = pace if pace is not None else Pace()
    pace.attach(trainer, evaluator)  # no-ops when the handlers attached the timers already
    pace.attach_last(trainer, evaluator)
    guard = RunFolderGuard(run_dir)
    main = is_main_process()  # training on several processes, the main one writes the run's files
    first_iteration = trainer.state.iteration
    log.info("training on %d cases, validating on %d (fold %d); %d iterations per epoch", len(split.training),
             len(split.validation), split.fold, trainer.state.epoch_length)
    try:
        if not split.resumed and main:
            atomic_write_text(run_dir / SPLIT_FILE, split.to_json())
        trainer.state.stopped_by = "epochs"  # type: ignore[attr-defined]  # unless RunBudget stops it otherwise
        reached = _stop_reached(trainer, options)
        if reached is None:
            if split.resumed and main:  # an earlier run's summary would call this one finished if it stopped early
                (run_dir / SUMMARY_FILE).unlink(missing_ok=True)
            trainer.run()
        else:  # resumed from a checkpoint taken at the stop: the earlier run ended before its summary
            log.info("the checkpoint is at the run's stop (%s, iteration %d): finishing the run without training",
                     reached, trainer.state.iteration)
            trainer.state.stopped_by = reached  # type: ignore[attr-defined]  # Ignite's State takes custom attributes
        FinalValidation(evaluator, pace)(trainer)
        summary = _finish(run_dir, trainer, split, pace, first_iteration, options, initial_weights, datalist, main)
        barrier()  # the other processes go on (finalize, medseg train's summary) once the main one has written
        return summary
    except BaseException:
        if main and not getattr(trainer.state, "checkpoint_saved", False):
            guard.rollback()
        elif main:
            log.error("training failed after a checkpoint was saved; continue it with --resume")
        raise


def _stop_reached(trainer: Engine, options: TrainOptions | None) -> str | None:
    """What stop a resumed ``trainer`` is already at (``"epochs"``, ``"max_iterations"``), None if it has training
    left. (Ignite would start such a run again from iteration 0.)"""
    state = trainer.state
    if state.iteration == 0:
        return None
    if options is not None and options.max_iterations is not None and state.iteration >= options.max_iterations:
        return "max_iterations"  # checked first, as RunBudget stops the last epoch at that iteration
    if state.max_epochs is not None and state.epoch >= state.max_epochs:
        return "epochs"
    return None


def _finish(run_dir: Path, trainer: Engine, split: Split, pace: Pace, first_iteration: int,
            options: TrainOptions | None, initial_weights: InitialWeights | None,
            datalist: Datalist | None, write: bool = True) -> dict[str, Any]:
    """Write (with ``write``) the final model (if no validation produced one) and the summary; returns the summary."""
    model_path = run_dir / WEIGHTS_FILE
    network = getattr(trainer, "network", None)
    if isinstance(network, torch.nn.Module):
        network = unwrap(network)  # DDP's wrapper: the state dict of the network inside
    if write and not model_path.exists() and isinstance(network, torch.nn.Module):  # no validation gave a Dice (NaN)
        with atomic_path(model_path) as tmp:
            torch.save(network.state_dict(), tmp)
    best: BestValidation = getattr(trainer.state, "best_validation", None) or BestValidation()
    iterations, epoch_length = trainer.state.iteration, trainer.state.epoch_length
    assert epoch_length is not None, "set by SupervisedTrainer"
    epochs = completed_epochs(iterations, epoch_length)
    stopped_by = str(getattr(trainer.state, "stopped_by", "epochs"))
    summary = {
        "epochs_completed": epochs,
        "iterations": iterations,
        "iterations_this_run": iterations - first_iteration,
        "epoch_length": epoch_length,
        "best_val_mean_dice": best.mean_dice,
        "best_epoch": best.epoch,
        "best_iteration": best.iteration,
        "best_val_dice_per_label": best.per_label,
        "training_cases": len(split.training),
        "validation_cases": len(split.validation),
        "fold": split.fold,
        "resumed": split.resumed,
        "seconds": round(pace.elapsed(), 1),
        "stopped_by": stopped_by,
        "stopped_by_time_budget": stopped_by == "time budget",
        "init_weights": None if initial_weights is None else initial_weights.summary(),
        "device": str(getattr(trainer.state, "device", None) or "cpu"),
        "dataset": None if datalist is None else {"name": datalist.name, "path": str(datalist.path),
                                                  "training_cases": len(datalist.training)},
        "options": {} if options is None else {k: v for k, v in asdict(options).items() if k != "network"},
    }
    summary["processes"] = world_size()
    if write:
        atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
    log.info("training done: %d epoch%s (%d iterations) in %s, stopped by %s; best validation Dice %.4f at iteration "
             "%d (epoch %d); model: %s", epochs, "s" * (epochs != 1), iterations, duration(pace.elapsed()), stopped_by,
             best.metric, best.iteration, best.epoch, model_path)
    return summary
