"""Bundle-level factories that bundle configs name with ``_target_``: paths inside a bundle or dataset,
data lists, running an engine, scoring a folder of predictions.

medseg's own bundle configs contain no ``$`` expressions: every computed value comes from a factory,
so the configs pass safe mode and the CLI and ``python -m monai.bundle run`` build exactly the same
pipeline ("one pipeline, two doors"). The inference parts (inferer, inversion, label-map writer) are
made in the inference layer, :mod:`medseg.inference.compose`; the names configs written before that
used for them here are kept (the allow list compares objects, so either spelling is accepted).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine

from medseg.bundle.pipeline import InferenceOptions, predict
from medseg.errors import BundleError, InputError
from medseg.inference.cases import collect_cases
from medseg.inference.compose import (  # noqa: F401 - the names older configs give these parts
    SaveLabelMapd,
    inference_postprocessing,
    sliding_window_inferer,
)
from medseg.inference.postprocess import PostprocessingRules, read_rules
from medseg.io.image import image_suffix, list_images
from medseg.layout import META_FILE, PLAN_FILE, POSTPROCESSING_FILE, WEIGHTS_FILE  # noqa: F401 - re-exported for the bundle layer
from medseg.networks import build_network, load_weights, read_state_dict, torch_load_weights_only  # noqa: F401 - config factories
from medseg.networks.ensemble import ModelEnsemble
from medseg.plan import Plan, load_plan
from medseg.reports.evaluation import evaluate_folders

log = logging.getLogger(__name__)


def bundle_path(bundle_root: str | os.PathLike[str], parts: Sequence[str]) -> str:
    """``bundle_root/parts[0]/parts[1]/...`` as a string (configs cannot concatenate without ``$``)."""
    return str(Path(bundle_root).joinpath(*parts))


def image_list(dataset_dir: str | os.PathLike[str], subdir: str = "imagesTs",
               plan: Plan | None = None) -> list[dict[str, Any]]:
    """``[{"image": path}, ...]`` for the images in ``dataset_dir/subdir`` (or ``dataset_dir`` itself
    when it has no such sub-folder, or a single image file); for a ``plan`` of several input channels,
    ``[{"image": [channel files]}, ...]``, the nnU-Net channel files (``CASE_0000``, ``CASE_0001``, ...)
    grouped into cases (:func:`medseg.inference.cases.collect_cases`).

    Raises
    ------
    InputError
        Missing folder or no images; channel files that do not group into complete cases.
    """
    root = Path(dataset_dir)
    if root.is_file():
        if image_suffix(root) is None:
            raise InputError(root, "not a supported image file")
        if plan is None or plan.num_channels == 1:
            return [{"image": str(root)}]
    folder = root if root.is_file() else root / subdir if (root / subdir).is_dir() else root
    if plan is not None and plan.num_channels > 1:
        return [{"image": [str(f) for f in case.files]} for case in collect_cases(folder, plan)]
    return [{"image": str(p)} for p in list_images(folder)]


def labels_folder(dataset_dir: str | os.PathLike[str], subdir: str = "labelsTs") -> str:
    """``dataset_dir/subdir``, the reference label maps an evaluation scores against.

    Raises
    ------
    InputError
        If there is no such folder.
    """
    folder = Path(dataset_dir) / subdir
    if not folder.is_dir():
        raise InputError(folder, f"no reference label maps ({subdir}/) to evaluate against")
    return str(folder)


def run_engine(engine: Engine) -> None:
    """Run an Ignite engine (what model-zoo configs do with ``"$@evaluator.run()"``)."""
    engine.run()


def score_predictions(plan: Plan, predictions_dir: str | os.PathLike[str], labels_dir: str | os.PathLike[str],
                      output_dir: str | os.PathLike[str], nsd_tolerance_mm: float = 1.0) -> dict[str, Any]:
    """Score the label maps in ``predictions_dir`` against ``labels_dir`` with the plan's label names and
    write ``metrics.csv``, ``summary.json`` (and ``lesions.csv``, ``dice_boxplot.png``) into ``output_dir``
    (:func:`medseg.reports.evaluation.evaluate_folders`); the last step of ``configs/evaluate.json``.

    Raises
    ------
    InputError
        Missing or unpaired predictions or references, bad label maps (see ``evaluate_folders``).
    """
    summary = evaluate_folders(predictions_dir, labels_dir, output_dir, labels=plan.labels,
                               nsd_tolerance_mm=nsd_tolerance_mm)
    mean = summary["mean_dice_foreground"]
    log.info("mean Dice over foreground labels: %s", "n/a" if mean is None else f"{mean:.4f}")
    return summary


def evaluate_bundle(bundle_root: str | os.PathLike[str], dataset_dir: str | os.PathLike[str],
                    output_dir: str | os.PathLike[str], device: str = "cpu", overlap: float = 0.5,
                    nsd_tolerance_mm: float = 1.0) -> dict[str, Any]:
    """What ``configs/evaluate.json`` ran before it became an override of ``inference.json`` (kept for such
    bundles): ``medseg predict`` of ``dataset_dir/imagesTs`` into ``output_dir/predictions`` with the bundle's
    ``inference.json``, then :func:`score_predictions` against ``dataset_dir/labelsTs``.

    Raises
    ------
    InputError
        Missing images or references, bad predictions.
    BundleError
        A bundle without plan or weights, or refused by safe mode.
    """
    references = labels_folder(dataset_dir)
    root, out = Path(dataset_dir), Path(output_dir)
    images = root / "imagesTs" if (root / "imagesTs").is_dir() else root
    predict(bundle_root, images, out / "predictions", InferenceOptions(device=device, overlap=overlap), overwrite=True)
    return score_predictions(load_plan(bundle_root), out / "predictions", references, out, nsd_tolerance_mm)


def fold_ensemble(plan: Plan, bundle_root: str | os.PathLike[str], folds: Sequence[int],
                  device: str | torch.device = "cpu") -> ModelEnsemble:
    """The models of ``folds`` of a cross-validation run (``bundle_root/fold_K/models/model.pt``, each read with
    ``torch.load(weights_only=True)``) as one :class:`~medseg.networks.ensemble.ModelEnsemble` of ``plan``'s
    network, in eval mode; infer it with ``sliding_window_inferer(..., members=len(folds))``.

    Raises
    ------
    BundleError
        No fold, a fold number outside 0-4 or given twice, a fold whose ``configs/plan.json`` is not ``plan``,
        missing weights or weights that do not fit the network.
    """
    numbers = [int(k) for k in folds]
    if not numbers or len(set(numbers)) != len(numbers) or any(not 0 <= k < 5 for k in numbers):
        raise BundleError(f"{bundle_root}: folds must be distinct numbers 0-4, got {list(folds)}")
    root = Path(bundle_root)
    networks = []
    for fold in numbers:
        folder = root / f"fold_{fold}"
        if load_plan(folder).to_json() != plan.to_json():
            raise BundleError(f"{folder / PLAN_FILE}: fold {fold} was trained on another plan than {root / PLAN_FILE}")
        networks.append(load_weights(build_network(plan), folder / WEIGHTS_FILE, device=device))
    return ModelEnsemble(networks).eval()


def postprocessing_rules(bundle_root: str | os.PathLike[str]) -> PostprocessingRules:
    """``bundle_root/configs/postprocessing.json`` (:func:`medseg.inference.postprocess.read_rules`).

    Raises
    ------
    InputError
        A missing or invalid rules file, named.
    """
    return read_rules(Path(bundle_root) / POSTPROCESSING_FILE)
