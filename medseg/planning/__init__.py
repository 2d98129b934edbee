"""The planner (``medseg plan``): from a dataset fingerprint to nnU-Net's configurations and the plan of
the chosen one, fitted to a memory target and, on the CPU, to a time budget.

:mod:`~medseg.planning.rules` (target spacing, patch steps, batch), :mod:`~medseg.planning.memory`
(the analytical memory and cost model), :mod:`~medseg.planning.configurations` (2d, 3d_fullres,
3d_lowres), :mod:`~medseg.planning.budget` (the time-budget choice), :mod:`~medseg.planning.measure`
(measured iterations), :mod:`~medseg.planning.options` and :mod:`~medseg.planning.planner`.
"""

from medseg.planning.options import (
    DEFAULT_CPU_BUDGET_HOURS,
    PRESETS,
    PlannerOptions,
    check_planner_options,
    default_workers,
)
from medseg.planning.planner import PLANS_FORMAT, PlanningResult, plan_dataset

__all__ = ["DEFAULT_CPU_BUDGET_HOURS", "PLANS_FORMAT", "PRESETS", "PlannerOptions", "PlanningResult",
           "check_planner_options", "default_workers", "plan_dataset"]
