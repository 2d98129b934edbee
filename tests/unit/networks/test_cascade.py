"""A cascade stage's input: the image and the previous stage's label map, one-hot inside the network; the label map
through the training chain (nearest neighbour, perturbed) and the plan field that asks for it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medseg.architectures import NetworkSpec
from medseg.networks import PreviousStageInput, build_network, split_pointwise_head
from medseg.plan import Intensity, Plan
from medseg.transforms.augment import planned_augmentation, sampling_preparation
from medseg.transforms.cascade import AttachPreviousd, PerturbPreviousd


def _plan(**changes: object) -> Plan:
    plan = Plan(3, "CT", {0: "background", 1: "liver", 2: "spleen"}, (1.0, 1.0, 1.0), (16, 16, 16),
                Intensity("ct", -100.0, 200.0, 50.0, 40.0), NetworkSpec("dynunet"), configuration="3d_cascade_fullres",
                previous_stage="3d_lowres")
    return dataclasses.replace(plan, **changes)


class _Record(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x


def test_the_previous_label_map_reaches_the_network_one_hot() -> None:
    inner = _Record()
    network = PreviousStageInput(inner, classes=3)
    image = torch.randn(2, 1, 4, 4, 4)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4)).float()
    network(torch.cat([image, labels], dim=1))
    assert inner.seen.shape == (2, 3, 4, 4, 4)
    assert torch.equal(inner.seen[:, :1], image)
    for value in (1, 2):
        assert torch.equal(inner.seen[:, value], (labels[:, 0] == value).float())
    with pytest.raises(ValueError, match="classes are 0-2"):
        network(torch.cat([image, labels + 3], dim=1))


def test_the_cascade_network_splits_its_pointwise_head_exactly() -> None:
    plan = _plan()
    network = build_network(plan).eval()
    assert isinstance(network, PreviousStageInput) and plan.network_inputs == 3
    split = split_pointwise_head(network)
    assert split is not None
    body, head, _ = split
    x = torch.cat([torch.randn(1, 1, 16, 16, 16), torch.randint(0, 3, (1, 1, 16, 16, 16)).float()], dim=1)
    with torch.no_grad():
        assert torch.allclose(head(body(x)), network(x), atol=1e-5)


def test_the_plan_field_goes_with_the_cascade_configuration_only() -> None:
    plan = Plan.from_json(_plan().to_json())
    assert plan.previous_stage == "3d_lowres" and Plan.from_json(plan.to_json()) == plan
    one_stage = _plan(configuration="3d_fullres", previous_stage=None)
    assert "previous_stage" not in one_stage.to_json()  # plans of one stage are written as before
    with pytest.raises(ValueError, match="'previous_stage' must be given exactly for"):
        Plan.from_json({**one_stage.to_json(), "previous_stage": "3d_lowres"})
    with pytest.raises(ValueError, match="previous_stage"):
        Plan.from_json({**plan.to_json(), "previous_stage": "2d"})


def test_training_patches_carry_the_previous_map_as_the_last_channel_by_nearest_neighbour() -> None:
    plan = _plan(planning={"augmentation": {"name": "nnunet"}})
    labels = np.zeros((1, 24, 24, 24), np.int64)
    labels[0, 4:14, 4:14, 4:14] = 1
    labels[0, 14:20, 14:20, 14:20] = 2
    case = {"image": torch.randn(1, 24, 24, 24), "label": torch.as_tensor(labels),
            "previous": torch.as_tensor(labels)}
    case = sampling_preparation(plan)[0](case)
    chain = planned_augmentation(plan)
    for seed in range(6):
        chain.set_random_state(seed=seed)
        patch = chain(dict(case))[0]
        assert set(patch) == {"image", "label"} and patch["image"].shape == (2, 16, 16, 16)
        assert set(torch.unique(patch["image"][1]).tolist()) <= {0.0, 1.0, 2.0}  # never interpolated between labels


def test_the_perturbation_changes_only_where_classes_grow_or_shrink() -> None:
    labels = np.zeros((1, 20, 20, 20), np.int64)
    labels[0, 2:16, 2:16, 2:16] = 1  # a third of the patch: never removed (at most 15 %)
    labels[0, 17:20, 17:20, 17:20] = 2
    perturb = PerturbPreviousd("previous", morphology=1.0, component=0.0)
    changed = 0
    for seed in range(5):
        perturb.set_random_state(seed=seed)
        out = perturb({"previous": torch.as_tensor(labels)})["previous"]
        assert out.shape == labels.shape and set(torch.unique(out).tolist()) <= {0, 1, 2}
        changed += int((out.numpy() != labels).any())
    assert changed >= 4
    removal = PerturbPreviousd("previous", morphology=0.0, component=1.0)
    removal.set_random_state(seed=0)
    out = removal({"previous": torch.as_tensor(labels)})["previous"].numpy()
    assert (out == 2).sum() == 0 and (out == 1).sum() == (labels == 1).sum()  # the small component went, the big stayed


def test_attaching_checks_the_grid() -> None:
    with pytest.raises(ValueError, match="previous stage's label map has shape"):
        AttachPreviousd()({"image": torch.zeros(1, 4, 4, 4), "previous": torch.zeros(1, 4, 4, 5)})
