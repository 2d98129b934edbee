"""The previous stage of a cascade stage's run (``medseg train --configuration 3d_cascade_fullres --previous-stage
RUN``): RUN is a cross-validated run of the previous stage's configuration (``3d_lowres``, ``medseg train --fold
all``), whose out-of-fold label maps (``RUN/cv/predictions``) the cascade stage trains on: each training case's map
comes from the fold that held the case out, as nnU-Net's cascade trains on its lowres stage's cross-validation.
They are copied into each bundle of the stage (``previous/predictions``), which its ``configs/train.json`` reads
and its cross-validation predicts with."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from medseg.bundle.ensembles import copy_member, member_files
from medseg.data.datalist import Datalist
from medseg.errors import InputError
from medseg.io.image import case_name, list_images
from medseg.layout import PLAN_FILE, PREVIOUS_DIR, PREVIOUS_PREDICTIONS, WEIGHTS_FILE
from medseg.plan import Plan, load_plan

__all__ = ["attach_previous_model", "check_previous_stage", "copy_previous_maps"]

log = logging.getLogger(__name__)


def check_previous_stage(run: str | os.PathLike[str], plan: Plan, datalist: Datalist) -> Path:
    """The folder of the out-of-fold label maps of ``run``, checked to be the previous stage of ``plan`` for the
    cases of ``datalist``.

    Raises
    ------
    InputError
        (naming ``run``) Not a cross-validation run, another configuration than ``plan.previous_stage``, other labels,
        or a training case without its out-of-fold label map (its fold not trained).
    """
    root = Path(run)
    plans = sorted(root.glob(f"fold_[0-9]/{PLAN_FILE.as_posix()}"))
    if not root.is_dir() or not plans:
        raise InputError(root, "not a cross-validation run (fold_K/configs/plan.json) of the previous stage; train one "
                               f"with medseg train --configuration {plan.previous_stage} --fold all")
    previous = load_plan(plans[0].parent.parent)
    if previous.configuration != plan.previous_stage:
        raise InputError(root, f"a run of {previous.configuration}; the previous stage of {plan.configuration} is "
                               f"{plan.previous_stage}")
    if dict(previous.labels) != dict(plan.labels):
        raise InputError(root, f"its labels {previous.labels} differ from the dataset's {plan.labels}")
    folder = root / "cv" / "predictions"
    found = {case_name(p)[: -len("_seg")] for p in list_images(folder)} if folder.is_dir() else set()
    missing = [case.name for case in datalist.training if case.name not in found]
    if missing:
        raise InputError(root, f"no out-of-fold label map of {len(missing)} training case(s) ({', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}) in cv/predictions: finish its folds first "
                               "(medseg train --fold all --resume)")
    return folder


def copy_previous_maps(folder: Path, bundle: str | os.PathLike[str]) -> Path:
    """Copy the label maps of ``folder`` into ``bundle/previous/predictions`` (replacing an older copy); returns it."""
    target = Path(bundle) / PREVIOUS_PREDICTIONS
    staging = target.parent / ".predictions.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in list_images(folder):
        shutil.copy2(path, staging / path.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("previous stage: %d label map(s) from %s copied into %s", len(list_images(target)), folder, target)
    return target


def attach_previous_model(run: str | os.PathLike[str], previous: str | os.PathLike[str]) -> Path:
    """Copy the trained folds of the previous stage's cross-validation run ``previous`` into the cascade stage's
    run folder as ``run/previous/`` (a bundle of their fold ensemble: its plan and inference config, each fold's
    configs and weights), what the stage's bundle predicts the previous label map of a new image with; returns it.

    Raises
    ------
    InputError
        ``previous`` has no trained fold.
    """
    source = Path(previous)
    folds = [k for k in range(10) if (source / f"fold_{k}" / WEIGHTS_FILE).is_file()]
    if not folds:
        raise InputError(source, "no trained fold (fold_K/models/model.pt) of the previous stage here")
    plan = load_plan(source / f"fold_{folds[0]}")
    copy_member(Path(run), source, folds, member_files(plan, folds), relative=PREVIOUS_DIR)
    log.info("previous stage: folds %s of %s copied into %s", folds, source, Path(run) / PREVIOUS_DIR)
    return Path(run) / PREVIOUS_DIR
