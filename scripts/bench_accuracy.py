#!/usr/bin/env python
"""Accuracy side by side: medseg and nnU-Net v2 trained on one dataset, same device, threads and wall-clock budget.

The dataset (MSD ``dataset.json``, as ``medseg synth`` writes) is converted to nnU-Net's raw layout in a work
folder; nnU-Net v2 runs from its own venv (created here if missing, torch pinned to the project's wheel) with
``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` in that folder. With ``--minutes M`` both systems train
on the CPU for M minutes (medseg with ``--max-minutes``; nnU-Net fold 0 with a trainer subclass that stops at the
budget, see ``scripts/nnunet_peer.py``), predict the labelled test cases (imagesTs/ + labelsTs/) and are scored
by ``medseg evaluate`` (geometry checked). With ``--compare-plans`` medseg's plan for a CUDA device with 8 GB
and nnU-Net's 3d_fullres plan are compared (no GPU needed), with planning and preprocessing times.

    .venv/bin/python scripts/bench_accuracy.py --data DIR/dataset.json [--minutes M] [--threads T]
        [--systems planned,default,nnunet] [--jobs J] [--compare-plans] [--tta] [--nnunet-venv PATH]
        [--folds K [--ensemble]] [--work DIR] [--keep] --json FILE

``--systems`` names what trains: ``planned`` (medseg's planner, CPU plan for the budget), ``default``
(``medseg train --plan default``), ``nnunet``; ``--jobs J`` trains J of them at a time, each pinned to its
own T cores (so ``--jobs 2 --threads 1`` on two cores gives each system one core, its data loading included).

The JSON is a list of records with ``system`` ("medseg" or "nnunet") and ``dataset``; plan records
(``kind: plan``) add configuration, spacing, patch_size, batch_size, n_stages and seconds; training records
(``kind: training``; medseg's with ``variant`` "planned" or "default") add minutes, optimizer, iterations,
seconds_per_iteration, mean_dice, dice and hd95 per label name, preprocess_seconds and predict_seconds.
Spacing and patch are in the image's voxel axis order (x, y, z).

With ``--folds K`` each system trains K folds of its own split for ``--minutes`` each: medseg ``medseg train --fold
0,..,K-1`` then ``medseg select``; nnU-Net ``nnUNetv2_train`` fold by fold (each validated after its budget) then
``nnUNetv2_find_best_configuration`` (its out-of-fold Dice and the postprocessing chosen on it; one configuration,
3d_fullres, so nothing to ensemble across). The out-of-fold predictions of both are scored by ``medseg evaluate``
against the training label maps (``oof_mean_dice``). The test cases are predicted by fold 0 (``fold0_*``) and, with
``--ensemble``, by the K folds with the chosen postprocessing (``medseg predict --model RUN``; ``nnUNetv2_predict -f
0 .. K-1`` then ``nnUNetv2_apply_postprocessing``): then ``mean_dice`` and ``dice`` are the ensemble's.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nnunet_peer import Peer, PeerError, RawDataset, convert_dataset, pinned, plan_record

from medseg.data.datalist import load_datalist
from medseg.errors import MedsegError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".venv-nnunet"
MEDSEG_DEFAULT_BATCH = 2  # medseg train's batch size when the plan does not record one


class BenchError(Exception):
    """A step of the benchmark failed; ``exit_code`` 2 for bad input, 1 for a failing tool."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- medseg ----------------------------------------------------------------------------------------------------
def medseg_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def run_medseg(args: list[str], log: Path, threads: int, cores: frozenset[int] | None = None) -> float:
    """``python -m medseg ARGS`` (output to ``log``), on ``cores`` when given; its wall-clock seconds.

    Raises
    ------
    BenchError
        It exited non-zero (the message ends with its last lines).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call([sys.executable, "-m", "medseg", *args], stdout=out, stderr=subprocess.STDOUT,
                               env=medseg_env(threads), preexec_fn=pinned(cores))
    seconds = time.monotonic() - started
    if code != 0:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        raise BenchError(f"medseg {' '.join(args[:2])} exited with {code}:\n" + "\n".join(lines[-8:]))
    return seconds


@functools.cache
def _plan_help() -> str | None:
    """``medseg plan --help`` of this medseg (asked once), None when it has no ``medseg plan``."""
    done = subprocess.run([sys.executable, "-m", "medseg", "plan", "--help"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def has_plan_command() -> bool:
    """Whether this medseg has ``medseg plan`` (the planner); without it plans come from ``bundle init``."""
    return _plan_help() is not None


def has_preprocess_option() -> bool:
    """Whether this medseg's ``medseg plan`` has ``--preprocess`` (else training preprocesses on first use)."""
    return "--preprocess" in (_plan_help() or "")


