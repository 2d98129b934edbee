"""Connected-component postprocessing of label maps, kept only where it raised Dice on labelled cases.

A prediction often holds small islands away from the structure (a second "spleen" in the liver, a speck of
tumour in the background). nnU-Net's answer, which medseg follows, is to try "keep the largest connected
component" on cases with a reference (out-of-fold predictions) and keep it only where the mean Dice rises:

1. of the whole foreground (every label together; voxels outside its largest component become background),
   kept when the mean Dice over the labels rises;
2. then of each label on its own (on top of step 1 where it was kept), kept for a label when that label's
   mean Dice rises.

:func:`choose_rules` makes that decision in one pass over the cases (one pair of label maps in memory at a
time) and records the figures; :func:`apply_rules` applies a decision to a label map; :func:`postprocess_folder`
applies it to a folder of predictions (``medseg postprocess``). The rules live in a small JSON file
(``configs/postprocessing.json``), read back strictly by :func:`read_rules`. Components are found by MONAI's
``KeepLargestConnectedComponent`` with face connectivity (6 neighbours in 3D, 4 in 2D).

Applying the rules to labels another label encloses (nested regions of a region-based plan, painted in their
order) treats every label value on its own, as the label map holds it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import KeepLargestConnectedComponent, MapTransform

from medseg.errors import InputError
from medseg.io.atomic import atomic_write_text
from medseg.io.image import list_images, read_source, write_label_map
from medseg.metrics.evaluate import pair_cases, pair_spacings
from medseg.metrics.labelmaps import as_label_map, label_values, read_label_map

__all__ = [
    "RULES_FORMAT",
    "LargestComponentsd",
    "PostprocessingRules",
    "apply_rules",
    "choose_rules",
    "folder_cases",
    "label_map_pairs",
    "postprocess_folder",
    "read_rules",
    "write_rules",
]

log = logging.getLogger(__name__)

#: The ``format`` of a rules file this version reads and writes.
RULES_FORMAT = "medseg-postprocessing/1"
#: Face connectivity (``scipy``/``skimage`` connectivity 1): 6 neighbours in 3D, 4 in 2D.
CONNECTIVITY = 1
_KEYS = {"format", "foreground_largest_component", "largest_component_labels", "connectivity", "evidence"}


@dataclass(frozen=True)
class PostprocessingRules:
    """What to do to a predicted label map: keep the largest component of the foreground, then of each of
    ``largest_component_labels``; ``evidence`` records the figures the decision was made on (not applied)."""

    foreground_largest_component: bool = False
    largest_component_labels: tuple[int, ...] = ()
    evidence: Mapping[str, Any] = field(default_factory=dict)

    @property
    def changes_anything(self) -> bool:
        return self.foreground_largest_component or bool(self.largest_component_labels)

    def to_json(self) -> dict[str, Any]:
        return {"format": RULES_FORMAT, "connectivity": CONNECTIVITY,
                "foreground_largest_component": self.foreground_largest_component,
                "largest_component_labels": list(self.largest_component_labels), "evidence": dict(self.evidence)}


def _keep_largest(labels: np.ndarray, applied: Sequence[int], independent: bool) -> np.ndarray:
    """MONAI's ``KeepLargestConnectedComponent`` on a label map (index order kept; other labels untouched)."""
    if not applied:
        return labels
    keep = KeepLargestConnectedComponent(applied_labels=list(applied), is_onehot=False, independent=independent,
                                         connectivity=CONNECTIVITY)
    out = keep(torch.tensor(labels)[None])  # a copy: MONAI's transform writes into the tensor it is given
    return np.asarray(out[0].numpy() if isinstance(out, torch.Tensor) else out[0]).astype(labels.dtype, copy=False)


def foreground_largest_component(labels: np.ndarray) -> np.ndarray:
    """Set to background every foreground voxel outside the largest component of all labels together."""
    return _keep_largest(labels, [v for v in label_values(labels) if v != 0], independent=False)


def label_largest_component(labels: np.ndarray, label: int) -> np.ndarray:
    """Set to background the voxels of ``label`` outside its largest component."""
    return _keep_largest(labels, [label], independent=True) if np.any(labels == label) else labels


def apply_rules(labels: np.ndarray, rules: PostprocessingRules) -> np.ndarray:
    """``labels`` after ``rules`` (a new array where anything changes; other labels are untouched)."""
    if rules.foreground_largest_component:
        labels = foreground_largest_component(labels)
    for label in rules.largest_component_labels:
        labels = label_largest_component(labels, label)
    return labels


