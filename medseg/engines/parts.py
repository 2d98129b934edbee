"""Small factories for the parts of ``configs/train.json`` that a config cannot compute without a ``$``
expression (which safe mode refuses): the network's parameters for the optimiser, the polynomial LR
decay, a value of the plan, mixed precision on CUDA (bfloat16 autocast on CPUs where the planner measured it
faster), nnU-Net's gradient clipping."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Literal

import torch
from ignite.engine import Engine
from monai.engines import IterationEvents
from monai.inferers import SimpleInferer
from monai.networks.utils import one_hot
from monai.transforms import AsDiscreted, Compose, MapTransform

from medseg.engines.budget import FINISH_SECONDS, VALIDATION_MARGIN
from medseg.engines.distributed import max_over_ranks
from medseg.engines.progress import Pace
from medseg.plan import Plan
from medseg.transforms.regions import regions_to_label_map

__all__ = ["CpuAutocastInferer", "GradientClipping", "ValidationLabelMaps", "mixed_precision", "parameters", "plan_value",
           "poly_lr_schedule", "training_inferer", "validation_postprocessing"]

#: The plan values a config may ask for (:func:`plan_value`).
PLAN_VALUES = ("patch_size", "window_size", "sw_batch_size", "num_classes", "batch_size")


def parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``list(network.parameters())`` (the zoo's ``"$@network.parameters()"``)."""
    return list(network.parameters())