def medseg_plan_args(data: Path, bundle: Path, device: str, memory_gb: float | None = None,
                     budget_minutes: float | None = None, planner: bool = True) -> list[str]:
    """The command that writes a planned bundle: ``medseg plan`` when present, else ``medseg bundle init``."""
    if not planner:
        return ["bundle", "init", "--data", str(data), "--out", str(bundle)]
    args = ["plan", "--data", str(data), "--out", str(bundle), "--device", device]
    if memory_gb is not None:
        args += ["--memory-gb", f"{memory_gb:g}"]
    if budget_minutes is not None:
        args += ["--time-budget", f"{budget_minutes / 60:.4g}"]
    return args


def medseg_plan_record(plan: dict[str, Any]) -> dict[str, Any]:
    """The compared fields of a medseg ``configs/plan.json`` (any schema version since medseg-plan/1)."""
    network = plan.get("network", {})
    name = network.get("name", "unet")
    if name == "dynunet":
        stages = len(network.get("kernel_sizes") or network.get("filters") or [])
    elif name == "segresnet":
        stages = len(network.get("blocks_down") or [])
    else:
        stages = len(network.get("channels") or [])
    dims = int(plan.get("dims", len(plan.get("patch_size", [])) or 3))
    return {
        "configuration": plan.get("configuration") or ("3d_fullres" if dims == 3 else "2d"),
        "spacing": [round(float(s), 4) for s in plan["target_spacing"]],
        "patch_size": [int(p) for p in plan["patch_size"]],
        "batch_size": int(plan.get("batch_size") or MEDSEG_DEFAULT_BATCH),
        "n_stages": stages or None,
        "network": name,
        # the CPU training precision the planner recorded (plans before it: float32)
        "precision": ((plan.get("planning") or {}).get("precision") or {}).get("name", "float32"),
    }


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: {what} could not be read ({exc})") from None


def evaluate(pred: Path, raw: RawDataset, data: Path, out: Path, threads: int, logs: Path, system: str,
             cores: frozenset[int] | None = None) -> dict:
    """``medseg evaluate`` of ``pred`` against the test reference label maps; its ``summary.json``."""
    run_medseg(["evaluate", "--pred", str(pred), "--ref", str(raw.test_labels), "--labels", str(data),
                "--out", str(out)], logs / f"{system}-evaluate.log", threads, cores)
    return read_json(out / "summary.json", "the evaluation summary")


# -- records ---------------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


def training_record(system: str, dataset: str, minutes: float, threads: int, run: dict[str, Any],
                    evaluation: dict[str, Any]) -> dict[str, Any]:
    """One training record from a run's figures (``iterations``, ``seconds``: the system's own time of its
    budgeted run, ``preprocess_seconds``, ``predict_seconds``) and a ``medseg evaluate`` summary."""
    labels = evaluation.get("labels", {})
    iterations = int(run["iterations"])
    return {
        "system": system,
        "dataset": dataset,
        "kind": "training",
        "minutes": minutes,
        "threads": threads,
        "iterations": iterations,
        "seconds_per_iteration": round(run["seconds"] / iterations, 3) if iterations else None,
        "mean_dice": _number(evaluation.get("mean_dice_foreground")),
        "dice": {entry["name"]: _number(entry["dice"]["mean"]) for entry in labels.values()},
        "hd95": {entry["name"]: _number(entry["hd95_mm"]["mean"]) for entry in labels.values()},
        "preprocess_seconds": round(run["preprocess_seconds"], 1),
        "predict_seconds": round(run["predict_seconds"], 1),
        "train_seconds": round(run["seconds"], 1),
        "test_cases": evaluation.get("cases"),
        **{k: v for k, v in run.items() if k not in ("iterations", "seconds", "preprocess_seconds", "predict_seconds")},
    }


