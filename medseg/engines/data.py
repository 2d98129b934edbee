"""The data of a training run, as factories ``configs/train.json`` names: the dataset's training cases,
their split into training and validation, the items and transforms of the MONAI datasets, the
datasets of planned plans (preprocessed once, cached on disk), the data-loading workers, the epoch length.

Each reads (and checks) what it needs and writes nothing, except :func:`preprocessed_dataset`, whose
cache is written by MONAI's ``PersistentDataset`` as cases are first loaded; ``split.json`` is written
when the run starts (:func:`medseg.engines.training.run_training`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import monai
from monai.data import PersistentDataset
from monai.transforms import Compose

import medseg
from medseg.data.datalist import Case, Datalist, load_datalist, split_cases, validate_datalist
from medseg.devices import worker_count
from medseg.engines.weights import ResumePoint
from medseg.errors import BundleError, InputError
from medseg.io.image import case_name, list_images
from medseg.plan import Plan
from medseg.transforms import augmentation, preprocessing
from medseg.transforms.augment import planned_augmentation, sampling_preparation

__all__ = ["PREPROCESSED", "Split", "case_items", "drop_last", "epoch_length", "has_workers", "preprocessed_dataset",
           "training_datalist", "training_split", "training_transforms", "worker_count"]

#: Default cache folder of the preprocessed cases, under the run folder (:func:`preprocessed_dataset`).
PREPROCESSED = "preprocessed"

log = logging.getLogger("medseg.engines.training")

SPLIT_FILE = "split.json"


def find_training_cases(dataset_dir: str | os.PathLike[str], plan: Plan) -> Datalist:
    """The training cases of ``dataset_dir``: a ``dataset.json`` file (MSD or nnU-Net v2 raw), a folder
    holding one, or a folder with ``imagesTr/`` and ``labelsTr/`` (paired by file name; labels from the plan).

    Raises
    ------
    InputError
        No dataset found, or dataset labels, regions, ignore label or number of channels that differ
        from the plan's.
    """
    root = Path(dataset_dir)
    if root.is_file() or (root / "dataset.json").exists():
        datalist = load_datalist(root)  # an MSD dataset.json, or an nnU-Net v2 raw folder or its dataset.json
        if datalist.labels != plan.labels:
            raise InputError(datalist.path, f"labels {datalist.labels} differ from the bundle's {plan.labels}")
        if datalist.regions != plan.regions or datalist.ignore_label != plan.ignore_label:
            raise InputError(datalist.path, f"regions {list(datalist.regions)} and ignore label {datalist.ignore_label} "
                             f"differ from the bundle's {list(plan.regions)} and {plan.ignore_label}")
        if datalist.num_channels != plan.num_channels:
            raise InputError(datalist.path, f"{datalist.num_channels} input channel(s) "
                             f"({', '.join(datalist.channel_names)}); the bundle's network takes {plan.num_channels}")
        return datalist
    images, labels = root / "imagesTr", root / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise InputError(root, "no dataset.json and no imagesTr/ + labelsTr/ folders")
    cases = []
    for image in list_images(images):
        label = labels / image.name
        if not label.exists():
            raise InputError(image, f"no label map {label.name} in {labels}")
        cases.append(Case(case_name(image), image, label))
    return Datalist(root / "dataset.json", root.name, plan.modality, dict(plan.labels), cases, [],
                    regions=plan.regions, ignore_label=plan.ignore_label)


def training_datalist(dataset_dir: str | os.PathLike[str], plan: Plan) -> Datalist:
    """:func:`find_training_cases`, each case checked (:func:`medseg.data.datalist.validate_datalist`:
    readable images, label maps on the image grid with the plan's labels only).

    Raises
    ------
    InputError
        No dataset, labels that differ from the plan's, an unreadable or inconsistent case.
    """
    datalist = find_training_cases(dataset_dir, plan)
    validate_datalist(datalist)
    return datalist


@dataclass(frozen=True)
class Split:
    """Training and validation cases of a run (``split.json``)."""

    fold: int
    training: list[Case]
    validation: list[Case]
    #: read from the run being resumed (its ``split.json`` is kept as it is)
    resumed: bool = False

    def to_json(self) -> str:
        return json.dumps({"fold": self.fold, "training": [c.name for c in self.training],
                           "validation": [c.name for c in self.validation]}, indent=2) + "\n"


def _resumed_split(bundle_root: Path, datalist: Datalist, fold: int) -> Split:
    split_file = bundle_root / SPLIT_FILE
    if not split_file.exists():
        raise BundleError(f"{split_file}: no training to resume in this bundle")
    try:
        split = json.loads(split_file.read_text(encoding="utf-8"))
        names = [str(n) for n in split["training"]], [str(n) for n in split["validation"]]
        fold = int(split.get("fold", fold))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BundleError(f"{split_file}: not a training split ({type(exc).__name__})") from exc
    by_name = {c.name: c for c in datalist.training}
    missing = [n for n in names[0] + names[1] if n not in by_name]
    if missing:
        raise InputError(datalist.path, f"cases of the run being resumed are missing: {', '.join(missing)}")
    return Split(fold, [by_name[n] for n in names[0]], [by_name[n] for n in names[1]], resumed=True)


def training_split(datalist: Datalist, bundle_root: str | os.PathLike[str], fold: int = 0,
                   resume: bool = False) -> Split:
    """The cases of fold ``fold`` (:func:`medseg.data.datalist.split_cases`), or with ``resume`` the
    split of the run being resumed (``bundle_root/split.json``).

    Raises
    ------
    InputError
        ``fold`` outside 0-4, too few cases, cases of the resumed run missing from the dataset.
    BundleError
        ``resume`` without a readable ``split.json``.
    """
    if resume:
        split = _resumed_split(Path(bundle_root), datalist, fold)
    else:
        split = Split(fold, *split_cases(datalist.training, fold))
    log.info("loading %d training and %d validation cases", len(split.training), len(split.validation))
    return split


def _check_part(part: str) -> None:
    """Refuse a ``part`` other than ``"training"`` or ``"validation"`` (ValueError)."""
    if part not in ("training", "validation"):
        raise ValueError(f"part must be 'training' or 'validation', got {part!r}")


def case_items(split: Split, part: Literal["training", "validation"] = "training",
               previous: str | os.PathLike[str] | None = None) -> list[dict[str, str | list[str]]]:
    """``[{"image": path, "label": path}, ...]`` of the ``training`` or ``validation`` cases of ``split``;
    a case of several channels has ``"image": [path of each channel, in order]`` (stacked by the
    preprocessing into one image of several channels). With ``previous`` (a cascade stage: the folder of the
    previous stage's out-of-fold label maps, ``<case>_seg.<ending>``), each item also has ``"previous"``.

    Raises
    ------
    ValueError
        For another ``part``.
    InputError
        A case without its label map in ``previous`` (naming the folder and the case).
    """
    _check_part(part)
    maps = _previous_maps(Path(previous)) if previous is not None else {}
    items: list[dict[str, str | list[str]]] = []
    for case in getattr(split, part):
        images = [str(p) for p in case.images]
        item: dict[str, str | list[str]] = {"image": images if len(images) > 1 else images[0], "label": str(case.label)}
        if previous is not None:
            if case.name not in maps:
                raise InputError(previous, f"no label map of case {case.name} ({case.name}_seg.<ending>) of the "
                                           "previous stage here; a cascade stage trains on the previous stage's "
                                           "out-of-fold predictions of every training case")
            item["previous"] = str(maps[case.name])
        items.append(item)
    return items


def _previous_maps(folder: Path) -> dict[str, Path]:
    """The label maps ``<case>_seg.<ending>`` in ``folder`` by case.

    Raises
    ------
    InputError
        No such folder.
    """
    if not folder.is_dir():
        raise InputError(folder, "no folder of the previous stage's label maps (a cascade stage's bundle keeps them "
                                 "in previous/predictions)")
    return {case_name(path)[: -len("_seg")]: path for path in list_images(folder) if case_name(path).endswith("_seg")}


def training_transforms(plan: Plan, samples_per_case: int = 2) -> Compose:
    """The training chain: the plan's preprocessing of image and label, then patch sampling and
    augmentation (one flat ``Compose``, so that ``CacheDataset`` / ``PersistentDataset`` cache
    everything before the first random transform). Planned plans: the deterministic part ends with the
    class voxels for foreground sampling (:func:`medseg.transforms.augment.sampling_preparation`) and
    the augmentation is :func:`~medseg.transforms.augment.planned_augmentation` (a cascade stage's previous label
    map attached to the image at its end); ``"custom"`` plans keep :func:`~medseg.transforms.augment.augmentation`."""
    pre = list(preprocessing(plan, ("image", "label"), attach=False).transforms)
    if plan.planned:
        return Compose(pre + sampling_preparation(plan) + list(planned_augmentation(plan, samples_per_case).transforms))
    return Compose(pre + list(augmentation(plan, samples_per_case).transforms))


def _case_hash(item: Any) -> bytes:
    """Cache key of one data item: its content (file names) and, for each existing file it names,
    the size and modification time (a rewritten image is preprocessed again)."""
    stamps = []
    for value in (item.values() if isinstance(item, dict) else [item]):
        for name in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(name, (str, os.PathLike)) and os.path.isfile(name):
                stat = os.stat(name)
                stamps.append((str(name), stat.st_size, stat.st_mtime_ns))
    return hashlib.md5(pickle.dumps((item, stamps), protocol=4), usedforsecurity=False).hexdigest().encode()


def plan_key(plan: Plan) -> str:
    """A short hash of everything the preprocessed cases depend on: the plan, medseg's and MONAI's versions."""
    text = json.dumps([plan.to_json(), medseg.__version__, monai.__version__], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def preprocessed_dataset(data: Sequence[dict[str, Any]], transform: Compose, plan: Plan,
                         cache_dir: str | os.PathLike[str], part: Literal["training", "validation"]) -> PersistentDataset:
    """MONAI's ``PersistentDataset``: each case's deterministic transforms (reading, resampling,
    normalisation, the class voxels) run once and are saved under ``cache_dir/<plan key>/<part>/`` as
    ``.pt`` files (read back with ``torch.load(weights_only=True)``); every later load starts from
    them, so iterations never resample again (nnU-Net's preprocessing, done on first use).

    ``PersistentDataset`` keys its files by the data item only (not by the transforms), so the folder
    is keyed by :func:`plan_key` (another plan, medseg or MONAI version: another folder) and ``part``
    (the training and validation chains differ); an item's key includes its files' sizes and
    modification times (a rewritten image is preprocessed again).

    Raises
    ------
    ValueError
        For another ``part``.
    """
    _check_part(part)
    folder = Path(cache_dir) / plan_key(plan) / part
    log.info("preprocessed %s cases cached in %s", part, folder)
    return PersistentDataset(list(data), transform, cache_dir=folder, hash_func=_case_hash)


def has_workers(num_workers: int) -> bool:
    """Whether a loader has worker processes (``persistent_workers`` needs some)."""
    return num_workers > 0


def drop_last(dataset: Sized, batch_size: int) -> bool:
    """Whether the training loader drops an incomplete last batch: only when there is more than one batch."""
    return len(dataset) > batch_size


def epoch_length(dataloader: Sized, minimum: int = 20, resume: ResumePoint | None = None,
                 iterations: int | None = None) -> int:
    """Iterations per epoch: ``iterations`` when given (the planned recipe: 250, as nnU-Net), else the
    loader's batches, at least ``minimum`` (small datasets train as long as big ones); a resumed run
    keeps the epoch length it was started with."""
    length = iterations if iterations is not None else max(len(dataloader), minimum)
    if resume is not None and resume.epoch_length and resume.epoch_length != length:
        log.info("keeping the resumed run's %d iterations per epoch (this dataset and batch size give %d)",
                 resume.epoch_length, length)
        return resume.epoch_length
    return length
