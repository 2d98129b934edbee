"""Planning for a time budget: the patch and network that can be trained for long enough in the time a
user has, chosen from a few timed iterations on this machine.

The rule (:func:`choose_for_budget`): context first, then capacity, each only as far as the budget still
trains at least ``min_iterations`` iterations (:data:`MIN_ITERATIONS`).

Candidates (:func:`budget_candidates`) are the memory-fitted patch and patches shrunk step by step to
about half, a quarter, ... of its volume; on each patch three networks, from the most capacious: nnU-Net's
DynUNet (32 features at full resolution; on the fitted patch at the fitted batch), the same 16 wide, and
the lean network, MONAI's U-Net with a pointwise head (:class:`medseg.networks.unet_head.PointwiseHeadUNet`,
16 features), whose first convolution is strided: on a CPU it trains 3-5 times faster per patch than a
DynUNet (measured here). Batch 2 except where noted.

1. The patch: the largest on which the lean network reaches ``min_iterations``; found by bisecting the
   patches (a larger patch is assumed slower), timing the lean network. If not even the smallest patch
   does, the lean network on the smallest patch is chosen, with the shortfall recorded.
2. The network on that patch: the most capacious of DynUNet 32, DynUNet 16 and the lean network that
   still reaches ``min_iterations`` (DynUNet 16 timed first; DynUNet 32 only if it fits).

For the ``2d`` configuration of 3D data the context is the batch of slices on the fitted slice (see
:func:`budget_candidates`): the same two steps choose the batch, then the network.

Seconds per iteration come from an injected ``timer`` (measured iterations on this machine in the
planner, fake timings in tests). A candidate is not timed, and counts as too slow, when a timed candidate
of the same network on a smaller patch, scaled by the patch volume, predicts more than
:data:`SKIP_FACTOR` times the time an iteration may take, or when :data:`MAX_PROBES` candidates have been
timed or the timing has used :data:`PROBE_SHARE` of the budget.

Why 2,000 iterations: on this project's CPU benchmarks (2-core machine, one thread per run) the planned
DynUNet at 700 iterations reached 0.944 mean Dice on the CT phantoms where the 4-level U-Net at 2,000
iterations reached 0.967, and 0.881 against 0.912 (280 against 1,221 iterations) on the MNI152 tissue
task: below about 2,000 iterations more iterations count for more than a wider network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from medseg.architectures import Topology, plan_topology, slice_axis
from medseg.planning.configurations import MIN_STAGES, Configuration, Network
from medseg.planning.memory import GB, MemoryModel
from medseg.planning.rules import MIN_BATCH, shrink_patch

__all__ = ["LEAN", "MIN_ITERATIONS", "TRAINING_SHARE", "WIDTHS", "BudgetChoice", "Candidate", "budget_candidates",
           "choose_for_budget"]

#: The least number of training iterations a budget should allow (see the module docstring).
MIN_ITERATIONS = 2000
#: The part of the budget spent in training iterations (the rest: data loading, validation).
TRAINING_SHARE = 0.85
#: DynUNet widths tried: features of the first stage (the lean network has :data:`LEAN_FEATURES`).
WIDTHS = (32, 16)
LEAN = "unet_head"
LEAN_FEATURES = 16
#: Patches tried: the fitted one and each about half the volume of the previous, this many in all.
PATCH_STEPS = 5
#: At most this many candidates are timed, in at most this part of the budget (each timing costs about
#: PROBE_ITERATIONS iterations: one untimed, two timed).
MAX_PROBES = 6
PROBE_SHARE = 0.05
PROBE_ITERATIONS = 3
#: A candidate predicted to take more than this many times the allowed seconds per iteration is not timed.
SKIP_FACTOR = 4.0


@dataclass(frozen=True)
class Candidate:
    """A network (architecture and width), topology (with the patch) and batch, with its cost per iteration."""

    network: Network
    topology: Topology
    batch_size: int
    macs: int
    memory_bytes: int

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.topology.patch_size

    @property
    def context(self) -> tuple[Any, ...]:
        """What the budget trades for iterations first: the patch; for a network over slices (patch one
        voxel thick) the patch and the batch of slices."""
        return (self.patch_size, self.batch_size) if slice_axis(self.patch_size) is not None else (self.patch_size,)

    @property
    def work(self) -> int:
        """Voxels per iteration (patch times batch): the scale of a timing predicted from another."""
        return math.prod(self.patch_size) * self.batch_size

    def describe(self) -> dict[str, Any]:
        return {"network": self.network.architecture, "base_features": self.network.base_features,
                "patch_size": list(self.patch_size), "batch_size": self.batch_size, "n_stages": self.topology.stages,
                "gmacs": round(self.macs / 1e9, 3), "memory_estimate_gb": round(self.memory_bytes / GB, 3)}


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


def budget_candidates(configuration: Configuration, target_bytes: float, model: MemoryModel,
                      widths: Sequence[int] = WIDTHS) -> list[Candidate]:
    """The candidates of :func:`choose_for_budget` for a memory-fitted configuration, largest patch
    first and on each patch the most capacious network first: the configuration as planned, DynUNets of
    each of ``widths`` at batch 2 and the lean network at batch 2, those that fit ``target_bytes``.

    The ``2d`` configuration of 3D data (a patch one slice thick) keeps its fitted slice (nnU-Net's 2d patch
    covers the median slice) and steps its batch of slices down instead: the planned batch, then about half
    of the one before (at least 2), each with the three networks. Two slices per iteration would see a
    fraction of one 3D patch's voxels, and a smaller slice costs little less to sample and augment."""
    spacing, planned = configuration.spacing, configuration.network
    found = [Candidate(planned, configuration.topology, configuration.batch_size,
                       planned.macs(configuration.topology, configuration.batch_size), configuration.memory_bytes)]
    if slice_axis(configuration.patch_size) is not None:
        steps = [(configuration.patch_size, batch) for batch in _batches(configuration.batch_size)]
    else:
        steps = [(patch, MIN_BATCH) for patch in _patches(configuration)]
    # the planned network stands for its width on the first step's patch and batch
    seen = {(planned.architecture, planned.base_features, *steps[0])}
    for patch, batch in steps:
        topology = plan_topology(spacing, patch)
        networks = [replace(planned, base_features=width) for width in widths]
        networks.append(replace(planned, base_features=LEAN_FEATURES, res_block=False, deep_supervision=False,
                                architecture=LEAN))
        for network in networks:
            if (network.architecture, network.base_features, patch, batch) in seen:
                continue
            memory = network.memory(topology, batch, model)
            if memory <= target_bytes:
                found.append(Candidate(network, topology, batch, network.macs(topology, batch), memory))
                seen.add((network.architecture, network.base_features, patch, batch))
    return found