def plan_ratios(medseg: dict[str, Any], nnunet: dict[str, Any]) -> dict[str, Any]:
    """medseg / nnU-Net: spacing per axis, patch volume, plan + preprocessing time."""
    return {
        "spacing": [round(a / b, 3) for a, b in zip(medseg["spacing"], nnunet["spacing"])],
        "patch_volume": round(math.prod(medseg["patch_size"]) / math.prod(nnunet["patch_size"]), 3),
        "plan_and_preprocess_seconds": round(medseg["plan_and_preprocess_seconds"]
                                             / nnunet["plan_and_preprocess_seconds"], 3),
    }


# -- the two parts of the benchmark ----------------------------------------------------------------------------
def compare_plans(data: Path, dataset: str, raw: RawDataset, peer: Peer, work: Path, threads: int) -> list[dict]:
    planner = has_plan_command()
    bundle = work / "medseg-plan"
    args = medseg_plan_args(data, bundle, "cuda", memory_gb=8, planner=planner)
    print(f"medseg: {' '.join(args[:2])} (device cuda, 8 GB)" if planner else "medseg: bundle init (no medseg plan)",
          flush=True)
    seconds = run_medseg(args, work / "logs" / "medseg-plan.log", threads)
    # planning and preprocessing of fold 0's cases (all training cases) in --threads processes, as nnU-Net's
    # plan_and_preprocess does with nnUNet_def_n_proc = --threads
    preprocess = ["--preprocess", "--workers", str(threads)] if planner and has_preprocess_option() else []
    both = run_medseg([*medseg_plan_args(data, work / "medseg-plan-preprocessed", "cuda", memory_gb=8), *preprocess],
                      work / "logs" / "medseg-plan-preprocess.log", threads) if preprocess else seconds
    medseg = {"system": "medseg", "dataset": dataset, "kind": "plan",
              **medseg_plan_record(read_json(bundle / "configs" / "plan.json", "medseg's plan")),
              "plan_seconds": round(seconds, 2), "plan_and_preprocess_seconds": round(both, 2),
              "command": "medseg " + " ".join(args[:2]) + (" --device cuda --memory-gb 8" if planner else "")
                         + (f" [{' '.join(preprocess)}]" if preprocess else "")}
    print("nnU-Net: nnUNetv2_extract_fingerprint + nnUNetv2_plan_experiment", flush=True)
    fingerprint_s, plan_s = peer.plan_only(raw)
    nnunet = {"system": "nnunet", "dataset": dataset, "kind": "plan", **plan_record(peer.plans(raw)),
              "plan_seconds": round(fingerprint_s + plan_s, 2)}
    print("nnU-Net: nnUNetv2_plan_and_preprocess -c 3d_fullres", flush=True)
    nnunet["plan_and_preprocess_seconds"] = round(peer.plan_and_preprocess(raw), 2)
    nnunet["command"] = "nnUNetv2_plan_and_preprocess -c 3d_fullres"
    ratios = plan_ratios(medseg, nnunet)
    return [medseg, nnunet, {"system": "medseg/nnunet", "dataset": dataset, "kind": "plan_ratio", **ratios}]


#: What ``--systems`` may name: medseg with the planner's CPU plan for the budget, medseg with its default plan
#: (the fixed small U-Net and AdamW recipe of ``medseg train --plan default``), nnU-Net v2's 3d_fullres.
SYSTEMS = ("planned", "default", "nnunet")


