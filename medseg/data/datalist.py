"""Reading a dataset: an MSD ``dataset.json`` (cases listed in ``training``) or an nnU-Net v2 raw dataset
(cases found in ``imagesTr/`` by their ``_0000`` channel suffix and ``file_ending``, see :mod:`.raw`),
with one or several input channels, plain or region-based labels and an ignore label."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.cases import Case, Datalist
from medseg.data.channels import CT_NAMES, MR_NAMES, channel_modality, parse_channel_names
from medseg.data.raw import raw_dataset_cases
from medseg.data.validation import validate_case, validate_datalist
from medseg.errors import InputError
from medseg.io.image import case_name
from medseg.labels import parse_dataset_labels

__all__ = [
    "CT_NAMES",
    "MR_NAMES",
    "Case",
    "Datalist",
    "check_unique_names",
    "listed_path",
    "load_datalist",
    "read_dataset_json",
    "split_cases",
    "validate_case",
    "validate_datalist",
]

#: dataset.json keys read into a Datalist's fields (the others are kept in ``Datalist.extra``).
_KNOWN = {"labels", "modality", "channel_names", "training", "test", "name", "regions_class_order", "dataset"}


def listed_path(root: Path, entry: Any, key: str, json_path: Path) -> Path:
    """A file named in ``json_path``'s ``key`` list: relative to ``root``, or absolute.

    Raises
    ------
    InputError
        (naming ``json_path``) An entry that is not a non-empty string.
    """
    if not isinstance(entry, str) or not entry:
        raise InputError(json_path, f"'{key}' entries must be file paths, got {entry!r}")
    path = Path(entry)
    return path if path.is_absolute() else (root / path).resolve()


def _listed_images(root: Path, entry: Any, key: str, channel_names: tuple[str, ...], json_path: Path) -> Case:
    """A case from an MSD entry's image: one file, or a list of files (one per channel)."""
    if isinstance(entry, list):
        if len(entry) != len(channel_names):
            raise InputError(json_path, f"'{key}' entry lists {len(entry)} image file(s) for {len(channel_names)} "
                             f"channel(s) ({', '.join(channel_names)})")
        files = tuple(listed_path(root, e, key, json_path) for e in entry)
        return Case(case_name(files[0]), files[0], None, files if len(files) > 1 else ())
    image = listed_path(root, entry, key, json_path)
    if len(channel_names) > 1:
        raise InputError(json_path, f"{len(channel_names)} input channels ({', '.join(channel_names)}) but "
                         f"'{key}' names one image file per case ({image.name}): multi-channel MSD images are 4D "
                         f"files; convert the dataset once to one file per channel (the nnU-Net v2 raw layout) with "
                         f"`medseg convert-msd --data {json_path} --out NEW_FOLDER`, or list one file per channel "
                         "(\"image\": [...])")
    return Case(case_name(image), image)


def _msd_cases(root: Path, data: dict[str, Any], channel_names: tuple[str, ...],
               json_path: Path) -> tuple[list[Case], list[Case]]:
    training_raw = data.get("training")
    if not isinstance(training_raw, list) or not training_raw:
        raise InputError(json_path, "'training' must be a non-empty list of {\"image\": ..., \"label\": ...}")
    training: list[Case] = []
    for entry in training_raw:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(json_path, f"training entry {entry!r} needs 'image' and 'label'")
        case = _listed_images(root, entry["image"], "training", channel_names, json_path)
        case.label = listed_path(root, entry["label"], "training", json_path)
        training.append(case)
    test: list[Case] = []
    for entry in data.get("test") or []:
        image = entry.get("image") if isinstance(entry, dict) else entry
        case = _listed_images(root, image, "test", channel_names, json_path)
        label_path = entry.get("label") if isinstance(entry, dict) else None
        label = listed_path(root, label_path, "test", json_path) if label_path else root / "labelsTs" / case.image.name
        case.label = label if label.exists() else None
        test.append(case)
    return training, test


def read_dataset_json(path: Path) -> dict[str, Any]:
    """A ``dataset.json``'s object.

    Raises
    ------
    InputError
        (naming ``path``) A missing file, invalid JSON, anything but an object.
    """
    if not path.exists():
        raise InputError(path, "no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not a valid JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(path, "must hold a JSON object")
    return data


def load_datalist(path: str | os.PathLike[str]) -> Datalist:
    """Parse a dataset: an MSD ``dataset.json`` (with a ``training`` list), or an nnU-Net v2 raw dataset
    folder or its ``dataset.json`` (no ``training`` list: cases found in ``imagesTr/``, see :mod:`.raw`).

    Every listed or found file must exist. Test cases get a reference label map from ``labelsTs/``
    when there is one. Several channels (``channel_names``), region-based labels (lists of label
    values with ``regions_class_order``) and an ``ignore`` label are read as nnU-Net v2 defines them.

    Raises
    ------
    InputError
        Missing or unreadable file, invalid JSON, missing keys, bad labels, regions or channel names,
        an MSD list naming one (4D) file for several channels, listed files that do not exist,
        duplicated case names; for the raw layout: a missing channel file, an extra file, a label map
        without images, a missing label map, ``numTraining`` that differs from the cases found.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    data = read_dataset_json(path)
    path = path.resolve()
    root = path.parent
    declared = parse_dataset_labels(data.get("labels"), data.get("regions_class_order"), path)
    channel_names = parse_channel_names(data, path)
    file_ending: str | None = data.get("file_ending") if isinstance(data.get("file_ending"), str) else None
    if "training" in data:
        training, test = _msd_cases(root, data, channel_names, path)
    else:
        training, test, file_ending = raw_dataset_cases(root, data, channel_names, path)
    check_unique_names([c.name for c in training + test], path)
    for case in training + test:  # listed files (MSD 'training', nnU-Net 'dataset') need not exist
        for file in (*case.images, case.label):
            if file is not None and not file.exists():
                raise InputError(file, f"listed in {path.name} but does not exist")
    return Datalist(path, str(data.get("name", root.name)), channel_modality(channel_names[0]), declared.labels,
                    training, test, {k: v for k, v in data.items() if k not in _KNOWN},
                    channel_names=channel_names, regions=declared.regions, ignore_label=declared.ignore_label,
                    file_ending=file_ending)


def check_unique_names(names: list[str], json_path: Path) -> None:
    """Raise InputError (naming ``json_path``) listing the case names that occur more than once."""
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(json_path, f"case names used twice: {', '.join(duplicates)}")


def split_cases(cases: list[Case], fold: int, folds: int = 5, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Deterministic k-fold split: returns (training, validation) for ``fold``.

    Raises
    ------
    InputError
        If ``fold`` is not in ``0..folds-1`` or there are too few cases to hold one out.
    """
    if not 0 <= fold < folds:
        raise InputError(None, f"--fold must be between 0 and {folds - 1}, got {fold}")
    if len(cases) < 2:
        raise InputError(None, f"need at least 2 training cases for a train/validation split, got {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    folds = min(folds, len(cases))
    val_idx = set(order[fold % folds :: folds].tolist())
    train = [c for i, c in enumerate(cases) if i not in val_idx]
    val = [c for i, c in enumerate(cases) if i in val_idx]
    return train, val
