"""A bundle planned by the planner (``medseg plan``, ``medseg train --plan auto``): the dataset's
fingerprint (``configs/fingerprint.json``), every configuration considered (``configs/plans.json``)
and the chosen configuration's plan (``configs/plan.json``) with the rest of the bundle
(:func:`medseg.bundle.create.write_bundle`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from medseg.bundle.create import describe_data_source, write_bundle
from medseg.data.datalist import Datalist, load_datalist
from medseg.data.fingerprint import extract_fingerprint
from medseg.engines.preprocess import preprocess_cases
from medseg.errors import InputError
from medseg.io.atomic import atomic_write_text
from medseg.plan import load_plan
from medseg.planning import PlannerOptions, PlanningResult, check_planner_options, plan_dataset

__all__ = ["FINGERPRINT_FILE", "PLANS_FILE", "PlannedBundle", "plan_bundle_for", "planned_bundle", "write_planned"]

FINGERPRINT_FILE = Path("configs") / "fingerprint.json"
PLANS_FILE = Path("configs") / "plans.json"


@dataclass
class PlannedBundle:
    """The validated dataset and the planner's result, not yet written."""

    datalist: Datalist
    result: PlanningResult


def planned_bundle(data: str | os.PathLike[str], bundle_dir: str | os.PathLike[str],
                   options: PlannerOptions) -> PlannedBundle:
    """Everything :func:`plan_bundle_for` checks and plans, without writing: the options, an empty or
    new ``bundle_dir``, the dataset (each case read once, by the fingerprint), the plan.

    Raises
    ------
    InputError
        Bad options, ``bundle_dir`` not empty, an invalid dataset, a plan that cannot be made (see
        :func:`medseg.planning.plan_dataset`).
    """
    check_planner_options(options)
    datalist = load_datalist(data)
    bundle = Path(bundle_dir)
    if bundle.exists() and (not bundle.is_dir() or any(bundle.iterdir())):
        raise InputError(bundle, "exists and is not empty; choose a new folder")
    fingerprint = extract_fingerprint(datalist, workers=options.workers)
    return PlannedBundle(datalist, plan_dataset(fingerprint, options))


def write_planned(bundle_dir: str | os.PathLike[str], planned: PlannedBundle, data_source: str | None = None) -> Path:
    """Write the bundle of ``planned`` with its ``fingerprint.json`` and ``plans.json``.

    Raises
    ------
    InputError
        ``bundle_dir`` exists with files in it.
    """
    bundle = Path(bundle_dir)
    source = data_source or describe_data_source(planned.datalist, bundle)
    write_bundle(bundle, planned.result.plan, name=bundle.name, data_source=source)
    planned.result.fingerprint.save(bundle / FINGERPRINT_FILE)
    atomic_write_text(bundle / PLANS_FILE, json.dumps(planned.result.plans, indent=1) + "\n")
    return bundle


def plan_bundle_for(data: str | os.PathLike[str], bundle_dir: str | os.PathLike[str],
                    options: PlannerOptions | None = None, preprocess: bool = False) -> PlanningResult:
    """``medseg plan``: fingerprint the dataset ``data``, plan it for ``options`` and write a bundle
    into ``bundle_dir`` (nothing is written before the plan is made); with ``preprocess``, also cache
    fold 0's cases as training will read them (:func:`medseg.engines.preprocess.preprocess_cases`, in
    ``options.workers`` processes; the bundle stays if that fails: it is complete without the cache).

    Raises
    ------
    InputError
        As :func:`planned_bundle`.
    """
    options = options or PlannerOptions()
    planned = planned_bundle(data, bundle_dir, options)
    write_planned(bundle_dir, planned)
    if preprocess:
        preprocess_cases(load_plan(bundle_dir), data, bundle_dir, fold=0, workers=options.workers)
    return planned.result
