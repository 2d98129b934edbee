"""Regions of a region-based dataset (nnU-Net v2): overlapping targets such as whole tumour, tumour
core and enhancing tumour, each the union of some label values, each predicted by its own sigmoid
output and painted back into one label map in a fixed order.

:func:`parse_dataset_labels` reads a dataset's ``"labels"`` (and ``"regions_class_order"``) as nnU-Net
v2 defines them:

* plain labels, ``{"background": 0, "liver": 1}`` (or the MSD form ``{"0": "background"}``);
* region-based labels, where at least one value is a list of several label values,
  ``{"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": [3]}``, with
  ``"regions_class_order": [1, 2, 3]``: every non-background entry is a region (a single value ``3``
  is the region ``[3]``), painted with the value at its position in ``regions_class_order``;
* an ``ignore`` label (the key ``"ignore"``, or the name ``"ignore"`` in the MSD form): voxels left out
  of loss and metrics, never predicted; it must be the highest label value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medseg.errors import InputError
from medseg.labels.names import MAX_LABEL, parse_labels

__all__ = ["IGNORE_NAME", "DatasetLabels", "Region", "parse_dataset_labels"]

#: The name of the ignore label (nnU-Net v2).
IGNORE_NAME = "ignore"


@dataclass(frozen=True)
class Region:
    """One region: ``name``, the label values it unites (``labels``), and the label-map ``value`` it is
    painted with (nnU-Net's ``regions_class_order``); later regions are painted over earlier ones, so
    nested regions go from the largest to the smallest."""

    name: str
    labels: tuple[int, ...]
    value: int

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "labels": [...], "value": ...}``, as ``plan.json`` and ``fingerprint.json`` hold it."""
        return {"name": self.name, "labels": list(self.labels), "value": self.value}


@dataclass(frozen=True)
class DatasetLabels:
    """What a dataset's ``"labels"`` declare.

    ``labels``: the values of the label maps a model outputs, with their names (for region-based
    datasets: 0 and each region's painted value, named by the region). ``regions``: in painting order,
    empty for plain labels. ``ignore_label``: the ignore value, or None. ``label_values``: every value a
    training label map may hold (the labels, or the values the regions unite, and the ignore label).
    """

    labels: dict[int, str]
    regions: tuple[Region, ...] = ()
    ignore_label: int | None = None
    label_values: tuple[int, ...] = ()


def _is_ignore(key: Any, value: Any) -> bool:
    return key == IGNORE_NAME or (isinstance(value, str) and value == IGNORE_NAME and str(key).strip().isdigit())


def _label_value(value: Any, where: str, source: str | os.PathLike[str] | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LABEL:
        raise InputError(source, f"{where}: {value!r} is not a label value (an integer in 0..{MAX_LABEL})")
    return value


def _split_ignore(raw: Mapping[Any, Any], source: str | os.PathLike[str] | None) -> tuple[dict[Any, Any], int | None]:
    """The labels without the ignore label, and the ignore value."""
    rest: dict[Any, Any] = {}
    ignore: int | None = None
    for key, value in raw.items():
        if _is_ignore(key, value):
            if isinstance(value, (list, tuple)):
                raise InputError(source, f"the ignore label must be one label value, not a region {value!r}")
            ignore = int(key) if isinstance(value, str) else _label_value(value, "label 'ignore'", source)
        else:
            rest[key] = value
    return rest, ignore


def _regions(raw: dict[Any, Any], order: Any, source: str | os.PathLike[str] | None
             ) -> tuple[dict[int, str], tuple[Region, ...], set[int]]:
    """Output labels, regions in painting order and the united label values of region-based labels."""
    background: str | None = None
    members: list[tuple[str, tuple[int, ...]]] = []
    for key, value in raw.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise InputError(source, f"region {key!r} holds no label values")
        checked = tuple(_label_value(v, f"region {key!r}", source) for v in values)
        if set(checked) == {0}:
            background = str(key)
        elif 0 in checked:
            raise InputError(source, f"region {key!r} {list(checked)} mixes the background (0) with other values")
        else:
            members.append((str(key), tuple(sorted(set(checked)))))
    if background is None:
        raise InputError(source, "'labels' must declare the background, e.g. \"background\": 0")
    if order is None:
        raise InputError(source, "region-based labels (lists of label values) need 'regions_class_order': "
                         "the label value painted for each region, in the order of 'labels'")
    if not isinstance(order, list) or len(order) != len(members):
        raise InputError(source, f"'regions_class_order' must list one label value per region ({len(members)}: "
                         f"{', '.join(name for name, _ in members)}), got {order!r}")
    values = [_label_value(v, "'regions_class_order'", source) for v in order]
    if 0 in values or len(set(values)) != len(values):
        raise InputError(source, f"'regions_class_order' {values} must give each region its own non-zero value")
    regions = tuple(Region(name, labels, value) for (name, labels), value in zip(members, values, strict=True))
    labels = dict(sorted([(0, background), *((r.value, r.name) for r in regions)]))
    united = {0}.union(*(r.labels for r in regions))
    return labels, regions, united


def parse_dataset_labels(raw: Any, regions_class_order: Any = None,
                         source: str | os.PathLike[str] | None = None) -> DatasetLabels:
    """A dataset's labels, regions and ignore label from its ``"labels"`` and ``"regions_class_order"``.

    Region-based when at least one label is a list of several values (nnU-Net's rule); then every
    non-background entry is a region, painted with the value at its position in ``regions_class_order``.

    Raises
    ------
    InputError
        (naming ``source``) Labels :func:`medseg.labels.parse_labels` refuses (plain labels); for
        regions: no background, a value outside 0..65535, a region mixing 0 with other values, no or a
        wrong ``regions_class_order`` (one distinct non-zero value per region); an ignore label that is
        a list, already a label value, or not the highest value.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise InputError(source, "'labels' must be a non-empty mapping such as {\"background\": 0, \"liver\": 1}")
    rest, ignore = _split_ignore(raw, source)
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in rest.values()):
        labels, regions, values = _regions(rest, regions_class_order, source)
    else:  # plain labels; nnU-Net reads a one-value list [3] as the label 3
        plain = {k: v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for k, v in rest.items()}
        labels, regions = parse_labels(plain, source), ()
        values = set(labels)
    if ignore is not None:
        if ignore in values or ignore <= max(values):
            raise InputError(source, f"the ignore label ({ignore}) must be the highest label value "
                             f"(above {max(values)}) and not a label of its own")
        values.add(ignore)
    return DatasetLabels(labels, regions, ignore, tuple(sorted(values)))
