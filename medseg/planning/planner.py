"""The planner: a dataset fingerprint and what to plan for (:class:`PlannerOptions`) in, the plan of the
chosen configuration and every configuration considered (``plans.json``, nnU-Net style) out.

Steps: the target spacing and median image (:mod:`medseg.planning.rules`); the configurations, each
fitted to the memory target (:mod:`medseg.planning.configurations`); the configuration asked for (by
default ``3d_fullres``, or ``2d`` for 2D data); with a time budget (by default on the CPU), the width,
patch and batch that train long enough in it (:mod:`medseg.planning.budget`); the memory estimate
checked by a measured iteration (:mod:`medseg.planning.measure`), the patch shrunk if the measurement
exceeds the target.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medseg.architectures import NetworkSpec
from medseg.data.channels import channel_modality, channel_preset
from medseg.data.fingerprint import Fingerprint, IntensityStats
from medseg.devices import worker_count
from medseg.errors import InputError
from medseg.plan import Channel, Intensity, Plan, checked_network
from medseg.planning.budget import LEAN, TRAINING_SHARE, BudgetChoice, Candidate, budget_candidates, choose_for_budget
from medseg.planning.configurations import (
    Configuration,
    MemoryTargetError,
    Network,
    fit_configuration,
    plan_configurations,
)
from medseg.planning.measure import (
    Probe,
    ProbeRequest,
    augmentation_seconds,
    case_load_seconds,
    iteration_seconds,
    probe,
    probe_in_fresh_process,
)
from medseg.planning.memory import GB, MemoryModel, memory_model
from medseg.planning.options import PRESETS, PlannerOptions, check_planner_options
from medseg.planning.recipe import choose_augmentation, choose_optimizer, choose_precision
from medseg.planning.rules import resampled_median_shape, target_spacing

__all__ = ["PLANNER", "PLANS_FORMAT", "PlanningResult", "plan_dataset"]

#: nnU-Net's second stage of the cascade: 3d_fullres fed the label map of a 3d_lowres model too.
CASCADE = "3d_cascade_fullres"

log = logging.getLogger("medseg.planning")

PLANS_FORMAT = "medseg-plans/1"
PLANNER = "medseg nnU-Net-style planner"
#: Times the patch is shrunk when a measured iteration exceeds the memory target.
MAX_MEMORY_RETRIES = 3

Timer = Callable[[Candidate], float]
Measurer = Callable[[ProbeRequest], Probe | None]


@dataclass
class PlanningResult:
    """The chosen configuration's plan, the fingerprint it came from and every configuration (the
    content of ``plans.json``)."""

    plan: Plan
    fingerprint: Fingerprint
    configurations: dict[str, Configuration]
    plans: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """What ``medseg plan`` prints: configuration, spacing, patch, batch, stages, expected iterations."""
        plan, record = self.plan, self.plan.planning
        iterations = record.get("expected_iterations")
        budget = record.get("time_budget_hours")
        measured = record.get("memory_measured_gb")
        lines = [
            f"configuration: {plan.configuration} (of {', '.join(sorted(self.configurations))})",
            f"target spacing: {' x '.join(f'{s:.4g}' for s in plan.target_spacing)} mm",
            f"patch: {' x '.join(map(str, plan.patch_size))}  batch: {plan.batch_size}",
            _network_line(plan.network),
            (f"memory: estimate {record['memory_estimate_gb']:.2f} GB, measured "
            f"{'n/a' if measured is None else f'{measured:.2f} GB'}, "
            f"target {record['memory_target_gb']:.3g} GB ({record['device']})"),
        ]
        if budget is not None:
            lines.append(f"expected iterations: {iterations} in {budget:.3g} h at "
                         f"{record['seconds_per_iteration']:.3g} s per iteration")
        else:
            lines.append("expected iterations: n/a (no time budget)")
        optimizer = record.get("optimizer")
        if optimizer:
            lines.append(f"optimizer: {optimizer['name']}, learning rate {optimizer['learning_rate']:g} "
                         f"({optimizer['reason']})")
        precision = record.get("precision")
        if precision:
            lines.append(f"training precision: {precision['name']} ({precision['reason']})")
        return lines


def _features(spec: NetworkSpec) -> tuple[int, ...]:
    """Feature channels per stage of a planned network (a DynUNet's ``filters``, the lean U-Net's ``channels``)."""
    return spec.channels if spec.name == LEAN else spec.filters


def _network_line(spec: NetworkSpec) -> str:
    """``network: DynUNet, 5 stages, features 32-64-128-256-320`` (or the lean U-Net's)."""
    features = _features(spec)
    blocks = " (residual blocks)" if spec.name == "dynunet" and spec.res_block else ""
    return f"network: {spec.title}{blocks}, {len(features)} stages, features {'-'.join(map(str, features))}"


def plan_dataset(fingerprint: Fingerprint, options: PlannerOptions, timer: Timer | None = None,
                 measurer: Measurer | None = None) -> PlanningResult:
    """Plan ``fingerprint`` for ``options`` (see the module docstring). ``timer`` (seconds per
    iteration of a candidate) and ``measurer`` (a measured iteration) replace the measurements on
    this machine (tests).

    Raises
    ------
    InputError
        Bad options (:func:`~medseg.planning.options.check_planner_options`), a target spacing of the
        wrong length, a memory target too small for any patch, a configuration that this dataset has
        not (``3d_fullres`` or ``3d_lowres`` of 2D data; ``3d_lowres`` when the full-resolution patch
        covers a quarter of the median image), a time budget or measurement on
        CUDA where no CUDA device is available.
    """
    started = time.monotonic()
    check_planner_options(options)
    dims = fingerprint.dims
    spacings, shapes = fingerprint.spacings, fingerprint.shapes_after_crop
    if options.target_spacing is not None and len(options.target_spacing) != dims:
        raise InputError(None, f"--spacing needs {dims} values for this {dims}D dataset, got {list(options.target_spacing)}")
    spacing = (np.asarray(options.target_spacing, float) if options.target_spacing is not None
               else target_spacing(spacings, shapes))
    median = resampled_median_shape(spacings, shapes, spacing)
    preset = PRESETS[options.preset]
    cascade = options.configuration == CASCADE
    # a cascade stage's network also takes the previous stage's label map, one channel per foreground class
    inputs = len(fingerprint.channels) + (max(fingerprint.labels) if cascade else 0)
    network = Network(inputs, fingerprint.num_outputs, res_block=preset.res_block)
    model = memory_model(options.device)
    target = options.memory_target_gb() * GB
    try:
        configurations = plan_configurations(tuple(spacing), tuple(median), len(fingerprint.cases), network, target,
                                             model, lowres=options.configuration == "3d_lowres")
    except MemoryTargetError as exc:
        raise InputError(None, f"--memory-gb {options.memory_target_gb():.3g}: {exc}") from None
    name = _configuration_name(options.configuration, dims, configurations)
    # the cascade's second stage is 3d_fullres with the previous stage's label map as inputs
    configuration = (dataclasses.replace(configurations["3d_fullres"], name=CASCADE) if cascade
                     else configurations[name])
    budget_hours = options.budget_hours()
    choice = None
    precision: dict[str, Any] = {"name": "float16", "reason": "mixed precision on CUDA (MONAI's amp)"}
    if not options.cuda:
        precision = {"name": options.precision, "reason": "asked for (--precision)"}
    if budget_hours is not None:
        _need_cuda(options, timer is None, "--time-budget times training iterations")
        candidates = budget_candidates(configuration, target, model)
        if timer is None and not options.cuda and options.precision == "auto":
            precision = _cpu_precision(candidates, configuration, options.device)
        # the patch and network are chosen on float32 timings; bfloat16 buys iterations, not a bigger patch (on
        # MNI152 the bigger patch it bought scored 0.881, the float32 choice trained in bfloat16 0.941)
        choice = choose_for_budget(candidates, budget_hours * 3600 * TRAINING_SHARE,
                                   timer or _probe_timer(configuration, options.device))
        if timer is None and precision["name"] == "bfloat16":
            seconds = _probe_timer(configuration, options.device, "bfloat16")(choice.candidate)
            choice = dataclasses.replace(choice, seconds_per_iteration=seconds, expected_iterations=int(
                budget_hours * 3600 * TRAINING_SHARE // max(seconds, 1e-9)))
        chosen = choice.candidate
    if precision["name"] == "auto":  # nothing timed: no time budget, or timings given
        precision = {"name": "float32", "reason": "--precision auto: no iteration timed here; float32"}
    if budget_hours is None:
        chosen = Candidate(configuration.network, configuration.topology, configuration.batch_size,
                           configuration.network.macs(configuration.topology, configuration.batch_size),
                           configuration.memory_bytes)
    chosen, measured, retries = _validated(chosen, configuration, target, model, options, measurer,
                                           precision["name"])
    record = _record(options, configuration, chosen, choice, measured, retries, target, model, budget_hours)
    record["precision"] = precision
    plan = _plan(fingerprint, options, configuration, chosen, record)
    record["planning_seconds"] = round(time.monotonic() - started, 2)
    result = PlanningResult(plan, fingerprint, configurations)
    result.plans = _plans_json(result, options, spacings, shapes, name)
    log.info("plan: %s, spacing %s mm, patch %s, batch %d, %d stages", name, [round(s, 3) for s in plan.target_spacing],
             list(plan.patch_size), plan.batch_size, len(_features(plan.network)))
    return result


def _configuration_name(asked: str | None, dims: int, configurations: dict[str, Configuration]) -> str:
    if asked is None:
        return "3d_fullres" if dims == 3 else "2d"
    if asked.startswith("3d") and dims == 2:
        raise InputError(None, f"--configuration {asked}: this dataset is 2D; use 2d")
    if asked == CASCADE:
        return asked
    if asked not in configurations:
        raise InputError(None, f"--configuration {asked}: not planned for this dataset; use 3d_fullres")
    return asked


def _need_cuda(options: PlannerOptions, measuring: bool, what: str) -> None:
    if options.cuda and measuring and not torch.cuda.is_available():
        raise InputError(None, f"--device {options.device}: {what} on the GPU, and CUDA is not available on this "
                         "machine; plan on the machine that trains, or leave out --time-budget")


def _spec(network: Network, candidate: Candidate) -> NetworkSpec:
    topology = candidate.topology
    if network.architecture == LEAN:
        return NetworkSpec(LEAN, channels=network.filters(topology), level_strides=topology.strides)
    return NetworkSpec("dynunet", filters=network.filters(topology), kernel_sizes=topology.kernel_sizes,
                       level_strides=topology.strides, res_block=network.res_block,
                       deep_supervision=network.deep_supervision)


def _request(candidate: Candidate, device: str, spacing: tuple[float, ...] | None = None,
             precision: str = "float32") -> ProbeRequest:
    return ProbeRequest(_spec(candidate.network, candidate), candidate.patch_size, candidate.batch_size,
                        candidate.network.in_channels, candidate.network.out_channels, device, spacing,
                        "bfloat16" if precision == "bfloat16" else "float32")


def _cpu_precision(candidates: list[Candidate], configuration: Configuration, device: str) -> dict[str, Any]:
    """The CPU training precision (:func:`~medseg.planning.recipe.choose_precision`), from the smallest candidate's
    iteration measured here in float32 and under bfloat16 autocast."""
    smallest = min(candidates, key=lambda c: c.macs)
    seconds = {name: probe(_request(smallest, device, configuration.spacing, name)).seconds
               for name in ("float32", "bfloat16")}
    chosen = choose_precision(seconds["float32"], seconds["bfloat16"])
    log.info("training precision %s: %s", chosen["name"], chosen["reason"])
    return chosen


def _probe_timer(configuration: Configuration, device: str, precision: str = "float32") -> Timer:
    """Seconds per iteration of a candidate, measured here: the network's iteration (one untimed and
    two timed) and the batch's data, each patch's case read from the cache (timed once: it depends on
    the median image only) and cut and augmented by the planned chain (timed once per patch size),
    combined as training will run them with this machine's loader workers
    (:func:`~medseg.planning.measure.iteration_seconds`, :func:`~medseg.devices.worker_count`)."""
    workers = worker_count()
    channels = configuration.network.in_channels
    load_seconds = case_load_seconds(configuration.median_shape, channels)
    per_patch: dict[tuple[int, ...], float] = {}

    def timer(candidate: Candidate) -> float:
        request = _request(candidate, device, configuration.spacing, precision)
        network_seconds = probe(request).seconds
        patch = candidate.patch_size
        if patch not in per_patch:
            per_patch[patch] = load_seconds + augmentation_seconds(request.plan(), configuration.median_shape, channels)
        data_seconds = per_patch[patch] * candidate.batch_size
        seconds = iteration_seconds(network_seconds, data_seconds, workers)
        log.info("timed %s: %.3g s per iteration (network %.3g s, data %.3g s per batch, %d loader workers)",
                 candidate.describe(), seconds, network_seconds, data_seconds, workers)
        return seconds
    return timer


def _measure(request: ProbeRequest) -> Probe | None:
    """A measured iteration: on CUDA in this process (None without CUDA), on the CPU in a fresh one."""
    if request.device.startswith("cuda"):
        if torch.cuda.is_available():
            return probe(request, steps=1, warmup=0)
        log.warning("no CUDA device here: the plan's memory estimate is not checked by a measured iteration")
        return None
    return probe_in_fresh_process(request)


def _validated(chosen: Candidate, configuration: Configuration, target: float, model: MemoryModel,
               options: PlannerOptions, measurer: Measurer | None, precision: str = "float32"
               ) -> tuple[Candidate, Probe | None, int]:
    """``chosen`` with its peak memory measured; while the peak exceeds the target, the patch is fitted
    again to a target lowered by the overshoot and measured again (at most :data:`MAX_MEMORY_RETRIES`)."""
    if not options.measure and measurer is None:
        return chosen, None, 0
    measure = measurer or _measure
    measured = measure(_request(chosen, options.device, precision=precision))
    retries = 0
    while measured is not None and measured.peak_bytes is not None and measured.peak_bytes > target:
        if retries >= MAX_MEMORY_RETRIES:
            raise InputError(None, f"--memory-gb {target / GB:.3g}: a measured iteration needs "
                             f"{measured.peak_bytes / GB:.2f} GB even after {retries} smaller patches")
        retries += 1
        lowered = chosen.memory_bytes * target / measured.peak_bytes
        try:
            smaller = fit_configuration(configuration.name, configuration.spacing, configuration.median_shape,
                                        chosen.network, 0.0, lowered, model, chosen.patch_size, chosen.batch_size)
        except MemoryTargetError as exc:
            raise InputError(None, f"--memory-gb {target / GB:.3g}: measured {measured.peak_bytes / GB:.2f} GB; "
                             f"{exc}") from None
        chosen = Candidate(chosen.network, smaller.topology, chosen.batch_size,
                           chosen.network.macs(smaller.topology, chosen.batch_size),
                           chosen.network.memory(smaller.topology, chosen.batch_size, model))
        log.warning("a measured iteration needed %.2f GB, above the %.3g GB target: patch shrunk to %s",
                    measured.peak_bytes / GB, target / GB, list(chosen.patch_size))
        measured = measure(_request(chosen, options.device, precision=precision))
    return chosen, measured, retries


def _record(options: PlannerOptions, configuration: Configuration, chosen: Candidate, choice: BudgetChoice | None,
            measured: Probe | None, retries: int, target: float, model: MemoryModel,
            budget_hours: float | None) -> dict[str, Any]:
    """``plan.planning``: the planner's reasoning."""
    preset = PRESETS[options.preset]
    if measured is not None and measured.peak_bytes is not None:
        how = "torch.cuda.max_memory_allocated" if options.cuda else "peak resident memory of a fresh process"
    elif options.cuda:
        how = "not measured: no CUDA device on the planning machine" if options.measure else "not measured"
    else:
        how = "not measured"
    record: dict[str, Any] = {
        "planner": PLANNER, "device": options.device, "preset": options.preset, "preset_note": preset.note,
        "configuration": configuration.name, "memory_target_gb": round(target / GB, 3), "memory_model": model.name,
        "memory_estimate_gb": round(chosen.memory_bytes / GB, 3),
        "memory_measured_gb": None if measured is None or measured.peak_bytes is None
        else round(measured.peak_bytes / GB, 3),
        "memory_measurement": how, "memory_retries": retries,
        "base_features": chosen.network.base_features, "deep_supervision": chosen.network.deep_supervision,
        "time_budget_hours": budget_hours, "training_share": TRAINING_SHARE if budget_hours is not None else None,
        "seconds_per_iteration": None, "expected_iterations": None,
    }
    if choice is not None:
        seconds = measured.seconds if measured is not None and chosen is not choice.candidate else \
            choice.seconds_per_iteration
        record.update({"seconds_per_iteration": round(seconds, 4),
                       "expected_iterations": int(budget_hours * 3600 * TRAINING_SHARE // max(seconds, 1e-9))
                       if budget_hours is not None else None,
                       "candidates": choice.candidates, "reason": choice.reason})
    elif measured is not None:
        record["seconds_per_iteration"] = round(measured.seconds, 4)
    record["optimizer"] = choose_optimizer(record["expected_iterations"])
    record["augmentation"] = choose_augmentation(record["expected_iterations"])
    return record


def _intensity(stats: IntensityStats, preset: str, window: tuple[float, float] | None) -> Intensity:
    """CT: clip to the foreground's 0.5 and 99.5 percentiles (or ``window``), z-score with its mean and
    std (nnU-Net's CT normalisation); anything else: z-score per image (MR)."""
    if preset != "ct":
        return Intensity("mr")
    low, high = window if window is not None else (stats.percentile_00_5, stats.percentile_99_5)
    if low is None or high is None or stats.mean is None or stats.std is None or not low < high:
        low, high = window if window is not None else (-1000.0, 1000.0)
        return Intensity("ct", float(low), float(high), (low + high) / 2, (high - low) / 4)
    return Intensity("ct", float(low), float(high), float(stats.mean), float(max(stats.std, 1e-3)))


def _plan(fingerprint: Fingerprint, options: PlannerOptions, configuration: Configuration, chosen: Candidate,
          record: dict[str, Any]) -> Plan:
    """The plan: one :class:`Channel` per input channel when there are several (each normalised by its
    own preset and statistics), the dataset's labels, regions and ignore label."""
    channels = tuple(Channel(name, _intensity(stats, channel_preset(name), options.ct_window))
                     for name, stats in zip(fingerprint.channels, fingerprint.intensity, strict=True))
    spec = checked_network(_spec(chosen.network, chosen), chosen.patch_size, configuration.spacing)
    return Plan(fingerprint.dims, channel_modality(fingerprint.channels[0]), dict(fingerprint.labels),
                tuple(float(s) for s in configuration.spacing), chosen.patch_size, channels[0].intensity, spec,
                channels=channels if len(channels) > 1 else (), regions=fingerprint.regions,
                ignore_label=fingerprint.ignore_label, configuration=configuration.name,
                batch_size=chosen.batch_size, planning=record,
                previous_stage="3d_lowres" if configuration.name == CASCADE else None)


def _plans_json(result: PlanningResult, options: PlannerOptions, spacings: np.ndarray, shapes: np.ndarray,
                chosen: str) -> dict[str, Any]:
    """``plans.json``: every configuration considered, the cascade when there is a 3d_lowres, the chosen one."""
    configurations = {name: c.to_json() for name, c in result.configurations.items()}
    if "3d_lowres" in configurations:
        configurations["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres",
                                                "note": "medseg train --configuration 3d_cascade_fullres "
                                                        "--previous-stage LOWRES_RUN (a cross-validated 3d_lowres run)"}
    plan = result.plan
    return {
        "format": PLANS_FORMAT, "planner": PLANNER, "dataset": result.fingerprint.dataset,
        "device": options.device, "preset": options.preset,
        "memory_target_gb": plan.planning["memory_target_gb"],
        "original_median_spacing": [round(float(s), 6) for s in np.median(spacings, axis=0)],
        "original_median_shape": [int(round(float(s))) for s in np.median(shapes, axis=0)],
        "configurations": configurations,
        "chosen": {"configuration": chosen, "patch_size": list(plan.patch_size), "batch_size": plan.batch_size,
                   "network": plan.network.name, "filters": list(_features(plan.network)), "plan": "plan.json"},
        "channel_names": {str(number): name for number, name in enumerate(result.fingerprint.channels)},
        "foreground_intensity_properties_per_channel": {
            str(number): vars(stats) for number, stats in enumerate(result.fingerprint.intensity)},
    }
