"""Networks whose last layer is a pointwise (1 x 1 x 1) convolution: split into body and head, so
that sliding-window inference can blend features instead of class logits."""

from __future__ import annotations

import copy

import torch

__all__ = ["split_pointwise_head"]


# network class -> attribute holding its last layer, a pointwise (1 x 1 x 1) convolution
_POINTWISE_HEADS = {"DynUNet": "output_block", "BasicUNet": "final_conv",
                    "SegResNet": "conv_final", "PointwiseHeadUNet": "head"}


def split_pointwise_head(network: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, int] | None:
    """Split a network whose last layer is a pointwise affine convolution into ``(body, head, F)``:
    ``network(x) == head(body(x))``, ``body`` returns ``F`` feature channels, ``head`` is the
    1 x 1 (x 1) convolution. Sliding-window inference can then blend ``F`` features instead of the
    class logits (:func:`medseg.inference.sliding.slab_sliding_window`), so that its memory does not
    grow with the number of classes.

    Known: MONAI's DynUNet, BasicUNet and SegResNet, and medseg's
    :class:`~medseg.networks.unet_head.PointwiseHeadUNet` (the last two end in norm -> activation ->
    1 x 1 x 1 convolution: the body keeps norm and activation). ``None`` for anything else, e.g.
    MONAI's ``UNet``, whose last layer is a 3 x 3 x 3 convolution. A network with a ``pointwise_split()``
    method (:class:`medseg.networks.nnunet.NnUNetEnsemble`) splits itself. The original network is not
    modified (the body is a shallow copy). A DynUNet with deep-supervision heads splits too: the split
    is the main output's (the inference output); its body never stacks the heads' outputs, even in
    training mode.
    """
    split = getattr(network, "pointwise_split", None)
    if callable(split):
        parts: tuple[torch.nn.Module, torch.nn.Module, int] = split()
        return parts
    attr = _POINTWISE_HEADS.get(type(network).__name__)
    if attr is None:
        return None
    last = getattr(network, attr, None)
    if not isinstance(last, torch.nn.Module):
        return None
    keep: torch.nn.Module = torch.nn.Identity()
    if isinstance(last, torch.nn.Sequential):  # SegResNet, PointwiseHeadUNet: (norm, act, conv)
        keep, last = torch.nn.Sequential(*list(last)[:-1]), list(last)[-1]
    convs = [m for m in last.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]  # noqa: SLF001
    params = [m for m in last.modules() if any(True for _ in m.parameters(recurse=False))]
    if len(convs) != 1 or params != convs:
        return None
    conv = convs[0]
    if conv.transposed or any(k != 1 for k in conv.kernel_size) or any(s != 1 for s in conv.stride) \
            or conv.groups != 1:
        return None
    body = copy.copy(network)
    body._modules = {**network._modules, attr: keep}  # noqa: SLF001 - a new dict: the original keeps its own
    if getattr(network, "deep_supervision", False):
        setattr(body, "deep_supervision", False)  # noqa: B010 - the copy's own attribute: the main output's features only
    return body, last, int(conv.in_channels)
