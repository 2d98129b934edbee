"""Small factories for the parts of ``configs/train.json`` that a config cannot compute without a ``$``
expression (which safe mode refuses): the network's parameters for the optimiser, the polynomial LR
decay, a value of the plan."""

from __future__ import annotations

from typing import Any, Literal

import torch

from medseg.plan import Plan

__all__ = ["parameters", "plan_value", "poly_lr_schedule"]

#: The plan values a config may ask for (:func:`plan_value`).
PLAN_VALUES = ("patch_size", "sw_batch_size", "num_classes")


def parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``list(network.parameters())`` (the zoo's ``"$@network.parameters()"``)."""
    return list(network.parameters())


def poly_lr_schedule(optimizer: torch.optim.Optimizer, epochs: int, power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial decay per epoch, ``lr * (1 - min(epoch, epochs - 1) / epochs) ** power`` (stepped at
    every epoch end by MONAI's ``LrScheduleHandler``).

    Not torch's ``PolynomialLR``: that one reaches 0 after the last epoch, and it keeps ``total_iters``
    in its state dict, so a run resumed with a larger ``--epochs`` would decay on the old schedule.
    Here the decay is a function (never saved with the schedule's state): a resumed run follows its
    new ``epochs``.

    Raises
    ------
    ValueError
        If ``epochs`` is below 1.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer of at least 1, got {epochs!r}")

    def factor(epoch: int) -> float:
        return float((1 - min(epoch, epochs - 1) / epochs) ** power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plan_value(plan: Plan, field: Literal["patch_size", "sw_batch_size", "num_classes"]) -> Any:
    """One value of the plan (``patch_size`` as a list) for a MONAI component's argument.

    Raises
    ------
    ValueError
        For a field not in :data:`PLAN_VALUES`.
    """
    if field not in PLAN_VALUES:
        raise ValueError(f"field must be one of {', '.join(PLAN_VALUES)}, got {field!r}")
    value = getattr(plan, field)
    return list(value) if isinstance(value, tuple) else value
