"""``medseg select RUN [RUN ...]``: the configuration, ensemble and postprocessing chosen on out-of-fold Dice.

Each ``RUN`` is a cross-validation run of ``medseg train --fold all`` (one configuration each: a 2d, a 3d_fullres
plan, ...; a 3d_cascade_fullres stage, whose bundle predicts with its 3d_lowres stage's fold ensemble first). Each
run is scored by its mean out-of-fold Dice; so is every pair of runs whose folds held out the same cases: each
held-out case is predicted by that fold of both runs, their probabilities resampled to the case's grid and averaged
(:class:`~medseg.inference.configurations.ConfigurationEnsemble`), into ``FIRST/cv/ensembles/<SECOND>/`` (nnU-Net's
``find_best_configuration`` compares pairs of configurations the same way, from saved probabilities). The best of
runs and pairs is chosen (a pair only when it beats every run); its trained folds become one ensemble (their
probabilities averaged block by block by the bounded-memory inferer); largest-component postprocessing is kept only
where it raises the out-of-fold Dice (:func:`medseg.inference.postprocess.choose_rules`). The chosen run folder
then is a bundle of that ensemble::

    RUN/configs/plan.json             the folds' plan
    RUN/configs/inference.json        medseg's inference config with the fold ensemble (``fold_ensemble``,
                                      ``members``) and the postprocessing rules in its ``postprocessing``
    RUN/configs/evaluate.json         layered on inference.json: the ensemble's predictions of ``imagesTs`` scored
                                      against ``labelsTs`` (``medseg bundle run RUN --config evaluate``)
    RUN/configs/postprocessing.json   the rules and the figures they were chosen on
    RUN/configs/selection.json        every run and pair compared, its out-of-fold Dice, and what was chosen
    RUN/configs/metadata.json, logging.conf, docs/README.md

and, when a pair won, the other run's folds copied into it with the pair's own rules
(:mod:`medseg.bundle.ensembles`: ``configs/ensemble.json``, ``members/<RUN>``): ``medseg predict --model RUN`` runs
the chosen ensemble and postprocessing, the pair included; ``python -m monai.bundle run`` on its inference.json
runs the run's own folds (with the rules chosen for them alone). Selecting again rewrites these files; nothing
else in the runs is changed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.bundle.create import evaluate_config, metadata, readme
from medseg.bundle.crossval import fold_dir, fold_records
from medseg.bundle.ensembles import (
    copy_member,
    ensemble_inference_config,
    member_files,
    remove_ensemble,
    write_ensemble,
)
from medseg.bundle.pipeline import InferencePipeline, inference_pipeline
from medseg.errors import InputError
from medseg.inference.cohort import predict_files
from medseg.inference.configurations import ConfigurationEnsemble
from medseg.inference.postprocess import PostprocessingRules, choose_rules, label_map_pairs, write_rules
from medseg.io.atomic import atomic_write_text
from medseg.layout import PLAN_FILE, POSTPROCESSING_FILE
from medseg.logs import BUNDLE_LOGGING_CONF
from medseg.plan import Plan, load_plan

__all__ = ["ensemble_inference_config", "select_runs"]

log = logging.getLogger(__name__)

C = "medseg.bundle.components"


def _oof_score(run: Path) -> tuple[float, list[dict[str, Any]]]:
    """The mean out-of-fold Dice of a run (over its cases, then its labels) and its fold records.

    Raises
    ------
    InputError
        ``run`` is not a cross-validation run with at least one finished fold.
    """
    if not run.is_dir():
        raise InputError(run, "no such cross-validation run folder")
    records = fold_records(run)
    if not records:
        raise InputError(run, "no finished fold (cv/fold_K.json) here: train it with medseg train --fold all")
    cases = [case for record in records for case in record["cases"]]
    names = list(cases[0]["dice"])
    per_label = [float(np.mean([case["dice"][name] for case in cases])) for name in names]
    return float(np.mean(per_label)), records


def _oof_pairs(run: Path, records: list[dict[str, Any]]) -> list[tuple[str, Path, Path]]:
    """``(case, out-of-fold prediction, reference)`` files of every case of ``records``."""
    return [(case["case"], run / case["prediction"], Path(case["reference"]))
            for record in records for case in record["cases"]]


def select_runs(runs: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Choose among the cross-validation ``runs`` and their pairs, and write the chosen bundle (module docstring);
    returns what ``configs/selection.json`` holds.

    Raises
    ------
    InputError
        No run, a folder that is not a cross-validation run with a finished fold, unreadable fold records or
        out-of-fold predictions, or runs whose label sets differ (they do not segment the same task).
    """
    if not runs:
        raise InputError(None, "name at least one cross-validation run folder")
    scored = []
    for run in (Path(r) for r in runs):
        score, records = _oof_score(run)
        plan = load_plan(fold_dir(run, int(records[0]["fold"])))
        scored.append((run, score, records, plan))
        log.info("%s: %s, %d fold(s), out-of-fold mean Dice %.4f", run, plan.configuration, len(records), score)
    if len({json.dumps(sorted(p.labels.items())) for *_, p in scored}) > 1:
        raise InputError(scored[1][0], f"its labels differ from {scored[0][0]}'s: the runs do not segment one task")
    run, score, records, plan = max(scored, key=lambda item: item[1])
    folds = [int(record["fold"]) for record in records]
    labels = [value for value in plan.labels if value != 0]
    rules = choose_rules(label_map_pairs(_oof_pairs(run, records), plan.labels), labels,
                         source=f"{run.name}/cv/predictions")
    pairs = _pairs(scored, labels)
    best_pair = max(pairs, key=lambda item: item["oof_mean_dice"], default=None)
    selection: dict[str, Any] = {
        "runs": [{"run": str(r), "configuration": p.configuration, "folds": [int(x["fold"]) for x in recs],
                  "oof_mean_dice": round(s, 5)} for r, s, recs, p in scored],
        "pairs": [{key: value for key, value in pair.items() if key != "rules"} for pair in pairs],
        "chosen": {"run": str(run), "configuration": plan.configuration, "folds": folds, "oof_mean_dice": round(score, 5),
                   "ensemble": f"the {len(folds)} fold model(s), probabilities averaged block by block",
                   "postprocessing": _describe(rules),
                   "oof_mean_dice_postprocessed": rules.evidence["mean_dice"]["chosen"]},
        "note": "out-of-fold Dice: each training case predicted by the fold that held it out (a pair: by that fold of "
                "both runs, their probabilities averaged); the fold ensemble's own out-of-fold Dice cannot be "
                "measured (every case has one out-of-fold model); a cascade stage (3d_cascade_fullres) is scored on "
                "the out-of-fold maps of its previous stage, and its bundle predicts with that stage's fold ensemble",
    }
    if best_pair is not None and best_pair["oof_mean_dice"] > score:
        # the bundle lives in the better run of the pair (what the MONAI door runs alone); the other is copied in
        host, other = sorted((item for item in scored if str(item[0]) in best_pair["runs"]), key=lambda item: -item[1])
        first, second = host[0], other[0]
        own = rules if first == run else choose_rules(label_map_pairs(_oof_pairs(first, host[2]), host[3].labels),
                                                      labels, source=f"{first.name}/cv/predictions")
        run, records, plan, member_plan = first, host[2], host[3], other[3]
        folds = [int(record["fold"]) for record in records]
        pair_rules: PostprocessingRules = best_pair["rules"]
        selection["chosen"] = {
            "run": str(run), "members": [str(first), str(second)],
            "configuration": f"{plan.configuration} + {member_plan.configuration}", "folds": folds,
            "oof_mean_dice": best_pair["oof_mean_dice"],
            "ensemble": f"the {len(folds)} fold model(s) of each run, each run's probabilities averaged block by "
                        "block, the two runs' resampled to the input grid and averaged class by class",
            "postprocessing": _describe(pair_rules),
            "oof_mean_dice_postprocessed": pair_rules.evidence["mean_dice"]["chosen"],
            "bundle_door": f"python -m monai.bundle run on {first.name} runs its own folds only, with "
                           f"{_describe(own)}",
        }
        _write_bundle(run, plan, folds, own, selection)
        member_folds = [int(record["fold"]) for record in other[2]]
        relative = copy_member(run, second, member_folds, member_files(member_plan, member_folds))
        write_ensemble(run, [relative], pair_rules)
        return selection
    _write_bundle(run, plan, folds, rules, selection)
    remove_ensemble(run)
    return selection


