"""Write a MONAI bundle (model-zoo layout) for a plan: ``medseg bundle init`` and ``medseg train``.

Layout::

    BUNDLE/configs/metadata.json    model-zoo metadata, segment names and SNOMED CT codes
    BUNDLE/configs/plan.json        spacing, intensity, patch, network, labels (read by the factories)
    BUNDLE/configs/train.json       training   (python -m monai.bundle run --config_file configs/train.json ...)
    BUNDLE/configs/multi_gpu_train.json  layered on train.json: training on several processes (torchrun)
    BUNDLE/configs/inference.json   inference  (reads dataset_dir/imagesTs, writes output_dir)
    BUNDLE/configs/evaluate.json    layered on inference.json: its predictions scored against labelsTs
    BUNDLE/configs/logging.conf
    BUNDLE/docs/README.md
    BUNDLE/models/model.pt          weights (state dict), written by training

The configs hold no ``$`` expressions, only ``_target_``s of medseg, MONAI and torch, so they
pass medseg's safe mode.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import monai
import numpy as np
import torch

import medseg
from medseg.architectures import NetworkSpec
from medseg.bundle.train_config import multi_gpu_parts, train_parts
from medseg.errors import BundleError, InputError
from medseg.io.atomic import atomic_write_text
from medseg.labels import segment_code
from medseg.layout import WEIGHTS_FILE
from medseg.logs import BUNDLE_LOGGING_CONF
from medseg.plan import Plan

if TYPE_CHECKING:
    from medseg.data.datalist import Datalist

log = logging.getLogger(__name__)

C = "medseg.bundle.components"
INFERENCE = "medseg.inference.compose"

#: The docs/README.md metrics section of a bundle without trained weights (verify refuses it beside weights).
NOT_TRAINED = "Not trained yet."
#: The heading :func:`record_training` rewrites in docs/README.md.
METRICS_HEADING = "## Metrics"
README_FILE = Path("docs") / "README.md"



def _common(output_dir: str) -> dict[str, Any]:
    return {
        "bundle_root": ".",
        "dataset_dir": ".",
        "output_dir": output_dir,
        "device": "cpu",
        "plan": {"_target_": f"{C}.load_plan", "bundle_root": "@bundle_root"},
        "network_def": {"_target_": "medseg.networks.build_network", "plan": "@plan"},
    }


def inference_config() -> dict[str, Any]:
    """Model-zoo style inference: named, overridable parts; ``run`` runs the evaluator, whose postprocessing
    writes ``<case>_seg.<ending>`` into ``predictions_dir`` (``output_dir`` unless overridden; an existing
    file only with ``overwrite``)."""
    return {
        **_common("predictions"),
        "predictions_dir": "@output_dir",
        "overlap": 0.5,
        "sw_batch_size": None,
        "tta": False,
        "precision": "float32",
        "overwrite": False,
        "weights": {"_target_": f"{C}.bundle_path", "bundle_root": "@bundle_root", "parts": list(WEIGHTS_FILE.parts)},
        "network": {"_target_": f"{C}.load_weights", "network": "@network_def", "path": "@weights", "device": "@device"},
        "preprocessing": {"_target_": "medseg.transforms.preprocessing", "plan": "@plan"},
        "datalist": {"_target_": f"{C}.image_list", "dataset_dir": "@dataset_dir", "subdir": "imagesTs", "plan": "@plan"},
        "dataset": {"_target_": "monai.data.Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "monai.data.DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": f"{INFERENCE}.sliding_window_inferer", "plan": "@plan", "overlap": "@overlap",
                    "sw_batch_size": "@sw_batch_size", "tta": "@tta", "precision": "@precision"},
        "postprocessing": {"_target_": f"{INFERENCE}.inference_postprocessing", "plan": "@plan",
                           "preprocessing": "@preprocessing", "output_dir": "@predictions_dir", "overwrite": "@overwrite"},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": [],
        "run": [{"_target_": f"{C}.run_engine", "engine": "@evaluator"}],
    }


def train_config(plan: Plan | None = None) -> dict[str, Any]:
    """Model-zoo style training: the options as top-level keys (``--epochs 5`` overrides), the pipeline as
    named, overridable parts (see :mod:`medseg.bundle.train_config`; the recipe follows ``plan``'s
    configuration: planned or ``"custom"``, the default)."""
    return {**_common("."), **train_parts(plan)}


def evaluate_config() -> dict[str, Any]:
    """An override of :func:`inference_config` (run as ``--config_file "['configs/inference.json',
    'configs/evaluate.json']"``, as model-zoo bundles layer theirs): predict ``dataset_dir/imagesTs`` into
    ``output_dir/predictions`` with the inference pipeline, then score them against ``dataset_dir/labelsTs``
    into ``output_dir``. It overrides top-level ids only, so it also parses on its own (safe mode scans it so)."""
    return {
        "dataset_dir": ".",
        "output_dir": "evaluation",
        "overwrite": True,
        "nsd_tolerance_mm": 1.0,
        "predictions_dir": {"_target_": f"{C}.bundle_path", "bundle_root": "@output_dir", "parts": ["predictions"]},
        "labels_dir": {"_target_": f"{C}.labels_folder", "dataset_dir": "@dataset_dir", "subdir": "labelsTs"},
        "initialize": ["@labels_dir"],
        "run": [{"_target_": f"{C}.run_engine", "engine": "@evaluator"},
                {"_target_": f"{C}.score_predictions", "plan": "@plan", "predictions_dir": "@predictions_dir",
                 "labels_dir": "@labels_dir", "output_dir": "@output_dir", "nsd_tolerance_mm": "@nsd_tolerance_mm"}],
    }


def _spatial_shape(plan: Plan) -> list[str]:
    """MONAI's ``spatial_shape`` of a patch: ``"<divisor>*n"`` per axis (:meth:`NetworkSpec.patch_divisors`)."""
    network = plan.network.planned(plan.patch_size, plan.target_spacing)
    return [f"{d}*n" for d in network.patch_divisors(plan.dims)]