class LargestComponentsd(MapTransform):
    """Apply :class:`PostprocessingRules` to the label maps at ``keys`` (``(1, *spatial)``, in the input's grid:
    the step after the inversion in a bundle's ``postprocessing``); metadata kept."""

    def __init__(self, keys: str | Sequence[str], rules: PostprocessingRules) -> None:
        super().__init__(keys)
        self.rules = rules

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.rules.changes_anything:
            return d
        for key in self.key_iterator(d):
            value = d[key]
            given = np.asarray(value[0].cpu().numpy() if isinstance(value, torch.Tensor) else value[0])
            labels = apply_rules(given.astype(np.int32) if given.dtype.kind == "f" else given, self.rules)
            out = torch.from_numpy(np.ascontiguousarray(labels.astype(given.dtype, copy=False)))[None]  # as given
            d[key] = MetaTensor(out, meta=value.meta) if isinstance(value, MetaTensor) else out
        return d


def _dice(pred: np.ndarray, reference: np.ndarray, label: int) -> float:
    """Dice of ``label`` in ``pred`` against the reference's mask of it (1 when it is absent from both, medseg's
    empty convention)."""
    p = pred == label
    total = int(p.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, reference).sum()) / total


def choose_rules(cases: Iterable[tuple[str, np.ndarray, np.ndarray]], labels: Sequence[int],
                 source: str = "") -> PostprocessingRules:
    """Decide the rules on ``cases`` (``(case, predicted label map, reference label map)``, the predictions
    made without postprocessing): each step is kept only where the mean Dice over the cases rises (strictly).

    ``labels`` are the foreground label values scored (Dice 1 for a label absent from both maps of a case).
    The returned ``evidence`` holds the mean Dice per label without postprocessing, with each step, and the
    decisions; ``source`` (e.g. the prediction folder) is recorded with them.

    Raises
    ------
    ValueError
        No case, no foreground label, or a pair whose shapes differ.
    """
    labels = sorted({int(v) for v in labels if int(v) != 0})
    if not labels:
        raise ValueError("no foreground label to decide postprocessing on")
    sums = {key: dict.fromkeys(labels, 0.0) for key in ("none", "foreground", "label", "foreground_then_label")}
    count = 0
    for case, pred, ref in cases:
        if pred.shape != ref.shape:
            raise ValueError(f"{case}: prediction shape {pred.shape} differs from the reference's {ref.shape}")
        foreground = foreground_largest_component(pred)
        for label in labels:
            mask = ref == label  # once per label, for the four variants
            sums["none"][label] += _dice(pred, mask, label)
            sums["foreground"][label] += _dice(foreground, mask, label)
            sums["label"][label] += _dice(label_largest_component(pred, label), mask, label)
            sums["foreground_then_label"][label] += _dice(label_largest_component(foreground, label), mask, label)
        count += 1
    if not count:
        raise ValueError("no case to decide postprocessing on")
    means = {key: {label: value / count for label, value in per_label.items()} for key, per_label in sums.items()}

    def overall(key: str) -> float:
        return float(np.mean(list(means[key].values())))

    use_foreground = overall("foreground") > overall("none")
    base, on_top = ("foreground", "foreground_then_label") if use_foreground else ("none", "label")
    kept = tuple(label for label in labels if means[on_top][label] > means[base][label])
    final = {label: means[on_top][label] if label in kept else means[base][label] for label in labels}
    evidence = {
        "cases": count, "source": source, "labels": labels,
        "mean_dice": {"none": round(overall("none"), 5), "foreground_largest_component": round(overall("foreground"), 5),
                      "chosen": round(float(np.mean(list(final.values()))), 5)},
        "dice_per_label": {str(label): {"none": round(means["none"][label], 5),
                                        "foreground_largest_component": round(means["foreground"][label], 5),
                                        "label_largest_component": round(means[on_top][label], 5),
                                        "chosen": round(final[label], 5)} for label in labels},
        "rule": "a step is kept only where it raises the mean Dice over the cases: the largest component of the "
                "foreground (mean over the labels), then of each label on top of it (that label's mean)",
    }
    return PostprocessingRules(use_foreground, kept, evidence)


