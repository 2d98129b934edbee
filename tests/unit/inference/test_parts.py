"""Several models merged into one label map: parts run in order on the same input, each part's foreground painted
over the parts before it with the merged values of its labels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.inference.parts import ModelPart, PartsInferer, PartsNetwork


def _part(threshold: float, values: tuple[int, ...], calls: list[str], name: str) -> ModelPart:
    """A part labelling voxels above ``threshold`` (1) and above twice it (2, if it has two labels)."""

    def preprocess(data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        calls.append(f"preprocess {name}")
        return {"image": torch.as_tensor(data["image"]).clone()}

    def infer(batch: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        return batch

    def export(data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        image = np.asarray(data["pred"])
        labels = (image > threshold).astype(np.uint8) + ((image > 2 * threshold) & (len(values) > 2)).astype(np.uint8)
        return {"pred": torch.from_numpy(labels)}

    return ModelPart(preprocess, infer, export, values)


def test_later_parts_paint_over_earlier_ones_with_their_merged_values() -> None:
    image = MetaTensor(torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4), affine=torch.eye(4))
    calls: list[str] = []
    inferer = PartsInferer([_part(5.0, (0, 3, 1), calls, "a"), _part(17.0, (0, 2), calls, "b")])
    merged = inferer(image[None], PartsNetwork([torch.nn.Identity(), torch.nn.Identity()]))
    values = image.numpy()[0]
    expected = np.where(values > 17, 2, np.where(values > 10, 1, np.where(values > 5, 3, 0)))
    np.testing.assert_array_equal(merged[0, 0].numpy(), expected)
    assert merged.dtype == torch.uint8 and calls == ["preprocess a", "preprocess b"]


def test_parts_sharing_one_preprocessing_preprocess_once() -> None:
    calls: list[str] = []
    first = _part(5.0, (0, 1), calls, "shared")
    second = ModelPart(first.preprocessing, first.inferer, first.export, (0, 2))
    PartsInferer([first, second])(torch.zeros(1, 1, 2, 2, 2), PartsNetwork([torch.nn.Identity()] * 2))
    assert calls == ["preprocess shared"]


def test_a_batch_of_several_images_a_network_of_other_parts_and_unknown_labels_are_refused() -> None:
    calls: list[str] = []
    inferer = PartsInferer([_part(0.5, (0, 1, 2), calls, "a")])
    with pytest.raises(ValueError, match="one image at a time"):
        inferer(torch.zeros(2, 1, 2, 2, 2), PartsNetwork([torch.nn.Identity()]))
    with pytest.raises(ValueError, match="1 parts but a network of 2"):
        inferer(torch.zeros(1, 1, 2, 2, 2), PartsNetwork([torch.nn.Identity()] * 2))
    with pytest.raises(ValueError, match="predicted label 1, it has 1 labels"):
        PartsInferer([_part(0.5, (0,), calls, "b")])(torch.ones(1, 1, 2, 2, 2), PartsNetwork([torch.nn.Identity()]))
    with pytest.raises(TypeError, match="PartsInferer"):
        PartsNetwork([torch.nn.Identity()])(torch.zeros(1))
