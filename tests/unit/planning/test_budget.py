"""The time-budget choice, decided on fake timings (never on this machine's speed)."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.architectures import NetworkSpec
from medseg.planning import PlannerOptions, measure, plan_dataset, planner
from medseg.planning.budget import LEAN, MAX_PROBES, MIN_ITERATIONS, Candidate, budget_candidates, choose_for_budget
from medseg.planning.configurations import Network, fit_configuration
from medseg.planning.measure import (
    Probe,
    ProbeRequest,
    augmentation_seconds,
    case_load_seconds,
    iteration_seconds,
)
from medseg.planning.memory import CPU_FLOAT32, GB

from .helpers import fake_fingerprint

CONFIGURATION = fit_configuration("3d_fullres", (1.3, 1.3, 2.6), (96.0, 96.0, 45.0), Network(1, 6), 1e9, 8 * GB,
                                  CPU_FLOAT32)
CANDIDATES = budget_candidates(CONFIGURATION, 8 * GB, CPU_FLOAT32)


def _seconds(per_gmac: float, overhead: float = 0.0, lean_speedup: float = 4.0):
    """Fake timings: proportional to the multiply-accumulates (the lean U-Net ``lean_speedup`` times faster
    than the DynUNet estimate its cost is given as)."""
    calls = []

    def timer(candidate) -> float:
        calls.append(candidate)
        speedup = lean_speedup if candidate.network.architecture == LEAN else 1.0
        return overhead + per_gmac * candidate.macs / 1e9 / speedup
    return timer, calls


def _expected(timer, budget: float) -> Candidate:
    """The rule, by brute force: the largest patch the lean network trains MIN_ITERATIONS on, then the
    most capacious network that does on that patch."""
    limit = budget / MIN_ITERATIONS
    lean = [c for c in CANDIDATES if c.network.architecture == LEAN]
    patch = next((c.patch_size for c in lean if timer(c) <= limit), lean[-1].patch_size)
    return next(c for c in CANDIDATES if c.patch_size == patch and (timer(c) <= limit or c.network.architecture == LEAN))


def test_candidates_go_from_the_largest_patch_and_the_memory_planned_network_down() -> None:
    assert CANDIDATES[0].network.base_features == 32 and CANDIDATES[0].patch_size == CONFIGURATION.patch_size
    assert CANDIDATES[0].batch_size == CONFIGURATION.batch_size
    volumes = [math.prod(c.patch_size) for c in CANDIDATES]
    assert volumes == sorted(volumes, reverse=True) and len(set(volumes)) >= 3
    for patch in {c.patch_size for c in CANDIDATES}:
        on_patch = [(c.network.architecture, c.network.base_features) for c in CANDIDATES if c.patch_size == patch]
        assert on_patch == [("dynunet", 32), ("dynunet", 16), (LEAN, 16)]
    lean = next(c for c in CANDIDATES if c.network.architecture == LEAN)
    assert not lean.network.deep_supervision and not lean.network.res_block


def test_a_fast_machine_gets_nnunets_network_on_the_fitted_patch() -> None:
    timer, calls = _seconds(per_gmac=0.0001)
    choice = choose_for_budget(CANDIDATES, 1800, timer)
    assert choice.candidate is CANDIDATES[0] and choice.expected_iterations >= MIN_ITERATIONS
    assert len(calls) <= MAX_PROBES


@pytest.mark.parametrize(("per_gmac", "budget"), [(0.002, 1800.0), (0.01, 1800.0), (0.01, 7200.0), (0.05, 1800.0),
                                                  (0.05, 36000.0)])
def test_the_largest_patch_then_the_most_capacious_network_that_trains_long_enough(per_gmac: float,
                                                                                   budget: float) -> None:
    timer, calls = _seconds(per_gmac, overhead=0.05)
    choice = choose_for_budget(CANDIDATES, budget, timer)
    timed = len(calls)
    assert choice.candidate is _expected(timer, budget)
    assert choice.expected_iterations == int(budget // choice.seconds_per_iteration) >= MIN_ITERATIONS
    assert timed <= MAX_PROBES and sum(entry["chosen"] for entry in choice.candidates) == 1


def test_short_budgets_choose_the_lean_network_and_long_ones_nnunets() -> None:
    timer, _ = _seconds(per_gmac=0.01, overhead=0.05)
    assert choose_for_budget(CANDIDATES, 1800, timer).candidate.network.architecture == LEAN
    assert choose_for_budget(CANDIDATES, 1_000_000, timer).candidate is CANDIDATES[0]


def test_a_slow_machine_gets_the_lean_network_on_the_smallest_patch_and_is_told() -> None:
    timer, calls = _seconds(per_gmac=10.0, overhead=5.0)
    choice = choose_for_budget(CANDIDATES, 600, timer)
    assert choice.candidate is CANDIDATES[-1] and choice.candidate.network.architecture == LEAN
    assert choice.expected_iterations < MIN_ITERATIONS
    assert "no candidate trains" in choice.reason and len(calls) == 1  # nothing else was worth timing


def test_the_planner_records_its_budget_reasoning() -> None:
    fingerprint = fake_fingerprint([(1.3, 1.3, 2.6)] * 10, [(96, 96, 45)] * 10)
    timer, _ = _seconds(per_gmac=0.01, overhead=0.05)
    plan = plan_dataset(fingerprint, PlannerOptions(device="cpu", time_budget_hours=0.5, measure=False),
                        timer=timer).plan
    record = plan.planning
    assert record["time_budget_hours"] == 0.5 and record["expected_iterations"] >= MIN_ITERATIONS
    # --precision auto (the default) with timings given: nothing measured, float32
    assert record["precision"] == {"name": "float32", "reason": "--precision auto: no iteration timed here; float32"}
    assert record["seconds_per_iteration"] == pytest.approx(0.05 + 0.01 * record_macs(record) / 4e9, rel=1e-3)
    assert math.prod(plan.patch_size) <= math.prod(CONFIGURATION.patch_size)
    # the lean U-Net, built from the plan with the candidate's strides and widths
    assert plan.network.name == LEAN and plan.network.channels[0] == record["base_features"] and "reason" in record
    assert plan.network.level_strides and not record["deep_supervision"]
    assert any(entry["chosen"] for entry in record["candidates"])
    # a budget of a few thousand iterations trains with AdamW; no budget (a GPU plan) with nnU-Net's SGD
    assert record["expected_iterations"] < 10_000 and record["optimizer"]["name"] == "AdamW"
    gpu = plan_dataset(fingerprint, PlannerOptions(device="cuda", measure=False)).plan.planning
    assert gpu["expected_iterations"] is None and gpu["optimizer"]["name"] == "SGD"


def record_macs(record: dict) -> float:
    chosen = next(entry for entry in record["candidates"] if entry["chosen"])
    return chosen["gmacs"] * 1e9


# -- the data side of an iteration (patches cut and augmented) -----------------------------------------------


def test_an_iteration_adds_the_data_time_without_workers_and_overlaps_it_with_them() -> None:
    assert iteration_seconds(0.5, 0.2, workers=0) == pytest.approx(0.7)
    assert iteration_seconds(0.5, 0.2, workers=1) == 0.5  # the loader keeps up: the network sets the pace
    assert iteration_seconds(0.1, 0.6, workers=2) == pytest.approx(0.3)  # the loader is the bottleneck


@pytest.mark.parametrize("workers", [0, 1])
def test_the_planners_timer_counts_the_batch_augmentation_once_per_patch(monkeypatch: pytest.MonkeyPatch,
                                                                         workers: int) -> None:
    """The timer of a CPU plan: network iteration (probe) plus the batch's data, each patch's case read
    and augmented (one timing per patch size, at the configuration's spacing and median shape),
    combined for the loader workers."""
    augmented: list[tuple] = []

    def fake_augmentation(plan, case_shape, channels):
        augmented.append((plan.patch_size, plan.target_spacing, tuple(case_shape), channels))
        return 0.25

    monkeypatch.setattr(planner, "probe", lambda request: Probe(0.5, None))
    monkeypatch.setattr(planner, "augmentation_seconds", fake_augmentation)
    monkeypatch.setattr(planner, "case_load_seconds", lambda case_shape, channels: 0.05)
    monkeypatch.setattr(planner, "worker_count", lambda: workers)
    timer = planner._probe_timer(CONFIGURATION, "cpu")
    lean = [c for c in CANDIDATES if c.network.architecture == LEAN]
    same_patch = [c for c in CANDIDATES if c.patch_size == lean[0].patch_size]
    assert len(same_patch) > 1
    for candidate in same_patch:
        data = (0.25 + 0.05) * candidate.batch_size
        assert timer(candidate) == pytest.approx(0.5 + data if workers == 0 else max(0.5, data))
    assert augmented == [(lean[0].patch_size, CONFIGURATION.spacing, CONFIGURATION.median_shape, 1)]


def test_augmentation_is_timed_on_a_case_with_every_class_and_the_planned_chain() -> None:
    """Positive, finite seconds (never compared with a figure: the machine's speed is not tested); the
    synthetic case holds every class, so foreground patches are drawn as in training."""
    request = ProbeRequest(NetworkSpec(LEAN, channels=(8, 16, 32), level_strides=((1, 1, 1), (2, 2, 2), (2, 2, 2))),
                           (16, 16, 8), 2, 2, 4, "cpu", (1.0, 1.0, 3.0))
    plan = request.plan()
    case = measure._synthetic_case(plan, (40, 36, 20), 2)
    assert tuple(case["image"].shape) == (2, 40, 36, 20)
    assert sorted(torch.unique(case["label"]).tolist()) == [0, 1, 2, 3]
    seconds = augmentation_seconds(plan, (40.0, 36.0, 20.0), channels=2, samples=2)
    assert math.isfinite(seconds) and seconds > 0
    with pytest.raises(ValueError, match="samples"):
        augmentation_seconds(plan, (40.0, 36.0, 20.0), samples=0)
    load = case_load_seconds((300.0, 300.0, 200.0), channels=2, probe_voxels=1 << 16)  # timed small, scaled up
    assert math.isfinite(load) and load > 0


def test_a_configuration_over_slices_trades_its_batch_of_slices_not_its_slice() -> None:
    """The 2d configuration of 3D data: every candidate keeps the fitted (whole) slice; the batch of slices
    steps down instead, and the rule picks the largest batch the lean network trains long enough with."""
    slices = fit_configuration("2d", (1.3, 1.3, 2.6), (96.0, 96.0, 45.0), Network(1, 6), 96 * 96 * 45 * 10.0, 8 * GB,
                               CPU_FLOAT32, patch=(96, 96, 1))
    candidates = budget_candidates(slices, 8 * GB, CPU_FLOAT32)
    assert {c.patch_size for c in candidates} == {(96, 96, 1)}
    batches = [c.batch_size for c in candidates]
    assert batches[0] == slices.batch_size > 8 and batches == sorted(batches, reverse=True) and batches[-1] == 2
    timer, _ = _seconds(per_gmac=0.2)
    choice = choose_for_budget(candidates, 1800, timer)
    lean = [c for c in candidates if c.network.architecture == LEAN]
    expected = next(c.batch_size for c in lean if timer(c) <= 1800 / MIN_ITERATIONS)
    assert 2 < expected < slices.batch_size  # neither end: the batch really was traded
    assert choice.candidate.batch_size == expected and choice.expected_iterations >= MIN_ITERATIONS
