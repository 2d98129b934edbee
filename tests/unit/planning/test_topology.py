"""The planner's topology rules (nnU-Net's): per-axis kernels and strides from the spacing, stages until
each bottleneck axis has at least 4 voxels, 32 * 2^k features capped at 320 (3D) and 512 (2D)."""

from __future__ import annotations

import pytest

from medseg.architectures import plan_topology, planned_filters


def test_isotropic_patch_pools_every_axis_down_to_four_voxels() -> None:
    topology = plan_topology((1.0, 1.0, 1.0), (128, 128, 128))
    assert topology.stages == 6 and topology.sizes()[-1] == (4, 4, 4)
    assert all(s == (2, 2, 2) for s in topology.strides[1:]) and topology.strides[0] == (1, 1, 1)
    assert set(topology.kernel_sizes) == {(3, 3, 3)} and len(topology.kernel_sizes) == 6
    assert planned_filters(topology.stages, 3) == (32, 64, 128, 256, 320, 320)


def test_thick_slices_are_pooled_and_convolved_in_plane_first() -> None:
    topology = plan_topology((0.8, 0.8, 3.0), (192, 192, 48))
    assert topology.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 1))
    assert topology.kernel_sizes == ((3, 3, 1),) + ((3, 3, 3),) * 5
    assert topology.divisors == (32, 32, 8) and topology.patch_size == (192, 192, 48)
    assert topology.sizes()[-1] == (6, 6, 6)


def test_two_dimensional_patch_and_its_feature_cap() -> None:
    topology = plan_topology((0.7, 0.7), (512, 512))
    assert topology.stages == 8 and topology.sizes()[-1] == (4, 4)
    assert planned_filters(topology.stages, 2) == (32, 64, 128, 256, 512, 512, 512, 512)
    assert planned_filters(6, 3, base=16) == (16, 32, 64, 128, 160, 160)  # a narrower network, evenly thinned


def test_a_single_axis_is_pooled_only_while_it_keeps_twelve_voxels() -> None:
    topology = plan_topology((1.0, 1.0, 1.0), (64, 8, 8))
    assert topology.strides == ((1, 1, 1), (2, 2, 2), (2, 1, 1), (2, 1, 1))


def test_the_patch_is_padded_to_what_the_strides_need() -> None:
    topology = plan_topology((1.0, 1.0, 1.0), (100, 100, 100))  # 100 -> 50 -> 25 -> 13 -> 7: four poolings
    assert topology.divisors == (16, 16, 16) and topology.patch_size == (112, 112, 112)


def test_bad_topology_input_is_refused() -> None:
    with pytest.raises(ValueError, match="same"):
        plan_topology((1.0, 1.0), (64, 64, 64))
    with pytest.raises(ValueError, match="positive"):
        plan_topology((1.0, 0.0, 1.0), (64, 64, 64))
