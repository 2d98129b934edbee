"""The optimiser a plan trains with, chosen from the iterations its budget allows.

nnU-Net's SGD (Nesterov momentum 0.99, learning rate 1e-2) is tuned for its 1000 epochs of 250
iterations; in the few hundred to few thousand iterations a CPU budget allows it is far from converged
(measured on ``scripts/check_oblique.py``, 16 CT phantoms: SGD 0.35 mean Dice after 400 iterations and
0.76 after 1000, AdamW 2e-3 0.94 after 400). Plans whose budget allows fewer than
:data:`SGD_MIN_ITERATIONS` iterations therefore train with AdamW (learning rate 2e-3, the recipe of
medseg's default plan); plans without a budget (a GPU plan trained to convergence) or with a long one
keep nnU-Net's SGD. Both decay the learning rate polynomially per iteration.

The augmentation follows the same rule: nnU-Net's (strong rotations and scaling, gamma, blur, low-resolution
simulation, one patch in three at the foreground) regularises a thousand epochs; in a CPU budget it slows the
fit more than it helps (MNI152 grey/white matter, 30 minutes on one core: 0.910 mean Dice with nnU-Net's,
0.928 with the light recipe, the fixed default plan 0.921), so short budgets get the light recipe of
:func:`medseg.transforms.augment.planned_augmentation`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ADAMW", "AUGMENTATIONS", "BFLOAT16_MIN_GAIN", "OPTIMIZERS", "SGD", "SGD_MIN_ITERATIONS",
           "choose_augmentation", "choose_optimizer", "choose_precision"]

#: Budgets of at least this many iterations train with nnU-Net's SGD.
SGD_MIN_ITERATIONS = 10_000
SGD: dict[str, Any] = {"name": "SGD", "learning_rate": 0.01, "momentum": 0.99, "nesterov": True,
                       "weight_decay": 3e-5}
ADAMW: dict[str, Any] = {"name": "AdamW", "learning_rate": 0.002, "weight_decay": 3e-5}
#: The optimisers a plan may name (``planning["optimizer"]["name"]``), with their settings.
OPTIMIZERS: dict[str, dict[str, Any]] = {"SGD": SGD, "AdamW": ADAMW}
#: The augmentation recipes a plan may name (``planning["augmentation"]["name"]``).
AUGMENTATIONS = ("nnunet", "light")
#: On the CPU, training runs under bfloat16 autocast when a measured iteration is at least this much faster.
BFLOAT16_MIN_GAIN = 1.25


def choose_optimizer(expected_iterations: int | None) -> dict[str, Any]:
    """The optimiser (name, learning rate, its settings and the reason) for a plan whose budget allows
    ``expected_iterations`` training iterations (None: no budget, trained to convergence)."""
    if expected_iterations is None:
        return {**SGD, "reason": "no time budget: nnU-Net's SGD, trained to convergence"}
    if expected_iterations >= SGD_MIN_ITERATIONS:
        return {**SGD, "reason": f"{expected_iterations} iterations expected (>= {SGD_MIN_ITERATIONS}): "
                                 "nnU-Net's SGD"}
    return {**ADAMW, "reason": f"{expected_iterations} iterations expected (< {SGD_MIN_ITERATIONS}): AdamW 2e-3 "
                               "converges in a short budget, nnU-Net's SGD (momentum 0.99) does not"}


def choose_augmentation(expected_iterations: int | None) -> dict[str, Any]:
    """The augmentation recipe (name and reason) for a plan whose budget allows ``expected_iterations`` training
    iterations (None: no budget): nnU-Net's, or for fewer than :data:`SGD_MIN_ITERATIONS` the light one."""
    if expected_iterations is None or expected_iterations >= SGD_MIN_ITERATIONS:
        return {"name": "nnunet", "reason": "nnU-Net's augmentation for a long training"}
    return {"name": "light", "reason": f"{expected_iterations} iterations expected (< {SGD_MIN_ITERATIONS}): light "
                                       "augmentation, class-balanced patches (nnU-Net's slows a short training)"}


def choose_precision(float32_seconds: float, bfloat16_seconds: float) -> dict[str, Any]:
    """The CPU training precision from one network's measured iteration in each: ``"bfloat16"`` (the forward
    pass under autocast, weights and loss in float32) when it is at least :data:`BFLOAT16_MIN_GAIN` times faster
    (CPUs with AMX or AVX-512 BF16 units: 2.4 x on this project's machine), else ``"float32"``."""
    gain = float32_seconds / max(bfloat16_seconds, 1e-9)
    measured = {"float32_seconds": round(float32_seconds, 4), "bfloat16_seconds": round(bfloat16_seconds, 4),
                "gain": round(gain, 2)}
    if gain >= BFLOAT16_MIN_GAIN:
        return {"name": "bfloat16", **measured, "reason": f"an iteration under bfloat16 autocast is {gain:.2f} x "
                                                          "faster on this CPU: more iterations in the budget"}
    return {"name": "float32", **measured, "reason": f"bfloat16 autocast gains {gain:.2f} x on this CPU "
                                                     f"(< {BFLOAT16_MIN_GAIN}): float32"}

