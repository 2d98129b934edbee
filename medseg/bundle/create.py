"""Write a MONAI bundle (model-zoo layout) for a plan: ``medseg bundle init`` and ``medseg train``.

Layout::

    BUNDLE/configs/metadata.json    model-zoo metadata, segment names and SNOMED CT codes
    BUNDLE/configs/plan.json        spacing, intensity, patch, network, labels (read by the factories)
    BUNDLE/configs/train.json       training   (python -m monai.bundle run --config_file configs/train.json ...)
    BUNDLE/configs/inference.json   inference  (reads dataset_dir/imagesTs, writes output_dir)
    BUNDLE/configs/evaluate.json    inference + metrics on dataset_dir/imagesTs vs labelsTs
    BUNDLE/configs/logging.conf
    BUNDLE/docs/README.md
    BUNDLE/models/model.pt          weights (state dict), written by training

The configs hold no ``$`` expressions, only ``_target_``s of medseg, MONAI and torch, so they
pass medseg's safe mode.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import monai
import numpy as np
import torch

import medseg
from medseg.bundle.codes import segment_code
from medseg.errors import InputError
from medseg.io.atomic import atomic_write_text
from medseg.plan import NetworkSpec, Plan

if TYPE_CHECKING:
    from medseg.data.datalist import Datalist

log = logging.getLogger(__name__)

C = "medseg.bundle.components"

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


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
    """Model-zoo style inference: named, overridable parts; ``run`` runs the evaluator."""
    return {
        **_common("predictions"),
        "overlap": 0.5,
        "sw_batch_size": None,
        "tta": False,
        "weights": {"_target_": f"{C}.bundle_path", "bundle_root": "@bundle_root", "parts": ["models", "model.pt"]},
        "network": {"_target_": f"{C}.load_weights", "network": "@network_def", "path": "@weights", "device": "@device"},
        "preprocessing": {"_target_": "medseg.transforms.preprocessing", "plan": "@plan"},
        "datalist": {"_target_": f"{C}.image_list", "dataset_dir": "@dataset_dir", "subdir": "imagesTs"},
        "dataset": {"_target_": "monai.data.Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "monai.data.DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": f"{C}.sliding_window_inferer", "plan": "@plan", "overlap": "@overlap",
                    "sw_batch_size": "@sw_batch_size", "tta": "@tta"},
        "postprocessing": {"_target_": f"{C}.inference_postprocessing", "plan": "@plan",
                           "preprocessing": "@preprocessing", "output_dir": "@output_dir"},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": [],
        "run": [{"_target_": f"{C}.run_engine", "engine": "@evaluator"}],
    }


def train_config() -> dict[str, Any]:
    """Training: hyper-parameters as top-level keys (``--epochs 5`` overrides), network and loss as parts."""
    return {
        **_common("."),
        "epochs": 100,
        "val_interval": 5,
        "max_minutes": None,
        "fold": 0,
        "learning_rate": 0.002,
        "batch_size": 2,
        "samples_per_case": 2,
        "seed": 0,
        "resume": False,
        "init_weights": None,
        "loss": {"_target_": "monai.losses.DiceCELoss", "to_onehot_y": True, "softmax": True},
        "options": {"_target_": "medseg.engines.training.TrainOptions", "epochs": "@epochs",
                    "max_minutes": "@max_minutes", "device": "@device", "fold": "@fold", "resume": "@resume",
                    "val_interval": "@val_interval", "learning_rate": "@learning_rate", "batch_size": "@batch_size",
                    "samples_per_case": "@samples_per_case", "seed": "@seed", "init_weights": "@init_weights"},
        "initialize": [],
        "run": [{"_target_": "medseg.engines.training.train_bundle", "bundle_root": "@bundle_root",
                 "dataset_dir": "@dataset_dir", "options": "@options", "network": "@network_def", "loss": "@loss"}],
    }


def evaluate_config() -> dict[str, Any]:
    """Predict ``dataset_dir/imagesTs`` and score against ``dataset_dir/labelsTs``."""
    return {
        **_common("evaluation"),
        "overlap": 0.5,
        "nsd_tolerance_mm": 1.0,
        "initialize": [],
        "run": [{"_target_": f"{C}.evaluate_bundle", "bundle_root": "@bundle_root", "dataset_dir": "@dataset_dir",
                 "output_dir": "@output_dir", "device": "@device", "overlap": "@overlap",
                 "nsd_tolerance_mm": "@nsd_tolerance_mm"}],
    }


def _divisor(plan: Plan) -> int:
    return int(np.prod(plan.network.strides)) if plan.network.strides else 1


def metadata(plan: Plan, name: str, description: str, data_source: str, authors: str = "medseg developers",
             version: str = "0.1.0", eval_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """Model-zoo ``metadata.json`` for ``plan`` (fields of the zoo's meta schema plus ``segments``)."""
    fg = {k: v for k, v in plan.labels.items() if k != 0}
    n = _divisor(plan)
    modality = "CT" if plan.intensity.preset == "ct" else "MR"
    value_range = [plan.intensity.a_min, plan.intensity.a_max] if plan.intensity.preset == "ct" else [0, 1]
    packages = {"medseg": medseg.__version__, "nibabel": _version("nibabel"), "SimpleITK": _version("SimpleITK"),
                "pytorch-ignite": _version("ignite")}
    return {
        "version": version,
        "changelog": {version: "created by medseg bundle init"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        # the zoo's field; MONAI 1.6 also reads its successor, required_packages_version
        "optional_packages_version": packages,
        "required_packages_version": packages,
        "name": name,
        "task": f"{plan.dims}D {modality} segmentation of {', '.join(fg.values())}",
        "description": description,
        "authors": authors,
        "copyright": "Copyright (c) medseg developers",
        "data_source": data_source,
        "data_type": "nibabel, SimpleITK (NIfTI, NRRD, MetaImage)",
        "image_classes": f"single channel {modality} image"
                         + (", HU clipped and z-scored" if modality == "CT" else ", z-scored on non-zero voxels"),
        "label_classes": "single channel label map: " + ", ".join(f"{k} {v}" for k, v in plan.labels.items()),
        "pred_classes": f"{plan.num_classes} channels (softmax), argmax written as a label map: "
                        + ", ".join(f"{k} {v}" for k, v in plan.labels.items()),
        "eval_metrics": eval_metrics or {},
        "intended_use": "Research and demonstration only; not for clinical use.",
        "references": ["Ronneberger et al., U-Net (2015)", "Isensee et al., nnU-Net (2021)",
                       "Cardoso et al., MONAI (2022)"],
        "segments": {str(k): segment_code(v) for k, v in fg.items()},
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield" if modality == "CT" else "magnitude", "modality": modality,
                "num_channels": 1, "spatial_shape": [f"{n}*n"] * plan.dims, "dtype": "float32",
                "value_range": value_range, "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": plan.num_classes,
                "spatial_shape": [f"{n}*n"] * plan.dims, "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "channel_def": {str(k): v for k, v in plan.labels.items()}}},
        },
    }


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
Not trained yet.
"""


def init_bundle(data: str | os.PathLike[str], bundle_dir: str | os.PathLike[str],
                target_spacing: Sequence[float] | None = None, patch_size: Sequence[int] | None = None,
                network: NetworkSpec | None = None, ct_window: Sequence[float] | None = None,
                name: str | None = None, description: str | None = None,
                data_source: str | None = None) -> tuple[Path, Datalist, Plan]:
    """``medseg bundle init`` (and the first step of ``medseg train --out``): validate an MSD dataset,
    derive a plan from it (see :func:`medseg.plan.make_plan`) and write a bundle.

    Returns the bundle folder, the validated dataset and the plan.

    Raises
    ------
    InputError
        ``bundle_dir`` not empty, an invalid dataset (nothing is written then), a target spacing
        or CT window of the wrong form.
    """
    from medseg.data.datalist import load_datalist, validate_datalist
    from medseg.plan import make_plan

    datalist = load_datalist(data)
    bundle = Path(bundle_dir)
    if bundle.exists() and any(bundle.iterdir()):
        raise InputError(bundle, "exists and is not empty; choose a new folder")
    geometries = validate_datalist(datalist)  # before anything is written: bad data leaves no bundle
    try:
        plan = make_plan(datalist, geometries, target_spacing, patch_size, network, ct_window)
    except ValueError as exc:
        raise InputError(None, str(exc)) from exc
    source = data_source or f"MSD dataset {datalist.name!r} ({datalist.path}): {len(datalist.training)} training cases"
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
    description = description or f"{plan.dims}D U-Net segmentation bundle created by medseg"
    configs = bundle / "configs"
    plan.save(configs / "plan.json")
    for file, content in (("inference.json", inference_config()), ("train.json", train_config()),
                          ("evaluate.json", evaluate_config()),
                          ("metadata.json", metadata(plan, name, description, data_source))):
        atomic_write_text(configs / file, json.dumps(content, indent=2) + "\n")
    atomic_write_text(configs / "logging.conf", LOGGING_CONF)
    atomic_write_text(bundle / "docs" / "README.md", readme(plan, name, description, data_source))
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    log.info("bundle %s written to %s", name, bundle)
    return bundle
