#!/usr/bin/env python
"""Robustness to oblique acquisitions: train once, predict the test cases axis-aligned and regridded obliquely.

Each test case of a ``medseg synth`` CT dataset is regridded onto an oblique grid (rotated about the
cranio-caudal axis, then tilted; spacing 0.9 x 1.1 x 2 mm; image by linear interpolation, label by
nearest neighbour: :func:`regrid_oblique`). A model trained on the axis-aligned training cases then
predicts both test sets, each scored against its own labels (``medseg evaluate``'s scoring). The
planned recipe should hold within 0.05 mean Dice of the axis-aligned cases (issue 14).

``--recipe planned`` trains the default plan marked as planned (a DynUNet with deep supervision,
``configuration: 3d_fullres``: the planned training recipe of ``configs/train.json``), ``--recipe
custom`` the default plan as it is (the recipe of bundles made before the planner); ``--recipe both``
runs one after the other on the same data. Training is bounded by iterations, not time. ``--model
BUNDLE --data DIR/dataset.json`` trains nothing: it scores a trained bundle (e.g. the planner's, from
``scripts/bench_accuracy.py --keep``) on that dataset's test cases (``imagesTs``/``labelsTs``),
axis-aligned and oblique. Usage::

    python scripts/check_oblique.py --work /tmp/oblique [--cases 16] [--size 96] [--iterations 500]
        [--recipe planned|custom|both] [--angle 12] [--json FILE]
    python scripts/check_oblique.py --work /tmp/oblique --model BUNDLE --data DIR/dataset.json [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OBLIQUE_SPACING = (0.9, 1.1, 2.0)


def oblique_direction(direction: Sequence[float], angle_deg: float) -> np.ndarray:
    """``direction`` (3 x 3, row-major as SimpleITK gives it) turned by ``angle_deg`` about its third axis,
    then by ``angle_deg / 2`` about its first: an in-plane rotation and a tilt, as an oblique acquisition."""
    a, b = math.radians(angle_deg), math.radians(angle_deg / 2)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return np.asarray(direction, dtype=float).reshape(3, 3) @ about_z @ about_x


def regrid_oblique(image: sitk.Image, angle_deg: float = 12.0, spacing: Sequence[float] = OBLIQUE_SPACING,
                   label: bool = False) -> sitk.Image:
    """``image`` resampled onto an oblique grid of ``spacing`` (mm) whose axes are those of ``image``
    turned by :func:`oblique_direction`, covering the whole of ``image`` (background 0, or the image's
    minimum); linear interpolation for an image, nearest neighbour for a ``label`` map. The voxel type is kept.

    Raises
    ------
    ValueError
        For an image that is not 3D or a spacing that is not three positive numbers.
    """
    if image.GetDimension() != 3 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError("a 3D image and three positive spacings needed")
    direction = oblique_direction(image.GetDirection(), angle_deg)
    size = np.array(image.GetSize())
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
                        for corner in np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size])).reshape(3, -1).T])
    local = corners @ direction  # coordinates along the new axes (columns of direction)
    low, high = local.min(axis=0), local.max(axis=0)
    steps = np.asarray(spacing, dtype=float)
    out_size = np.ceil((high - low) / steps).astype(int)
    origin = direction @ (low + steps / 2)
    reference = sitk.Image([int(s) for s in out_size], image.GetPixelID())
    reference.SetSpacing([float(s) for s in steps])
    reference.SetDirection([float(v) for v in direction.ravel()])
    reference.SetOrigin([float(v) for v in origin])
    array = sitk.GetArrayViewFromImage(image)
    background = 0.0 if label else float(array.min())
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, background, image.GetPixelID())


def oblique_test_set(data_dir: Path, out_dir: Path, angle_deg: float) -> tuple[Path, Path]:
    """``imagesTs``/``labelsTs`` of ``data_dir`` regridded by :func:`regrid_oblique` into ``out_dir``."""
    images, labels = out_dir / "imagesTs", out_dir / "labelsTs"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for path in sorted((data_dir / "imagesTs").glob("*.nii.gz")):
        sitk.WriteImage(regrid_oblique(sitk.ReadImage(str(path)), angle_deg), str(images / path.name))
        reference = data_dir / "labelsTs" / path.name
        sitk.WriteImage(regrid_oblique(sitk.ReadImage(str(reference)), angle_deg, label=True), str(labels / path.name))
    return images, labels


def _train(recipe: str, dataset_json: Path, run: Path, iterations: int) -> dict[str, Any]:
    from medseg.architectures import NetworkSpec
    from medseg.bundle.create import plan_bundle, write_bundle
    from medseg.bundle.training import train
    from medseg.engines.options import TrainOptions

    if recipe == "planned":
        _, plan = plan_bundle(dataset_json, run, network=NetworkSpec("dynunet", deep_supervision=True))
        write_bundle(run, dataclasses.replace(plan, configuration="3d_fullres", batch_size=2), name=run.name)
        epochs = math.ceil(iterations / 250)
        options = TrainOptions(epochs=epochs, max_iterations=iterations, val_interval=epochs, seed=0)
        return train(dataset_json, run, options, bundle=True)
    options = TrainOptions(epochs=math.ceil(iterations / 20), max_iterations=iterations, val_interval=10, seed=0)
    return train(dataset_json, run, options)


def _score(run: Path, images: Path, labels: Path, out: Path, names: dict[int, str]) -> dict[str, Any]:
    from medseg.bundle.pipeline import InferenceOptions, predict
    from medseg.reports.evaluation import evaluate_folders

    predict(run, images, out / "predictions", InferenceOptions(), overwrite=True)
    result = evaluate_folders(out / "predictions", labels, out / "evaluation", labels=names, plots=False)
    return {"mean_dice": result["mean_dice_foreground"],
            "dice": {entry["name"]: entry["dice"]["mean"] for entry in result["labels"].values()}}


def score_model(model: Path, work: Path, dataset_json: Path, oblique: tuple[Path, Path]) -> dict[str, Any]:
    """A trained bundle's mean Dice on the dataset's axis-aligned and oblique test cases."""
    from medseg.data.datalist import load_datalist

    names = load_datalist(dataset_json).labels
    data = dataset_json.parent
    axis = _score(model, data / "imagesTs", data / "labelsTs", work / "axis-model", names)
    tilted = _score(model, oblique[0], oblique[1], work / "oblique-model", names)
    return {"recipe": f"model {model}", "iterations": None, "train_seconds": None, "axis_aligned": axis,
            "oblique": tilted, "drop": None if axis["mean_dice"] is None or tilted["mean_dice"] is None
            else axis["mean_dice"] - tilted["mean_dice"]}


def check(recipe: str, work: Path, dataset_json: Path, oblique: tuple[Path, Path], iterations: int) -> dict[str, Any]:
    """Train ``recipe`` on the dataset, score the axis-aligned and the oblique test cases."""
    from medseg.data.datalist import load_datalist

    run = work / f"run-{recipe}"
    shutil.rmtree(run, ignore_errors=True)
    started = time.monotonic()
    summary = _train(recipe, dataset_json, run, iterations)
    trained = time.monotonic() - started
    names = load_datalist(dataset_json).labels
    data = dataset_json.parent
    axis = _score(run, data / "imagesTs", data / "labelsTs", work / f"axis-{recipe}", names)
    tilted = _score(run, oblique[0], oblique[1], work / f"oblique-{recipe}", names)
    return {"recipe": recipe, "iterations": summary["iterations"], "train_seconds": round(trained),
            "axis_aligned": axis, "oblique": tilted,
            "drop": None if axis["mean_dice"] is None or tilted["mean_dice"] is None
            else axis["mean_dice"] - tilted["mean_dice"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder (data, runs, predictions)")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--iterations", type=int, default=500, help="training iterations of each recipe")
    parser.add_argument("--recipe", choices=["planned", "custom", "both"], default="both")
    parser.add_argument("--angle", type=float, default=12.0, help="in-plane rotation in degrees (tilt: half of it)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--model", type=Path, default=None, help="score this trained bundle (train nothing)")
    parser.add_argument("--data", type=Path, default=None, help="with --model: the dataset.json whose test cases "
                        "(imagesTs, labelsTs) are scored")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from medseg.data.synthetic import write_dataset

    args.work.mkdir(parents=True, exist_ok=True)
    if args.model is not None:
        oblique = oblique_test_set(args.data.parent, args.work / "oblique", args.angle)
        result = score_model(args.model, args.work, args.data, oblique)
        print(f"{args.model}: mean Dice axis-aligned {result['axis_aligned']['mean_dice']:.3f}, oblique "
              f"{result['oblique']['mean_dice']:.3f} (drop {result['drop']:.3f})", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps([result], indent=2) + "\n", encoding="utf-8")
        return 0
    data = args.work / "data"
    dataset_json = data / "dataset.json"
    if not dataset_json.exists():
        write_dataset(data, modality="ct", cases=args.cases, seed=0, size=args.size, dims=3)
    oblique = oblique_test_set(data, args.work / "oblique", args.angle)
    recipes = ["planned", "custom"] if args.recipe == "both" else [args.recipe]
    results = []
    for recipe in recipes:
        result = check(recipe, args.work, dataset_json, oblique, args.iterations)
        results.append(result)
        print(f"{recipe}: {result['iterations']} iterations in {result['train_seconds']}s; mean Dice axis-aligned "
              f"{result['axis_aligned']['mean_dice']:.3f}, oblique {result['oblique']['mean_dice']:.3f} "
              f"(drop {result['drop']:.3f})", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
