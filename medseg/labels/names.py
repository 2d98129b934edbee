"""Label names: one reader for every place that takes them, and label mappings.

A *label map* is an integer image whose voxel values are labels; the *label names* say what each
value means (``{0: "background", 1: "liver"}``). :func:`read_label_names` reads them from any of
the sources a user has at hand:

* a bundle or run folder (``configs/plan.json``; a MONAI model-zoo bundle without a plan:
  ``configs/metadata.json``), or a dataset folder holding ``dataset.json``;
* a ``plan.json``;
* a ``dataset.json``, full or holding only ``"labels"``, in the MSD form ``{"0": "background"}``
  or the nnU-Net v2 form ``{"background": 0}``;
* a bundle's ``metadata.json`` (``network_data_format.outputs.pred.channel_def``).

A *label mapping* (``--label-map 6=5,7=5``) renames prediction values to reference values before
they are compared.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from medseg.errors import InputError

__all__ = ["MAX_LABEL", "parse_label_mapping", "parse_labels"]

#: The largest label value a label map may hold (uint16).
MAX_LABEL = 65535



def parse_labels(raw: Any, source: str | os.PathLike[str] | None) -> dict[int, str]:
    """``{value: name}`` from a ``"labels"`` mapping, sorted by value.

    Accepts the MSD form ``{"0": "background", "1": "liver"}`` and the nnU-Net v2 form
    ``{"background": 0, "liver": 1}``.

    Raises
    ------
    InputError
        (naming ``source``) Not a non-empty mapping, region-based labels (a list of values), a value
        outside 0..65535 or declared twice, no background (0).
    """
    if not isinstance(raw, Mapping) or not raw:
        raise InputError(source, "'labels' must be a non-empty mapping such as {\"0\": \"background\", \"1\": \"liver\"}")
    labels: dict[int, str] = {}
    for key, value in raw.items():
        if str(key).strip().lstrip("-").isdigit() and isinstance(value, str):  # MSD: {"0": "background"}
            number, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: {"background": 0}
            number, name = value, str(key)
        else:
            raise InputError(source, f"label {key!r}: {value!r} is not supported "
                             "(expected {\"1\": \"liver\"} or {\"liver\": 1}; region-based labels are not)")
        if not 0 <= number <= MAX_LABEL:
            raise InputError(source, f"label value {number} is outside 0..{MAX_LABEL}")
        if number in labels:
            raise InputError(source, f"label value {number} is declared twice")
        labels[number] = name
    if 0 not in labels:
        raise InputError(source, "'labels' must declare 0 (background)")
    return dict(sorted(labels.items()))


def parse_label_mapping(text: str) -> dict[int, int]:
    """``{prediction value: reference value}`` from ``"6=5,7=5"`` (``PRED=REF`` pairs).

    Raises
    ------
    ValueError
        A pair that is not two integers in 0..65535 joined by ``=``, or a prediction value mapped twice.
    """
    mapping: dict[int, int] = {}
    for pair in (p.strip() for p in text.split(",")):
        if not pair:
            continue
        source, sep, target = pair.partition("=")
        if not sep or not source.strip().isdigit() or not target.strip().isdigit():
            raise ValueError(f"expected PRED=REF pairs of label values separated by commas (e.g. 6=5,7=5), got {pair!r}")
        key, value = int(source), int(target)
        if key > MAX_LABEL or value > MAX_LABEL:
            raise ValueError(f"label values must be in 0..{MAX_LABEL}, got {pair!r}")
        if key in mapping and mapping[key] != value:
            raise ValueError(f"prediction label {key} is mapped twice ({key}={mapping[key]} and {pair})")
        mapping[key] = value
    if not mapping:
        raise ValueError(f"expected PRED=REF pairs (e.g. 6=5,7=5), got {text!r}")
    return mapping
