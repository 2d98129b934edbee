"""Region targets and their painting back into a label map (medseg.transforms.regions)."""

from __future__ import annotations

import pytest
import torch

from medseg.labels import Region
from medseg.transforms import label_map_to_regions, regions_to_label_map

REGIONS = (Region("whole tumour", (1, 2, 3), 1), Region("tumour core", (2, 3), 2), Region("enhancing", (3,), 3))


def test_nested_regions_round_trip_to_the_label_map() -> None:
    label = torch.tensor([[[0, 1, 2, 3]]])  # (1, 1, 4): a 2D label map of one row
    regions = label_map_to_regions(label, REGIONS)
    assert regions.shape == (3, 1, 4)
    assert regions[:, 0, 2].tolist() == [1.0, 1.0, 0.0]  # label 2: whole tumour and core, not enhancing
    assert regions_to_label_map(regions, REGIONS).tolist() == label.tolist()


def test_batched_label_maps_use_the_channel_dim() -> None:
    label = torch.tensor([[[[3, 0]]], [[[1, 2]]]])  # (B=2, 1, 1, 2)
    regions = label_map_to_regions(label, REGIONS, channel_dim=1)
    assert regions.shape == (2, 3, 1, 2)
    assert regions[1, :, 0, 1].tolist() == [1.0, 1.0, 0.0]


def test_region_conversions_refuse_wrong_channel_counts() -> None:
    with pytest.raises(ValueError, match="one channel"):
        label_map_to_regions(torch.zeros((2, 4, 4)), REGIONS)
    with pytest.raises(ValueError, match="3 region channels expected"):
        regions_to_label_map(torch.zeros((2, 4, 4)), REGIONS)