def _image_classes(plan: Plan) -> str:
    """``image_classes``: the input channel(s) and how each is normalised."""
    def norm(preset: str) -> str:
        return "HU clipped and z-scored" if preset == "ct" else "z-scored on non-zero voxels"

    if plan.num_channels == 1:
        modality = "CT" if plan.intensity.preset == "ct" else "MR"
        return f"single channel {modality} image, {norm(plan.intensity.preset)}"
    return f"{plan.num_channels} channels on one grid (one file each): " + "; ".join(
        f"{i} {c.name}, {norm(c.intensity.preset)}" for i, c in enumerate(plan.input_channels))


def _outputs(plan: Plan) -> tuple[str, dict[str, str]]:
    """``pred_classes`` and the output ``channel_def``: one softmax channel per class, or one sigmoid channel
    per region painted in order."""
    labels = ", ".join(f"{k} {v}" for k, v in plan.labels.items())
    if not plan.regions:
        return (f"{plan.num_classes} channels (softmax), argmax written as a label map: {labels}",
                {str(k): v for k, v in plan.labels.items()})
    painted = ", ".join(f"{r.name} (labels {list(r.labels)}) as {r.value}" for r in plan.regions)
    text = (f"{len(plan.regions)} channels (sigmoid per region), each region painted in this order where its "
            f"probability exceeds 0.5 into a label map: {painted}; label map values: {labels}")
    return text, {str(i): r.name for i, r in enumerate(plan.regions)}


