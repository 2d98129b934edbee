"""``medseg demo``: synthetic CT -> train a 3D U-Net -> predict held-out cases -> evaluate."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from medseg.errors import InputError

log = logging.getLogger(__name__)

MARKER = ".medseg-demo"


def _prepare(out: Path) -> None:
    if out.exists():
        if (out / MARKER).exists():
            log.info("replacing the earlier demo in %s", out)
            shutil.rmtree(out)
        elif not out.is_dir() or any(out.iterdir()):
            raise InputError(out, "exists and is not an earlier medseg demo folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by medseg demo; replaced by the next demo run\n")


def run_demo(out: str | os.PathLike[str] = "medseg-demo", minutes: float | None = 5.0, cases: int = 16, seed: int = 0,
             device: str = "cpu", epochs: int = 30, max_iterations: int | None = None,
             plan: str | None = None) -> dict[str, Any]:
    """Run the whole path on a synthetic CT dataset and return timings and the held-out mean Dice.

    ``plan`` "auto" (the default with a time budget): the planner chooses network, patch and batch for
    ``device`` and the budget of ``minutes`` (as ``medseg train`` does), epochs of 250 iterations;
    "default" (the default without a budget): the fixed small U-Net, epochs of 20 iterations.
    Training stops after ``epochs`` epochs (or ``max_iterations``), or earlier when the time budget of
    ``minutes`` (final validation included; ``None`` or 0: no budget) runs out.
    Folder layout: ``data/`` (dataset), ``run/`` (model), ``predictions/``, ``evaluation/``.

    Raises
    ------
    InputError
        If ``out`` exists and is not an earlier demo folder, a count is out of range, or ``plan``
        "auto" without a time budget.
    """
    from medseg.bundle.pipeline import InferenceOptions, predict
    from medseg.bundle.training import train
    from medseg.data.datalist import load_datalist
    from medseg.data.synthetic import write_dataset
    from medseg.engines.options import TrainOptions, check_options
    from medseg.planning import PlannerOptions
    from medseg.reports.evaluation import evaluate_folders

    if minutes is not None and not minutes >= 0:
        raise InputError(None, f"--minutes must be 0 (no time budget) or positive, got {minutes}")
    plan = plan or ("auto" if minutes else "default")
    if plan not in ("auto", "default"):
        raise InputError(None, f"--plan must be auto or default, got {plan!r}")
    if plan == "auto" and not minutes:
        raise InputError(None, "--plan auto plans for the time budget: give --minutes (> 0) or use --plan default")
    options = TrainOptions(epochs=epochs, max_minutes=minutes or None, max_iterations=max_iterations,
                           device=device, val_interval=5, seed=seed)
    check_options(options)  # before the demo folder is touched
    out = Path(out)
    _prepare(out)
    started = time.monotonic()
    dataset_json = write_dataset(out / "data", modality="ct", cases=cases, seed=seed, size=96, dims=3)
    datalist = load_datalist(dataset_json)
    log.info("synthetic CT dataset: %d training and %d test cases in %s (%.0fs)", len(datalist.training),
             len(datalist.test), dataset_json.parent, time.monotonic() - started)
    t_train = time.monotonic()
    planner = PlannerOptions(device=device, workers=1) if plan == "auto" else None  # the budget: --minutes
    summary = train(dataset_json, out / "run", options, planner=planner)
    t_predict = time.monotonic()
    predict(out / "run", out / "data" / "imagesTs", out / "predictions", InferenceOptions(device=device))
    t_eval = time.monotonic()
    result = evaluate_folders(out / "predictions", out / "data" / "labelsTs", out / "evaluation", labels=datalist.labels)
    finished = time.monotonic()
    timing = {"total_s": finished - started, "train_s": t_predict - t_train, "predict_s": t_eval - t_predict}
    log.info("demo finished in %.0fs (training %.0fs, prediction %.0fs); per-case metrics: %s",
             timing["total_s"], timing["train_s"], timing["predict_s"], out / "evaluation" / "metrics.csv")
    for number, entry in result["labels"].items():
        log.info("  %-8s %-10s Dice %.3f", number, entry["name"], entry["dice"]["mean"] or float("nan"))
    return {"mean_dice": result["mean_dice_foreground"], "train": summary, "timing": timing, "summary": result}
