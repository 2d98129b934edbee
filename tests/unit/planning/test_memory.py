"""The memory estimate: conservative against a measured iteration, and the patch and batch fitted to it."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.architectures import NetworkSpec, plan_topology, planned_filters
from medseg.planning.configurations import MemoryTargetError, Network, fit_configuration
from medseg.planning.measure import ProbeRequest, probe_in_fresh_process
from medseg.planning.memory import CPU_FLOAT32, CUDA_MIXED, GB, training_bytes
from medseg.planning.rules import initial_patch


def test_the_cpu_estimate_is_above_a_measured_iteration_and_within_the_target() -> None:
    """One forward/backward/SGD step in a fresh process: its peak resident memory growth stays below the
    estimate, and the estimate below a 1 GB target (the planner's check on the CPU), even while this
    process holds 1 GB (a spawned process inherits its parent's ``ru_maxrss``: it must not count)."""
    topology = plan_topology((1.0, 1.0, 1.0), (48, 48, 48))
    filters = planned_filters(topology.stages, 3, base=8)
    estimate = training_bytes(topology, filters, 1, 3, 2, CPU_FLOAT32, deep_supervision=False)
    spec = NetworkSpec("dynunet", filters=filters, kernel_sizes=topology.kernel_sizes, level_strides=topology.strides)
    held = torch.ones(GB // 4)  # noqa: F841 - resident while the probe runs
    measured = probe_in_fresh_process(ProbeRequest(spec, topology.patch_size, 2, 1, 3))
    if measured.peak_bytes is None:
        pytest.skip("no peak resident memory on this platform")
    assert 0 < measured.peak_bytes <= estimate <= 1 * GB


def test_a_small_memory_target_shrinks_the_patch_largest_axis_first() -> None:
    spacing, median = (1.0, 1.0, 2.0), (300.0, 300.0, 120.0)
    network = Network(1, 4)
    large = fit_configuration("3d_fullres", spacing, median, network, 1e12, 8 * GB, CUDA_MIXED)
    small = fit_configuration("3d_fullres", spacing, median, network, 1e12, 1 * GB, CUDA_MIXED)
    assert math.prod(small.patch_size) < math.prod(large.patch_size) <= math.prod(initial_patch(spacing, median)) * 1.1
    assert small.memory_bytes <= 1 * GB and large.memory_bytes <= 8 * GB
    assert small.topology.stages <= large.topology.stages
    ratios = [p / m for p, m in zip(small.patch_size, median, strict=True)]
    assert max(ratios) / min(ratios) < 1.6  # shrunk towards the median image's aspect ratio


def test_the_batch_grows_while_it_fits_and_covers_at_most_five_percent_of_the_data() -> None:
    spacing, median, network = (1.0, 1.0, 1.0), (64.0, 64.0, 64.0), Network(1, 2)
    roomy = fit_configuration("3d_fullres", spacing, median, network, 1e12, 80 * GB, CUDA_MIXED)
    assert roomy.batch_size > 2 and roomy.memory_bytes <= 80 * GB
    few_cases = fit_configuration("3d_fullres", spacing, median, network, 10 * 64.0**3, 80 * GB, CUDA_MIXED)
    assert few_cases.batch_size == 2  # 5 % of 10 images is less than one patch: the minimum of 2


def test_a_target_too_small_for_any_network_is_refused() -> None:
    with pytest.raises(MemoryTargetError, match="too little memory"):
        fit_configuration("3d_fullres", (1.0, 1.0, 1.0), (200.0, 200.0, 200.0), Network(1, 2), 1e12, 0.01 * GB,
                          CUDA_MIXED)


def test_a_measured_iteration_above_the_target_shrinks_the_patch() -> None:
    from medseg.planning import PlannerOptions, plan_dataset
    from medseg.planning.measure import Probe

    from .helpers import fake_fingerprint

    calls = []

    def measurer(request: ProbeRequest) -> Probe:
        calls.append(request.patch_size)
        return Probe(1.0, int(20 * GB) if len(calls) == 1 else int(1 * GB))

    fingerprint = fake_fingerprint([(1.0, 1.0, 1.0)] * 10, [(256, 256, 256)] * 10)
    result = plan_dataset(fingerprint, PlannerOptions(device="cuda", memory_gb=8, measure=False), measurer=measurer)
    record, planned = result.plan.planning, result.configurations["3d_fullres"]
    assert record["memory_retries"] == 1 and record["memory_measured_gb"] == 1.0 and len(calls) == 2
    assert calls[0] == planned.patch_size and math.prod(result.plan.patch_size) < math.prod(planned.patch_size)


def test_a_network_with_deep_supervision_heads_is_probed_with_the_training_loss() -> None:
    """A DynUNet of 4 stages with deep supervision has a head (medseg.networks.factory): in training it
    stacks its outputs, which the probe's loss takes as training does."""
    from medseg.planning.measure import probe

    topology = plan_topology((1.0, 1.0, 1.0), (32, 32, 32))
    assert len(topology.strides) >= 4
    spec = NetworkSpec("dynunet", filters=planned_filters(topology.stages, 3, base=4), kernel_sizes=topology.kernel_sizes,
                       level_strides=topology.strides, deep_supervision=True)
    measured = probe(ProbeRequest(spec, topology.patch_size, 1, 1, 3), steps=1, warmup=0, min_seconds=0.0, max_steps=1)
    assert measured.seconds > 0
