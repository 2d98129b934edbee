"""Preprocessing ahead of training (``medseg plan --preprocess``), as ``nnUNetv2_plan_and_preprocess`` does:
each case of a fold read, resampled to the plan's spacing and normalised once, in worker processes, into
the on-disk cache the planned recipe trains from (:func:`medseg.engines.data.preprocessed_dataset`), so the
first epoch starts from it instead of preprocessing on first use."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.data import PersistentDataset
from torch.utils.data import DataLoader, Dataset

from medseg.engines.data import (
    case_items,
    find_training_cases,
    preprocessed_dataset,
    training_split,
    training_transforms,
)
from medseg.errors import InputError
from medseg.plan import Plan
from medseg.transforms import preprocessing

__all__ = ["CACHE_FOLDER", "PreprocessResult", "preprocess_cases"]

log = logging.getLogger(__name__)

#: The cache folder inside a bundle (the planned recipe's ``cache_dir``: ``bundle_root/preprocessed``).
CACHE_FOLDER = "preprocessed"


@dataclass(frozen=True)
class PreprocessResult:
    """Cases preprocessed per part, the cache folder, the wall-clock seconds."""

    training: int
    validation: int
    folder: Path
    seconds: float


class _Caching(Dataset[int]):
    """Item ``i`` writes case ``i``'s cache file of ``dataset`` (MONAI's ``PersistentDataset._cachecheck``:
    the deterministic transforms, saved once) and returns nothing, so no image travels back from a worker."""

    def __init__(self, dataset: PersistentDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.data)

    def __getitem__(self, index: int) -> int:
        self.dataset._cachecheck(self.dataset.data[index])  # noqa: SLF001 (exactly what training caches)
        return index


def _none(batch: Any) -> None:
    return None


def preprocess_cases(plan: Plan, dataset_dir: str | os.PathLike[str], bundle_dir: str | os.PathLike[str],
                     fold: int = 0, workers: int = 1) -> PreprocessResult:
    """Cache fold ``fold``'s training and validation cases of the dataset ``dataset_dir`` as ``medseg
    train --data dataset_dir`` on this bundle will read them (same cases and paths, split, transforms,
    plan key and cache folder), in ``workers`` processes (0 or 1: in this one). Cases already cached are
    kept; the cases are not checked again (the fingerprint read each one).

    Raises
    ------
    InputError
        A plan not made by the planner (its recipe caches cases in memory, not on disk), a dataset that
        does not match the plan, a fold outside 0-4 or too few cases, ``workers`` below 0.
    """
    if not plan.planned:
        raise InputError(bundle_dir, "only a plan made by the planner (medseg plan) trains from preprocessed "
                                     "cases on disk; this one is 'custom'")
    if workers < 0:
        raise InputError(None, f"--workers must be 0 or more, got {workers}")
    started = time.monotonic()
    datalist = find_training_cases(os.path.abspath(dataset_dir), plan)  # the paths medseg train will hash
    split = training_split(datalist, bundle_dir, fold)
    folder = Path(bundle_dir) / CACHE_FOLDER
    chains = {"training": training_transforms(plan, samples_per_case=1),
              "validation": preprocessing(plan, ("image", "label"))}
    for part in ("training", "validation"):
        dataset = preprocessed_dataset(case_items(split, part), chains[part], plan, folder, part)
        loader = DataLoader(_Caching(dataset), batch_size=1, num_workers=workers if workers > 1 else 0,
                            collate_fn=_none)
        for _ in loader:
            pass
    seconds = time.monotonic() - started
    log.info("preprocessed %d training and %d validation cases into %s in %.1f s", len(split.training),
             len(split.validation), folder, seconds)
    return PreprocessResult(len(split.training), len(split.validation), folder, seconds)