def metadata(plan: Plan, name: str, description: str, data_source: str, authors: str = "medseg developers",
             version: str = "0.1.0", eval_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """Model-zoo ``metadata.json`` for ``plan`` (fields of the zoo's meta schema plus ``segments``; for a
    region-based plan also ``labels``, the label map's values, since ``channel_def`` names the regions)."""
    fg = {k: v for k, v in plan.labels.items() if k != 0}
    modality = "CT" if plan.intensity.preset == "ct" else "MR"
    value_range = [plan.intensity.a_min, plan.intensity.a_max] if plan.intensity.preset == "ct" else [0, 1]
    packages = {"medseg": medseg.__version__, "nibabel": _version("nibabel"), "SimpleITK": _version("SimpleITK"),
                "pytorch-ignite": _version("ignite")}
    pred_classes, output_channels = _outputs(plan)
    input_channels = ({"0": "image"} if plan.num_channels == 1
                      else {str(i): c.name for i, c in enumerate(plan.input_channels)})
    meta: dict[str, Any] = {
        "version": version,
        "changelog": {version: "created by medseg bundle init"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": packages,  # MONAI 1.6's name (optional_packages_version is deprecated)
        "name": name,
        "task": f"{plan.dims}D {modality} segmentation of {', '.join(fg.values())}",
        "description": description,
        "authors": authors,
        "copyright": "Copyright (c) medseg developers",
        "data_source": data_source,
        "data_type": "nibabel, SimpleITK (NIfTI, NRRD, MetaImage)",
        "image_classes": _image_classes(plan),
        "label_classes": "single channel label map: " + ", ".join(f"{k} {v}" for k, v in plan.labels.items()),
        "pred_classes": pred_classes,
        "eval_metrics": eval_metrics or {},
        "intended_use": "Research and demonstration only; not for clinical use.",
        "references": ["Ronneberger et al., U-Net (2015)", "Isensee et al., nnU-Net (2021)",
                       "Cardoso et al., MONAI (2022)"],
        "segments": {str(k): segment_code(v) for k, v in fg.items()},
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield" if modality == "CT" else "magnitude", "modality": modality,
                "num_channels": plan.num_channels, "spatial_shape": _spatial_shape(plan), "dtype": "float32",
                "value_range": value_range, "is_patch_data": True, "channel_def": input_channels}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": plan.num_outputs,
                "spatial_shape": _spatial_shape(plan), "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "channel_def": output_channels}},
        },
    }
    if plan.regions:
        meta["labels"] = {str(k): v for k, v in plan.labels.items()}
    return meta


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - a version string is informative only
        return "unknown"


def readme(plan: Plan, name: str, description: str, data_source: str) -> str:
    labels = "\n".join(f"| {k} | {v} | {(segment_code(v)['snomed'] or {}).get('code', '-')} |"
                       for k, v in plan.labels.items() if k != 0)
    return f"""# {name}

{description}

## Data
{data_source}

## Labels
| value | name | SNOMED CT |
|---|---|---|
{labels}

## Preprocessing
Orientation RAS, spacing {list(plan.target_spacing)} mm, patch {list(plan.patch_size)},
intensity preset `{plan.intensity.preset}` (see `configs/plan.json`).

## Use
```sh
medseg train --bundle . --data DATASET_DIR/dataset.json     # writes models/model.pt
medseg predict --model . --input IMAGES --output OUT
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir DATA --output_dir OUT
```

## Metrics
{NOT_TRAINED}
"""


def plan_bundle(data: str | os.PathLike[str], bundle_dir: str | os.PathLike[str],
                target_spacing: Sequence[float] | None = None, patch_size: Sequence[int] | None = None,
                network: NetworkSpec | None = None, ct_window: Sequence[float] | None = None) -> tuple[Datalist, Plan]:
    """Everything :func:`init_bundle` checks and derives, without writing: the validated dataset and its plan.

    Raises
    ------
    InputError
        ``bundle_dir`` not empty, an invalid dataset, a target spacing, patch size or CT window of
        the wrong form.
    """
    from medseg.data.datalist import load_datalist, validate_datalist
    from medseg.plan import make_plan

    datalist = load_datalist(data)
    bundle = Path(bundle_dir)
    if bundle.exists() and (not bundle.is_dir() or any(bundle.iterdir())):
        raise InputError(bundle, "exists and is not empty; choose a new folder")
    geometries = validate_datalist(datalist)
    try:
        plan = make_plan(datalist, geometries, target_spacing, patch_size, network, ct_window)
    except ValueError as exc:
        raise InputError(None, str(exc)) from exc
    return datalist, plan


def describe_data_source(datalist: Datalist, bundle_dir: str | os.PathLike[str]) -> str:
    """``data_source`` for a bundle trained on ``datalist`` (see :func:`describe_dataset`)."""
    return describe_dataset(datalist.name, datalist.path, len(datalist.training), bundle_dir)


