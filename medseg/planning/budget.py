"""Planning for a time budget: the network width, patch and batch that can be trained for long enough
in the time a user has, chosen from a few timed iterations on this machine.

The rule (:func:`choose_for_budget`): candidates are the memory-fitted configuration (nnU-Net's
network, 32 features at full resolution) and narrower networks (16, 8) on that patch and on patches
shrunk step by step to about half, a quarter, ... of its volume, at batch 2. They are ranked by their
cost per iteration (multiply-accumulates, :func:`medseg.planning.memory.multiply_accumulates`);
among candidates of about the same cost (within 25 %) the larger patch ranks first (context before
capacity, as nnU-Net prefers). The planner picks the highest-ranked candidate that reaches at least
``min_iterations`` iterations in the training part of the budget: the most network and context the
budget trains long enough. If none does, the cheapest candidate, with the shortfall recorded.

Seconds per iteration come from an injected ``timer`` (measured iterations on this machine in the
planner, fake timings in tests). The cheapest candidate is timed first; then the ranked list is
bisected (a more costly candidate is assumed slower), timing the candidate in the middle. A candidate
is not timed, and counts as too slow, when the nearest cheaper timed one, scaled by cost, predicts more
than :data:`SKIP_FACTOR` times the time an iteration may take, or when :data:`MAX_PROBES` candidates
have been timed or the timing has used :data:`PROBE_SHARE` of the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medseg.architectures import Topology, plan_topology
from medseg.planning.configurations import MIN_STAGES, Configuration, Network
from medseg.planning.memory import GB, MemoryModel
from medseg.planning.rules import MIN_BATCH, shrink_patch

__all__ = ["MIN_ITERATIONS", "TRAINING_SHARE", "WIDTHS", "BudgetChoice", "Candidate", "budget_candidates",
           "choose_for_budget"]

#: The least number of training iterations a budget should allow (the planner's rule of thumb: fewer
#: leave a network from scratch far from converged).
MIN_ITERATIONS = 500
#: The part of the budget spent in training iterations (the rest: data loading, validation).
TRAINING_SHARE = 0.85
#: Widths tried: features of the first stage.
WIDTHS = (32, 16, 8)
#: Patches tried: the fitted one and each about half the volume of the previous, this many in all.
PATCH_STEPS = 5
#: Candidates within this factor of cost rank the larger patch first.
SIMILAR_COST = 1.25
#: At most this many candidates are timed, in at most this part of the budget (each timing costs about
#: PROBE_ITERATIONS iterations: one untimed, two timed).
MAX_PROBES = 5
PROBE_SHARE = 0.05
PROBE_ITERATIONS = 3
#: A candidate predicted to take more than this many times the allowed seconds per iteration is not timed.
SKIP_FACTOR = 4.0


@dataclass(frozen=True)
class Candidate:
    """A network width, topology (with the patch) and batch, with its cost per iteration."""

    network: Network
    topology: Topology
    batch_size: int
    macs: int
    memory_bytes: int

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.topology.patch_size

    def describe(self) -> dict[str, Any]:
        return {"base_features": self.network.base_features, "patch_size": list(self.patch_size),
                "batch_size": self.batch_size, "n_stages": self.topology.stages, "gmacs": round(self.macs / 1e9, 3),
                "memory_estimate_gb": round(self.memory_bytes / GB, 3)}


@dataclass
class BudgetChoice:
    """The chosen candidate, its seconds per iteration (measured), the iterations it expects in the
    budget, every candidate considered (with measured or predicted seconds) and why."""

    candidate: Candidate
    seconds_per_iteration: float
    expected_iterations: int
    candidates: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""


def _patches(configuration: Configuration) -> list[tuple[int, ...]]:
    """The configuration's patch and patches of about half the volume of the one before."""
    spacing, median = configuration.spacing, configuration.median_shape
    patches = [configuration.patch_size]
    while len(patches) < PATCH_STEPS:
        patch = patches[-1]
        while math.prod(patch) > math.prod(patches[-1]) / 2:
            smaller = shrink_patch(spacing, patch, median)
            if smaller == patch or plan_topology(spacing, smaller).stages < MIN_STAGES:
                return patches
            patch = smaller
        patches.append(patch)
    return patches


def _rank(candidates: list[Candidate]) -> list[Candidate]:
    """Most costly first; about equal costs (log buckets of :data:`SIMILAR_COST`): larger patch first."""
    def key(c: Candidate) -> tuple[int, int, int]:
        return (-math.floor(math.log(max(c.macs, 1)) / math.log(SIMILAR_COST)), -math.prod(c.patch_size),
                -c.network.base_features)
    return sorted(candidates, key=key)


