"""The time-budget choice, decided on fake timings (never on this machine's speed)."""

from __future__ import annotations

import math

import pytest

from medseg.planning import PlannerOptions, plan_dataset
from medseg.planning.budget import MIN_ITERATIONS, budget_candidates, choose_for_budget
from medseg.planning.configurations import Network, fit_configuration
from medseg.planning.memory import CPU_FLOAT32, GB

from .helpers import fake_fingerprint

CONFIGURATION = fit_configuration("3d_fullres", (1.3, 1.3, 2.6), (96.0, 96.0, 45.0), Network(1, 6), 1e9, 8 * GB,
                                  CPU_FLOAT32)
CANDIDATES = budget_candidates(CONFIGURATION, 8 * GB, CPU_FLOAT32)


def _seconds(per_gmac: float, overhead: float = 0.0):
    calls = []

    def timer(candidate) -> float:
        calls.append(candidate)
        return overhead + per_gmac * candidate.macs / 1e9
    return timer, calls


def test_candidates_are_ranked_by_cost_and_include_the_memory_planned_network() -> None:
    assert CANDIDATES[0].network.base_features == 32 and CANDIDATES[0].patch_size == CONFIGURATION.patch_size
    costs = [c.macs for c in CANDIDATES]
    assert costs[0] == max(costs) and costs[-1] == min(costs)
    assert {c.network.base_features for c in CANDIDATES} == {8, 16, 32}
    assert len({c.patch_size for c in CANDIDATES}) >= 3


def test_a_fast_machine_gets_the_largest_candidate() -> None:
    timer, calls = _seconds(per_gmac=0.001)
    choice = choose_for_budget(CANDIDATES, 1800, timer)
    assert choice.candidate is CANDIDATES[0] and choice.expected_iterations >= MIN_ITERATIONS
    assert len(calls) <= 5


@pytest.mark.parametrize("per_gmac", [0.01, 0.05, 0.2])
def test_the_most_costly_candidate_that_trains_long_enough_is_chosen(per_gmac: float) -> None:
    timer, calls = _seconds(per_gmac, overhead=0.3)
    budget = 1800.0
    choice = choose_for_budget(CANDIDATES, budget, timer)
    fitting = [c for c in CANDIDATES if budget / (0.3 + per_gmac * c.macs / 1e9) >= MIN_ITERATIONS]
    assert fitting and choice.candidate is fitting[0]
    assert choice.expected_iterations == int(budget // choice.seconds_per_iteration) >= MIN_ITERATIONS
    assert len(calls) <= 5 and sum(entry["chosen"] for entry in choice.candidates) == 1


def test_a_slow_machine_gets_the_cheapest_candidate_and_is_told() -> None:
    timer, calls = _seconds(per_gmac=10.0, overhead=5.0)
    choice = choose_for_budget(CANDIDATES, 600, timer)
    assert choice.candidate is CANDIDATES[-1] and choice.expected_iterations < MIN_ITERATIONS
    assert "no candidate trains" in choice.reason and len(calls) == 1  # nothing else was worth timing


def test_the_planner_records_its_budget_reasoning() -> None:
    fingerprint = fake_fingerprint([(1.3, 1.3, 2.6)] * 10, [(96, 96, 45)] * 10)
    timer, _ = _seconds(per_gmac=0.05, overhead=0.2)
    plan = plan_dataset(fingerprint, PlannerOptions(device="cpu", time_budget_hours=0.5, measure=False),
                        timer=timer).plan
    record = plan.planning
    assert record["time_budget_hours"] == 0.5 and record["expected_iterations"] >= MIN_ITERATIONS
    assert record["seconds_per_iteration"] == pytest.approx(0.2 + 0.05 * record_macs(record) / 1e9, rel=1e-3)
    assert math.prod(plan.patch_size) <= math.prod(CONFIGURATION.patch_size)
    assert plan.network.filters[0] == record["base_features"] and "reason" in record
    assert any(entry["chosen"] for entry in record["candidates"])
    # a budget of a few thousand iterations trains with AdamW; no budget (a GPU plan) with nnU-Net's SGD
    assert record["expected_iterations"] < 10_000 and record["optimizer"]["name"] == "AdamW"
    gpu = plan_dataset(fingerprint, PlannerOptions(device="cuda", measure=False)).plan.planning
    assert gpu["expected_iterations"] is None and gpu["optimizer"]["name"] == "SGD"


def record_macs(record: dict) -> float:
    chosen = next(entry for entry in record["candidates"] if entry["chosen"])
    return chosen["gmacs"] * 1e9
