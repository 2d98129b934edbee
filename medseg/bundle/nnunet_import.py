"""``medseg bundle import-nnunet``: an nnU-Net v2 trained-model folder -> a medseg bundle (model-zoo layout).

The folder is what ``nnUNetv2_train`` leaves in ``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION``:
``dataset.json``, ``plans.json`` and ``fold_K/checkpoint_final.pth`` (TotalSegmentator's weights folders are
such folders). The bundle gets

* ``configs/nnunet.json``: the configuration's preprocessing, architecture, folds and mirroring axes
  (:mod:`medseg.bundle.nnunet`), from ``plans.json`` (``inherits_from`` resolved);
* ``configs/plan.json``: a medseg plan for everything else medseg does with a model (labels and regions from
  ``dataset.json``, input channels, spacing and intensities for the input checks, network ``"nnunet"``);
* ``configs/inference.json`` naming the nnU-Net factories, ``configs/metadata.json`` (segment codes from
  ``--segments``, else medseg's table, else none: DICOM SEG needs a code for every segment), ``docs/README.md``;
* ``models/fold_K.pt``: each fold's network weights as a plain state dict.

Several folders (TotalSegmentator's parts: each model segments other labels) make one bundle whose label map
merges theirs (:mod:`medseg.bundle.nnunet_parts`): ``configs/nnunet.json`` then lists one configuration per part
with the merged value of each of its labels (from ``--class-map`` by name, else numbered in folder order), the
weights are ``models/part_P/fold_K.pt``, and the plan's labels are the merged ones.

Every checkpoint is read without running pickled code (:func:`medseg.networks.nnunet.read_nnunet_checkpoint`)
and loaded into the rebuilt network before anything is written; the bundle is written into a temporary
folder beside ``--out`` and moved into place at the end, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.architectures import IMPORTED, NetworkSpec
from medseg.bundle.create import inference_config, metadata, readme
from medseg.bundle.nnunet import NNUNET_FILE, NNUNET_FORMAT, fold_weights, read_imported
from medseg.bundle.nnunet_parts import PARTS_FORMAT, merge_part_labels, part_weights, read_parts
from medseg.data.channels import channel_modality, parse_channel_names
from medseg.errors import BundleError, InputError, printable
from medseg.io.atomic import atomic_write_text
from medseg.labels import DatasetLabels, parse_dataset_labels
from medseg.logs import BUNDLE_LOGGING_CONF
from medseg.plan import Channel, Intensity, Plan

__all__ = ["import_nnunet"]

log = logging.getLogger(__name__)

_READERS = ("SimpleITKIO",)
_RESAMPLING = "resample_data_or_seg_to_shape"
_FOLD = re.compile(r"^fold_(\d+)$")
_N = "medseg.bundle.nnunet"
_P = "medseg.bundle.nnunet_parts"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such file; an nnU-Net trained-model folder holds dataset.json, plans.json and "
                               "fold_K/ folders") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "must hold a JSON object")
    return data


def _configuration(plans: Mapping[str, Any], name: str, path: Path) -> dict[str, Any]:
    """One configuration of ``plans.json`` with its ``inherits_from`` chain merged (the child's fields win)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping) or name not in configurations:
        known = ", ".join(configurations) if isinstance(configurations, Mapping) else "none"
        raise InputError(path, f"no configuration {name!r} (it has: {known})")
    merged: dict[str, Any] = {}
    seen: list[str] = []
    current: str | None = name
    while current is not None:
        if current in seen or current not in configurations or not isinstance(configurations[current], Mapping):
            raise InputError(path, f"configuration {name!r}: bad 'inherits_from' chain {' -> '.join([*seen, str(current)])}")
        seen.append(current)
        merged = {**configurations[current], **merged}
        parent = configurations[current].get("inherits_from")
        current = str(parent) if parent is not None else None
    return merged


def _configuration_name(model_dir: Path, given: str | None) -> str:
    if given:
        return given
    parts = model_dir.name.split("__")
    return parts[-1] if len(parts) == 3 else "3d_fullres"


def _folds(model_dir: Path, given: Sequence[int] | None, checkpoint: str) -> list[int]:
    found = sorted(int(m.group(1)) for p in model_dir.iterdir() if p.is_dir() and (m := _FOLD.match(p.name))
                   and (p / checkpoint).is_file())
    if given is None:
        if not found:
            raise InputError(model_dir, f"no fold_K/{checkpoint} in this folder (is it an nnU-Net trained-model folder?)")
        return found
    missing = [f for f in given if f not in found]
    if missing:
        raise InputError(model_dir / f"fold_{missing[0]}" / checkpoint, "no such checkpoint "
                         f"(folds with {checkpoint}: {', '.join(map(str, found)) or 'none'})")
    return list(dict.fromkeys(given))


def _nnunet_config(plans: Mapping[str, Any], configuration: dict[str, Any], name: str, channels: int,
                   outputs: int, regions: Sequence[Any], folds: Sequence[int], mirror: Sequence[int],
                   source: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``configs/nnunet.json`` from the plans (checked with :func:`medseg.bundle.nnunet.read_imported`)."""
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in _READERS:
        raise InputError(path, f"image_reader_writer {reader!r} is not supported (medseg reads images as "
                               f"{', '.join(_READERS)} does)")
    if configuration.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise InputError(path, f"configuration {name!r}: preprocessor {configuration.get('preprocessor_name')!r} "
                               "is not supported (only nnU-Net's DefaultPreprocessor)")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if configuration.get(key) != _RESAMPLING:
            raise InputError(path, f"configuration {name!r}: {key} {configuration.get(key)!r} is not supported "
                                   f"(only {_RESAMPLING})")
    kwargs = {key: {k: v for k, v in (configuration.get(f"{key}_kwargs") or {}).items() if k != "is_seg"}
              for key in ("resampling_fn_data", "resampling_fn_probabilities")}
    properties = plans.get("foreground_intensity_properties_per_channel") or {}
    data = {
        "format": NNUNET_FORMAT,
        "source": dict(source),
        "configuration": name,
        "transpose_forward": plans.get("transpose_forward"),
        "transpose_backward": plans.get("transpose_backward"),
        "spacing": configuration.get("spacing"),
        "patch_size": configuration.get("patch_size"),
        "normalization_schemes": configuration.get("normalization_schemes"),
        "use_mask_for_norm": configuration.get("use_mask_for_norm"),
        "intensity_properties": [properties.get(str(c), {}) for c in range(channels)],
        "resampling_data": kwargs["resampling_fn_data"],
        "resampling_probabilities": kwargs["resampling_fn_probabilities"],
        "architecture": _architecture(configuration, name, path),
        "input_channels": channels,
        "num_outputs": outputs,
        "regions": [{"name": r.name, "labels": list(r.labels), "value": r.value} for r in regions],
        "folds": list(folds),
        "mirror_axes": list(mirror),
    }
    try:
        read_imported(data)
    except ValueError as exc:
        raise InputError(path, f"configuration {name!r}: {exc}") from None
    return data


_LEGACY_FIELDS = ("UNet_class_name", "UNet_base_num_features", "unet_max_num_features", "n_conv_per_stage_encoder",
                  "n_conv_per_stage_decoder", "conv_kernel_sizes", "pool_op_kernel_sizes", "patch_size")


def _architecture(configuration: Mapping[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The configuration's ``architecture``; plans written before nnU-Net 2.4 (TotalSegmentator's among them) give
    the U-Net as separate fields (``UNet_class_name``, ``UNet_base_num_features``, ...), read as nnU-Net reads them:
    features doubling per stage up to the maximum, instance norm, leaky ReLU, biased convolutions.

    Raises
    ------
    InputError
        Neither form, or old fields missing.
    """
    architecture = configuration.get("architecture")
    if isinstance(architecture, Mapping):
        return dict(architecture)
    missing = [field for field in _LEGACY_FIELDS if field not in configuration]
    if missing:
        raise InputError(path, f"configuration {name!r} has no 'architecture' (nor the older fields: "
                               f"{', '.join(missing)} missing)")
    kind = configuration["UNet_class_name"]
    if kind not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise InputError(path, f"configuration {name!r}: UNet_class_name {kind!r} is not PlainConvUNet or "
                               "ResidualEncoderUNet")
    stages = len(configuration["n_conv_per_stage_encoder"])
    dims = len(configuration["patch_size"])
    base, top = int(configuration["UNet_base_num_features"]), int(configuration["unet_max_num_features"])
    blocks = "n_conv_per_stage" if kind == "PlainConvUNet" else "n_blocks_per_stage"
    return {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{kind}",
        "arch_kwargs": {
            "n_stages": stages, "features_per_stage": [min(base * 2**i, top) for i in range(stages)],
            "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": configuration["conv_kernel_sizes"],
            "strides": configuration["pool_op_kernel_sizes"], blocks: configuration["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": configuration["n_conv_per_stage_decoder"], "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _plan(configuration: Mapping[str, Any], plans: Mapping[str, Any], labels: Any, channel_names: Sequence[str],
          config: Mapping[str, Any]) -> Plan:
    """The medseg plan of an imported model: its labels and inputs; the target spacing in the file's axis order (for
    the input checks); the patch in nnU-Net's axis order, which its preprocessing produces and the inferer windows."""
    backward = config["transpose_backward"]
    spacing = list(config["spacing"])
    patch = list(config["patch_size"])
    dims = len(backward)
    if len(spacing) < dims:  # a 2d configuration: the slice axis keeps the image's spacing
        spacing = [float(plans.get("original_median_spacing_after_transp", [1.0])[0]), *spacing]
        patch = [1, *patch]
    file_order = [dims - 1 - a for a in range(dims)]
    ordered = [backward[a] for a in file_order]
    intensities = []
    for number in range(len(channel_names)):
        scheme = config["normalization_schemes"][number]
        props = config["intensity_properties"][number]
        if scheme == "CTNormalization":
            intensities.append(Intensity("ct", float(props["percentile_00_5"]), float(props["percentile_99_5"]),
                                         float(props["mean"]), float(props["std"])))
        else:
            intensities.append(Intensity("mr"))
    channels = tuple(Channel(n, i) for n, i in zip(channel_names, intensities)) if len(channel_names) > 1 else ()
    modality = channel_modality(channel_names[0])
    return Plan(dims=dims, modality=modality, labels=labels.labels,
                target_spacing=tuple(float(spacing[a]) for a in ordered),
                patch_size=tuple(int(p) for p in patch), intensity=intensities[0],
                network=NetworkSpec(IMPORTED), channels=channels, regions=labels.regions,
                ignore_label=labels.ignore_label, configuration="custom", batch_size=int(configuration.get("batch_size", 2)),
                planning={"imported": {"from": "nnU-Net v2", "configuration": config["configuration"],
                                       "folds": config["folds"], "plans": plans.get("plans_name", "")}})


def _segments(path: str | os.PathLike[str] | None, labels: Mapping[int, str]) -> dict[str, Any] | None:
    """``--segments`` codes by label value or name: ``{"liver": {"code": "10200004", "scheme": "SCT",
    "meaning": "Liver"}}``; None without the option.

    Raises
    ------
    InputError
        Unreadable file, an entry naming no label, or a code without code, scheme and meaning.
    """
    if path is None:
        return None
    data = _read_json(Path(path))
    by_name = {name: value for value, name in labels.items()}
    codes: dict[str, Any] = {}
    for key, code in data.items():
        value = int(key) if key.isdigit() else by_name.get(key)
        if value is None or value not in labels or value == 0:
            raise InputError(path, f"{key!r} is not a foreground label of the model ({', '.join(by_name)})")
        if not isinstance(code, Mapping) or not all(isinstance(code.get(k), str) and code.get(k)
                                                    for k in ("code", "scheme", "meaning")):
            raise InputError(path, f"{key!r}: a code needs the strings code, scheme and meaning")
        codes[str(value)] = {"code": code["code"], "scheme": code["scheme"], "meaning": code["meaning"]}
    return codes


@dataclass
class _Part:
    """One nnU-Net model folder, read and checked: its ``configs/nnunet.json`` content and fold weights."""

    folder: Path
    dataset: dict[str, Any]
    plans: dict[str, Any]
    configuration: dict[str, Any]
    labels: Any  # medseg.labels.DatasetLabels
    channel_names: Sequence[str]
    config: dict[str, Any]
    weights: dict[int, Any]
    source: dict[str, Any]


def _read_part(source_dir: Path, configuration: str | None, folds: Sequence[int] | None, checkpoint: str) -> _Part:
    """Read a model folder: dataset.json, plans.json (the configuration), the folds' checkpoints loaded into the
    rebuilt network (errors as :func:`import_nnunet`'s)."""
    from medseg.networks.nnunet import nnunet_network, read_nnunet_checkpoint

    if not source_dir.is_dir():
        raise InputError(source_dir, "no such folder (expected an nnU-Net trained-model folder)")
    dataset = _read_json(source_dir / "dataset.json")
    plans = _read_json(source_dir / "plans.json")
    name = _configuration_name(source_dir, configuration)
    config_part = _configuration(plans, name, source_dir / "plans.json")
    labels = parse_dataset_labels(dataset.get("labels"), dataset.get("regions_class_order"),
                                  source_dir / "dataset.json")
    channel_names = parse_channel_names(dataset, source_dir / "dataset.json")
    outputs = len(labels.regions) if labels.regions else len(labels.labels)
    chosen = _folds(source_dir, folds, checkpoint)
    read = {fold: read_nnunet_checkpoint(source_dir / f"fold_{fold}" / checkpoint) for fold in chosen}
    axes = {c.mirror_axes for c in read.values()}
    if len(axes) > 1:
        raise InputError(source_dir, f"the folds allow different mirroring axes ({sorted(map(str, axes))})")
    mirror = next(iter(axes)) or tuple(range(len(config_part.get("patch_size") or ())))
    first = next(iter(read.values()))
    source = {"tool": "nnU-Net v2", "folder": source_dir.name, "dataset": str(dataset.get("name", "")),
              "trainer": first.trainer, "plans": str(plans.get("plans_name", "")), "checkpoint": checkpoint,
              "epochs": {str(f): c.epoch for f, c in read.items()}}
    config = _nnunet_config(plans, config_part, name, len(channel_names), outputs, labels.regions, chosen, mirror,
                            source, source_dir / "plans.json")
    for fold, content in read.items():
        network = nnunet_network(config["architecture"], len(channel_names), outputs, where=str(source_dir / "plans.json"))
        try:
            network.load_state_dict(content.weights, strict=True)
        except Exception as exc:  # noqa: BLE001 - any failure: weights of another network
            raise BundleError(f"{printable(source_dir / f'fold_{fold}' / checkpoint)}: the weights do not fit the "
                              f"network of plans.json ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    return _Part(source_dir, dataset, plans, config_part, labels, channel_names, config,
                 {fold: content.weights for fold, content in read.items()}, source)


def _merged(parts: Sequence[_Part], class_map: str | os.PathLike[str] | None) -> tuple[Any, dict[str, Any]]:
    """The labels of several parts merged (:func:`medseg.bundle.nnunet_parts.merge_part_labels`) and the multi-part
    ``configs/nnunet.json`` content.

    Raises
    ------
    InputError
        A region-based part, parts of other input channels, labels not disjoint, or a bad class map.
    """
    for part in parts:
        if part.labels.regions:
            raise InputError(part.folder / "dataset.json", "a region-based model cannot be merged with others")
    first = parts[0]
    for part in parts[1:]:
        if len(part.channel_names) != len(first.channel_names):
            raise InputError(part.folder / "dataset.json", f"takes {len(part.channel_names)} input channel(s), "
                             f"{first.folder.name} takes {len(first.channel_names)}")
    merged, tables = merge_part_labels([(str(p.folder), p.labels.labels) for p in parts], class_map)
    config = {"format": PARTS_FORMAT,
              "parts": [{**p.config, "part": p.folder.name, "label_values": list(t)} for p, t in zip(parts, tables)]}
    try:
        read_parts(config)
    except ValueError as exc:
        raise InputError(first.folder, str(exc)) from None
    return DatasetLabels(merged, (), None, tuple(merged)), config


def import_nnunet(model_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                  configuration: str | None = None, folds: Sequence[int] | None = None,
                  checkpoint: str = "checkpoint_final.pth", segments: str | os.PathLike[str] | None = None,
                  class_map: str | os.PathLike[str] | None = None) -> Path:
    """Import an nnU-Net v2 trained-model folder as a medseg bundle at ``out`` (see the module docstring); several
    folders (TotalSegmentator's parts, each segmenting other labels) as one model whose label map merges theirs,
    the values from ``class_map`` (by label name) or numbered in folder order.

    Raises
    ------
    InputError
        ``out`` exists; a missing or unreadable ``dataset.json`` / ``plans.json``, an unknown configuration,
        missing folds, unsupported preprocessing, bad labels or ``--segments`` (each naming the file); parts
        that cannot be merged or a bad ``class_map``.
    BundleError
        A checkpoint refused (pickled code) or unreadable, a network outside the allow-list, or weights that
        do not fit it (naming the file).
    """
    folders = [Path(model_dir)] if isinstance(model_dir, (str, os.PathLike)) else [Path(d) for d in model_dir]
    target = Path(out)
    if not folders:
        raise InputError(None, "no nnU-Net model folder given")
    if len(set(folders)) != len(folders):
        raise InputError(folders[0], "the same model folder is given twice")
    if target.exists():
        raise InputError(target, "already exists; choose a new folder for the bundle")
    if class_map is not None and len(folders) == 1:
        raise InputError(class_map, "a class map merges several model folders; give more than one")
    parts = [_read_part(folder, configuration, folds, checkpoint) for folder in folders]
    first = parts[0]
    if len(parts) == 1:
        labels, config = first.labels, first.config
        weights = {fold_weights(fold): state for fold, state in first.weights.items()}
    else:
        labels, config = _merged(parts, class_map)
        weights = {part_weights(number, fold): state for number, part in enumerate(parts)
                   for fold, state in part.weights.items()}
    plan = _plan(first.configuration, first.plans, labels, first.channel_names, first.config)
    codes = _segments(segments, plan.labels)
    _write(target, plan, config, weights, first.dataset, codes, [p.source for p in parts])
    return target


def _inference_config(parts: bool) -> dict[str, Any]:
    """The imported bundle's ``configs/inference.json``: nnU-Net's factories (of :mod:`medseg.bundle.nnunet`, or for
    several parts of :mod:`medseg.bundle.nnunet_parts`) in medseg's template."""
    config = inference_config()
    for key in ("network_def", "weights"):
        config.pop(key, None)
    config["tta"] = True  # nnUNetv2_predict mirrors unless told not to (--disable_tta)
    module = _P if parts else _N
    config["network"] = {"_target_": f"{module}.nnunet{'_parts' if parts else ''}_network", "bundle_root": "@bundle_root",
                         "tta": "@tta", "device": "@device"}
    if parts:
        config["preprocessing"] = {"_target_": f"{_P}.nnunet_parts_preprocessing", "bundle_root": "@bundle_root"}
        config["inferer"] = {"_target_": f"{_P}.nnunet_parts_inferer", "bundle_root": "@bundle_root",
                             "overlap": "@overlap", "sw_batch_size": "@sw_batch_size", "precision": "@precision"}
        config["postprocessing"] = {"_target_": f"{_P}.nnunet_parts_postprocessing", "output_dir": "@predictions_dir",
                                    "overwrite": "@overwrite"}
        return config
    config["preprocessing"] = {"_target_": f"{_N}.nnunet_preprocessing", "bundle_root": "@bundle_root"}
    # nnU-Net's windows and Gaussian; the mirroring is nnU-Net's too, inside the network
    config["inferer"] = {**config["inferer"], "tta": False, "grid": "nnunet"}
    config["postprocessing"] = {"_target_": f"{_N}.nnunet_postprocessing", "bundle_root": "@bundle_root",
                                "output_dir": "@predictions_dir", "overwrite": "@overwrite"}
    return config


def _describe(config: Mapping[str, Any], sources: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """What the bundle is made of: a short phrase for its description and the README's paragraph."""
    parts = config.get("parts") or [config]
    phrase = "; ".join(f"{p['configuration']}, folds {', '.join(map(str, p['folds']))}" for p in parts)
    folders = "; ".join(f"`{s['folder']}` (trainer {s['trainer']}, plans {s['plans']}, configuration "
                        f"{p['configuration']}, folds {', '.join(map(str, p['folds']))}, checkpoint {s['checkpoint']})"
                        for s, p in zip(sources, parts))
    merge = ("" if len(parts) == 1 else f" The {len(parts)} parts are predicted one after another and merged into one "
             "label map (values in `configs/plan.json`); where two parts claim a voxel, the later part's label wins.")
    return phrase, (f"Source folder{'s' if len(parts) > 1 else ''} {folders}. Predictions follow nnU-Net's "
                    "preprocessing and export (`configs/nnunet.json`); test-time mirroring is on as in "
                    f"`nnUNetv2_predict` (`medseg predict --no-tta`).{merge}\n")


def _spatial_shape(config: Mapping[str, Any]) -> list[str]:
    """``network_data_format`` spatial shape of an imported network (of the first part): per axis a multiple of the
    product of its strides (nnU-Net's networks take nothing else), ``"1"`` for the slice axis of a 2d
    configuration."""
    first = (config.get("parts") or [config])[0]
    strides = first["architecture"]["arch_kwargs"].get("strides") or []
    axes = len(first["patch_size"])
    factors = [math.prod(int(s[a]) if isinstance(s, list) else int(s) for s in strides) for a in range(axes)]
    shape = [f"{f}*n" for f in factors]
    return shape if axes == len(first["transpose_forward"]) else ["1", *shape]


def _write(target: Path, plan: Plan, config: dict[str, Any], weights: Mapping[Path, Any], dataset: Mapping[str, Any],
           codes: dict[str, Any] | None, sources: Sequence[Mapping[str, Any]]) -> None:
    import torch

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(work, 0o777 & ~mask)  # a folder like any the user makes (mkdtemp's is private)
        name = str(dataset.get("name") or target.name)
        phrase, paragraph = _describe(config, sources)
        description = f"{name}: nnU-Net v2 model ({phrase}) imported by medseg"
        data_source = str(dataset.get("description") or dataset.get("reference") or "as stated by the model's authors")
        meta = metadata(plan, name, description, data_source, authors=str(dataset.get("author", "the model's authors")))
        folders = ", ".join(s["folder"] for s in sources)
        for side, key in (("inputs", "image"), ("outputs", "pred")):
            meta["network_data_format"][side][key]["spatial_shape"] = _spatial_shape(config)
        meta["changelog"] = {meta["version"]: f"imported from nnU-Net v2 ({folders}) by medseg bundle import-nnunet"}
        meta["copyright"] = str(dataset.get("copyright", "as stated by the model's authors"))
        meta["license"] = str(dataset.get("licence", dataset.get("license", "as stated by the model's authors")))
        meta["source"] = dict(sources[0]) if len(sources) == 1 else {"tool": "nnU-Net v2", "parts": list(sources)}
        reference = [str(dataset["reference"])] if dataset.get("reference") else []
        meta["references"] = ["Isensee et al., nnU-Net (2021)", *reference]
        if codes is not None:
            for value, code in codes.items():
                meta["segments"][value]["snomed"] = code
        missing = [meta["segments"][v]["name"] for v in meta["segments"] if not meta["segments"][v]["snomed"]]
        configs = work / "configs"
        plan.save(configs / "plan.json")
        atomic_write_text(work / NNUNET_FILE, json.dumps(config, indent=2) + "\n")
        atomic_write_text(configs / "inference.json", json.dumps(_inference_config(len(sources) > 1), indent=2) + "\n")
        atomic_write_text(configs / "metadata.json", json.dumps(meta, indent=2) + "\n")
        atomic_write_text(configs / "logging.conf", BUNDLE_LOGGING_CONF)
        note = "\n## Imported from nnU-Net v2\n\n" + paragraph
        if missing:
            note += ("\nNo segment code for: " + ", ".join(missing) + ". DICOM SEG output needs one per segment: "
                     "re-import with `--segments CODES.json` (label name -> code, scheme, meaning).\n")
        atomic_write_text(work / "docs" / "README.md", readme(plan, name, description, data_source) + note)
        for relative, state in weights.items():
            (work / relative).parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(state), work / relative)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("imported %s into %s", ", ".join(s["folder"] for s in sources), target)
    if missing:
        log.warning("%s: no segment code for %s; DICOM SEG output needs one (re-import with --segments)",
                    target, ", ".join(missing))