def train_medseg(data: Path, raw: RawDataset, work: Path, minutes: float, threads: int, tta: bool, variant: str,
                 cores: frozenset[int] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """medseg ``variant`` ("planned": ``medseg plan`` for the CPU and the budget, then ``medseg train --bundle``;
    "default": ``medseg train --plan default``) trained for ``minutes``, predicting and scoring the test cases."""
    logs, run_dir, name = work / "logs", work / f"medseg-{variant}", f"medseg-{variant}"
    started = time.monotonic()
    if variant == "planned":
        plan_args = medseg_plan_args(data, run_dir, "cpu", budget_minutes=minutes, planner=has_plan_command())
        print(f"{name}: {' '.join(plan_args[:2])}, then train for {minutes:g} min", flush=True)
        run_medseg(plan_args, logs / f"{name}-plan.log", threads, cores)
        train = ["train", "--data", str(data), "--bundle", str(run_dir)]
    else:
        print(f"{name}: train --plan default for {minutes:g} min", flush=True)
        train = ["train", "--data", str(data), "--out", str(run_dir), "--plan", "default"]
    plan_s = time.monotonic() - started
    run_medseg([*train, "--max-minutes", f"{minutes:g}", "--seed", "0", "--device", "cpu"],
               logs / f"{name}-train.log", threads, cores)
    summary = read_json(run_dir / "train_summary.json", f"{name}'s training summary")
    pred = work / "pred" / name
    print(f"{name}: predict and evaluate the test cases", flush=True)
    predict_s = run_medseg(["predict", "--model", str(run_dir), "--input", str(raw.test_images), "--output",
                            str(pred), "--device", "cpu", *(["--tta"] if tta else [])], logs / f"{name}-predict.log",
                           threads, cores)
    plan = read_json(run_dir / "configs" / "plan.json", f"{name}'s plan")
    optimizer = (plan.get("planning") or {}).get("optimizer") or {}
    record = {"iterations": summary["iterations"], "seconds": summary["seconds"], "preprocess_seconds": plan_s,
              "predict_seconds": predict_s, "stopped_by": summary.get("stopped_by"), "variant": variant,
              "optimizer": optimizer.get("name", "AdamW" if variant == "default" else "SGD"),
              "validation": f"medseg's own fold 0 ({summary.get('validation_cases')} cases)",
              "plan": medseg_plan_record(plan)}
    return record, evaluate(pred, raw, data, work / "eval" / name, threads, logs, name, cores)


def train_nnunet(data: Path, raw: RawDataset, peer: Peer, work: Path, minutes: float, tta: bool, preprocessed: float | None,
                 cores: frozenset[int] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """nnU-Net v2: plan and preprocess (unless done), train fold 0 to the budget, predict, score."""
    peer.cores = cores
    print(f"nnunet: plan_and_preprocess, then train fold 0 for {minutes:g} min", flush=True)
    pre_s = preprocessed if preprocessed is not None else peer.plan_and_preprocess(raw)
    _, trainer = peer.train(raw, minutes)
    pred = work / "pred" / "nnunet"
    print("nnunet: predict and evaluate the test cases", flush=True)
    predict_s = peer.predict(raw, pred, tta)
    record = {"iterations": trainer["iterations"], "seconds": trainer["seconds"], "preprocess_seconds": pre_s,
              "predict_seconds": predict_s, "stopped_by": trainer.get("stopped_by"), "optimizer": "SGD",
              "validation": "nnU-Net's 5-fold split, fold 0", "plan": plan_record(peer.plans(raw))}
    return record, evaluate(pred, raw, data, work / "eval" / "nnunet", peer.threads, work / "logs", "nnunet", cores)


def crossval_medseg(data: Path, raw: RawDataset, work: Path, minutes: float, threads: int, tta: bool, variant: str,
                    cores: frozenset[int] | None, folds: int, ensemble: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """medseg ``variant`` trained on ``folds`` folds (``medseg train --fold``, ``minutes`` each), selected
    (``medseg select``), its test cases predicted by fold 0 and, with ``ensemble``, by the selected bundle."""
    logs, run_dir, name = work / "logs", work / f"medseg-{variant}", f"medseg-{variant}"
    print(f"{name}: train folds 0-{folds - 1} for {minutes:g} min each, then select", flush=True)
    train = ["train", "--data", str(data), "--out", str(run_dir), "--fold", ",".join(map(str, range(folds))),
             "--max-minutes", f"{minutes:g}", "--seed", "0", "--device", "cpu",
             *(["--plan", "default"] if variant == "default" else [])]
    cv_s = run_medseg(train, logs / f"{name}-train.log", threads, cores)
    run_medseg(["select", str(run_dir)], logs / f"{name}-select.log", threads, cores)
    summaries = [read_json(run_dir / f"fold_{k}" / "train_summary.json", f"{name}'s fold {k} summary")
                 for k in range(folds)]
    cv = read_json(run_dir / "cv_summary.json", f"{name}'s cross-validation summary")
    chosen = read_json(run_dir / "configs" / "selection.json", f"{name}'s selection")["chosen"]
    fold0 = _medseg_test(run_dir / "fold_0", f"{name}-fold0", raw, data, work, threads, tta, cores)
    record = {"iterations": sum(int(s["iterations"]) for s in summaries),
              "seconds": sum(float(s["seconds"]) for s in summaries), "preprocess_seconds": 0.0,
              "predict_seconds": fold0[0], "variant": variant, "folds": folds, "cv_seconds": round(cv_s, 1),
              "oof_mean_dice": _number(cv["overall"]["mean_dice"]),
              "oof_mean_dice_postprocessed": _number(chosen.get("oof_mean_dice_postprocessed")),
              "postprocessing": chosen.get("postprocessing"),
              "fold0_mean_dice": _number(fold0[1].get("mean_dice_foreground")), "fold0_dice": _label_dice(fold0[1]),
              "stopped_by": sorted({str(s.get("stopped_by")) for s in summaries}),
              "plan": medseg_plan_record(read_json(run_dir / "fold_0" / "configs" / "plan.json", f"{name}'s plan")),
              "validation": f"medseg's {folds}-fold split, out-of-fold predictions by medseg train --fold"}
    if not ensemble:
        return record, fold0[1]
    seconds, evaluation = _medseg_test(run_dir, f"{name}-ensemble", raw, data, work, threads, tta, cores)
    record.update(predict_seconds=seconds, ensemble=f"{folds} folds + postprocessing (medseg select)")
    return record, evaluation


def _medseg_test(model: Path, name: str, raw: RawDataset, data: Path, work: Path, threads: int, tta: bool,
                 cores: frozenset[int] | None) -> tuple[float, dict[str, Any]]:
    """``medseg predict --model MODEL`` of the test cases and its ``medseg evaluate`` summary; (seconds, summary)."""
    pred = work / "pred" / name
    print(f"{name}: predict and evaluate the test cases", flush=True)
    seconds = run_medseg(["predict", "--model", str(model), "--input", str(raw.test_images), "--output", str(pred),
                          "--device", "cpu", *(["--tta"] if tta else [])], work / "logs" / f"{name}-predict.log",
                         threads, cores)
    return seconds, evaluate(pred, raw, data, work / "eval" / name, threads, work / "logs", name, cores)


def _label_dice(evaluation: dict[str, Any]) -> dict[str, float | None]:
    return {entry["name"]: _number(entry["dice"]["mean"]) for entry in evaluation.get("labels", {}).values()}


def crossval_nnunet(data: Path, raw: RawDataset, peer: Peer, work: Path, minutes: float, tta: bool,
                    preprocessed: float | None, cores: frozenset[int] | None, folds: int,
                    ensemble: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """nnU-Net v2: plan and preprocess (unless done), ``folds`` folds trained to the budget and validated,
    ``nnUNetv2_find_best_configuration``, the test cases predicted by fold 0 and, with ``ensemble``, by the folds
    with the chosen postprocessing."""
    peer.cores = cores
    print(f"nnunet: plan_and_preprocess, then train folds 0-{folds - 1} for {minutes:g} min each", flush=True)
    pre_s = preprocessed if preprocessed is not None else peer.plan_and_preprocess(raw)
    started = time.monotonic()
    trainers = [peer.train(raw, minutes, fold=k, validate=True)[1] for k in range(folds)]
    _, information = peer.find_best_configuration(raw, list(range(folds)))
    cv_s = time.monotonic() - started
    best = information["best_model_or_ensemble"]
    oof, merged = work / "eval" / "nnunet-oof", Path(best["postprocessing_file"]).parent
    references = work / "eval" / "nnunet-oof-references"  # the training label maps of the folds' held-out cases
    references.mkdir(parents=True, exist_ok=True)
    for prediction in merged.glob(f"*{raw.file_ending}"):
        os.link(raw.folder / "labelsTr" / prediction.name, references / prediction.name)
    run_medseg(["evaluate", "--pred", str(merged), "--ref", str(references), "--labels", str(data), "--out", str(oof)],
               work / "logs" / "nnunet-oof-evaluate.log", peer.threads, cores)
    oof_summary = read_json(oof / "summary.json", "nnU-Net's out-of-fold evaluation")
    logs = work / "logs"
    pred0 = work / "pred" / "nnunet-fold0"
    print("nnunet: predict (fold 0) and evaluate the test cases", flush=True)
    fold0_s = peer.predict(raw, pred0, tta)
    fold0 = evaluate(pred0, raw, data, work / "eval" / "nnunet-fold0", peer.threads, logs, "nnunet-fold0", cores)
    record = {"iterations": sum(int(t["iterations"]) for t in trainers),
              "seconds": sum(float(t["seconds"]) for t in trainers), "preprocess_seconds": pre_s,
              "predict_seconds": fold0_s, "optimizer": "SGD", "folds": folds, "cv_seconds": round(cv_s, 1),
              "oof_mean_dice": _number(oof_summary.get("mean_dice_foreground")),
              "oof_mean_dice_nnunet": _number(best.get("result_on_crossval_pre_pp")),
              "oof_mean_dice_postprocessed_nnunet": _number(best.get("result_on_crossval_post_pp")),
              "postprocessing": nnunet_postprocessing(merged / "postprocessing.json"),
              "fold0_mean_dice": _number(fold0.get("mean_dice_foreground")), "fold0_dice": _label_dice(fold0),
              "stopped_by": sorted({str(t.get("stopped_by")) for t in trainers}),
              "validation": f"nnU-Net's {folds}-fold split, validated by nnUNetv2_train, chosen by "
                            "nnUNetv2_find_best_configuration", "plan": plan_record(peer.plans(raw))}
    if not ensemble:
        return record, fold0
    raw_pred, pred = work / "pred" / "nnunet-folds", work / "pred" / "nnunet-ensemble"
    print(f"nnunet: predict ({folds} folds), postprocess and evaluate the test cases", flush=True)
    seconds = peer.predict(raw, raw_pred, tta, folds=list(range(folds)))
    seconds += peer.apply_postprocessing(raw_pred, pred, information)
    for extra in ("plans.json", "dataset.json", "predict_from_raw_data_args.json"):
        (pred / extra).unlink(missing_ok=True)  # copied beside the label maps by nnU-Net
    record.update(predict_seconds=seconds, ensemble=f"{folds} folds + postprocessing (find_best_configuration)")
    return record, evaluate(pred, raw, data, work / "eval" / "nnunet-ensemble", peer.threads, logs, "nnunet", cores)


def nnunet_postprocessing(path: Path) -> str:
    """What ``nnUNetv2_find_best_configuration`` chose (its ``postprocessing.json``), e.g.
    ``remove_all_but_largest_component_from_segmentation(labels_or_regions=4)``; ``none`` for no step."""
    chosen = read_json(path, "nnU-Net's postprocessing choice")
    steps = [f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
             for name, kwargs in zip(chosen.get("postprocessing_fns", []), chosen.get("postprocessing_kwargs", []))]
    return ", ".join(steps) or "none"


def core_sets(jobs: int, threads: int) -> list[frozenset[int] | None]:
    """``jobs`` disjoint sets of ``threads`` cores of this process' affinity (None for one job: not pinned).

    Raises
    ------
    BenchError
        Fewer cores than ``jobs`` x ``threads``.
    """
    if jobs == 1:
        return [None]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < jobs * threads:
        raise BenchError(f"--jobs {jobs} x --threads {threads} needs {jobs * threads} cores; this process may use "
                         f"{len(cores)}", exit_code=2)
    return [frozenset(cores[i * threads:(i + 1) * threads]) for i in range(jobs)]


def side_by_side(data: Path, dataset: str, raw: RawDataset, peer: Peer, work: Path, minutes: float,
                 threads: int, tta: bool, preprocessed: float | None, systems: Sequence[str] = ("planned", "nnunet"),
                 jobs: int = 1, folds: int = 1, ensemble: bool = False) -> list[dict]:
    """Train, predict and score each of ``systems`` for ``minutes``; ``jobs`` of them at a time, each on its
    own ``threads`` cores (a queue of core sets: a system starts when one is free)."""
    free: queue.Queue[frozenset[int] | None] = queue.Queue()
    for cores in core_sets(jobs, threads):
        free.put(cores)

    def one(system: str) -> dict[str, Any]:
        cores = free.get()
        try:
            if system == "nnunet" and folds > 1:
                run, evaluation = crossval_nnunet(data, raw, peer, work, minutes, tta, preprocessed, cores, folds,
                                                  ensemble)
                return training_record("nnunet", dataset, minutes, threads, run, evaluation)
            if system == "nnunet":
                run, evaluation = train_nnunet(data, raw, peer, work, minutes, tta, preprocessed, cores)
                return training_record("nnunet", dataset, minutes, threads, run, evaluation)
            if folds > 1:
                run, evaluation = crossval_medseg(data, raw, work, minutes, threads, tta, system, cores, folds,
                                                  ensemble)
                return training_record("medseg", dataset, minutes, threads, run, evaluation)
            run, evaluation = train_medseg(data, raw, work, minutes, threads, tta, system, cores)
            return training_record("medseg", dataset, minutes, threads, run, evaluation)
        finally:
            free.put(cores)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, system) for system in systems]
        return [future.result() for future in futures]


# -- output ----------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, list):
        return " x ".join(_fmt(v) for v in value)
    return str(value)


def table(records: list[dict]) -> str:
    """The records as plain-text tables: plans, their ratios, training runs (Dice per label)."""
    lines: list[str] = []
    plans = [r for r in records if r["kind"] == "plan"]
    if plans:
        lines.append(f"{'system':8} {'config':11} {'spacing (mm)':22} {'patch':16} {'batch':>5} {'stages':>6} "
                     f"{'plan s':>8} {'plan+prep s':>11}")
        lines += [f"{r['system']:8} {r['configuration']:11} {_fmt(r['spacing']):22} {_fmt(r['patch_size']):16} "
                  f"{r['batch_size']:>5} {_fmt(r['n_stages']):>6} {r['plan_seconds']:>8.1f} "
                  f"{r['plan_and_preprocess_seconds']:>11.1f}" for r in plans]
    for r in (r for r in records if r["kind"] == "plan_ratio"):
        lines.append(f"medseg / nnU-Net: spacing {_fmt(r['spacing'])}, patch volume {r['patch_volume']:.3f}, "
                     f"plan+preprocess time {r['plan_and_preprocess_seconds']:.3f}")
    runs = [r for r in records if r["kind"] == "training"]
    if runs:
        names = list(runs[0]["dice"])
        lines.append("")
        lines.append(f"{'system':15} {'min':>5} {'iters':>6} {'s/iter':>7} {'prep s':>7} {'pred s':>7} {'mean Dice':>9} "
                     + " ".join(f"{n[:8]:>8}" for n in names) + "  HD95 mm (mean of the labels found)")
        for r in runs:
            hd = [v for v in r["hd95"].values() if v is not None]
            label = r["system"] + (f"-{r['variant']}" if r.get("variant") else "")
            lines.append(f"{label:15} {r['minutes']:>5g} {r['iterations']:>6} {_fmt(r['seconds_per_iteration']):>7} "
                         f"{r['preprocess_seconds']:>7.1f} {r['predict_seconds']:>7.1f} {_fmt(r['mean_dice']):>9} "
                         + " ".join(f"{_fmt(r['dice'].get(n)):>8}" for n in names)
                         + f"  {_fmt(sum(hd) / len(hd) if hd else None)} ({len(hd)}/{len(r['hd95'])})")
    folded = [r for r in runs if r.get("folds")]
    if folded:
        lines.append("")
        lines.append(f"{'system':15} {'folds':>5} {'OOF Dice':>8} {'test fold 0':>11} {'test ensemble':>13}  postprocessing")
        for r in folded:
            label = r["system"] + (f"-{r['variant']}" if r.get("variant") else "")
            lines.append(f"{label:15} {r['folds']:>5} {_fmt(r['oof_mean_dice']):>8} {_fmt(r['fold0_mean_dice']):>11} "
                         f"{_fmt(r['mean_dice'] if r.get('ensemble') else None):>13}  {r.get('postprocessing') or '-'}")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------------------
def _systems(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'nothing'}: choose among {', '.join(SYSTEMS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the dataset's dataset.json (MSD layout)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="train both for this wall-clock budget on the CPU and score them on the test cases")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for each system (default: 1)")
    parser.add_argument("--compare-plans", action="store_true",
                        help="compare medseg's --device cuda --memory-gb 8 plan with nnU-Net's 3d_fullres plan")
    parser.add_argument("--systems", type=_systems, default=("planned", "nnunet"),
                        help="what trains side by side, comma-separated, of " + ", ".join(SYSTEMS)
                             + " (default: planned,nnunet; planned: medseg's CPU plan for the budget, default: "
                               "medseg train --plan default)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="systems trained at a time, each pinned to its own --threads cores (default: 1)")
    parser.add_argument("--json", required=True, type=Path, help="write the records here")
    parser.add_argument("--folds", type=int, default=1,
                        help="train this many folds per system (--minutes each), choose postprocessing on their "
                             "out-of-fold predictions (medseg select, nnUNetv2_find_best_configuration) and score "
                             "those (default: 1, fold 0 only)")
    parser.add_argument("--ensemble", action="store_true",
                        help="with --folds K: also predict the test cases with the K folds and the chosen "
                             "postprocessing (default: fold 0)")
    parser.add_argument("--tta", action="store_true", help="predict with mirroring (both systems; default: neither)")
    parser.add_argument("--nnunet-venv", type=Path, default=DEFAULT_VENV,
                        help=f"nnU-Net v2's venv, created when missing (default: {DEFAULT_VENV})")
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder (nnUNet_raw, _preprocessed, _results, medseg runs, logs); must not exist "
                             "(default: a temporary folder beside --json)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (removed by default)")
    args = parser.parse_args(argv)
    if args.minutes is None and not args.compare_plans:
        parser.error("nothing to do: give --minutes M (train side by side) and/or --compare-plans")
    if args.threads < 1 or args.jobs < 1 or (args.minutes is not None and args.minutes <= 0):
        parser.error("--threads, --jobs and --minutes must be positive")
    if not 1 <= args.folds <= 5 or (args.ensemble and args.folds < 2):
        parser.error("--folds takes 1 to 5, and --ensemble at least 2 folds")
    if args.folds > 1 and args.minutes is None:
        parser.error("--folds needs --minutes (the budget of each fold)")
    return args


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    try:
        datalist = load_datalist(args.data)
        raw = convert_dataset(datalist, work)
    except (MedsegError, ValueError) as exc:
        raise BenchError(str(exc), exit_code=2) from None
    print(f"{datalist.name}: {len(raw.training)} training and {len(raw.test)} labelled test cases -> {raw.folder}",
          flush=True)
    peer = Peer(args.nnunet_venv.resolve(), work, args.threads, work / "logs")
    needs_peer = args.compare_plans or (args.minutes is not None and "nnunet" in args.systems)
    if needs_peer:  # medseg alone (--systems planned,default) needs no nnU-Net install
        peer.ensure()
        print(f"nnU-Net v2 in {peer.venv} (nnunetv2 and torch: {peer.version})", flush=True)
    records: list[dict] = []
    data = Path(datalist.path)
    if args.compare_plans:
        records += compare_plans(data, datalist.name, raw, peer, work, args.threads)
    if args.minutes is not None:
        done = next((r["plan_and_preprocess_seconds"] for r in records if r["system"] == "nnunet"), None)
        records += side_by_side(data, datalist.name, raw, peer, work, args.minutes, args.threads, args.tta, done,
                                systems=args.systems, jobs=args.jobs, folds=args.folds, ensemble=args.ensemble)
    if needs_peer:
        nnunetv2, _, torch = peer.version.partition(" ")
        for record in records:
            if record["system"] == "nnunet":
                record["versions"] = {"nnunetv2": nnunetv2, "torch": torch}
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        print(f"bench_accuracy: error: {args.work}: the work folder exists and is not empty", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-accuracy-", dir=args.json.parent))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        records = run(args, work)
    except (BenchError, PeerError) as exc:
        print(f"bench_accuracy: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("bench_accuracy: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    args.json.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    print(table(records))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
