"""The training loss of a plan: Dice + cross-entropy (``configs/train.json``'s ``loss`` part).

* class plans: MONAI's ``DiceCELoss`` on softmax outputs, the label map one-hot encoded;
* region plans (``plan.regions``): Dice + binary cross-entropy on one sigmoid output per region, the
  targets made from the label map by :func:`medseg.transforms.regions.label_map_to_regions`;
* an ignore label (``plan.ignore_label``): its voxels are left out of both Dice and cross-entropy
  (:class:`MaskedDiceCELoss`, MONAI's ``MaskedDiceLoss`` plus a masked cross-entropy);
* deep supervision (a DynUNet with heads, :func:`medseg.networks.factory.deep_supervision_heads`):
  MONAI's ``DeepSupervisionLoss`` over the main output and each head, weights halving per level and
  summing to 1 (nnU-Net's rule; its lowest level, weighted 0, has no head).

Why not ``DiceCELoss`` everywhere: it takes no mask, and for several sigmoid channels it computes a
softmax cross-entropy (its binary cross-entropy is for one channel only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss, MaskedDiceLoss
from torch.nn.modules.loss import _Loss

from medseg.networks.factory import deep_supervision_heads
from medseg.plan import Plan
from medseg.transforms.regions import label_map_to_regions

__all__ = ["MaskedDiceCELoss", "SegmentationLoss", "deep_supervision_weights", "segmentation_loss"]

#: nnU-Net's Dice smoothing (numerator and denominator).
SMOOTH = 1e-5


def deep_supervision_weights(outputs: int) -> list[float]:
    """Loss weights of the main output and ``outputs - 1`` deep-supervision heads: 1, 1/2, 1/4, ...
    normalised to sum to 1.

    Raises
    ------
    ValueError
        If ``outputs`` is below 1.
    """
    if outputs < 1:
        raise ValueError(f"at least one output needed, got {outputs}")
    weights = [0.5**level for level in range(outputs)]
    return [w / sum(weights) for w in weights]


class MaskedDiceCELoss(_Loss):
    """Dice + cross-entropy with voxels left out by a mask (MONAI's ``MaskedDiceLoss`` and a masked
    cross-entropy, averaged over the voxels kept).

    ``forward(input, target, mask)``: ``input`` logits ``(B, C, *spatial)``; ``target`` one-hot or region
    channels of the same shape; ``mask`` ``(B, 1, *spatial)``, 1 where a voxel counts. ``sigmoid``: binary
    cross-entropy per channel (regions), else softmax cross-entropy over the channels.
    """

    def __init__(self, sigmoid: bool = False, include_background: bool = True, batch: bool = False,
                 smooth: float = SMOOTH) -> None:
        super().__init__()
        self.sigmoid = sigmoid
        self.dice = MaskedDiceLoss(include_background=include_background, sigmoid=sigmoid, softmax=not sigmoid,
                                   batch=batch, smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(prediction.dtype)
        dice: torch.Tensor = self.dice(prediction, target, mask)
        if self.sigmoid:
            ce = F.binary_cross_entropy_with_logits(prediction, target.to(prediction.dtype), reduction="none") * mask
            ce = ce.sum() / torch.clamp(mask.sum() * prediction.shape[1], min=1.0)
        else:
            ce = F.cross_entropy(prediction, target.argmax(dim=1), reduction="none") * mask[:, 0]
            ce = ce.sum() / torch.clamp(mask.sum(), min=1.0)
        return dice + ce


class SegmentationLoss(_Loss):
    """The loss of one plan (see the module docstring); ``forward(prediction, label)`` with the label map
    ``(B, 1, *spatial)`` as the dataset gives it and the network's output: a tensor ``(B, C, *spatial)``,
    a DynUNet's stacked deep-supervision outputs ``(B, 1 + heads, C, *spatial)`` or a list of tensors.

    Raises
    ------
    ValueError
        (from ``forward``) A prediction whose channels differ from the plan's outputs.
    """

    def __init__(self, plan: Plan, batch_dice: bool = True, include_background: bool | None = None) -> None:
        super().__init__()
        self.regions = plan.regions
        self.ignore_label = plan.ignore_label
        self.num_outputs, self.num_classes = plan.num_outputs, plan.num_classes
        # nnU-Net: Dice of every region, of the foreground classes only
        background = bool(plan.regions) if include_background is None else include_background
        if self.ignore_label is None and not self.regions:
            base: _Loss = DiceCELoss(include_background=background, to_onehot_y=True, softmax=True, batch=batch_dice,
                                     smooth_nr=SMOOTH, smooth_dr=SMOOTH)
        else:
            base = _MaskedTargets(plan, MaskedDiceCELoss(sigmoid=bool(self.regions), include_background=background,
                                                         batch=batch_dice))
        self.outputs = 1 + deep_supervision_heads(plan.network.planned(plan.patch_size, plan.target_spacing))
        self.loss = DeepSupervisionLoss(base, weights=deep_supervision_weights(self.outputs))

    def forward(self, prediction: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        outputs = list(torch.unbind(prediction, dim=1)) if isinstance(prediction, torch.Tensor) and \
            prediction.dim() == target.dim() + 1 else prediction
        first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        if first.shape[1] != self.num_outputs:
            raise ValueError(f"the network gave {first.shape[1]} output channels, the plan has {self.num_outputs}")
        result: torch.Tensor = self.loss(outputs, target)
        return result


class _MaskedTargets(_Loss):
    """Label map -> (targets, mask) for :class:`MaskedDiceCELoss`: one-hot classes or region channels,
    the ignore label's voxels masked out (and counted as background in the targets)."""

    def __init__(self, plan: Plan, loss: MaskedDiceCELoss) -> None:
        super().__init__()
        self.regions, self.ignore_label, self.num_classes = plan.regions, plan.ignore_label, plan.num_classes
        self.loss = loss

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        label = target.round().long() if target.is_floating_point() else target.long()
        if self.ignore_label is not None:
            mask = label != self.ignore_label
            label = torch.where(mask, label, torch.zeros_like(label))
        else:
            mask = torch.ones_like(label, dtype=torch.bool)
        if self.regions:
            channels = label_map_to_regions(label, self.regions, channel_dim=1)
        else:
            channels = F.one_hot(label[:, 0].clamp(0, self.num_classes - 1), self.num_classes)
            channels = channels.movedim(-1, 1).to(prediction.dtype)
        result: torch.Tensor = self.loss(prediction, channels, mask)
        return result


def segmentation_loss(plan: Plan, batch_dice: bool = True, include_background: bool | None = None) -> SegmentationLoss:
    """The loss of ``plan`` (``configs/train.json``'s ``loss``): :class:`SegmentationLoss`.

    ``batch_dice`` (nnU-Net's default): one Dice over the whole batch per channel instead of one per
    patch. ``include_background``: whether the Dice counts the background channel of a class plan
    (default: no, as nnU-Net; region plans have no background channel and count every region).
    The bundles planned before this recipe used ``batch_dice=False, include_background=True``.
    """
    return SegmentationLoss(plan, batch_dice=batch_dice, include_background=include_background)
