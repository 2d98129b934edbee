"""Several models, each for a subset of the labels, merged into one label map (TotalSegmentator's multi-part
layout: one nnU-Net model per group of classes, one name table for all).

Each :class:`ModelPart` carries its own preprocessing (a dictionary transform of ``{"image": ...}`` onto its own
grid), its own sliding-window inferer and its own export (back to a label map on the input's grid), and the
table from its label values to the merged ones. :class:`PartsInferer` runs the parts one after another on the
same input and paints each part's foreground over the label map of the parts before it (a voxel two parts
claim keeps the later part's label, as TotalSegmentator merges them). Memory is that of the largest part plus
one label map of the input: no part's probabilities outlive its own export. Parts whose preprocessing is the
same object share one preprocessed image.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer

__all__ = ["ModelPart", "PartsInferer", "PartsNetwork"]

#: Voxels of one slab of the merge.
_SLAB_VOXELS = 1 << 22

Transform = Callable[[Mapping[Hashable, Any]], Mapping[Hashable, Any]]


@dataclass(frozen=True)
class ModelPart:
    """One part: ``preprocessing`` (``{"image": input}`` -> the part's ``"image"`` plus what its export needs),
    ``inferer`` (``(batch, network)`` -> the part's outputs), ``export`` (``"pred"``, the outputs of one image, ->
    a ``(1, *input shape)`` label map of the part's values) and ``label_values`` (the merged value of each of
    the part's values: ``label_values[k]`` for the part's label ``k``; 0 for background)."""

    preprocessing: Transform
    inferer: Callable[..., torch.Tensor]
    export: Transform
    label_values: tuple[int, ...]


class PartsNetwork(torch.nn.Module):
    """The networks of the parts, in part order; run through :class:`PartsInferer` (each on its own grid), never
    called on one input."""

    def __init__(self, networks: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not networks:
            raise ValueError("a multi-part model needs at least one network")
        self.parts = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("a multi-part model runs through medseg.inference.parts.PartsInferer, one part at a time")


class PartsInferer(Inferer):
    """``(inputs, network)`` -> the merged ``(1, 1, *spatial)`` label map of a batch of one input (a
    ``MetaTensor`` with its affine and file name, as read), ``network`` a :class:`PartsNetwork` of as many
    networks as there are parts.

    Raises
    ------
    ValueError
        A batch of more than one image, or a network of another number of parts.
    """

    def __init__(self, parts: Sequence[ModelPart]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("a multi-part model needs at least one part")
        self.parts = tuple(parts)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.shape[0] != 1:
            raise ValueError(f"a multi-part model predicts one image at a time, got a batch of {inputs.shape[0]}")
        networks = list(getattr(network, "parts", ()))
        if len(networks) != len(self.parts):
            raise ValueError(f"{len(self.parts)} parts but a network of {len(networks)}")
        image = inputs[0].cpu()
        highest = max(max(part.label_values) for part in self.parts)
        merged: np.ndarray | None = None
        shared: tuple[Transform, Mapping[Hashable, Any]] | None = None
        for part, part_network in zip(self.parts, networks):
            if shared is None or shared[0] is not part.preprocessing:
                shared = (part.preprocessing, part.preprocessing({"image": image}))
            data = dict(shared[1])
            data["pred"] = part.inferer(data["image"][None].to(inputs.device), part_network)[0].cpu()
            labels = np.asarray(torch.as_tensor(part.export(data)["pred"])[0])
            del data
            if merged is None:
                merged = np.zeros(labels.shape, dtype=np.uint8 if highest <= 255 else np.uint16)
            _paint(merged, labels, np.asarray(part.label_values, dtype=merged.dtype))
        assert merged is not None
        return torch.from_numpy(merged)[None, None]


def _paint(merged: np.ndarray, labels: np.ndarray, table: np.ndarray) -> None:
    """``merged`` takes ``table[labels]`` where that is foreground, a slab of planes at a time (a lookup over
    the whole volume would hold 8-byte indices of every voxel).

    Raises
    ------
    ValueError
        ``labels`` holds a value the table has no entry for.
    """
    if labels.size and int(labels.max()) >= len(table):
        raise ValueError(f"a part predicted label {int(labels.max())}, it has {len(table)} labels")
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(labels.shape[1:]))))
    for start in range(0, labels.shape[0], step):
        values = table[labels[start:start + step]]
        np.copyto(merged[start:start + step], values, where=values > 0)
