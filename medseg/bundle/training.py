"""Training a bundle: ``medseg train`` (:func:`train`) and the bundle-level steps of ``configs/train.json``.

``medseg train --data D --out RUN`` plans a bundle from the data and writes it into ``RUN``
(:func:`medseg.bundle.create.plan_bundle`, :func:`~medseg.bundle.create.write_bundle`; with
``--plan auto`` the planner: :func:`medseg.bundle.planned.planned_bundle`); ``--bundle B`` uses an
existing one, ``--resume`` continues one. Either way the bundle's ``configs/train.json`` then
runs through the same machinery as ``medseg bundle run B --config train`` (safe mode included), with
the options as overrides: one pipeline, whether started by ``medseg train``, ``medseg bundle run``
or ``python -m monai.bundle run``.

The config's ``initialize`` checks that the bundle's metadata can record the result
(:func:`check_trainable`); its ``finalize`` records it (:func:`record_training_run`: version, changelog,
``eval_metrics``, ``docs/README.md``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from medseg.bundle.cascade import check_previous_stage, copy_previous_maps
from medseg.bundle.create import (
    describe_data_source,
    describe_dataset,
    plan_bundle,
    read_trainable_metadata,
    record_training,
    write_bundle,
)
from medseg.bundle.planned import PlannedBundle, planned_bundle, write_planned
from medseg.bundle.runner import run_bundle
from medseg.data.datalist import Datalist
from medseg.engines.data import training_datalist
from medseg.engines.distributed import init_distributed, is_main_process, share_from_main
from medseg.engines.options import TrainOptions, check_options
from medseg.engines.rundir import RunFolderGuard
from medseg.engines.tracking import tracking_location
from medseg.engines.training import SUMMARY_FILE
from medseg.engines.weights import InitialWeights
from medseg.errors import BundleError, InputError, MedsegError, root_cause
from medseg.layout import LAST_CHECKPOINT, PREVIOUS_PREDICTIONS, WEIGHTS_FILE
from medseg.logs import held_info
from medseg.networks import build_network
from medseg.plan import Plan, load_plan
from medseg.planning import PlannerOptions

__all__ = ["TrainOptions", "check_trainable", "record_training_run", "train", "train_overrides", "write_run"]

TRAIN_CONFIG = Path("configs") / "train.json"
#: The config ``medseg train`` runs when ``torchrun`` started it (layered on ``configs/train.json``).
MULTI_GPU_CONFIG = "multi_gpu_train"

log = logging.getLogger(__name__)

#: TrainOptions fields that are scalar keys of configs/train.json (the rest shape a new bundle's plan).
CONFIG_OPTIONS = ("epochs", "val_interval", "max_minutes", "max_iterations", "log_every", "device", "fold",
                  "resume", "learning_rate", "batch_size", "samples_per_case", "min_iterations_per_epoch",
                  "iterations_per_epoch", "num_workers", "mlflow_uri", "seed", "init_weights")
#: Options whose None keeps the config's value (no override).
CONFIG_DEFAULTED = ("learning_rate", "batch_size", "samples_per_case", "num_workers", "iterations_per_epoch",
                    "mlflow_uri")
#: Options a configs/train.json written before them does not read (refused rather than ignored).
NEWER_OPTIONS = {"iterations_per_epoch": "--iterations-per-epoch", "mlflow_uri": "--mlflow"}


def train_overrides(data: str | os.PathLike[str], options: TrainOptions) -> dict[str, Any]:
    """The overrides of ``configs/train.json`` for ``medseg train``: ``dataset_dir`` and every option
    of :data:`CONFIG_OPTIONS`, except those of :data:`CONFIG_DEFAULTED` left at None (paths made
    absolute: the config runs from inside the bundle; a local ``--mlflow`` folder as a plain path)."""
    values: dict[str, Any] = {"dataset_dir": os.path.abspath(data)}
    for key in CONFIG_OPTIONS:
        if getattr(options, key) is not None or key not in CONFIG_DEFAULTED:
            values[key] = getattr(options, key)
    if options.init_weights is not None:
        values["init_weights"] = os.path.abspath(options.init_weights)
    if options.mlflow_uri is not None:
        values["mlflow_uri"] = tracking_location(options.mlflow_uri)
    return values


def _check_inputs(data: str | os.PathLike[str], run_dir: Path, opts: TrainOptions, bundle: bool,
                  planner: PlannerOptions | None) -> tuple[Plan, str | None, PlannedBundle | None, Path | None]:
    """Every input of :func:`train` checked without writing; returns the plan and, for a new bundle,
    its ``data_source`` (and what the planner made, with ``planner``), and a cascade stage's previous-stage label
    maps to copy in (:func:`medseg.bundle.cascade.check_previous_stage`)."""
    check_options(opts)
    weights = InitialWeights(opts.init_weights) if opts.init_weights else None  # before any data is read
    planned = None
    if bundle or opts.resume:
        if planner is not None:
            raise InputError(run_dir, "--plan auto plans a new run; this bundle already has its configs/plan.json")
        plan = load_plan(run_dir)  # raises BundleError if this is not a bundle
        if not opts.resume and (run_dir / WEIGHTS_FILE).exists():
            raise InputError(run_dir / WEIGHTS_FILE, "this bundle is already trained; pass --resume "
                             "to continue, or train a copy (its weights would be replaced)")
        _check_train_config(run_dir, opts)
        datalist = training_datalist(data, plan)
        read_trainable_metadata(run_dir)
        source = None
    else:
        try:
            if planner is not None:
                planned = planned_bundle(data, run_dir, _planner_options(planner, opts))
                plan, datalist = planned.result.plan, planned.datalist
                source = describe_data_source(planned.datalist, run_dir)
            else:
                datalist, plan = plan_bundle(data, run_dir, opts.target_spacing, opts.patch_size, opts.network,
                                             opts.ct_window)
                source = describe_data_source(datalist, run_dir)
        except InputError as exc:
            if exc.path == str(run_dir):  # say how to continue a run instead
                raise InputError(run_dir, "exists and is not empty; choose a new --out folder or pass "
                                          "--resume") from exc
            raise
    if weights is not None:
        weights.apply(build_network(plan))  # the weights fit the plan's network (the config applies them again)
    return plan, source, planned, _previous_stage(plan, opts, run_dir, datalist)


def _previous_stage(plan: Plan, opts: TrainOptions, run_dir: Path, datalist: Datalist) -> Path | None:
    """The previous stage's out-of-fold label maps to copy into a cascade stage's bundle (None: none to copy).

    Raises
    ------
    InputError
        ``--previous-stage`` for a plan of one stage, a cascade stage without it (unless its bundle has the maps),
        or a previous stage :func:`~medseg.bundle.cascade.check_previous_stage` refuses.
    """
    if not plan.previous_stage:
        if opts.previous_stage is not None:
            raise InputError(opts.previous_stage, f"--previous-stage is for --configuration 3d_cascade_fullres; this "
                                                  f"plan is {plan.configuration}")
        return None
    if opts.previous_stage is None:
        if (run_dir / PREVIOUS_PREDICTIONS).is_dir():
            return None
        raise InputError(None, f"{plan.configuration} trains on the label maps of its previous stage: give the "
                               f"cross-validation run of {plan.previous_stage} with --previous-stage RUN")
    return check_previous_stage(opts.previous_stage, plan, datalist)


def _planned_budget(opts: TrainOptions, plan: Plan | None) -> TrainOptions:
    """A new run of a plan made for a time budget (``medseg plan --time-budget``, or a CPU plan without one:
    :data:`medseg.planning.DEFAULT_CPU_BUDGET_HOURS`) trains for that budget when no ``--max-minutes`` is
    given, not for its epochs."""
    budget = plan.planning.get("time_budget_hours") if plan is not None else None
    if budget is None or opts.max_minutes is not None:
        return opts
    log.info("training for the plan's time budget: %.0f min (set another with --max-minutes)", budget * 60)
    return replace(opts, max_minutes=float(budget) * 60)


def _planner_options(planner: PlannerOptions, opts: TrainOptions) -> PlannerOptions:
    """The planner's options for ``medseg train --plan auto``: the training device, the time budget
    from ``--max-minutes`` unless one is given, ``--spacing`` and ``--ct-window``.

    Raises
    ------
    InputError
        ``--patch-size`` or a network given with ``--plan auto`` (the planner chooses them).
    """
    if opts.patch_size is not None:
        raise InputError(None, "--patch-size is chosen by the planner with --plan auto; leave it out or use --plan default")
    budget = planner.time_budget_hours
    if budget is None and opts.max_minutes is not None:
        budget = opts.max_minutes / 60
    return replace(planner, device=opts.device, time_budget_hours=budget,
                   target_spacing=planner.target_spacing or opts.target_spacing,
                   ct_window=planner.ct_window or opts.ct_window)


def _check_train_config(run_dir: Path, opts: TrainOptions) -> None:
    """Refuse a ``configs/train.json`` of a medseg before the config named its parts (one call to
    ``train_bundle``), with what to do instead of safe mode's list of unknown targets; refuse an option
    such a config would ignore (:data:`NEWER_OPTIONS`)."""
    path = run_dir / TRAIN_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return  # missing or unreadable: the runner says so
    if isinstance(config, dict) and "train" not in config and "train_bundle" in json.dumps(config.get("run")):
        raise BundleError(f"{path}: written by an older medseg (training was one call to train_bundle); replace "
                          "it with the train.json of a bundle made by this version (medseg bundle init)")
    for key, flag in NEWER_OPTIONS.items():
        if getattr(opts, key) is not None and isinstance(config, dict) and key not in config:
            raise InputError(path, f"written by an older medseg, it does not read {flag} ({key}); add the "
                             f"'{key}' key or train a bundle made by this version")


def train(data: str | os.PathLike[str], run_dir: str | os.PathLike[str], options: TrainOptions | None = None,
          bundle: bool = False, planner: PlannerOptions | None = None) -> dict[str, Any]:
    """``medseg train``: write a bundle for the MSD dataset ``data`` into ``run_dir`` (plan derived from
    the data: the default plan, or with ``planner`` the planner's, see :func:`_planner_options`), then
    run its ``configs/train.json`` (a planned plan's config takes ``plan.batch_size`` patches per
    iteration unless ``options.batch_size`` is given). With ``bundle=True`` (or ``options.resume``),
    ``run_dir`` is an existing bundle whose plan is used as it is. Nothing is written before every
    input has been checked; a run that fails before its first checkpoint leaves ``run_dir`` as it
    found it. The run's clock (``pace#started``) starts with this call, so that a ``max_minutes``
    budget counts the checks and the planning too.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1): the processes join one process group, the main
    process (rank 0) checks the inputs and writes the bundle while the others wait, then every process
    runs ``configs/multi_gpu_train.json`` layered on ``configs/train.json``
    (:mod:`medseg.engines.distributed`); only the main process writes into ``run_dir``.

    Returns the training summary (also written to ``train_summary.json``).

    Raises
    ------
    InputError
        Invalid dataset (see :func:`medseg.data.datalist.validate_datalist`) or options (see
        :func:`medseg.engines.options.check_options`, :func:`medseg.planning.check_planner_options`),
        ``planner`` with ``bundle`` or ``--resume``, a plan the planner cannot make, a non-empty run folder without ``--resume``,
        a trained bundle without ``--resume``, ``--init-weights`` that are not a loadable state dict
        or do not fit the network.
    BundleError
        ``--resume`` with a missing or unreadable checkpoint, ``bundle=True`` without a plan, with
        unreadable metadata or with a config refused by safe mode.
    """
    started = time.monotonic()  # a time budget counts the checks and the planning too
    opts = options or TrainOptions()
    run_dir = Path(run_dir)
    distributed = init_distributed(opts.device)  # started by torchrun: join the other processes first
    if distributed and not is_main_process():
        return _train_other_process(data, run_dir, started)
    try:
        with held_info():  # notes on the plan and data are printed once every input has passed its checks
            plan, data_source, planned, previous = _check_inputs(data, run_dir, opts, bundle, planner)
            opts = _planned_budget(opts, None if opts.resume else plan)
    except BaseException as exc:
        share_from_main(_MainFailed(str(exc)))
        raise
    guard = RunFolderGuard(run_dir)
    try:
        with held_info():  # until the config has built its parts (run_training releases it): an error is one line
            try:
                _write_checked(run_dir, plan, data_source, planned, previous)
            except BaseException as exc:
                share_from_main(_MainFailed(str(exc)))
                raise
            share_from_main(opts)  # the bundle is written: the other processes read it
            _run_train_config(run_dir, {**train_overrides(data, opts), "pace#started": started},
                              MULTI_GPU_CONFIG if distributed else "train")
    except BaseException:
        trained = any((run_dir / p).exists() for p in (LAST_CHECKPOINT, WEIGHTS_FILE))
        if data_source is not None and not trained:  # the new bundle goes too (the run removed its own files)
            guard.rollback()
        raise
    summary: dict[str, Any] = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    return summary


def write_run(data: str | os.PathLike[str], run_dir: str | os.PathLike[str], options: TrainOptions,
              planner: PlannerOptions | None = None) -> None:
    """The first half of :func:`train` for a new run: check every input, then write the bundle into ``run_dir``
    (the planner's with ``planner``, else the default plan; a cascade stage's previous label maps) without
    training it; ``train(data, run_dir, options, bundle=True)`` trains it. Cross-validation plans this way once
    before its folds train (in parallel, :func:`medseg.bundle.crossval.train_folds`). A failure while writing
    leaves ``run_dir`` as it found it.

    Raises
    ------
    InputError
        What :func:`train` raises for its inputs (``--resume`` is refused: this writes a new run).
    """
    run = Path(run_dir)
    if options.resume:
        raise InputError(run, "a new run is written here; --resume continues one that exists")
    with held_info():
        plan, data_source, planned, previous = _check_inputs(data, run, options, False, planner)
    guard = RunFolderGuard(run)
    try:
        _write_checked(run, plan, data_source, planned, previous)
    except BaseException:
        guard.rollback()
        raise


def _write_checked(run_dir: Path, plan: Plan, data_source: str | None, planned: PlannedBundle | None,
                   previous: Path | None) -> None:
    """Write what :func:`_check_inputs` returned: a new run's bundle (the planner's, or ``plan``'s: ``data_source``
    is set for a new run, None for an existing bundle, which is left as it is) and a cascade stage's previous
    label maps."""
    if planned is not None:
        write_planned(run_dir, planned, data_source)
    elif data_source is not None:
        write_bundle(run_dir, plan, name=run_dir.name, data_source=data_source)
    if previous is not None:
        copy_previous_maps(previous, run_dir)


class _MainFailed:
    """What the main process sends the others when it fails before training (its error, one line)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _train_other_process(data: str | os.PathLike[str], run_dir: Path, started: float) -> dict[str, Any]:
    """``medseg train`` in a process other than the main one (``torchrun``): wait for the main process
    to check the inputs and write the bundle, then run its ``configs/multi_gpu_train.json`` with the
    main process's options; returns the summary the main process wrote.

    Raises
    ------
    MedsegError
        The main process failed before training (it reports why).
    """
    shared = share_from_main(None)
    if not isinstance(shared, TrainOptions):
        message = shared.message if isinstance(shared, _MainFailed) else "no options received"
        raise MedsegError(f"{run_dir}: the main training process stopped before training ({message})")
    _run_train_config(run_dir, {**train_overrides(data, shared), "pace#started": started}, MULTI_GPU_CONFIG)
    summary: dict[str, Any] = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    return summary


