"""The plan of a model (``configs/plan.json``): its schema and reader (:mod:`medseg.plan.model`) and
the default plan derived from a dataset (:mod:`medseg.plan.derive`)."""

from medseg.architectures import NetworkSpec
from medseg.plan.derive import ct_intensity_statistics, default_patch_size, make_plan, ras_extent, ras_spacing
from medseg.plan.model import (
    CONFIGURATIONS,
    PLAN_FORMAT,
    PREVIOUS_STAGES,
    Channel,
    Intensity,
    Plan,
    checked_network,
    load_plan,
)

__all__ = ["CONFIGURATIONS", "PLAN_FORMAT", "PREVIOUS_STAGES", "Channel", "Intensity", "NetworkSpec", "Plan", "checked_network",
           "ct_intensity_statistics", "default_patch_size", "load_plan", "make_plan", "ras_extent", "ras_spacing"]