def _pairs(scored: list[tuple[Path, float, list[dict[str, Any]], Plan]], labels: list[int]) -> list[dict[str, Any]]:
    """Every pair of runs whose folds held out the same cases: their out-of-fold ensemble (each case predicted by
    that fold of both runs, :class:`~medseg.inference.configurations.ConfigurationEnsemble`) into
    ``FIRST/cv/ensembles/<SECOND>/``, its mean Dice and the postprocessing chosen on it."""
    found = []
    for i, (first, _, records, plan) in enumerate(scored):
        for second, _, other, _ in scored[i + 1:]:
            if _held_out(records) != _held_out(other):
                log.info("%s and %s: their folds hold out different cases; not ensembled", first, second)
                continue
            pairs = _pair_predictions(first, second, records)
            rules = choose_rules(label_map_pairs(pairs, plan.labels), labels,
                                 source=f"{first.name}/cv/ensembles/{second.name}")
            score = float(rules.evidence["mean_dice"]["none"])
            log.info("%s + %s: out-of-fold mean Dice %.4f", first, second, score)
            found.append({"runs": [str(first), str(second)], "oof_mean_dice": score,
                          "postprocessing": _describe(rules), "rules": rules,
                          "oof_mean_dice_postprocessed": rules.evidence["mean_dice"]["chosen"]})
    return found


