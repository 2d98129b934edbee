"""Bundles of several nnU-Net v2 models merged into one label map (TotalSegmentator's layout: each model segments
a subset of the classes; one name table for all), and the factories their ``configs/inference.json`` names.

``configs/nnunet.json`` of such a bundle has the format ``medseg-nnunet-parts/1`` and a list ``parts``: each one a
``medseg-nnunet/1`` configuration (:func:`medseg.bundle.nnunet.read_imported`) with the model folder's name
(``part``) and ``label_values``, the merged label value of each of its labels (index = the part's value, 0 for
background). Weights: ``models/part_P/fold_K.pt``. Prediction (:class:`medseg.inference.parts.PartsInferer`):
each part preprocessed, predicted and exported as nnU-Net does, one after another; each part's foreground painted
over the parts before it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.bundle.nnunet import NNUNET_FILE, ImportedModel, read_imported, read_nnunet_file
from medseg.errors import InputError
from medseg.labels import parse_labels

__all__ = ["PARTS_FORMAT", "ImportedPart", "load_parts", "merge_part_labels", "nnunet_parts_inferer",
           "nnunet_parts_network", "nnunet_parts_postprocessing", "nnunet_parts_preprocessing", "part_weights",
           "read_parts"]

PARTS_FORMAT = "medseg-nnunet-parts/1"


def part_weights(part: int, fold: int) -> Path:
    """The weights file of one fold of one part: ``models/part_P/fold_K.pt``."""
    return Path("models") / f"part_{part}" / f"fold_{fold}.pt"


@dataclass(frozen=True)
class ImportedPart:
    """One part of a multi-part bundle: its model folder's name, configuration and merged label values."""

    name: str
    model: ImportedModel
    label_values: tuple[int, ...]


