"""A faster copy of a network for sliding-window inference on the CPU (same weights, same function).

On the CPU, oneDNN runs 3D convolutions with one or two channels on a side (the first layer of a
one-channel CT network, the last layers of a two-class network at full resolution) several times
slower in PyTorch's default NCDHW layout than in channels-last (NDHWC): on this project's 2-core
AVX-512 machine a 2 -> 2 channel 3 x 3 x 3 convolution over two 96 x 96 x 64 windows took 33 ms in
NCDHW and 12 ms in NDHWC *including* both layout conversions, while at 8 channels and more NDHWC was
as fast or slower. In MONAI's ``UNet((16, 32, 64, 128))`` for two classes these layers are a third of
the forward pass. :func:`inference_network` wraps exactly those layers (3D convolutions and transposed
convolutions with at most ``thin_channels`` input or output channels) so that they run in channels-last
and hand back the usual layout: the arithmetic is unchanged (outputs equal up to float rounding) and
the rest of the network is left as it is (whole-network channels-last was slower at 8+ channels).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ChannelsLast", "inference_network"]

_CONVS = (nn.Conv3d, nn.ConvTranspose3d)


class ChannelsLast(nn.Module):
    """Runs a 3D (transposed) convolution in channels-last memory format; input and output in the
    default (contiguous) format. The weights are copied in channels-last layout when wrapping (for
    inference: later changes to the original's weights are not seen; wrap again)."""

    def __init__(self, conv: nn.Conv3d | nn.ConvTranspose3d) -> None:
        super().__init__()
        self.conv = copy.copy(conv)
        self.conv._parameters = {  # noqa: SLF001 - a new dict: the original keeps its own parameters
            name: p if p is None or p.ndim != 5
            else nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last_3d), requires_grad=False)
            for name, p in conv._parameters.items()  # noqa: SLF001
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.contiguous(memory_format=torch.channels_last_3d)).contiguous()


def _is_thin(module: nn.Module, thin_channels: int) -> bool:
    return (
        isinstance(module, _CONVS)
        and module.weight.ndim == 5
        and min(module.in_channels, module.out_channels) <= thin_channels
    )


def inference_network(network: nn.Module, thin_channels: int = 2) -> nn.Module:
    """``network`` in eval mode with its thin 3D convolutions (at most ``thin_channels`` input or
    output channels) run in channels-last.

    The original module tree is not modified: containers on the path to a wrapped layer are
    shallow-copied, every other module is shared (and switched to eval mode); the wrapped layers hold
    channels-last copies of their weights. A network without such layers (or ``thin_channels=0``) is
    returned as it is.
    """
    fast = _wrap(network, int(thin_channels)) if thin_channels > 0 else network
    return fast.eval()


def _wrap(module: nn.Module, thin_channels: int) -> nn.Module:
    if _is_thin(module, thin_channels):
        return ChannelsLast(module)
    children = {}
    for name, child in module._modules.items():  # noqa: SLF001 - a plain walk over the children
        if child is not None and not isinstance(child, ChannelsLast):
            new = _wrap(child, thin_channels)
            if new is not child:
                children[name] = new
    if not children:
        return module
    fast = copy.copy(module)
    fast._modules = {**module._modules, **children}  # noqa: SLF001 - a new dict: the original keeps its own
    return fast
