"""MSD ``dataset.json`` (Medical Segmentation Decathlon, also nnU-Net v2 raw) reading and validation."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io.geometry import Geometry
from medseg.io.image import case_name, read_geometry, read_image
from medseg.labels import parse_labels

__all__ = [
    "CT_NAMES",
    "MR_NAMES",
    "Case",
    "Datalist",
    "load_datalist",
    "split_cases",
    "validate_case",
    "validate_datalist",
]

log = logging.getLogger(__name__)

CT_NAMES = {"ct", "cta", "pet-ct"}
MR_NAMES = {"mr", "mri", "t1", "t1w", "t1c", "t1gd", "t2", "t2w", "flair", "adc", "dwi", "pd", "t1ce"}


@dataclass
class Case:
    """One case of a dataset: an image and (for training, or test with references) its label map."""

    name: str
    image: Path
    label: Path | None = None


@dataclass
class Datalist:
    """A parsed ``dataset.json``: labels, modality and the training / test cases with absolute paths."""

    path: Path
    name: str
    modality: str  # "CT", "MR" or the raw channel name
    labels: dict[int, str]
    training: list[Case]
    test: list[Case]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def foreground_labels(self) -> dict[int, str]:
        return {k: v for k, v in self.labels.items() if k != 0}

    @property
    def preset(self) -> str:
        """Intensity preset name: ``"ct"`` for CT, ``"mr"`` for everything else."""
        return "ct" if self.modality == "CT" else "mr"


def _resolve(root: Path, entry: Any, key: str, json_path: Path) -> Path:
    if not isinstance(entry, str) or not entry:
        raise InputError(json_path, f"'{key}' entries must be file paths, got {entry!r}")
    path = Path(entry)
    return path if path.is_absolute() else (root / path).resolve()


def _parse_modality(data: dict[str, Any], json_path: Path) -> str:
    raw = data.get("channel_names") or data.get("modality")
    if raw is None:
        raise InputError(json_path, "neither 'modality' nor 'channel_names' is given")
    if isinstance(raw, str):
        raw = {"0": raw}
    if not isinstance(raw, dict) or not raw:
        raise InputError(json_path, "'modality' must map channel numbers to names, e.g. {\"0\": \"CT\"}")
    if len(raw) > 1:
        raise InputError(json_path, f"{len(raw)} input channels ({', '.join(map(str, raw.values()))}); "
                         "multi-channel datasets are not supported yet")
    name = str(next(iter(raw.values())))
    lowered = name.lower()
    if lowered in CT_NAMES:
        return "CT"
    if lowered in MR_NAMES or "mr" in lowered or lowered.startswith(("t1", "t2")):
        return "MR"
    log.warning("%s: unknown modality %r, using MR-style (z-score) normalisation", json_path, name)
    return name


def load_datalist(path: str | os.PathLike[str]) -> Datalist:
    """Parse an MSD-style ``dataset.json`` and check that every listed file exists.

    Test cases get a reference label map when ``labelsTs/<same file name>`` exists.

    Raises
    ------
    InputError
        Missing or unreadable file, invalid JSON, missing keys, bad labels, multi-channel data,
        listed files that do not exist, or duplicated case names.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.exists():
        raise InputError(path, "no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not a valid JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(path, "must hold a JSON object")
    path = path.resolve()
    root = path.parent
    labels = parse_labels(data.get("labels"), path)
    modality = _parse_modality(data, path)

    training_raw = data.get("training")
    if not isinstance(training_raw, list) or not training_raw:
        raise InputError(path, "'training' must be a non-empty list of {\"image\": ..., \"label\": ...}")
    training: list[Case] = []
    for entry in training_raw:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(path, f"training entry {entry!r} needs 'image' and 'label'")
        image = _resolve(root, entry["image"], "training", path)
        label = _resolve(root, entry["label"], "training", path)
        training.append(Case(case_name(image), image, label))

    test: list[Case] = []
    for entry in data.get("test") or []:
        image = _resolve(root, entry.get("image") if isinstance(entry, dict) else entry, "test", path)
        label_path = entry.get("label") if isinstance(entry, dict) else None
        label = _resolve(root, label_path, "test", path) if label_path else root / "labelsTs" / image.name
        test.append(Case(case_name(image), image, label if label.exists() else None))

    names = [c.name for c in training + test]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(path, f"case names used twice: {', '.join(duplicates)}")
    for case in training + test:
        for file in (case.image, case.label):
            if file is not None and not file.exists():
                raise InputError(file, f"listed in {path.name} but does not exist")
    known = {"labels", "modality", "channel_names", "training", "test", "name"}
    return Datalist(path, str(data.get("name", root.name)), modality, labels, training, test,
                    {k: v for k, v in data.items() if k not in known})


def validate_case(case: Case, labels: dict[int, str], dims: int | None = None) -> Geometry:
    """Check a case: readable image and label map, same grid, integer labels within ``labels``.

    Returns the image geometry.

    Raises
    ------
    InputError
        Unreadable or truncated files, wrong dimensionality, image/label grid mismatch,
        non-integer label values or values not declared in ``labels``.
    """
    geometry = read_geometry(case.image, dims)
    if case.label is None:
        return geometry
    label_geometry = read_geometry(case.label, geometry.dims)
    problem = geometry.mismatch(label_geometry)
    if problem:
        raise InputError(case.label, f"label map does not match its image {case.image.name}: {problem}")
    array = sitk.GetArrayFromImage(read_image(case.label))
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
        raise InputError(case.label, "label map has non-integer values")
    values = {int(v) for v in np.unique(array)}
    undeclared = sorted(values - set(labels))
    if undeclared:
        declared = ", ".join(str(k) for k in labels)
        raise InputError(case.label, f"label values {undeclared} are not declared in labels ({declared})")
    read_image(case.image, geometry.dims)  # full read: catches truncated pixel data
    return geometry


def validate_datalist(datalist: Datalist, include_test: bool = False) -> list[Geometry]:
    """Validate every training case (and test case if asked) and return their geometries.

    All cases must share the same dimensionality (2D or 3D).

    Raises
    ------
    InputError
        As :func:`validate_case`, or mixed 2D and 3D images.
    """
    cases = datalist.training + (datalist.test if include_test else [])
    geometries: list[Geometry] = []
    dims: int | None = None
    for case in cases:
        geometry = validate_case(case, datalist.labels, dims)
        dims = geometry.dims
        geometries.append(geometry)
    return geometries


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
