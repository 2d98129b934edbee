"""Region-based targets (nnU-Net v2): a label map to one binary channel per region (training targets),
and region probabilities back to one label map, painted region by region in the plan's order."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medseg.labels import Region

__all__ = ["RegionsToLabelMapd", "label_map_to_regions", "regions_to_label_map"]


def label_map_to_regions(label: torch.Tensor, regions: Sequence[Region], channel_dim: int = 0) -> torch.Tensor:
    """An integer label map with one channel at ``channel_dim`` (``(1, *spatial)``, or ``(B, 1, *spatial)``
    with ``channel_dim=1``) -> float32 of the same shape with one channel per region: channel r is 1 where
    the label is one of ``regions[r].labels``.

    Raises
    ------
    ValueError
        If ``label`` has more than one channel at ``channel_dim`` or ``regions`` is empty.
    """
    if not regions:
        raise ValueError("no regions to convert the label map to")
    if label.shape[channel_dim] != 1:
        raise ValueError(f"a label map of one channel needed, got shape {tuple(label.shape)}")
    masks = [torch.isin(label, torch.as_tensor(r.labels, device=label.device)) for r in regions]
    return torch.cat(masks, dim=channel_dim).to(torch.float32)


def regions_to_label_map(probabilities: torch.Tensor, regions: Sequence[Region], threshold: float = 0.5,
                         dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``(R, *spatial)`` sigmoid probabilities -> ``(1, *spatial)`` label map: 0, then each region's
    ``value`` where its probability exceeds ``threshold``, later regions painted over earlier ones.

    Raises
    ------
    ValueError
        If the channel count differs from the number of regions.
    """
    if probabilities.shape[0] != len(regions):
        raise ValueError(f"{len(regions)} region channels expected, got {probabilities.shape[0]}")
    label = torch.zeros((1, *probabilities.shape[1:]), dtype=dtype, device=probabilities.device)
    for channel, region in enumerate(regions):
        label[0][probabilities[channel] > threshold] = region.value
    return label


class RegionsToLabelMapd(MapTransform):
    """``keys``: ``(R, *spatial)`` region logits (``sigmoid=True``, a network's output) or sigmoid
    probabilities -> the ``(1, *spatial)`` label map of :func:`regions_to_label_map` (metadata kept).

    Raises
    ------
    ValueError
        From ``__call__``: a channel count other than the number of regions.
    """

    def __init__(self, keys: Any, regions: Sequence[Region], sigmoid: bool = True, threshold: float = 0.5,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.regions, self.sigmoid, self.threshold = tuple(regions), bool(sigmoid), float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            values = d[key]
            plain = values.as_tensor() if isinstance(values, MetaTensor) else torch.as_tensor(values)
            probabilities = torch.sigmoid(plain.float()) if self.sigmoid else plain
            label = regions_to_label_map(probabilities, self.regions, self.threshold)
            d[key] = MetaTensor(label, meta=values.meta) if isinstance(values, MetaTensor) else label
        return d