def describe_dataset(name: str, path: str | os.PathLike[str], cases: int, bundle_dir: str | os.PathLike[str]) -> str:
    """``data_source`` for a bundle trained on the dataset ``name`` (its ``dataset.json`` at ``path``,
    ``cases`` training cases): its name and size, and its path only relative to the bundle (a local
    absolute path means nothing to whoever receives the bundle)."""
    try:
        relative: Path | None = Path(os.path.relpath(Path(path).absolute(), Path(bundle_dir).absolute()))
    except ValueError:  # another drive (Windows)
        relative = None
    if relative is not None and relative.parts and relative.parts[0] != "..":
        where = f"{relative.as_posix()} in the bundle"
    else:
        where = f"{Path(path).name} of a folder named {Path(path).parent.name!r}"
    return f"MSD dataset {name!r}: {cases} training cases ({where})"


def init_bundle(data: str | os.PathLike[str], bundle_dir: str | os.PathLike[str],
                target_spacing: Sequence[float] | None = None, patch_size: Sequence[int] | None = None,
                network: NetworkSpec | None = None, ct_window: Sequence[float] | None = None,
                name: str | None = None, description: str | None = None,
                data_source: str | None = None) -> tuple[Path, Datalist, Plan]:
    """``medseg bundle init``: validate an MSD dataset, derive a plan from it (see
    :func:`medseg.plan.make_plan`) and write a bundle.

    Returns the bundle folder, the validated dataset and the plan.

    Raises
    ------
    InputError
        ``bundle_dir`` not empty, an invalid dataset (nothing is written then), a target spacing
        or CT window of the wrong form, a ``data_source`` holding a local absolute path.
    """
    datalist, plan = plan_bundle(data, bundle_dir, target_spacing, patch_size, network, ct_window)
    if data_source is not None and local_paths(data_source):
        raise InputError(None, f"--data-source names a local path ({local_paths(data_source)[0]}); describe the "
                         "data instead, or give a path relative to the bundle")
    bundle = Path(bundle_dir)
    source = data_source or describe_data_source(datalist, bundle)
    write_bundle(bundle, plan, name=name or bundle.name, description=description, data_source=source)
    return bundle, datalist, plan


def write_bundle(bundle_dir: str | os.PathLike[str], plan: Plan, name: str | None = None,
                 description: str | None = None, data_source: str = "unspecified", overwrite: bool = False) -> Path:
    """Write the bundle layout (see module docstring) for ``plan``; weights are left to training.

    Raises
    ------
    InputError
        If ``bundle_dir`` exists with files in it and ``overwrite`` is false.
    """
    bundle = Path(bundle_dir)
    if bundle.exists() and any(bundle.iterdir()) and not overwrite:
        raise InputError(bundle, "exists and is not empty; choose a new folder")
    name = name or bundle.name
    description = description or f"{plan.dims}D {plan.network.title} segmentation bundle created by medseg"
    configs = bundle / "configs"
    plan.save(configs / "plan.json")
    for file, content in (("inference.json", inference_config()), ("train.json", train_config(plan)),
                          ("multi_gpu_train.json", multi_gpu_parts()), ("evaluate.json", evaluate_config()),
                          ("metadata.json", metadata(plan, name, description, data_source))):
        atomic_write_text(configs / file, json.dumps(content, indent=2) + "\n")
    atomic_write_text(configs / "logging.conf", BUNDLE_LOGGING_CONF)
    atomic_write_text(bundle / "docs" / "README.md", readme(plan, name, description, data_source))
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    log.info("bundle %s written to %s", name, bundle)
    return bundle


# ------------------------------------------------------------------------------- after training

_PATH_END = r"""[^\s'"`)\]}>,;]"""
_LOCAL_PATH = re.compile(
    r"""(?:^|(?<=[\s'"`(\[{<=,;:]))"""  # at the start or after a separator (not inside a word or URL)
    rf"""(?:/(?!/){_PATH_END}+|~[\\/]{_PATH_END}*|[A-Za-z]:[\\/]{_PATH_END}*|\\\\{_PATH_END}+|file:{_PATH_END}+)""")
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def local_paths(text: str) -> list[str]:
    """The local absolute paths in ``text``: ``/home/...``, ``~/...``, ``C:\\...``, ``\\\\server\\...``,
    ``file:...`` (URLs such as ``https://...`` are not local)."""
    return _LOCAL_PATH.findall(text) if isinstance(text, str) else []


def bump_version(version: str) -> str:
    """The next minor version (``0.1.0`` -> ``0.2.0``): new weights change what the bundle predicts.

    Raises
    ------
    ValueError
        If ``version`` is not ``MAJOR.MINOR.PATCH``.
    """
    match = _VERSION.match(str(version))
    if match is None:
        raise ValueError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    return f"{match[1]}.{int(match[2]) + 1}.0"


