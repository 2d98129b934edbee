"""Training with MONAI's Ignite engines: ``SupervisedTrainer`` + ``SupervisedEvaluator`` and handlers.

Run folder written by :func:`train` (a MONAI bundle, see :mod:`medseg.bundle.create`)::

    RUN_DIR/configs/               plan.json, metadata.json (version, changelog and eval_metrics updated
                                   after training), train/inference/evaluate.json, logging.conf
    RUN_DIR/docs/README.md         with the validation Dice per label after training
    RUN_DIR/models/model.pt        network state dict of the best validation
    RUN_DIR/checkpoints/last.pt    state dicts of network, optimiser, LR schedule and trainer (for --resume)
    RUN_DIR/logs/                  TensorBoard event files
    RUN_DIR/split.json             training / validation case names
    RUN_DIR/train_summary.json     epochs and iterations done, best validation Dice, time, why training stopped
    RUN_DIR/history.json, curves.png   loss per epoch and validation Dice (updated at each validation)

Every input (options, dataset, ``--init-weights``, ``--resume`` state) is checked and loaded before
anything is written (:func:`medseg.engines.workflow.prepare_run`); a run that fails before its
first checkpoint removes what it wrote (:class:`medseg.engines.rundir.RunFolderGuard`). Progress is
logged every ``log_every`` iterations (:mod:`medseg.engines.progress`); a time budget includes the
final validation (:mod:`medseg.engines.budget`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from medseg.architectures import NetworkSpec
from medseg.bundle.create import (
    describe_data_source,
    plan_bundle,
    record_training,
    write_bundle,
)
from medseg.data.datalist import Case, Datalist, load_datalist, validate_datalist
from medseg.devices import resolve_device
from medseg.engines.budget import (
    FinalValidation,
    IterationLimit,
    TimeBudget,
    probe_validation,
)
from medseg.engines.progress import (
    Clock,
    Pace,
    ProgressLog,
    Schedule,
    duration,
    log_validation,
)
from medseg.engines.records import RunCheckpoints, completed_epochs, per_label_dice
from medseg.engines.rundir import RunFolderGuard
from medseg.engines.weights import load_matching_weights, read_init_weights
from medseg.engines.workflow import (
    METRIC,
    PreparedRun,
    build_evaluator,
    build_trainer,
    iteration_loss,
    prepare_run,
)
from medseg.errors import InputError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.image import case_name, list_images
from medseg.logs import held_info
from medseg.plan import Plan, load_plan

__all__ = ["TrainOptions", "load_matching_weights", "resolve_device", "train", "train_bundle", "training_datalist"]

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Options of :func:`train` (the ``medseg train`` flags)."""

    epochs: int = 100
    #: time budget in minutes for the whole run (data loading, training and the final validation)
    max_minutes: float | None = None
    #: stop after this many iterations in total (counted across --resume); the epochs still bound it
    max_iterations: int | None = None
    #: log a progress line every this many iterations (and at every epoch end)
    log_every: int = 10
    device: str = "cpu"
    fold: int = 0
    resume: bool = False
    val_interval: int = 5
    learning_rate: float = 2e-3
    batch_size: int = 2
    samples_per_case: int = 2
    #: an epoch is at least this many iterations (small datasets would otherwise give tiny epochs)
    min_iterations_per_epoch: int = 20
    num_workers: int = 0
    seed: int = 0
    target_spacing: tuple[float, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    ct_window: tuple[float, float] | None = None
    init_weights: str | None = None
    network: NetworkSpec = field(default_factory=NetworkSpec)


def check_options(opts: TrainOptions) -> torch.device:
    """Check every option before anything is read or written; returns the device.

    Raises
    ------
    InputError
        A count below its minimum, a non-positive or non-finite learning rate or time budget,
        ``--fold`` outside 0-4, ``--init-weights`` with ``--resume``, an unavailable device.
    """
    for flag, value, least in (("--epochs", opts.epochs, 1), ("--val-interval", opts.val_interval, 1),
                               ("--batch-size", opts.batch_size, 1), ("--log-every", opts.log_every, 1),
                               ("samples_per_case", opts.samples_per_case, 1), ("num_workers", opts.num_workers, 0),
                               ("min_iterations_per_epoch", opts.min_iterations_per_epoch, 1),
                               ("--max-iterations", opts.max_iterations, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise InputError(None, f"{flag} must be an integer of at least {least}, got {value!r}")
    for flag, number in (("--max-minutes", opts.max_minutes), ("learning_rate", opts.learning_rate)):
        if number is not None and not (isinstance(number, (int, float)) and math.isfinite(number) and number > 0):
            raise InputError(None, f"{flag} must be a positive number, got {number!r}")
    if not 0 <= opts.fold < 5:
        raise InputError(None, f"--fold must be between 0 and 4, got {opts.fold}")
    if opts.init_weights is not None and opts.resume:
        raise InputError(opts.init_weights, "--init-weights starts a new run; --resume continues one from its "
                         "checkpoint: use one of the two")
    return resolve_device(opts.device)


def training_datalist(dataset_dir: str | os.PathLike[str], plan: Plan) -> Datalist:
    """The training cases of ``dataset_dir``: a ``dataset.json`` file, a folder holding one, or a
    folder with ``imagesTr/`` and ``labelsTr/`` (paired by file name; labels from the plan).

    Raises
    ------
    InputError
        No dataset found, or dataset labels that differ from the plan's.
    """
    root = Path(dataset_dir)
    if root.is_file() or (root / "dataset.json").exists():
        datalist = load_datalist(root)
        if datalist.labels != plan.labels:
            raise InputError(datalist.path, f"labels {datalist.labels} differ from the bundle's {plan.labels}")
        return datalist
    images, labels = root / "imagesTr", root / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise InputError(root, "no dataset.json and no imagesTr/ + labelsTr/ folders")
    cases = []
    for image in list_images(images):
        label = labels / image.name
        if not label.exists():
            raise InputError(image, f"no label map {label.name} in {labels}")
        cases.append(Case(case_name(image), image, label))
    return Datalist(root / "dataset.json", root.name, plan.modality, dict(plan.labels), cases, [])


def train(data: str | os.PathLike[str], run_dir: str | os.PathLike[str], options: TrainOptions | None = None,
          bundle: bool = False) -> dict[str, Any]:
    """Train on an MSD dataset: write a bundle for it into ``run_dir`` (plan derived from the data),
    then train it. With ``bundle=True``, ``run_dir`` is an existing bundle (``medseg bundle init``)
    whose plan is used as it is. Nothing is written before every input has been checked; a run that
    fails before its first checkpoint leaves ``run_dir`` as it found it.

    Returns the training summary (also written to ``train_summary.json``).

    Raises
    ------
    InputError
        Invalid dataset (see :func:`medseg.data.datalist.validate_datalist`) or options (see
        :func:`check_options`), a non-empty run folder without ``--resume``, ``--init-weights``
        that are not a loadable state dict or do not fit the network.
    BundleError
        ``--resume`` with a missing or unreadable checkpoint, ``bundle=True`` without a plan or
        with unreadable metadata.
    """
    started = time.monotonic()
    opts = options or TrainOptions()
    run_dir = Path(run_dir)
    with held_info():  # notes on the plan and data are printed once every input has passed its checks
        check_options(opts)
        init = read_init_weights(opts.init_weights) if opts.init_weights else None  # before any data is read
        if bundle or opts.resume:
            plan = load_plan(run_dir)  # raises BundleError if this is not a bundle
            if not opts.resume and (run_dir / "models" / "model.pt").exists():
                raise InputError(run_dir / "models" / "model.pt", "this bundle is already trained; pass --resume "
                                 "to continue, or train a copy (its weights would be replaced)")
            datalist = training_datalist(data, plan)
            validate_datalist(datalist)
            new_bundle = False
        else:
            try:
                datalist, plan = plan_bundle(data, run_dir, opts.target_spacing, opts.patch_size, opts.network,
                                             opts.ct_window)
            except InputError as exc:
                if exc.path == str(run_dir):  # say how to continue a run instead
                    raise InputError(run_dir, "exists and is not empty; choose a new --out folder or pass "
                                              "--resume") from exc
                raise
            new_bundle = True
    return _train_validated(run_dir, plan, datalist, opts, init=init, new_bundle=new_bundle, started=started)


def train_bundle(bundle_root: str | os.PathLike[str], dataset_dir: str | os.PathLike[str],
                 options: TrainOptions | None = None, network: torch.nn.Module | None = None,
                 loss: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train the network of a bundle (its ``configs/plan.json``) on ``dataset_dir``; the entry point
    of ``configs/train.json``. Writes ``models/model.pt`` (best validation Dice),
    ``checkpoints/last.pt``, ``logs/``, ``split.json`` and ``train_summary.json`` in the bundle and
    records the result in its metadata and docs.

    Raises
    ------
    InputError
        Invalid dataset, bad options, unavailable device, ``--init-weights`` that do not fit.
    BundleError
        Missing plan or unreadable metadata; ``resume`` without a usable checkpoint.
    """
    started = time.monotonic()
    opts = options or TrainOptions()
    with held_info():
        check_options(opts)
        init = read_init_weights(opts.init_weights) if opts.init_weights else None
        plan = load_plan(bundle_root)
        datalist = training_datalist(dataset_dir, plan)
        validate_datalist(datalist)
    return _train_validated(Path(bundle_root), plan, datalist, opts, network, loss, init=init, started=started)


def _train_validated(run_dir: Path, plan: Plan, datalist: Datalist, opts: TrainOptions,
                     network: torch.nn.Module | None = None, loss: torch.nn.Module | None = None, *,
                     init: tuple[Path, Mapping[str, Any]] | None = None, new_bundle: bool = False,
                     started: float | None = None,
                     clock: Clock = time.monotonic) -> dict[str, Any]:
    """Check and load the rest (weights, checkpoint, images), then write and train; on a failure
    before the first checkpoint, remove what this call wrote."""
    started = clock() if started is None else started
    with held_info():
        device = check_options(opts)
        run = prepare_run(run_dir, plan, datalist, opts, device, network, init, new_bundle)
    guard = RunFolderGuard(run_dir)
    checkpoints: list[RunCheckpoints] = []
    try:
        if new_bundle:
            write_bundle(run_dir, plan, name=run_dir.name, data_source=describe_data_source(datalist, run_dir))
        if not opts.resume:
            atomic_write_text(run_dir / "split.json", run.split_json())
        return _run(run, loss, started, clock, checkpoints)
    except BaseException:
        if not any(c.saved for c in checkpoints):
            guard.rollback()
        else:
            log.error("training failed after a checkpoint was saved; continue it with --resume")
        raise


def _run(run: PreparedRun, loss: torch.nn.Module | None, started: float, clock: Clock,
         checkpoints_out: list[RunCheckpoints]) -> dict[str, Any]:
    """Build the engines with their handlers (in the order their timing needs), train, record."""
    opts, run_dir = run.opts, run.run_dir
    log.info("training on %d cases, validating on %d (fold %d); %d iterations per epoch", len(run.train_cases),
             len(run.val_cases), opts.fold, run.epoch_length)
    evaluator = build_evaluator(run)
    trainer = build_trainer(run, evaluator, loss)
    schedule = Schedule(run.epoch_length, opts.epochs, opts.val_interval, opts.max_iterations)
    pace = Pace(started, clock)
    pace.attach(trainer, evaluator)
    checkpoints = RunCheckpoints(run_dir, run.network, run.optimizer, run.scheduler, trainer, METRIC, run.plan.labels)
    checkpoints_out.append(checkpoints)
    if run.resume is not None:
        checkpoints.restore_best(run.resume.best_metric, run.resume.best_epoch, run.resume.best_iteration,
                                 run.resume.best_per_label)
        log.info("resuming from epoch %d (best validation Dice so far %.4f)", run.resume.epoch, run.resume.best_metric)
    history = run.history
    evaluator.add_event_handler(Events.COMPLETED, checkpoints.save_best)
    evaluator.add_event_handler(Events.COMPLETED, lambda engine: history.add_validation(
        trainer.state.epoch, float(engine.state.metrics.get(METRIC, float("nan"))), run_dir))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoints.save_last)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: history.add_loss(iteration_loss(engine)))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: history.end_epoch(engine.state.epoch))
    budget_s = None if opts.max_minutes is None else opts.max_minutes * 60
    ProgressLog(pace, schedule, opts.log_every, budget_s,
                lambda: run.optimizer.param_groups[0]["lr"]).attach(trainer, iteration_loss)
    if sys.stderr.isatty():
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=iteration_loss)
    limit = IterationLimit(opts.max_iterations) if opts.max_iterations is not None else None
    if limit is not None:
        limit.attach(trainer)
    pace.attach_last(trainer, evaluator)
    evaluator.add_event_handler(Events.COMPLETED, lambda engine: log_validation(
        trainer, float(engine.state.metrics.get(METRIC, float("nan"))),
        per_label_dice(engine, METRIC, run.plan.labels),
        pace.validation_s[-1] if pace.validation_s else None))
    budget = None
    if budget_s is not None:
        budget = TimeBudget(budget_s, pace, schedule)
        image = run.val_loader.dataset[0]["image"]
        pace.validation_estimate = probe_validation(run.network, evaluator.inferer, image, len(run.val_cases),
                                                    run.device, clock)
        log.info("time budget %s for the whole run, final validation included (one validation: about %s, "
                 "estimated from one case)", duration(budget_s), duration(pace.validation_estimate))
        budget.attach(trainer)
    FinalValidation(evaluator, pace).attach(trainer)
    first_iteration = trainer.state.iteration
    trainer.run()
    stopped_by = ("time budget" if budget is not None and budget.stopped
                  else "max_iterations" if limit is not None and limit.stopped else "epochs")
    return _finish(run, trainer, checkpoints, pace, first_iteration, stopped_by)


def _finish(run: PreparedRun, trainer: Engine, checkpoints: RunCheckpoints, pace: Pace, first_iteration: int,
            stopped_by: str) -> dict[str, Any]:
    """Write the final model (if no validation produced one), history, summary and bundle records."""
    opts, run_dir = run.opts, run.run_dir
    if not checkpoints.model_path.exists():  # no validation gave a Dice (NaN): keep the last weights
        with atomic_path(checkpoints.model_path) as tmp:
            torch.save(run.network.state_dict(), tmp)
    run.history.save(run_dir)
    iterations = trainer.state.iteration
    epochs = completed_epochs(iterations, run.epoch_length)
    best = checkpoints.best_metric if checkpoints.best_metric >= 0 else None
    summary = {
        "epochs_completed": epochs,
        "iterations": iterations,
        "iterations_this_run": iterations - first_iteration,
        "epoch_length": run.epoch_length,
        "best_val_mean_dice": best,
        "best_epoch": checkpoints.best_epoch,
        "best_iteration": checkpoints.best_iteration,
        "best_val_dice_per_label": checkpoints.best_per_label,
        "training_cases": len(run.train_cases),
        "validation_cases": len(run.val_cases),
        "seconds": round(pace.elapsed(), 1),
        "stopped_by": stopped_by,
        "stopped_by_time_budget": stopped_by == "time budget",
        "init_weights": None if run.transfer is None else {"source": str(opts.init_weights),
                                                           "loaded": len(run.transfer["loaded"]),
                                                           "skipped": run.transfer["skipped"]},
        "device": str(run.device),
        "options": {k: v for k, v in asdict(opts).items() if k != "network"},
    }
    atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    data_source = describe_data_source(run.datalist, run_dir)
    note = (f"{'continued (--resume) to' if run.resume is not None else 'trained'} {epochs} epoch{'s' * (epochs != 1)} "
            f"({iterations} iterations of {run.epoch_length} per epoch"
            f"{'' if iterations % run.epoch_length == 0 else ', the last epoch partly'}) on {data_source}"
            f"{'' if run.transfer is None else ', starting from --init-weights'}; stopped by {stopped_by}; "
            f"best validation mean Dice {'n/a' if best is None else f'{best:.4f}'} at epoch {checkpoints.best_epoch} "
            f"on {len(run.val_cases)} validation cases (fold {opts.fold})")
    record_training(run_dir, run.plan, mean_dice=best, per_label=checkpoints.best_per_label, note=note,
                    data_source=data_source)
    log.info("training done: %d epoch%s (%d iterations) in %s, stopped by %s; best validation Dice %.4f at iteration "
             "%d (epoch %d); model: %s", epochs, "s" * (epochs != 1), iterations, duration(pace.elapsed()), stopped_by,
             checkpoints.best_metric, checkpoints.best_iteration, checkpoints.best_epoch, checkpoints.model_path)
    return summary
