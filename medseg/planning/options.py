"""What the planner is asked for (``medseg plan`` options) and the presets it knows, checked before any
data is read."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from medseg.errors import InputError

__all__ = ["DEFAULT_CPU_BUDGET_HOURS", "PRESETS", "PlannerOptions", "Preset", "check_planner_options",
           "default_workers"]

#: The time budget a CPU plan is made for when none is given.
DEFAULT_CPU_BUDGET_HOURS = 1.0


@dataclass(frozen=True)
class Preset:
    """A network preset: residual blocks or not, its default memory target and how it relates to
    nnU-Net's planner of the same name."""

    res_block: bool
    memory_gb: float
    note: str


PRESETS = {
    "default": Preset(False, 8.0, "nnU-Net's default planner (plain U-Net, two convolutions per stage) as MONAI's "
                                  "DynUNet"),
    "resenc-m": Preset(True, 8.0, "nnU-Net ResEnc M (8 GB) as MONAI's DynUNet with res_block=True: one residual block "
                                  "per stage in the encoder and the decoder; nnU-Net's residual encoder stacks 1, 3, 4, "
                                  "6, 6, ... blocks per encoder stage and plain decoder blocks, which MONAI's DynUNet "
                                  "cannot express"),
    "resenc-l": Preset(True, 24.0, "nnU-Net ResEnc L (24 GB) as MONAI's DynUNet with res_block=True: one residual "
                                   "block per stage in the encoder and the decoder; nnU-Net's residual encoder stacks "
                                   "1, 3, 4, 6, 6, ... blocks per encoder stage and plain decoder blocks, which MONAI's "
                                   "DynUNet cannot express"),
}
CONFIGURATION_CHOICES = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


@dataclass
class PlannerOptions:
    """What to plan for: ``device`` (``cpu`` or ``cuda[:N]``: the memory and, on the CPU, the speed
    planned for), ``memory_gb`` (None: the preset's; on the CPU at most half the machine's memory),
    ``time_budget_hours`` (None: :data:`DEFAULT_CPU_BUDGET_HOURS` on the CPU, none on CUDA),
    ``preset`` (:data:`PRESETS`), ``configuration`` (None: ``3d_fullres`` for 3D data, ``2d`` for 2D),
    ``workers`` (processes reading the cases), ``target_spacing`` and ``ct_window`` (HU) overriding the
    planned ones, ``measure``: validate the memory estimate (and time iterations) on this machine,
    ``precision``: CPU training in ``float32``, under ``bfloat16`` autocast, or ``auto`` (bfloat16 where a measured
    iteration is faster enough, :func:`medseg.planning.recipe.choose_precision`)."""

    device: str = "cpu"
    memory_gb: float | None = None
    time_budget_hours: float | None = None
    preset: str = "default"
    configuration: str | None = None
    workers: int = 1
    target_spacing: tuple[float, ...] | None = None
    ct_window: tuple[float, float] | None = None
    measure: bool = True
    precision: str = "auto"  # CPU training: float32, bfloat16, or auto (measured: recipe.choose_precision)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def memory_target_gb(self) -> float:
        """The memory target: ``memory_gb`` or the preset's; on the CPU at most half the machine's memory."""
        target = self.memory_gb if self.memory_gb is not None else PRESETS[self.preset].memory_gb
        if not self.cuda:
            physical = _physical_memory_gb()
            if physical is not None:
                target = min(target, physical / 2)
        return target

    def budget_hours(self) -> float | None:
        """The time budget planned for (see the class docstring)."""
        if self.time_budget_hours is not None:
            return self.time_budget_hours
        return None if self.cuda else DEFAULT_CPU_BUDGET_HOURS


def default_workers() -> int:
    """Fingerprint workers when none are asked for: the CPU count, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def _physical_memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except (AttributeError, ValueError, OSError):
        return None


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_planner_options(options: PlannerOptions) -> None:
    """Check every option before any data is read.

    Raises
    ------
    InputError
        A device other than ``cpu``/``cuda[:N]``, a memory target or time budget that is not a
        positive number, an unknown preset or configuration, ``--workers`` below 1, a target spacing
        that is not positive, a CT window whose low end is not below its high end.
    """
    device = options.device
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda"
                                           or (device.startswith("cuda:") and device[5:].isdigit())):
        raise InputError(None, f"--device must be cpu, cuda or cuda:N, got {device!r}")
    for flag, value in (("--memory-gb", options.memory_gb), ("--time-budget", options.time_budget_hours)):
        if value is not None and not _positive(value):
            raise InputError(None, f"{flag} must be a positive number, got {value!r}")
    if options.preset not in PRESETS:
        raise InputError(None, f"--preset must be one of {', '.join(PRESETS)}, got {options.preset!r}")
    if options.configuration is not None and options.configuration not in CONFIGURATION_CHOICES:
        raise InputError(None, f"--configuration must be one of {', '.join(CONFIGURATION_CHOICES)}, "
                         f"got {options.configuration!r}")
    workers = options.workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(None, f"--workers must be an integer of at least 1, got {workers!r}")
    if options.target_spacing is not None and not all(_positive(s) for s in options.target_spacing):
        raise InputError(None, f"--spacing must be positive numbers, got {list(options.target_spacing)}")
    if options.ct_window is not None and not (len(options.ct_window) == 2 and options.ct_window[0] < options.ct_window[1]):
        raise InputError(None, f"--ct-window needs LOW below HIGH, got {list(options.ct_window)}")
