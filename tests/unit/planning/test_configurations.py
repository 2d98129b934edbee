"""The configurations planned for a dataset (2d, 3d_fullres, 3d_lowres + cascade) and the plan made."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.errors import InputError
from medseg.networks import build_network
from medseg.plan import Plan
from medseg.planning import PlannerOptions, plan_dataset

from .helpers import fake_fingerprint

LARGE = fake_fingerprint([(0.8, 0.8, 1.0)] * 10, [(512, 512, 400)] * 10)
SMALL = fake_fingerprint([(1.3, 1.3, 2.6)] * 10, [(96, 96, 45)] * 10)
GPU = PlannerOptions(device="cuda", memory_gb=8, measure=False)


def test_large_images_get_a_lowres_configuration_and_a_cascade() -> None:
    result = plan_dataset(LARGE, GPU)
    fullres, lowres = result.configurations["3d_fullres"], result.configurations["3d_lowres"]
    assert math.prod(fullres.patch_size) / math.prod(fullres.median_shape) < 0.25
    assert all(low > full for low, full in zip(lowres.spacing, fullres.spacing, strict=True))
    assert math.prod(lowres.patch_size) / math.prod(lowres.median_shape) >= 0.25
    assert math.prod(lowres.median_shape) * 2 <= math.prod(fullres.median_shape)
    assert result.plans["configurations"]["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
    assert result.plan.configuration == "3d_fullres" and result.plan.target_spacing == pytest.approx((0.8, 0.8, 1.0))
    chosen = plan_dataset(LARGE, PlannerOptions(device="cuda", memory_gb=8, measure=False, configuration="3d_lowres"))
    assert chosen.plan.configuration == "3d_lowres"
    assert chosen.plan.target_spacing == pytest.approx(lowres.spacing)


def test_small_images_get_fullres_and_2d_only() -> None:
    result = plan_dataset(SMALL, GPU)
    assert set(result.configurations) == {"2d", "3d_fullres"}
    assert result.configurations["2d"].spacing == pytest.approx((1.3, 1.3, 2.6))
    assert result.configurations["2d"].patch_size == (96, 96, 1)  # the whole slice, across the coarsest axis
    assert result.plan.patch_size == (96, 96, 48) and result.plan.batch_size == 2  # nnU-Net's plan of these phantoms
    assert len(result.plan.network.filters) == 5 and result.plan.network.deep_supervision


def test_a_lowres_configuration_asked_for_where_nnunet_finds_it_too_close_to_fullres_halves_the_resolution() -> None:
    """Images a little larger than four patches: nnU-Net's coarsening reaches a quarter coverage before the image
    has shrunk 2x, so it plans no 3d_lowres; asked for, it is planned at half the resolution, and says why."""
    near = fake_fingerprint([(1.0, 1.0, 1.0)] * 10, [(220, 220, 220)] * 10)
    assert "3d_lowres" not in plan_dataset(near, GPU).configurations
    result = plan_dataset(near, PlannerOptions(device="cuda", memory_gb=8, measure=False, configuration="3d_lowres"))
    lowres, fullres = result.configurations["3d_lowres"], result.configurations["3d_fullres"]
    assert result.plan.configuration == "3d_lowres"
    assert math.prod(lowres.median_shape) * 8 <= math.prod(fullres.median_shape) * 1.05
    assert math.prod(lowres.patch_size) / math.prod(lowres.median_shape) >= 0.25
    assert "the median image shrinks less than 2x" in result.plans["configurations"]["3d_lowres"]["note"]


def test_a_lowres_configuration_asked_for_where_nnunet_plans_none_halves_the_resolution() -> None:
    """Asked for explicitly (the first stage of a cascade on these images), 3d_lowres coarsens the spacing until the
    median image has 8 times fewer voxels, and says that nnU-Net would not plan it."""
    result = plan_dataset(SMALL, PlannerOptions(device="cuda", memory_gb=8, measure=False, configuration="3d_lowres"))
    lowres, fullres = result.configurations["3d_lowres"], result.configurations["3d_fullres"]
    assert result.plan.configuration == "3d_lowres" and result.plan.target_spacing == pytest.approx(lowres.spacing)
    assert math.prod(lowres.median_shape) * 8 <= math.prod(fullres.median_shape) * 1.05
    assert math.prod(lowres.patch_size) / math.prod(lowres.median_shape) >= 0.25
    assert "nnU-Net plans no 3d_lowres here" in result.plans["configurations"]["3d_lowres"]["note"]


def test_a_cascade_stage_is_3d_fullres_fed_the_previous_stage_s_label_map() -> None:
    result = plan_dataset(SMALL, PlannerOptions(device="cuda", memory_gb=8, measure=False,
                                                configuration="3d_cascade_fullres"))
    plan, fullres = result.plan, plan_dataset(SMALL, GPU).plan
    assert plan.configuration == "3d_cascade_fullres" and plan.previous_stage == "3d_lowres"
    assert plan.target_spacing == fullres.target_spacing and plan.patch_size == fullres.patch_size
    assert plan.num_channels == 1 and plan.network_inputs == 1 + max(plan.labels)
    assert Plan.from_json(plan.to_json()) == plan
    network = build_network(plan).eval()
    image = torch.zeros(1, 2, *plan.patch_size)  # the image and the previous stage's label map
    image[0, 1, :10] = max(plan.labels)
    with torch.no_grad():
        assert network(image).shape == (1, plan.num_outputs, *plan.patch_size)


def test_the_2d_configuration_of_3d_data_is_a_2d_unet_over_slices() -> None:
    plan = plan_dataset(SMALL, PlannerOptions(device="cuda", memory_gb=8, measure=False, configuration="2d")).plan
    assert plan.configuration == "2d" and plan.dims == 3 and plan.slice_axis == 2 and plan.spatial_axes == (0, 1)
    assert plan.patch_size == (96, 96, 1) and plan.batch_size > 2  # a batch of whole slices (at most 5 % of the data)
    assert plan.batch_size <= round(0.05 * 96 * 96 * 45 * 10 / (96 * 96))
    assert all(kernel[2] == 1 for kernel in plan.network.kernel_sizes)
    assert all(stride[2] == 1 for stride in plan.network.level_strides)
    assert max(plan.network.filters) == 512 and len(plan.network.filters) == 5  # nnU-Net's 2D widths, 4 poolings
    assert Plan.from_json(plan.to_json()) == plan
    network = build_network(plan).eval()
    image = torch.randn(1, 1, 96, 96, 3)
    with torch.no_grad():
        whole = network(image)
        assert whole.shape == (1, 3, 96, 96, 3)
        for z in range(3):  # each slice on its own: the slices never see each other
            assert torch.allclose(network(image[..., z : z + 1])[..., 0], whole[..., z], atol=1e-5)


def test_the_plan_carries_the_reasoning_and_builds_its_network() -> None:
    plan = plan_dataset(SMALL, GPU).plan
    assert Plan.from_json(plan.to_json()) == plan
    record = plan.planning
    assert record["device"] == "cuda" and record["memory_target_gb"] == 8
    assert record["memory_estimate_gb"] <= 8 and record["memory_measured_gb"] is None
    assert plan.intensity.preset == "ct" and (plan.intensity.a_min, plan.intensity.a_max) == (-50.0, 300.0)
    assert (plan.intensity.mean, plan.intensity.std) == (100.0, 50.0)
    network = build_network(plan).eval()
    small = tuple(2 * d for d in plan.network.patch_divisors(3))  # a small input it maps (the patch: the CLI test)
    with torch.no_grad():
        assert network(torch.zeros(1, 1, *small)).shape == (1, 3, *small)


def test_presets_mr_and_2d_data() -> None:
    mr = fake_fingerprint([(1.0, 1.0, 1.0)] * 4, [(160, 192, 160)] * 4, modality="MR")
    large = plan_dataset(mr, PlannerOptions(device="cuda", preset="resenc-l", measure=False)).plan
    medium = plan_dataset(mr, PlannerOptions(device="cuda", preset="resenc-m", measure=False)).plan
    assert large.network.res_block and large.planning["memory_target_gb"] == 24
    assert math.prod(large.patch_size) > math.prod(medium.patch_size) and large.intensity.preset == "mr"
    assert "ResEnc" in large.planning["preset_note"]
    flat = plan_dataset(fake_fingerprint([(0.5, 0.5)] * 4, [(512, 512)] * 4), GPU)
    assert set(flat.configurations) == {"2d"} and flat.plan.dims == 2 and max(flat.plan.network.filters) == 512


def test_a_given_spacing_and_a_memory_target_that_fits_nothing() -> None:
    plan = plan_dataset(SMALL, PlannerOptions(device="cuda", measure=False, target_spacing=(2.0, 2.0, 2.0))).plan
    assert plan.target_spacing == (2.0, 2.0, 2.0)
    with pytest.raises(InputError, match=r"--memory-gb 0\.001: .*too little memory"):
        plan_dataset(SMALL, PlannerOptions(device="cuda", memory_gb=0.001, measure=False))
    with pytest.raises(InputError, match="--memory-gb must be a positive number, got 0"):
        plan_dataset(SMALL, PlannerOptions(memory_gb=0))