def poly_lr_schedule(optimizer: torch.optim.Optimizer, epochs: int, power: float = 0.9,
                     epoch_length: int | None = None, max_iterations: int | None = None, pace: Pace | None = None,
                     max_minutes: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial decay, ``lr * (1 - progress) ** power``.

    Without ``epoch_length`` (the recipe of ``"custom"`` plans) it is stepped at every epoch end by
    MONAI's ``LrScheduleHandler`` and ``progress = min(epoch, epochs - 1) / epochs``. With
    ``epoch_length`` (the planned recipe) it is stepped after every iteration (``LrScheduleHandler``
    with ``epoch_level: false``): ``progress`` is the share of the run's iterations done (``epochs *
    epoch_length``, or ``max_iterations`` if fewer) -- nnU-Net decays per epoch of 250 iterations over
    1000 epochs; a run of a few epochs decays smoothly instead of in steps -- or, with a time budget
    (``pace`` and ``max_minutes``), the share of the budget's training time gone (the time left after
    the reserve for the final validation, as :class:`~medseg.engines.budget.TimeBudget` keeps it)
    when that is larger, so that a run stopped by its budget still ends at a small learning rate.
    The factor never goes below ``(1 / total) ** power`` (the last step of nnU-Net's schedule).
    Training on several processes, the share of the budget gone is the largest of any process
    (:func:`medseg.engines.distributed.max_over_ranks`), so that all step with the same learning rate.

    Not torch's ``PolynomialLR``: that one reaches 0 after the last epoch, and it keeps ``total_iters``
    in its state dict, so a run resumed with a larger ``--epochs`` would decay on the old schedule.
    Here the decay is a function (never saved with the schedule's state): a resumed run follows its
    new ``epochs``.

    Raises
    ------
    ValueError
        If ``epochs`` or ``epoch_length`` is below 1.
    """
    for name, value in (("epochs", epochs), ("epoch_length", epoch_length if epoch_length is not None else 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
    if epoch_length is None:
        def per_epoch(epoch: int) -> float:
            return float((1 - min(epoch, epochs - 1) / epochs) ** power)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, per_epoch)
    total = epochs * epoch_length if max_iterations is None else min(epochs * epoch_length, max_iterations)
    budget = None if pace is None or max_minutes is None else max_minutes * 60

    def per_iteration(iteration: int) -> float:
        progress = iteration / total
        if budget is not None and pace is not None and iteration > 0:
            reserve = VALIDATION_MARGIN * (pace.validation() or 0.0) + pace.epoch_end_max() + FINISH_SECONDS
            # the largest share of any training process: every process steps with the same learning rate
            progress = max(progress, max_over_ranks(pace.elapsed() / max(budget - reserve, 1e-6)))
        return float(max(1 - progress, 1 / total) ** power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, per_iteration)


def mixed_precision(device: str | torch.device) -> bool:
    """Whether to train and validate in mixed precision (MONAI's ``amp``): on CUDA only (on the CPU
    autocast is slow and MONAI's gradient scaler is for CUDA)."""
    return torch.device(device).type == "cuda"


class CpuAutocastInferer(SimpleInferer):
    """The training step's forward pass under bfloat16 autocast on the CPU (weights, gradients, optimiser and loss
    stay float32: the outputs come back as float32). On CPUs with AMX or AVX-512 BF16 units an iteration is about
    2.4 x faster (this project's machine); the planner measures it before choosing it."""

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = network(inputs, *args, **kwargs)
        if isinstance(output, torch.Tensor):
            return output.float()
        return [o.float() for o in output]


def training_inferer(plan: Plan, device: str | torch.device) -> SimpleInferer:
    """The training step's inferer: :class:`CpuAutocastInferer` for a plan whose planner chose bfloat16 on the CPU
    (``planning["precision"]["name"]``) trained on the CPU, else MONAI's ``SimpleInferer`` (on CUDA MONAI's ``amp``
    gives mixed precision)."""
    chosen = (plan.planning or {}).get("precision") or {}
    if torch.device(device).type == "cpu" and isinstance(chosen, Mapping) and chosen.get("name") == "bfloat16":
        return CpuAutocastInferer()
    return SimpleInferer()


class GradientClipping:
    """nnU-Net's gradient clipping, an Ignite handler for MONAI's ``SupervisedTrainer``: after each
    backward pass (``IterationEvents.BACKWARD_COMPLETED``) the gradients' total norm is clipped to
    ``max_norm`` (12), unscaled first under mixed precision.

    Raises
    ------
    ValueError
        A ``max_norm`` that is not positive.
    """

    def __init__(self, max_norm: float = 12.0) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        self.max_norm = float(max_norm)

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        scaler = getattr(trainer, "scaler", None)
        optimizer: torch.optim.Optimizer = trainer.optimizer  # type: ignore[attr-defined]
        if getattr(trainer, "amp", False) and scaler is not None:
            scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(parameters, self.max_norm)


def plan_value(plan: Plan, field: Literal["patch_size", "window_size", "sw_batch_size", "num_classes", "batch_size"]
               ) -> Any:
    """One value of the plan (``patch_size`` and ``window_size`` as lists) for a MONAI component's argument.

    Raises
    ------
    ValueError
        For a field not in :data:`PLAN_VALUES`.
    """
    if field not in PLAN_VALUES:
        raise ValueError(f"field must be one of {', '.join(PLAN_VALUES)}, got {field!r}")
    value = getattr(plan, field)
    return list(value) if isinstance(value, tuple) else value


class ValidationLabelMaps(MapTransform):
    """One validation case's prediction and label as one-hot label maps of the plan's classes, for
    MONAI's ``MeanDice``: the prediction's classes by argmax, or for a region plan its regions painted
    into a label map (:func:`~medseg.transforms.regions.regions_to_label_map`: the Dice is then per
    label value, as ``medseg evaluate`` scores the label maps); the ``ignore_label``'s voxels set to the
    background in both (they count for no label)."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(["pred", "label"])
        self.regions, self.ignore_label, self.num_classes = plan.regions, plan.ignore_label, plan.num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pred, label = torch.as_tensor(d["pred"]), torch.as_tensor(d["label"]).round().long()
        if self.regions:
            painted = regions_to_label_map(torch.sigmoid(pred.float()), self.regions, dtype=torch.long)
        else:
            painted = pred.argmax(dim=0, keepdim=True)
        if self.ignore_label is not None:
            ignored = label == self.ignore_label
            painted, label = painted.masked_fill(ignored, 0), label.masked_fill(ignored, 0)
        d["pred"] = one_hot(painted, self.num_classes, dim=0)
        d["label"] = one_hot(label.clamp(0, self.num_classes - 1), self.num_classes, dim=0)
        return d


def validation_postprocessing(plan: Plan) -> Compose:
    """``validate#postprocessing``: MONAI's ``AsDiscreted`` (argmax, one-hot) for a plan of classes
    without an ignore label, else :class:`ValidationLabelMaps` (regions, ignore label)."""
    if not plan.regions and plan.ignore_label is None:
        return Compose([AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=plan.num_classes)])
    return Compose([ValidationLabelMaps(plan)])
