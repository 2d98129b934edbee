"""Label names from every source a user has at hand (:func:`read_label_names`): a bundle or run folder
(``configs/plan.json``; a model-zoo bundle's ``configs/metadata.json``), a dataset folder or its
``dataset.json`` (MSD, nnU-Net v2, region-based: the painted values and the regions' names), a
``plan.json``, or a bundle's ``metadata.json`` (``network_data_format.outputs.pred.channel_def``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medseg.errors import InputError
from medseg.labels.names import parse_labels
from medseg.labels.regions import parse_dataset_labels
from medseg.layout import META_FILE, PLAN_FILE

__all__ = ["FOLDER_SOURCES", "read_label_names"]

#: Where a folder's label names are looked for, in order.
FOLDER_SOURCES: tuple[Path, ...] = (PLAN_FILE, META_FILE, Path("dataset.json"))
_EXPECTED = ("a bundle or run folder, a plan.json, a dataset.json, a JSON file with \"labels\" "
             "(e.g. {\"labels\": {\"0\": \"background\", \"1\": \"liver\"}}) or a bundle's metadata.json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not a valid JSON file ({exc})") from exc


def _labels_in(data: Any, path: Path) -> dict[int, str]:
    """The label names a parsed JSON document holds: its ``"labels"`` (dataset.json, plan.json) or
    its ``network_data_format.outputs.pred.channel_def`` (a bundle's metadata.json); for region-based
    nnU-Net labels, the values the regions are painted with and the regions' names."""
    if not isinstance(data, dict):
        raise InputError(path, f"must hold a JSON object; expected {_EXPECTED}")
    if "labels" in data:
        raw = data["labels"]
        if isinstance(raw, dict) and any(isinstance(v, list) for v in raw.values()):  # nnU-Net v2 regions
            return parse_dataset_labels(raw, data.get("regions_class_order"), path).labels
        return parse_labels(raw, path)
    node: Any = data
    for key in ("network_data_format", "outputs", "pred", "channel_def"):
        node = node.get(key) if isinstance(node, dict) else None
    if node is not None:
        return parse_labels(node, path)
    raise InputError(path, f"holds no \"labels\" mapping; expected {_EXPECTED}")


def read_label_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """``{value: name}`` (0, the background, included) from any label source (see the module doc).

    A folder is looked into for :data:`FOLDER_SOURCES` in that order (a bundle's plan first);
    a file is read as JSON and its ``"labels"`` (or metadata ``channel_def``) taken, whatever else
    it holds: a ``dataset.json`` need not list training cases or a modality.

    Raises
    ------
    InputError
        Missing path, a folder without any of the sources, unreadable or invalid JSON, no labels
        in it, or labels that :func:`parse_labels` refuses.
    """
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in FOLDER_SOURCES if (path / name).is_file()), None)
        if found is None:
            raise InputError(path, "no label names here: expected a bundle or run folder (configs/plan.json) "
                             "or a dataset folder (dataset.json)")
        path = found
    elif not path.exists():
        raise InputError(path, "no such file or folder")
    return _labels_in(_read_json(path), path)