def label_map_pairs(pairs: Sequence[tuple[str, Path, Path]], declared: Mapping[int, str] | None = None
                    ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(case, prediction, reference)`` label maps of ``pairs`` (``(case, prediction file, reference file)``),
    every pair grid-checked on the headers first (:func:`~medseg.metrics.evaluate.pair_spacings`), then read one
    pair at a time (for :func:`choose_rules`).

    Raises
    ------
    InputError
        Grids that differ, an unreadable file, or a file that is not a label map (of ``declared``'s labels).
    """
    pair_spacings(list(pairs))  # every pair on one grid, checked before anything is decided
    for case, pred, ref in pairs:
        yield case, read_label_map(pred, declared), read_label_map(ref, declared)


def folder_cases(pred_dir: str | os.PathLike[str], ref_dir: str | os.PathLike[str],
                 declared: Mapping[int, str] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """:func:`label_map_pairs` of two folders, paired as ``medseg evaluate`` pairs them.

    Raises
    ------
    InputError
        As :func:`medseg.metrics.evaluate.pair_cases` (unpaired cases) and :func:`label_map_pairs`.
    """
    return label_map_pairs(pair_cases(pred_dir, ref_dir), declared)


def read_rules(path: str | os.PathLike[str]) -> PostprocessingRules:
    """Read a rules file written by :func:`write_rules` (``configs/postprocessing.json``).

    Raises
    ------
    InputError
        (naming the file) A missing or unreadable file, not JSON, another ``format``, an unknown key, or a
        value of the wrong type (labels must be positive integers).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such postprocessing rules file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not a readable JSON rules file ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "a postprocessing rules file holds a JSON object")
    if data.get("format") != RULES_FORMAT:
        raise InputError(path, f"format {data.get('format')!r} is not {RULES_FORMAT!r}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise InputError(path, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    if data.get("connectivity", CONNECTIVITY) != CONNECTIVITY:
        raise InputError(path, f"connectivity {data['connectivity']!r} is not supported (only {CONNECTIVITY}: faces)")
    foreground = data.get("foreground_largest_component", False)
    labels = data.get("largest_component_labels", [])
    if not isinstance(foreground, bool):
        raise InputError(path, f"foreground_largest_component must be true or false, got {foreground!r}")
    if not isinstance(labels, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in labels):
        raise InputError(path, f"largest_component_labels must be a list of label values >= 1, got {labels!r}")
    evidence = data.get("evidence", {})
    if not isinstance(evidence, dict):
        raise InputError(path, "evidence must be a JSON object")
    return PostprocessingRules(foreground, tuple(sorted(set(labels))), evidence)


def write_rules(rules: PostprocessingRules, path: str | os.PathLike[str]) -> Path:
    """Write ``rules`` as JSON (atomically) and return the path."""
    return atomic_write_text(path, json.dumps(rules.to_json(), indent=2) + "\n")


def postprocess_folder(pred_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                       rules: PostprocessingRules) -> list[Path]:
    """Apply ``rules`` to every label map in ``pred_dir`` and write each, same name and grid, to ``out_dir``.

    All outputs are written into a temporary folder beside ``out_dir`` and moved into place once every case
    is done, so a failure leaves no output; the predictions themselves are never touched.

    Raises
    ------
    InputError
        ``pred_dir`` missing or without images; ``out_dir`` the same folder as ``pred_dir``, or holding a
        file of an output's name (it is not overwritten); an unreadable image, or one that is not a label map
        (fractional, negative, NaN values), named.
    """
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    images = list_images(pred_dir)  # refuses a missing folder, and one without images
    if out_dir.exists() and out_dir.resolve() == pred_dir.resolve():
        raise InputError(out_dir, "the output folder is the prediction folder; choose another (nothing is overwritten)")
    taken = [out_dir / p.name for p in images if (out_dir / p.name).exists()]
    if taken:
        raise InputError(taken[0], "already exists; choose an empty output folder (nothing is overwritten)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for path in images:
            source = read_source(path)
            labels = as_label_map(path, source.voxels())
            write_label_map(apply_rules(labels, rules), source, staging / path.name)
            source.drop_pixels()
            log.info("%s: postprocessed", path.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = {path.name for path in images}
        # the named files last, so that a MetaImage header never points at a data file not yet in place
        for produced in sorted(staging.iterdir(), key=lambda p: (p.name in names, p.name)):
            os.replace(produced, out_dir / produced.name)
        return [out_dir / path.name for path in images]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
