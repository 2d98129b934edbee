"""Inference of a network over slices (the 2d configuration of 3D data): thick windows that do not overlap along
the slice axis give the label maps and probabilities of windows one slice thick, in fewer network calls."""

from __future__ import annotations

import pytest
import torch

from medseg.architectures import NetworkSpec
from medseg.inference.compose import sliding_window_inferer
from medseg.inference.inferer import SlabInferer
from medseg.networks import build_network
from medseg.plan import Intensity, Plan


def _plan() -> Plan:
    spec = NetworkSpec("dynunet", filters=(8, 16, 32), kernel_sizes=((3, 3, 1),) * 3,
                       level_strides=((1, 1, 1), (2, 2, 1), (2, 2, 1)), deep_supervision=True)
    return Plan(3, "CT", {0: "background", 1: "liver", 2: "spleen"}, (1.0, 1.0, 3.0), (24, 20, 1),
                Intensity("ct", -100.0, 300.0, 50.0, 60.0), spec, configuration="2d", batch_size=8)


def test_a_plan_over_slices_has_thick_windows_without_overlap_or_gaussian_along_the_slices() -> None:
    plan = _plan()
    assert plan.slice_axis == 2 and plan.spatial_axes == (0, 1) and plan.window_size == (24, 20, 8)
    assert plan.window_overlap(0.5) == (0.5, 0.5, 0.0) and plan.window_sigma_scale()[2] >= 1e3
    unsliced = Plan(3, "CT", {0: "background", 1: "liver"}, (1.0, 1.0, 1.0), (16, 16, 16), Intensity("mr"))
    assert unsliced.slice_axis is None and unsliced.window_size == (16, 16, 16) and unsliced.window_overlap(0.5) == 0.5


@pytest.mark.parametrize("tta", [False, True])
def test_thick_windows_equal_windows_of_one_slice(tta: bool) -> None:
    plan = _plan()
    torch.manual_seed(0)
    network = build_network(plan).eval()
    image = torch.randn(1, 1, 50, 37, 19)  # 19 slices: the last window along z overlaps the one before
    with torch.no_grad():
        thick = sliding_window_inferer(plan, output="probabilities", tta=tta)(image, network)
        one = SlabInferer(plan.patch_size, plan.num_outputs, overlap=0.5, output="probabilities",
                          mirror_axes=(0, 1) if tta else ())(image, network)
    assert thick.shape == (1, 3, 50, 37, 19)
    assert torch.allclose(thick, one, atol=1e-5)


def test_a_per_axis_overlap_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="one per axis of the window"):
        SlabInferer((24, 20, 8), 3, overlap=(0.5, 0.0))
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        SlabInferer((24, 20, 8), 3, overlap=(0.5, 0.5, 1.0))