def _batches(batch: int) -> list[int]:
    """A batch of slices and about half of the one before, down to :data:`MIN_BATCH` (:data:`PATCH_STEPS` in all)."""
    batches = [batch]
    while len(batches) < PATCH_STEPS and batches[-1] > MIN_BATCH:
        batches.append(max(MIN_BATCH, batches[-1] // 2))
    return batches


def _same_network(a: Candidate, b: Candidate) -> bool:
    return (a.network.architecture, a.network.base_features) == (b.network.architecture, b.network.base_features)


class _Timings:
    """Seconds per iteration measured (at most :data:`MAX_PROBES`, within :data:`PROBE_SHARE` of the
    budget) or predicted from the same network on the nearest smaller timed patch, scaled by volume."""

    def __init__(self, candidates: Sequence[Candidate], budget_seconds: float, limit: float,
                 timer: Callable[[Candidate], float], max_probes: int) -> None:
        self.candidates, self.budget, self.limit, self.timer, self.max_probes = \
            candidates, budget_seconds, limit, timer, max_probes
        self.measured: dict[int, float] = {}

    def measure(self, index: int) -> float:
        if index not in self.measured:
            self.measured[index] = max(float(self.timer(self.candidates[index])), 1e-9)
        return self.measured[index]

    def predicted(self, index: int) -> float | None:
        candidate = self.candidates[index]
        volume = candidate.work
        same = [(self.candidates[i].work, seconds) for i, seconds in self.measured.items()
                if _same_network(self.candidates[i], candidate) and self.candidates[i].work <= volume]
        if not same:
            return None
        smaller, seconds = max(same)
        return seconds * volume / max(smaller, 1)

    def fits(self, index: int) -> bool:
        """Whether the candidate trains ``min_iterations`` in the budget (timed if worth it and allowed)."""
        if index in self.measured:
            return self.measured[index] <= self.limit
        guess = self.predicted(index)
        if guess is not None and guess > SKIP_FACTOR * self.limit:
            return False  # too slow to be worth a timed iteration
        spent = sum(PROBE_ITERATIONS * t for t in self.measured.values())
        if len(self.measured) >= self.max_probes or spent > PROBE_SHARE * self.budget:
            return False
        return self.measure(index) <= self.limit


def choose_for_budget(candidates: Sequence[Candidate], budget_seconds: float, timer: Callable[[Candidate], float],
                      min_iterations: int = MIN_ITERATIONS, max_probes: int = MAX_PROBES) -> BudgetChoice:
    """Choose among ``candidates`` (as :func:`budget_candidates` orders them; see the module docstring
    for the rule) for a budget of ``budget_seconds`` of training iterations; ``timer`` returns a
    candidate's seconds per iteration.

    Raises
    ------
    ValueError
        No candidates, no lean candidate, a budget that is not positive.
    """
    if not candidates:
        raise ValueError("no candidate network fits the memory target")
    if not budget_seconds > 0:
        raise ValueError(f"the time budget must be positive, got {budget_seconds}")
    lean = [i for i, c in enumerate(candidates) if c.network.architecture == LEAN]
    if not lean:
        raise ValueError("no lean candidate network fits the memory target")
    timings = _Timings(candidates, budget_seconds, budget_seconds / min_iterations, timer, max_probes)
    good, bad = len(lean) - 1, -1  # positions in lean: larger patches first, assumed slower
    if timings.measure(lean[good]) <= timings.limit:
        while good - bad > 1:
            middle = (good + bad) // 2
            if timings.fits(lean[middle]):
                good = middle
            else:
                bad = middle
    chosen = lean[good]
    if timings.measured[chosen] <= timings.limit:
        context = candidates[chosen].context
        richer = [i for i, c in enumerate(candidates) if c.context == context and i < chosen]  # most capacious first
        for index in reversed(richer):  # the narrower first: a wider one is tried only if it fits
            if not timings.fits(index):
                break
            chosen = index
    return _choice(candidates, chosen, timings, budget_seconds, min_iterations)


def _choice(candidates: Sequence[Candidate], chosen: int, timings: _Timings, budget_seconds: float,
            min_iterations: int) -> BudgetChoice:
    seconds = timings.measured[chosen]
    iterations = int(budget_seconds // seconds)
    tried = []
    for index, candidate in enumerate(candidates):
        entry = candidate.describe()
        if index in timings.measured:
            entry["seconds_per_iteration"] = round(timings.measured[index], 4)
        else:
            guess = timings.predicted(index)
            entry["predicted_seconds_per_iteration"] = None if guess is None else round(guess, 4)
        each = entry.get("seconds_per_iteration") or entry.get("predicted_seconds_per_iteration")
        entry["expected_iterations"] = None if not each else int(budget_seconds // each)
        entry["chosen"] = index == chosen
        tried.append(entry)
    name = f"{candidates[chosen].network.architecture} {candidates[chosen].network.base_features}"
    if iterations >= min_iterations:
        reason = (f"the largest patch, then the most capacious network ({name}), that trains at least "
                  f"{min_iterations} iterations in {budget_seconds:.0f} s: {iterations} at {seconds:.3g} s each")
    else:
        reason = (f"no candidate trains {min_iterations} iterations in {budget_seconds:.0f} s; the lean network on "
                  f"the smallest patch manages {iterations} at {seconds:.3g} s each (a longer budget or a GPU would "
                  "train more)")
    return BudgetChoice(candidates[chosen], seconds, iterations, tried, reason)