def _run_train_config(run_dir: Path, overrides: dict[str, Any], config: str = "train") -> None:
    """``configs/train.json`` (or ``config``: ``multi_gpu_train``, layered on it) through
    :func:`medseg.bundle.runner.run_bundle` (safe mode). A failure inside training that is not bad
    input stays an internal error (the runner reports it as the bundle's): its root cause is raised."""
    try:
        run_bundle(run_dir, config, overrides)
    except BundleError as exc:
        cause = root_cause(exc.__cause__) if exc.__cause__ is not None else None
        if cause is not None and not isinstance(cause, MedsegError):
            raise cause from None
        raise


def check_trainable(bundle_root: str | os.PathLike[str]) -> None:
    """Check, before training, that the bundle's metadata can record the result
    (:func:`medseg.bundle.create.read_trainable_metadata`); ``initialize`` of ``configs/train.json``.

    Raises
    ------
    BundleError
        Missing or unreadable metadata, a version that is not MAJOR.MINOR.PATCH, a bad changelog.
    """
    read_trainable_metadata(bundle_root)


def record_training_run(bundle_root: str | os.PathLike[str]) -> str:
    """Record the training that ``train_summary.json`` describes in the bundle's metadata and docs
    (:func:`medseg.bundle.create.record_training`); ``finalize`` of ``configs/train.json``. Returns
    the new version (an empty string in a training process other than the main one, which records nothing).

    Raises
    ------
    BundleError
        No readable summary, plan or metadata.
    """
    root = Path(bundle_root)
    if not is_main_process():  # training on several processes: the main one records the run
        return ""
    path = root / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        epochs, iterations = int(summary["epochs_completed"]), int(summary["iterations"])
        epoch_length, best = int(summary["epoch_length"]), summary["best_val_mean_dice"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"{path}: no training summary to record ({type(exc).__name__})") from exc
    plan = load_plan(root)
    dataset = summary.get("dataset") or {}
    data_source = (describe_dataset(dataset["name"], dataset["path"], dataset["training_cases"], root)
                   if dataset else "unspecified")
    note = (f"{'continued (--resume) to' if summary.get('resumed') else 'trained'} {epochs} epoch{'s' * (epochs != 1)} "
            f"({iterations} iterations of {epoch_length} per epoch"
            f"{'' if iterations % epoch_length == 0 else ', the last epoch partly'}) on {data_source}"
            f"{'' if summary.get('init_weights') is None else ', starting from --init-weights'}; stopped by "
            f"{summary.get('stopped_by', 'epochs')}; best validation mean Dice {'n/a' if best is None else f'{best:.4f}'} "
            f"at epoch {summary.get('best_epoch', 0)} on {summary.get('validation_cases', 0)} validation cases "
            f"(fold {summary.get('fold', 0)})")
    return record_training(root, plan, mean_dice=best, per_label=summary.get("best_val_dice_per_label") or {},
                           note=note, data_source=data_source)