def _class_map(path: str | os.PathLike[str]) -> dict[int, str]:
    """``--class-map``: label value -> name (``{"1": "spleen", ...}``, TotalSegmentator's form) or name -> value
    (``{"background": 0, "spleen": 1}``, dataset.json's form); background 0 added when missing.

    Raises
    ------
    InputError
        Unreadable file or labels :func:`medseg.labels.parse_labels` refuses.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read it as JSON ({exc})") from None
    if not isinstance(data, Mapping) or not data:
        raise InputError(path, "must be a JSON object of label values and names, e.g. {\"1\": \"spleen\"}")
    by_name = all(isinstance(v, int) and not isinstance(v, bool) for v in data.values())
    if not any((v == 0) if by_name else (str(k).strip() == "0") for k, v in data.items()):
        data = {"background": 0, **data} if by_name else {"0": "background", **data}
    labels = parse_labels(data, path)
    names = list(labels.values())
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(path, f"the name {twice[0]!r} is given to two label values")
    return labels


def merge_part_labels(parts: Sequence[tuple[str, Mapping[int, str]]], class_map: str | os.PathLike[str] | None
                      ) -> tuple[dict[int, str], list[tuple[int, ...]]]:
    """The merged labels of several parts (folder name, its labels value -> name) and each part's table of merged
    values: by name from ``class_map`` (:func:`_class_map`), else numbered in part order.

    Raises
    ------
    InputError
        A label name in two parts (parts must segment disjoint labels), a part label the class map lacks, or a
        class-map label no part segments (naming the class map or the folder).
    """
    owner: dict[str, str] = {}
    for folder, labels in parts:
        for value, name in labels.items():
            if value == 0:
                continue
            if name in owner:
                raise InputError(folder, f"label {name!r} is also segmented by {owner[name]}; the parts of a merged "
                                         "model must segment disjoint labels")
            owner[name] = folder
    if class_map is None:
        merged = {0: "background"}
        for _, labels in parts:
            for value in sorted(labels):
                if value:
                    merged[len(merged)] = labels[value]
    else:
        merged = _class_map(class_map)
        missing = [name for name in owner if name not in merged.values()]
        if missing:
            raise InputError(class_map, f"no value for {', '.join(repr(m) for m in missing)} (segmented by "
                                        f"{owner[missing[0]]})")
        unused = [name for value, name in merged.items() if value and name not in owner]
        if unused:
            raise InputError(class_map, f"no part segments {', '.join(repr(u) for u in unused)}; remove them from "
                                        "the class map or add the model folder that segments them")
    value_of = {name: value for value, name in merged.items()}
    tables = [tuple(value_of[labels[v]] if v else 0 for v in range(max(labels) + 1)) for _, labels in parts]
    return merged, tables


def read_parts(data: Any) -> list[ImportedPart]:
    """Check the content of a multi-part ``configs/nnunet.json``.

    Raises
    ------
    ValueError
        Naming the first bad field (of which part).
    """
    if not isinstance(data, Mapping) or data.get("format") != PARTS_FORMAT:
        raise ValueError(f"'format' must be {PARTS_FORMAT!r}")
    items = data.get("parts")
    if not isinstance(items, list) or not items:
        raise ValueError("'parts' must list the parts")
    parts = []
    for number, item in enumerate(items):
        try:
            model = read_imported(item)
            name = item.get("part")
            values = item.get("label_values")
            if not isinstance(name, str) or not name:
                raise ValueError("'part' must name the model folder")
            if not isinstance(values, list) or len(values) != model.num_outputs or values[0] != 0 or \
                    not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65535 for v in values[1:]):
                raise ValueError("'label_values' must give 0 and then a label value (1-65535) per output")
            if model.preprocessing.regions:
                raise ValueError("a region-based model cannot be a part")
        except ValueError as exc:
            raise ValueError(f"parts[{number}]: {exc}") from None
        parts.append(ImportedPart(name, model, tuple(values)))
    channels = {p.model.input_channels for p in parts}
    if len(channels) > 1:
        raise ValueError(f"the parts take different numbers of input channels ({sorted(channels)})")
    return parts


def load_parts(bundle_root: str | os.PathLike[str]) -> list[ImportedPart]:
    """The bundle's multi-part ``configs/nnunet.json``, checked (:func:`~medseg.bundle.nnunet.read_nnunet_file`
    with :func:`read_parts`).

    Raises
    ------
    BundleError
        Missing or unreadable file, or a bad field (named).
    """
    return read_nnunet_file(bundle_root, read_parts)


def nnunet_parts_network(bundle_root: str | os.PathLike[str], tta: bool = True, device: Any = "cpu") -> Any:
    """Every part's folds as one :class:`~medseg.networks.nnunet.NnUNetEnsemble` (mirrored at test time when
    ``tta``), together a :class:`~medseg.inference.parts.PartsNetwork`; weights from ``models/part_P/fold_K.pt``.

    Raises
    ------
    BundleError
        As :func:`medseg.bundle.nnunet.ensemble_network`, for any part.
    """
    from medseg.bundle.nnunet import ensemble_network
    from medseg.inference.parts import PartsNetwork

    root = Path(bundle_root)
    networks = [ensemble_network(part.model, {f: root / part_weights(number, f) for f in part.model.folds},
                                 str(root / NNUNET_FILE), tta)
                for number, part in enumerate(load_parts(root))]
    return PartsNetwork(networks).to(device).eval()


def nnunet_parts_preprocessing(bundle_root: str | os.PathLike[str]) -> Any:
    """Read an image (one file per input channel); each part preprocesses it in the inferer.

    Raises
    ------
    BundleError
        A bad ``configs/nnunet.json``.
    """
    from monai.transforms import Compose

    from medseg.transforms import load_transforms

    return Compose(load_transforms(["image"], load_parts(bundle_root)[0].model.input_channels))


def nnunet_parts_inferer(bundle_root: str | os.PathLike[str], overlap: float = 0.5, sw_batch_size: int | None = None,
                         progress: bool = False, precision: str = "float32") -> Any:
    """:class:`~medseg.inference.parts.PartsInferer` of the parts: each with nnU-Net's preprocessing, windows and
    export; parts of the same preprocessing share one preprocessed image.

    Raises
    ------
    BundleError
        A bad ``configs/nnunet.json``.
    InputError
        A bad overlap, window batch size or precision.
    """
    from medseg.inference.inferer import SlabInferer
    from medseg.inference.parts import ModelPart, PartsInferer
    from medseg.transforms.nnunet import NnUNetPreprocessd
    from medseg.transforms.nnunet_export import NnUNetExportd

    parts = load_parts(bundle_root)
    built: list[ModelPart] = []
    preprocessors: list[Any] = []
    for part in parts:
        config = part.model.preprocessing
        preprocessor = next((p for p in preprocessors if p.config == config), None)
        if preprocessor is None:
            preprocessor = NnUNetPreprocessd(keys="image", config=config)
            preprocessors.append(preprocessor)
        patch = tuple(config.patch_size)
        window = patch if len(patch) == len(config.transpose_forward) else (1, *patch)
        try:
            inferer = SlabInferer(window, part.model.num_outputs, overlap=float(overlap),
                                  sw_batch_size=int(2 if sw_batch_size is None else sw_batch_size), progress=progress,
                                  precision=precision, grid="nnunet")
        except (TypeError, ValueError) as exc:
            raise InputError(None, str(exc)) from exc
        export = NnUNetExportd(keys="pred", config=config, dtype="uint8" if part.model.num_outputs <= 256 else "uint16")
        built.append(ModelPart(preprocessor, inferer, export, part.label_values))
    return PartsInferer(built)


def nnunet_parts_postprocessing(output_dir: str | os.PathLike[str] | None = None, overwrite: bool = False) -> Any:
    """The merged label map is already on the input's grid: with ``output_dir``, write it there as
    ``<case>_seg.<ending>`` (an existing file refused unless ``overwrite``); else nothing."""
    from monai.transforms import Compose

    from medseg.inference.compose import SaveLabelMapd

    return Compose([SaveLabelMapd(keys="pred", output_dir=output_dir, overwrite=overwrite)]
                   if output_dir is not None else [])