def budget_candidates(configuration: Configuration, target_bytes: float, model: MemoryModel,
                      widths: Sequence[int] = WIDTHS) -> list[Candidate]:
    """The candidates of :func:`choose_for_budget` for a memory-fitted configuration, ranked: the
    configuration as planned, and every width on each of its shrinking patches at batch 2, those that
    fit ``target_bytes``."""
    spacing = configuration.spacing
    found = [Candidate(configuration.network, configuration.topology, configuration.batch_size,
                       configuration.network.macs(configuration.topology, configuration.batch_size),
                       configuration.memory_bytes)]
    seen = {(configuration.network.base_features, configuration.patch_size, configuration.batch_size)}
    for patch in _patches(configuration):
        topology = plan_topology(spacing, patch)
        for width in widths:
            if (width, patch, MIN_BATCH) in seen:
                continue
            network = Network(configuration.network.in_channels, configuration.network.out_channels, width,
                              configuration.network.res_block, configuration.network.deep_supervision)
            memory = network.memory(topology, MIN_BATCH, model)
            if memory <= target_bytes:
                found.append(Candidate(network, topology, MIN_BATCH, network.macs(topology, MIN_BATCH), memory))
                seen.add((width, patch, MIN_BATCH))
    return _rank(found)


def choose_for_budget(candidates: Sequence[Candidate], budget_seconds: float, timer: Callable[[Candidate], float],
                      min_iterations: int = MIN_ITERATIONS, max_probes: int = MAX_PROBES) -> BudgetChoice:
    """Choose among ranked ``candidates`` (see the module docstring for the rule) for a budget of
    ``budget_seconds`` of training iterations; ``timer`` returns a candidate's seconds per iteration.

    Raises
    ------
    ValueError
        No candidates, a budget that is not positive.
    """
    if not candidates:
        raise ValueError("no candidate network fits the memory target")
    if not budget_seconds > 0:
        raise ValueError(f"the time budget must be positive, got {budget_seconds}")
    limit = budget_seconds / min_iterations  # seconds per iteration that still allow min_iterations
    measured: dict[int, float] = {}

    def predicted(index: int) -> float:
        """From the nearest cheaper measured candidate, scaled by cost (an overestimate: fixed costs scale too)."""
        below = min(i for i in measured if i > index)
        return measured[below] * candidates[index].macs / max(candidates[below].macs, 1)

    def fits(index: int) -> bool:
        if predicted(index) > SKIP_FACTOR * limit:
            return False  # too slow to be worth a timed iteration
        if index not in measured:
            if len(measured) >= max_probes or sum(PROBE_ITERATIONS * t for t in measured.values()) > \
                    PROBE_SHARE * budget_seconds:
                return False
            measured[index] = max(float(timer(candidates[index])), 1e-9)
        return measured[index] <= limit

    cheapest = len(candidates) - 1
    measured[cheapest] = max(float(timer(candidates[cheapest])), 1e-9)
    good, bad = cheapest, -1  # candidates are assumed slower the more they cost: bisect between the two
    if measured[cheapest] <= limit:
        while good - bad > 1:
            middle = (good + bad) // 2
            if fits(middle):
                good = middle
            else:
                bad = middle
    return _choice(candidates, good, measured, budget_seconds, min_iterations)


def _choice(candidates: Sequence[Candidate], chosen: int, measured: dict[int, float], budget_seconds: float,
            min_iterations: int) -> BudgetChoice:
    seconds = measured[chosen]
    iterations = int(budget_seconds // seconds)
    tried = []
    for index, candidate in enumerate(candidates):
        entry = candidate.describe()
        if index in measured:
            entry["seconds_per_iteration"] = round(measured[index], 4)
        else:
            below = min((i for i in measured if i > index), default=None)
            entry["predicted_seconds_per_iteration"] = None if below is None else \
                round(measured[below] * candidate.macs / max(candidates[below].macs, 1), 4)
        each = entry.get("seconds_per_iteration") or entry.get("predicted_seconds_per_iteration")
        entry["expected_iterations"] = None if not each else int(budget_seconds // each)
        entry["chosen"] = index == chosen
        tried.append(entry)
    if iterations >= min_iterations:
        reason = (f"the most costly candidate (ranked by multiply-accumulates per iteration) that trains at least "
                  f"{min_iterations} iterations in {budget_seconds:.0f} s: {iterations} at {seconds:.3g} s each")
    else:
        reason = (f"no candidate trains {min_iterations} iterations in {budget_seconds:.0f} s; the cheapest "
                  f"manages {iterations} at {seconds:.3g} s each (a longer budget or a GPU would train more)")
    return BudgetChoice(candidates[chosen], seconds, iterations, tried, reason)
