"""Patch sampling and augmentation of the planned training recipe (medseg.transforms.augment): one
third of the patches centred on a foreground class present in the case, nnU-Net's rotation rules
(in-plane for anisotropic plans), the enlarged crop, and patches that keep their size and types."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from monai.transforms import Compose

from medseg.architectures import NetworkSpec
from medseg.plan import Intensity, Plan
from medseg.transforms.augment import (
    ForegroundOversampled,
    SpatialAugmentation,
    coarse_axis,
    enlarged_patch,
    planned_augmentation,
    rotation_range,
    sampling_preparation,
)


def _plan(spacing: tuple[float, ...] = (1.0, 1.0, 1.0), patch: tuple[int, ...] = (24, 24, 16)) -> Plan:
    labels = {0: "background", 1: "organ", 2: "lesion", 3: "absent"}
    return Plan(len(patch), "CT", labels, spacing, patch, Intensity("ct", -100.0, 300.0, 50.0, 60.0),
                NetworkSpec("dynunet"), configuration="3d_fullres")


def _case(ignore: int | None = None) -> dict[str, torch.Tensor]:
    label = torch.zeros(1, 60, 50, 40, dtype=torch.uint8)
    label[0, 10:20, 10:20, 5:12] = 1
    label[0, 57:59, 47:49, 37:39] = 2  # a small lesion in a corner
    if ignore is not None:
        label[0, 30:40, 30:40, 20:30] = ignore
    image = torch.randn(1, 60, 50, 40)
    return dict(Compose(sampling_preparation(_plan()))({"image": image, "label": label}))


def test_a_third_of_the_patches_are_centred_on_a_foreground_class_present_in_the_case() -> None:
    case = _case()
    sampler = ForegroundOversampled(["image", "label"], "label", (16, 16, 8), num_classes=4, num_samples=300)
    sampler.set_random_state(0)
    patches = sampler(case)
    centres = [int(p["label"][0, 8, 8, 4]) for p in patches]
    lesion = sum(c == 2 for c in centres)
    organ = sum(c == 1 for c in centres)
    # random patches hit the organ now and then (about 1.6 % of the image), never the corner lesion
    assert 80 <= lesion + organ <= 125 and 35 <= lesion <= 65
    assert all(p["image"].shape == (1, 16, 16, 8) and set(p) == {"image", "label"} for p in patches)


def test_a_voxel_at_the_border_is_still_the_centre_and_outside_the_image_is_zero() -> None:
    case = _case()
    sampler = ForegroundOversampled(["image", "label"], "label", (16, 16, 8), num_classes=3, foreground=1.0,
                                    num_samples=20, exclude=(1,))  # lesion voxels only
    sampler.set_random_state(1)
    for patch in sampler(case):
        assert int(patch["label"][0, 8, 8, 4]) == 2
        assert float(patch["image"][0, -1, -1, -1]) == 0.0  # beyond the corner: padding


def test_ignored_and_absent_values_are_never_drawn_and_a_case_without_foreground_gives_random_patches() -> None:
    case = _case(ignore=3)
    sampler = ForegroundOversampled(["image", "label"], "label", (8, 8, 8), num_classes=4, foreground=1.0,
                                    num_samples=50, exclude=(3,))
    sampler.set_random_state(2)
    assert all(int(p["label"][0, 4, 4, 4]) in (1, 2) for p in sampler(case))
    image = torch.arange(30 * 30 * 20, dtype=torch.float32).reshape(1, 30, 30, 20)
    empty = dict(Compose(sampling_preparation(_plan()))({"image": image, "label": torch.zeros_like(image).byte()}))
    corners = {float(p["image"][0, 0, 0, 0]) for p in sampler(empty)}
    assert len(corners) > 10  # random positions
    with pytest.raises(ValueError, match="foreground must be a probability"):
        ForegroundOversampled(["image"], "label", (8, 8, 8), 3, foreground=1.5)


def test_random_patches_reach_the_whole_image_but_never_leave_it() -> None:
    image = torch.arange(40 * 30 * 20, dtype=torch.float32).reshape(1, 40, 30, 20) + 1
    case = {"image": image, "label": torch.zeros(1, 40, 30, 20, dtype=torch.uint8)}
    case = dict(Compose(sampling_preparation(_plan()))(case))
    # a crop of 24 for a patch of 16: the patch (the crop's centre) stays inside the image, and reaches its borders
    sampler = ForegroundOversampled(["image", "label"], "label", (24, 24, 24), num_classes=4, foreground=0.0,
                                    num_samples=400, patch_size=(16, 16, 16))
    sampler.set_random_state(3)
    seen = torch.zeros(40 * 30 * 20, dtype=torch.bool)
    for patch in sampler(case):
        centre = patch["image"][0, 4:20, 4:20, 4:20]
        assert bool((centre > 0).all())
        seen[centre.flatten().long() - 1] = True
    seen = seen.reshape(40, 30, 20)
    for axis in range(3):
        assert bool(seen.select(axis, 0).any()) and bool(seen.select(axis, -1).any())


def test_rotation_follows_nnunet_rules_and_is_in_plane_for_anisotropic_plans() -> None:
    isotropic, anisotropic = _plan(), _plan(spacing=(0.7, 0.7, 5.0))
    assert coarse_axis(isotropic) is None and coarse_axis(anisotropic) == 2
    assert rotation_range(isotropic) == pytest.approx((math.radians(30),) * 3)
    assert rotation_range(anisotropic) == pytest.approx((0.0, 0.0, math.pi))
    flat = _plan(spacing=(1.0, 1.0), patch=(64, 64))
    assert rotation_range(flat) == pytest.approx((math.pi,))
    assert rotation_range(dataclasses.replace(flat, patch_size=(128, 32))) == pytest.approx((math.radians(15),))
    crop = enlarged_patch(isotropic)
    assert all(c >= 1.4 * p and (c - p) % 2 == 0 for c, p in zip(crop, isotropic.patch_size))
    crop = enlarged_patch(anisotropic)  # rotated about the coarse axis only, neither rotated nor scaled along it
    assert crop[2] == 16 and min(crop[:2]) >= 1.4 * math.hypot(24, 24)
    assert min(enlarged_patch(flat)) >= 1.4 * math.hypot(64, 64)


def test_without_a_draw_the_spatial_step_cuts_the_centre_exactly() -> None:
    plan = _plan()
    crop = enlarged_patch(plan)
    step = SpatialAugmentation(["image", "label"], plan.patch_size, 0.0, rotation_range(plan), [(-0.3, 0.4)] * 3)
    data = {"image": torch.randn(1, *crop), "label": torch.randint(0, 3, (1, *crop)).float()}
    out = step(data)
    lo = [(c - p) // 2 for c, p in zip(crop, plan.patch_size)]
    window = (slice(None), *[slice(a, a + p) for a, p in zip(lo, plan.patch_size)])
    torch.testing.assert_close(out["image"].as_tensor(), data["image"][window], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["label"].as_tensor(), data["label"][window])


def test_scaling_is_one_factor_for_every_scaled_axis() -> None:
    step = SpatialAugmentation(["image"], (8, 8, 8), 1.0, (0.0, 0.0, 0.0), [(-0.3, 0.4), (-0.3, 0.4), 0.0])
    step.set_random_state(4)
    grid = step.rand_affine.rand_affine_grid
    for _ in range(5):
        grid.randomize()
        a, b, c = grid.scale_params
        assert a == b and c == 1.0 and 0.7 <= a <= 1.4


def test_planned_augmentation_gives_patches_of_the_plan_with_training_types() -> None:
    plan = _plan()
    chain = planned_augmentation(plan, num_samples=2)
    chain.set_random_state(5)
    for _ in range(4):
        for patch in chain(_case()):
            assert patch["image"].shape == (1, *plan.patch_size) and patch["image"].dtype == torch.float32
            assert patch["label"].dtype == torch.int64 and set(patch["label"].unique().tolist()) <= {0, 1, 2}


def test_planned_augmentation_of_a_2d_plan_runs_every_transform() -> None:
    """Every random transform of a 2D plan's chain forced to fire (the low-resolution simulation once
    upsampled trilinearly, which a 2D image cannot be)."""
    plan = dataclasses.replace(_plan((0.8, 0.8), (32, 32)), configuration="2d")
    chain = planned_augmentation(plan, num_samples=1)
    for transform in chain.transforms:
        if hasattr(transform, "prob"):
            transform.prob = 1.0
    chain.set_random_state(3)
    label = torch.zeros(1, 70, 60, dtype=torch.uint8)
    label[0, 20:40, 15:35] = 1
    case = dict(Compose(sampling_preparation(plan))({"image": torch.randn(1, 70, 60), "label": label}))
    for _ in range(3):
        for patch in chain(dict(case)):
            assert patch["image"].shape == (1, 32, 32) and torch.isfinite(patch["image"]).all()


def test_short_budgets_get_the_light_recipe() -> None:
    """The planner names the recipe by the iterations its budget allows; planned_augmentation follows the name:
    light = two patches in three at the foreground, small rotations, no blur/gamma/low-resolution simulation."""
    from monai.transforms import RandGaussianSmoothd

    from medseg.planning.recipe import choose_augmentation

    assert choose_augmentation(4000)["name"] == "light"
    assert choose_augmentation(None)["name"] == choose_augmentation(50_000)["name"] == "nnunet"
    for spacing, expected in (((1.0, 1.0, 1.0), (math.radians(15),) * 3), ((1.0, 1.0, 4.0), (0.0, 0.0, math.radians(15)))):
        plan = dataclasses.replace(_plan(spacing), planning={"augmentation": choose_augmentation(4000)})
        chain = planned_augmentation(plan, num_samples=2)
        sampler, spatial = chain.transforms[0], chain.transforms[1]
        assert isinstance(sampler, ForegroundOversampled) and sampler.foreground == pytest.approx(2 / 3)
        assert isinstance(spatial, SpatialAugmentation) and spatial.prob == pytest.approx(0.2)
        assert tuple(spatial.rand_affine.rand_affine_grid.rotate_range) == pytest.approx(expected)
        assert not any(isinstance(t, RandGaussianSmoothd) for t in chain.transforms)
        chain.set_random_state(1)
        for patch in chain(_case()):
            assert patch["image"].shape == (1, *plan.patch_size) and patch["label"].dtype == torch.int64
    nnunet = planned_augmentation(_plan(), num_samples=1)  # a plan that names none: nnU-Net's, as before
    assert any(isinstance(t, RandGaussianSmoothd) for t in nnunet.transforms)
    with pytest.raises(ValueError, match=r"planning\.augmentation\.name"):
        planned_augmentation(dataclasses.replace(_plan(), planning={"augmentation": {"name": "heavy"}}))


@pytest.mark.parametrize("recipe", ["nnunet", "light"])
def test_a_plan_over_slices_is_augmented_in_plane_one_slice_at_a_time(recipe: str) -> None:
    """The 2d configuration of 3D data: each patch is one slice (its label values those of one slice of the
    case), rotated and scaled in-plane only, with every random transform forced to fire."""
    plan = dataclasses.replace(_plan((1.0, 1.0, 1.0), (32, 24, 1)), configuration="2d",
                               planning={"augmentation": {"name": recipe}})
    assert plan.slice_axis == 2 and enlarged_patch(plan)[2] == 1
    chain = planned_augmentation(plan, num_samples=2)
    for transform in chain.transforms:
        if hasattr(transform, "prob"):
            transform.prob = 1.0
    chain.set_random_state(7)
    label = torch.zeros(1, 60, 50, 40, dtype=torch.uint8)
    label[0, 10:50, 10:40, :] = (torch.arange(40) % 3 + 1).to(torch.uint8)  # the slice's value: z % 3 + 1
    case = dict(Compose(sampling_preparation(plan))({"image": torch.randn(1, 60, 50, 40), "label": label}))
    values = set()
    for _ in range(10):
        for patch in chain(dict(case)):
            assert patch["image"].shape == (1, 32, 24, 1) and patch["label"].shape == (1, 32, 24, 1)
            assert torch.isfinite(patch["image"]).all() and patch["label"].dtype == torch.int64
            present = set(patch["label"].unique().tolist()) - {0}
            assert len(present) <= 1  # never two slices' values: nothing mixes slices
            values |= present
    assert len(values) >= 2  # patches come from different slices
