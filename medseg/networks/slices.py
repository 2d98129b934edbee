"""A 2D network over the slices of 3D images: nnU-Net's ``2d`` configuration of 3D data, whose plan is 3D
with a patch one voxel thick along the slice axis (:attr:`medseg.plan.Plan.slice_axis`)."""

from __future__ import annotations

import torch

from medseg.networks.heads import split_pointwise_head

__all__ = ["SliceNetwork"]


class SliceNetwork(torch.nn.Module):
    """``network`` (2D) applied to every slice along spatial ``axis`` (0-based) of 3D input ``(B, C, X, Y, Z)``:
    the slices go through it as one batch and come back in place. Outputs keep any extra leading dimension the
    network adds (a DynUNet's deep-supervision heads, ``(B, heads, C, ...)``): the slice axis goes back among the
    last three.

    The 2D network runs 2D convolutions: the same result as a 3D network with kernels one voxel long along the
    slice axis, in about 0.6 of the time on the CPU.
    """

    def __init__(self, network: torch.nn.Module, axis: int) -> None:
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError(f"the slice axis must be 0, 1 or 2, got {axis}")
        self.network = network
        self.axis = int(axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"a network over slices takes (B, C, X, Y, Z) input, got shape {tuple(x.shape)}")
        moved = x.movedim(2 + self.axis, 1)  # (B, S, C, a, b)
        batch, slices = moved.shape[0], moved.shape[1]
        out: torch.Tensor = self.network(moved.flatten(0, 1))  # the slices of every image as one batch
        out = out.unflatten(0, (batch, slices))
        return out.movedim(1, out.ndim - 3 + self.axis)

    def pointwise_split(self) -> tuple[torch.nn.Module, torch.nn.Module, int] | None:
        """``(body, head, F)`` with ``self(x) == head(body(x))`` (see :func:`medseg.networks.split_pointwise_head`):
        the 2D body over slices and its 1 x 1 head as a 1 x 1 x 1 convolution, or None when the 2D network has no
        pointwise head."""
        split = split_pointwise_head(self.network)
        if split is None:
            return None
        body, head2d, features = split
        conv = next(m for m in head2d.modules() if isinstance(m, torch.nn.Conv2d))
        head = torch.nn.Conv3d(int(conv.in_channels), int(conv.out_channels), kernel_size=1, bias=conv.bias is not None)
        with torch.no_grad():
            head.weight.copy_(conv.weight.unsqueeze(2 + self.axis))
            if conv.bias is not None and head.bias is not None:
                head.bias.copy_(conv.bias)
        return SliceNetwork(body, self.axis), head.to(conv.weight.device).eval(), features
