"""Five-fold cross-validation of one plan: ``medseg train --fold all`` (or ``--fold 0,2``).

A cross-validation run folder holds one bundle per fold and what the folds say together::

    RUN/fold_0/ ... fold_4/         each a complete run folder (a MONAI bundle: configs, models, logs),
                                    all of one plan: the first fold trained makes it (the planner, or the
                                    default plan), the others copy its configs/plan.json
    RUN/cv/predictions/             out-of-fold label maps: every training case predicted by the fold
                                    that held it out (<case>_seg.<ext>, in the case's own grid)
    RUN/cv/fold_K.json              fold K's record, written once its model and predictions are complete:
                                    its cases and their Dice and HD95 per label, the device it trained on
    RUN/cv_summary.json             per fold and over all out-of-fold cases: Dice and HD95 per label, mean
    RUN/previous/                   a cascade stage's (--previous-stage): its previous stage's folds, the model its
                                    bundle predicts new images' previous label maps with (each fold keeps the
                                    out-of-fold maps it trains on in fold_K/previous/predictions)

The plan is made once, into the first fold's folder (the planner, or the default plan), before any fold
trains. The folds train one after another on one device, or in parallel with several devices
(``--device cuda:0,cuda:1``: one process per device, :mod:`medseg.bundle.fold_pool`), each with the options
given (``--max-minutes`` is each fold's training budget; the planning is not counted in it). A call that fails
before any fold has a checkpoint leaves no run folder behind. The same command with ``--resume`` continues a
stopped run: folds with a record are skipped, a fold with a checkpoint resumes from it, a fold without one
starts again; predictions finished before the stop are not made again (:func:`medseg.bundle.pipeline.predict`
records each case).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medseg.bundle.cascade import attach_previous_model
from medseg.bundle.create import describe_data_source, write_bundle
from medseg.bundle.fold_pool import run_on_devices, worker_threads
from medseg.bundle.pipeline import InferenceOptions, predict
from medseg.bundle.training import train, write_run
from medseg.data.datalist import load_datalist
from medseg.devices import resolve_device
from medseg.engines.data import find_training_cases, training_datalist, training_split
from medseg.engines.options import TrainOptions
from medseg.engines.rundir import RunFolderGuard
from medseg.engines.training import SUMMARY_FILE
from medseg.errors import InputError
from medseg.inference.cases import InputCase, write_manifest
from medseg.io.atomic import atomic_write_text
from medseg.layout import LAST_CHECKPOINT, PLAN_FILE, WEIGHTS_FILE
from medseg.metrics.evaluate import pair_spacings
from medseg.metrics.labelmaps import read_label_map
from medseg.metrics.overlap import label_metrics
from medseg.plan import Plan, load_plan
from medseg.planning import PlannerOptions

__all__ = ["CV_SUMMARY", "FOLDS", "parse_folds", "train_folds"]

log = logging.getLogger(__name__)

#: Folds of :func:`medseg.data.datalist.split_cases` (fewer when there are fewer training cases).
FOLDS = 5
#: The summary of a cross-validation run, in its folder.
CV_SUMMARY = "cv_summary.json"


def parse_folds(text: str) -> list[int]:
    """``all`` (folds 0-4) or a comma-separated list such as ``0,2`` (sorted, each once).

    Raises
    ------
    InputError
        Anything else, or a fold outside 0-4.
    """
    if text.strip() == "all":
        return list(range(FOLDS))
    try:
        folds = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise InputError(None, f"--fold takes a fold 0-{FOLDS - 1}, a list such as 0,2, or all; got {text!r}") from None
    if not folds or any(not 0 <= fold < FOLDS for fold in folds):
        raise InputError(None, f"--fold: folds are 0-{FOLDS - 1}, got {text!r}")
    return folds


def fold_dir(run_dir: Path, fold: int) -> Path:
    return run_dir / f"fold_{fold}"


def _record_path(run_dir: Path, fold: int) -> Path:
    return run_dir / "cv" / f"fold_{fold}.json"


def train_folds(data: str | os.PathLike[str], run_dir: str | os.PathLike[str], folds: Sequence[int],
                options: TrainOptions | None = None, planner: PlannerOptions | None = None,
                inference: InferenceOptions | None = None, devices: Sequence[str] | None = None) -> dict[str, Any]:
    """Train ``folds`` of one plan into ``run_dir`` (see the module docstring), predict each fold's held-out
    cases, and write ``cv_summary.json``; returns the summary. ``devices`` (more than one): the folds train in
    parallel, one process per device (:func:`medseg.bundle.fold_pool.run_on_devices`); the plan is made first,
    for the first device (``options.device`` is ignored then).

    Raises
    ------
    InputError
        A non-empty ``run_dir`` without ``options.resume``, ``--resume`` of a folder that is no cross-validation
        run, fewer training cases than folds asked for, a device that is not available, and everything
        :func:`medseg.bundle.training.train` raises for the first fold (bad dataset or options: nothing is
        written then); a fold that failed on its device (named).
    """
    opts = options or TrainOptions()
    if devices:
        for device in devices:
            resolve_device(device)  # each one available, before anything is read or written
        opts = replace(opts, device=devices[0])
    run = Path(run_dir)
    inference = inference or InferenceOptions(device=opts.device)
    if opts.resume:
        if not any(fold_dir(run, f).is_dir() for f in range(FOLDS)):
            raise InputError(run, "no fold_K folder of a cross-validation run here to resume")
    elif run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise InputError(run, "exists and is not empty; choose a new --out folder or pass --resume")
    cases = len(load_datalist(data).training)
    if max(folds) >= min(FOLDS, cases):  # split_cases makes min(5, cases) folds; a higher one would repeat one
        raise InputError(data, f"{cases} training case(s) make {min(FOLDS, cases)} folds (0-{min(FOLDS, cases) - 1}); "
                               f"fold {max(folds)} does not exist")
    pending = [fold for fold in folds if not _skipped(run, fold)]
    plan_source = next((fold_dir(run, f) for f in range(FOLDS) if (fold_dir(run, f) / PLAN_FILE).exists()),
                       None)
    guard = None if opts.resume else RunFolderGuard(run)
    try:
        if plan_source is None and pending:  # the first fold's bundle is planned (the planner, or the default plan)
            plan_source = fold_dir(run, pending[0])
            with worker_threads(devices or ()):  # timed with the threads of one worker (cpu,cpu: half the cores)
                write_run(data, plan_source, replace(opts, fold=pending[0], resume=False), planner)
            log.info("fold %d: planned -> %s; the other folds train its plan", pending[0], plan_source)
        if pending:
            assert plan_source is not None
            job = functools.partial(_fold_job, data, run, opts, inference, plan_source)
            if devices and len(devices) > 1:
                run_on_devices(job, pending, devices)
            else:
                for fold in pending:
                    job(fold, opts.device)
    except BaseException:
        if guard is not None and not _trained_any(run):  # nothing worth keeping: the run leaves no folder behind
            guard.rollback()
        raise
    if opts.previous_stage is not None:  # a cascade stage: the previous stage's model, to predict new images with
        attach_previous_model(run, opts.previous_stage)
    summary = _summary(run)
    atomic_write_text(run / CV_SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _trained_any(run: Path) -> bool:
    """Whether some fold of ``run`` has a checkpoint or weights (what a failed call keeps for ``--resume``)."""
    return any((fold_dir(run, f) / name).exists() for f in range(FOLDS) for name in (LAST_CHECKPOINT, WEIGHTS_FILE))


def _skipped(run: Path, fold: int) -> bool:
    """Whether fold ``fold`` finished in an earlier call (its record)."""
    if _record_path(run, fold).exists():
        log.info("fold %d: done earlier (%s), skipped", fold, _record_path(run, fold))
        return True
    return False


def _fold_job(data: str | os.PathLike[str], run: Path, opts: TrainOptions, inference: InferenceOptions,
              plan_source: Path, fold: int, device: str) -> None:
    """Train fold ``fold`` on ``device`` (the plan of ``plan_source``) and predict and score its held-out cases."""
    opts, inference = replace(opts, device=device), replace(inference, device=device)
    trained = _train_fold(data, fold_dir(run, fold), fold, opts, plan_source)
    # a fold trained now predicts all its held-out cases again; one trained before resumes its predictions
    _held_out(data, run, fold, inference, overwrite=trained, device=device)


def _train_fold(data: str | os.PathLike[str], target: Path, fold: int, opts: TrainOptions, plan_source: Path) -> bool:
    """Train fold ``fold`` on the plan of ``plan_source`` unless its training finished before (its
    ``train_summary.json``): resumed from its checkpoint; the bundle that holds the plan trained in place; another
    fold started afresh (a fold folder a stopped run left without a checkpoint holds only what this run wrote, and
    is removed first). Returns whether it trained now."""
    if (target / SUMMARY_FILE).exists():
        log.info("fold %d: trained earlier (%s)", fold, target / SUMMARY_FILE)
        return False
    if (target / LAST_CHECKPOINT).exists():
        log.info("fold %d: resuming from %s", fold, target / LAST_CHECKPOINT)
        train(data, target, replace(opts, fold=fold, resume=True))
        return True
    if target != plan_source:
        if target.exists():
            shutil.rmtree(target)
        plan = load_plan(plan_source)
        datalist = training_datalist(data, plan)
        write_bundle(target, plan, name=target.name, data_source=describe_data_source(datalist, target))
    log.info("fold %d: training -> %s", fold, target)
    train(data, target, replace(opts, fold=fold, resume=False), bundle=True)
    return True


def _held_out(data: str | os.PathLike[str], run: Path, fold: int, inference: InferenceOptions,
              overwrite: bool, device: str) -> None:
    """Predict fold ``fold``'s validation cases with its model into ``cv/predictions`` (``overwrite``: all of
    them again, else those not finished before) and record its scores."""
    target = fold_dir(run, fold)
    plan = load_plan(target)
    # the cases it held out; the dataset is found, not validated again (training read every case; prediction and
    # scoring read these and refuse a bad one, naming it)
    split = training_split(find_training_cases(data, plan), target, fold, resume=True)
    cv = run / "cv"
    manifest = cv / f"fold_{fold}_cases.csv"
    write_manifest(manifest, [InputCase(case.name, tuple(case.images)) for case in split.validation])
    outputs = predict(target, manifest, cv / "predictions", inference, overwrite=overwrite)
    by_case = {case.name: case for case in split.validation}
    cases = []
    for output in outputs:
        case = by_case[output.name[: output.name.index("_seg.")]]
        assert case.label is not None  # a training case has its label map
        cases.append({"case": case.name, "prediction": os.path.relpath(output, run),
                      "reference": str(Path(case.label).absolute()), **_scores(output, case.label, plan)})
    record = {"fold": fold, "model": os.path.relpath(target / WEIGHTS_FILE, run), "device": device, "cases": cases}
    atomic_write_text(_record_path(run, fold), json.dumps(record, indent=2) + "\n")
    log.info("fold %d: %d held-out case(s) predicted and scored", fold, len(cases))


def _scores(pred: Path, ref: Path, plan: Plan) -> dict[str, dict[str, float | None]]:
    """Dice and HD95 (mm) of each foreground label of ``pred`` against ``ref``.

    Raises
    ------
    InputError
        The two on different grids; a file that is not a label map of the plan's labels.
    """
    spacing = pair_spacings([(pred.name, pred, ref)])[pred.name]  # the grids checked as medseg evaluate checks them
    declared = dict(plan.labels)
    p, r = read_label_map(pred, declared), read_label_map(ref, declared)
    dice: dict[str, float | None] = {}
    hd95: dict[str, float | None] = {}
    for value, name in sorted(declared.items()):
        if value == 0:
            continue
        metrics = label_metrics(p, r, value, spacing)
        dice[name] = round(metrics.dice, 5)
        hd95[name] = None if math.isnan(metrics.hd95_mm) else round(metrics.hd95_mm, 4)  # one map without the label
    return {"dice": dice, "hd95": hd95}


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return round(float(np.mean(finite)), 5) if finite else None


def _aggregate(cases: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(cases[0]["dice"]) if cases else []
    dice = {n: _mean([c["dice"][n] for c in cases]) for n in names}
    hd95 = {n: _mean([c["hd95"][n] for c in cases]) for n in names}
    means = [v for v in dice.values() if v is not None]
    return {"cases": len(cases), "mean_dice": round(float(np.mean(means)), 5) if means else None, "dice": dice,
            "hd95": hd95}


def fold_records(run: Path) -> list[dict[str, Any]]:
    """The records of the folds of the cross-validation run ``run`` that finished (``cv/fold_K.json``), by fold.

    Raises
    ------
    InputError
        A record that is not readable JSON, named.
    """
    records = []
    for fold in range(FOLDS):
        path = _record_path(run, fold)
        if path.exists():
            try:
                records.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(path, f"not a readable fold record ({exc})") from None
    return records


def _summary(run: Path) -> dict[str, Any]:
    """``cv_summary.json`` from the fold records present: per fold and over all their out-of-fold cases."""
    records = fold_records(run)
    every = [case for record in records for case in record["cases"]]
    return {"folds": {str(r["fold"]): {"model": r["model"], **_aggregate(r["cases"])} for r in records},
            "overall": _aggregate(every), "predictions": "cv/predictions",
            "note": "Dice and HD95 (mm) per label, means over the held-out cases (HD95: of the cases where both "
                    "maps hold the label); overall: over every out-of-fold case of the folds trained so far"}