def read_trainable_metadata(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json``, checked before training so that recording the result cannot fail.

    Raises
    ------
    BundleError
        Missing or unreadable file, not a JSON object, a ``version`` that is not MAJOR.MINOR.PATCH,
        a ``changelog`` that is not an object.
    """
    path = Path(bundle_dir) / "configs" / "metadata.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read the bundle metadata that training updates "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: not a JSON object")
    try:
        bump_version(meta.get("version", ""))
    except ValueError as exc:
        raise BundleError(f"{path}: {exc}; training records a new version") from exc
    if not isinstance(meta.get("changelog", {}), dict):
        raise BundleError(f"{path}: changelog is not an object of version -> note")
    return meta


def metrics_section(per_label: dict[str, float | None], mean: float | None, plan: Plan, note: str) -> str:
    """The ``## Metrics`` section of docs/README.md after training: validation Dice per label and mean."""
    names = {name: value for value, name in plan.labels.items() if value != 0}
    rows = "\n".join(f"| {names.get(name, '-')} | {name} | {'n/a' if dice is None else f'{dice:.3f}'} |"
                     for name, dice in per_label.items())
    table = f"| value | segment | validation Dice |\n|---|---|---|\n{rows}\n\n" if rows else ""
    return (f"{METRICS_HEADING}\n{note}\n\n{table}"
            f"Mean validation Dice over foreground labels: **{'n/a' if mean is None else f'{mean:.3f}'}**. "
            f"Held-out test metrics: `medseg bundle run . --config evaluate --set dataset_dir=DATA`.\n")


def _replace_section(text: str, heading: str, section: str) -> str:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")


def record_training(bundle_dir: str | os.PathLike[str], plan: Plan, *, mean_dice: float | None,
                    per_label: dict[str, float | None], note: str, data_source: str,
                    today: datetime.date | None = None) -> str:
    """Record a finished training in the bundle's metadata and docs; returns the new version.

    ``configs/metadata.json``: the version bumped (:func:`bump_version`), a changelog entry
    ``"<date>: <note>"``, ``eval_metrics`` = ``val_mean_dice`` and ``val_dice_<label>`` (earlier
    metrics described the replaced weights and are dropped), and ``data_source`` replaced by
    ``data_source`` if it held a local absolute path or nothing. ``docs/README.md``: the
    ``## Metrics`` section rewritten (the file is written if missing). Both atomically.

    Raises
    ------
    BundleError
        As :func:`read_trainable_metadata`.
    """
    bundle = Path(bundle_dir)
    meta = read_trainable_metadata(bundle)
    version = bump_version(meta["version"])
    day = (today or datetime.date.today()).isoformat()
    meta["version"] = version
    meta["changelog"] = {version: f"{day}: {note}", **meta.get("changelog", {})}
    metrics = {"val_mean_dice": None if mean_dice is None else round(mean_dice, 4)}
    metrics.update({f"val_dice_{name}": None if dice is None else round(dice, 4) for name, dice in per_label.items()})
    meta["eval_metrics"] = metrics
    old_source = meta.get("data_source")
    if not isinstance(old_source, str) or not old_source.strip() or old_source == "unspecified" or local_paths(old_source):
        meta["data_source"] = data_source
    readme_path = bundle / README_FILE
    if readme_path.is_file():
        text = readme_path.read_text(encoding="utf-8")
        if isinstance(old_source, str) and old_source and meta["data_source"] != old_source:
            text = text.replace(old_source, meta["data_source"])
    else:
        text = readme(plan, str(meta.get("name", bundle.name)), str(meta.get("description", "")), meta["data_source"])
    section = metrics_section(per_label, mean_dice, plan, f"Validation Dice of `models/model.pt`, measured by "
                                                          f"`medseg train` on {day} (version {version}): {note}.")
    atomic_write_text(bundle / "configs" / "metadata.json", json.dumps(meta, indent=2) + "\n")
    atomic_write_text(readme_path, _replace_section(text, METRICS_HEADING, section))
    log.info("recorded the training in %s (version %s) and %s", bundle / "configs" / "metadata.json", version,
             readme_path)
    return version
