"""Network factory: the plan's architecture (MONAI UNet, DynUNet or SegResNet, or a U-Net with a pointwise
head) for 2D and 3D segmentation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.nets import DynUNet, SegResNet, UNet

from medseg.architectures import ARCHITECTURES, IMPORTED, NetworkSpec
from medseg.errors import BundleError
from medseg.networks.cascade import PreviousStageInput
from medseg.networks.slices import SliceNetwork
from medseg.networks.unet_head import PointwiseHeadUNet
from medseg.plan import Plan

__all__ = ["build_network", "deep_supervision_heads"]


def build_network(plan: Plan, spec: NetworkSpec | None = None) -> torch.nn.Module:
    """Build the segmentation network of ``plan`` (``spatial_dims`` = plan.dims, one input channel
    per image channel of the plan, one output channel per label including background, or per region):
    ``spec`` or ``plan.network``, a U-Net, a DynUNet (its topology planned from the plan's patch and
    spacing when the spec has none) or a SegResNet. Each maps a patch of ``plan.patch_size`` to class logits of the same size.

    A DynUNet with ``deep_supervision`` gets its :func:`deep_supervision_heads`: in training mode it
    returns the main output and the heads' outputs (upsampled to the patch) stacked on dimension 1
    (``(B, 1 + heads, C, *patch)``), in eval mode the main output only; the same network is built for
    training and inference, so weights trained with the heads load strictly.

    A 3D plan whose patch is one voxel thick along an axis (:attr:`~medseg.plan.Plan.slice_axis`, the ``2d``
    configuration of 3D data) gets the 2D network of the other two axes as a
    :class:`~medseg.networks.slices.SliceNetwork`. A cascade stage (:attr:`~medseg.plan.Plan.previous_stage`) takes
    its image channels and the previous stage's label map (:class:`~medseg.networks.cascade.PreviousStageInput`).

    Raises
    ------
    BundleError
        For an unknown architecture name (naming it and the known ones), or an imported nnU-Net network.
    """
    spec = spec or plan.network
    if spec.name == IMPORTED:
        raise BundleError("this model was imported from nnU-Net: its network is defined by configs/nnunet.json and "
                          "built by the bundle's configs/inference.json (medseg predict --model BUNDLE); it cannot be "
                          "trained or built from the plan")
    build = _BUILDERS.get(spec.name)
    if build is None:
        raise BundleError(f"unknown network architecture {spec.name!r}; available: {', '.join(ARCHITECTURES)}")
    flat = plan.slice_axis
    network: torch.nn.Module
    if flat is not None:  # nnU-Net's 2d configuration of 3D data: a 2D network over the slices
        flat_plan = plan.in_plane()
        network = SliceNetwork(build(spec.without_axis(flat).planned(flat_plan.patch_size, flat_plan.target_spacing),
                                     2, plan.network_inputs, plan.num_outputs), flat)
    else:
        network = build(spec.planned(plan.patch_size, plan.target_spacing), plan.dims, plan.network_inputs,
                        plan.num_outputs)
    return PreviousStageInput(network, plan.num_classes) if plan.previous_stage else network


def _norm(name: str) -> str | tuple[str, dict[str, bool]]:
    """MONAI's norm argument: instance normalisation with learnt affine parameters (as nnU-Net)."""
    return ("instance", {"affine": True}) if name == "instance" else name


def _unet(spec: NetworkSpec, dims: int, channels: int, classes: int) -> torch.nn.Module:
    return UNet(spatial_dims=dims, in_channels=channels, out_channels=classes, channels=spec.channels, strides=spec.strides,
                num_res_units=spec.num_res_units, norm=spec.norm, dropout=spec.dropout)


def _unet_head(spec: NetworkSpec, dims: int, channels: int, classes: int) -> torch.nn.Module:
    return PointwiseHeadUNet(dims, channels, classes, spec.channels, [tuple(level) for level in spec.level_strides[1:]],
                             num_res_units=spec.num_res_units, norm=spec.norm, dropout=spec.dropout)


def deep_supervision_heads(spec: NetworkSpec) -> int:
    """Extra training outputs of a planned DynUNet ``spec`` with ``deep_supervision`` (0 without): one per
    decoder level below the full resolution, except the lowest one, which nnU-Net weights 0 in the loss
    (so its head would never learn: it is not built). A DynUNet of ``n`` levels has ``n - 1`` decoder
    levels: ``n - 3`` heads (none for 3 levels)."""
    if spec.name != "dynunet" or not spec.deep_supervision:
        return 0
    return max(0, len(spec.level_strides) - 3)


def _dynunet(spec: NetworkSpec, dims: int, channels: int, classes: int) -> torch.nn.Module:
    strides = [list(level) for level in spec.level_strides]
    heads = deep_supervision_heads(spec)
    return DynUNet(spatial_dims=dims, in_channels=channels, out_channels=classes,
                   kernel_size=[list(level) for level in spec.kernel_sizes], strides=strides,
                   upsample_kernel_size=strides[1:], filters=list(spec.filters), dropout=spec.dropout or None,
                   norm_name=_norm(spec.norm), deep_supervision=heads > 0, deep_supr_num=max(heads, 1),
                   res_block=spec.res_block)


def _segresnet(spec: NetworkSpec, dims: int, channels: int, classes: int) -> torch.nn.Module:
    return SegResNet(spatial_dims=dims, in_channels=channels, out_channels=classes, init_filters=spec.init_filters,
                     dropout_prob=spec.dropout or None, norm=_norm(spec.norm), blocks_down=spec.blocks_down,
                     blocks_up=spec.blocks_up)


_BUILDERS: dict[str, Callable[[NetworkSpec, int, int, int], torch.nn.Module]] = {
    "unet": _unet, "dynunet": _dynunet, "segresnet": _segresnet, "unet_head": _unet_head}