def _ensemble_of(pipelines: list[InferencePipeline]) -> ConfigurationEnsemble:
    return ConfigurationEnsemble([pipeline.predictor() for pipeline in pipelines])


def _held_out(records: list[dict[str, Any]]) -> dict[int, list[str]]:
    return {int(record["fold"]): sorted(case["case"] for case in record["cases"]) for record in records}


def _pair_predictions(first: Path, second: Path, records: list[dict[str, Any]]) -> list[tuple[str, Path, Path]]:
    """``(case, prediction, reference)`` of every held-out case, predicted by the two runs' models of its fold."""
    out = first / "cv" / "ensembles" / second.name
    references = {case["case"]: Path(case["reference"]) for record in records for case in record["cases"]}
    found: list[tuple[str, Path, Path]] = []
    for record in records:
        fold = int(record["fold"])
        pipelines = [inference_pipeline(fold_dir(run, fold)) for run in (first, second)]
        outputs = predict_files(
            pipelines[0].plan, functools.partial(_ensemble_of, pipelines),
            first / "cv" / f"fold_{fold}_cases.csv", out, model=fold_dir(first, fold),
            settings={"ensemble": [str(fold_dir(first, fold)), str(fold_dir(second, fold))]})
        for output in outputs:
            case = output.name[: output.name.index("_seg.")]
            found.append((case, output, references[case]))
    return found


def _describe(rules: PostprocessingRules) -> str:
    steps = (["largest component of the foreground"] if rules.foreground_largest_component else []) + \
        [f"largest component of label {v}" for v in rules.largest_component_labels]
    return ", ".join(steps) or "none (no step raised the out-of-fold Dice)"


def _write_bundle(run: Path, plan: Plan, folds: list[int], rules: PostprocessingRules,
                  selection: dict[str, Any]) -> None:
    """The chosen run's bundle files (module docstring); each written atomically."""
    configs = run / "configs"
    plan.save(run / PLAN_FILE)
    write_rules(rules, run / POSTPROCESSING_FILE)
    atomic_write_text(configs / "inference.json",
                      json.dumps(ensemble_inference_config(folds, rules.changes_anything), indent=2) + "\n")
    atomic_write_text(configs / "evaluate.json", json.dumps(evaluate_config(), indent=2) + "\n")
    atomic_write_text(configs / "selection.json", json.dumps(selection, indent=2) + "\n")
    name = run.name
    description = (f"{plan.dims}D {plan.network.title}: ensemble of folds {', '.join(map(str, folds))} of a "
                   "cross-validation run, chosen and postprocessed on out-of-fold Dice by medseg select")
    source = f"the training cases of the cross-validation run's folds ({len(folds)} fold(s))"
    meta = metadata(plan, name, description, source,
                    eval_metrics={"oof_mean_dice": selection["chosen"]["oof_mean_dice"],
                                  "oof_mean_dice_postprocessed": selection["chosen"]["oof_mean_dice_postprocessed"]})
    atomic_write_text(configs / "metadata.json", json.dumps(meta, indent=2) + "\n")
    atomic_write_text(configs / "logging.conf", BUNDLE_LOGGING_CONF)
    text = readme(plan, name, description, source) + (
        f"\n## Selection\n\nOut-of-fold mean Dice {selection['chosen']['oof_mean_dice']:.4f} "
        f"(postprocessed: {selection['chosen']['oof_mean_dice_postprocessed']:.4f}); postprocessing: "
        f"{selection['chosen']['postprocessing']}. Runs compared: "
        + "; ".join(f"{r['run']} ({r['configuration']}, {r['oof_mean_dice']:.4f})" for r in selection["runs"]) + ".\n")
    atomic_write_text(run / "docs" / "README.md", text)
    log.info("%s: ensemble of folds %s, postprocessing %s", run, folds, _describe(rules))
