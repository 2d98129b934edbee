"""Several trained models of one plan (the folds of a cross-validation run) as one network for inference.

:class:`ModelEnsemble` returns its members' logits side by side, member by member (``K x C`` channels), and
never their average: medseg's inferer (``SlabInferer(members=K)``) blends each member's logits as it would one
model's and averages the members' *probabilities* block by block, so the label map equals averaging the
members' own probability maps (nnU-Net's ensembles average probabilities too), while memory holds one slab of
every member's channels, not K volumes. When every member ends in a pointwise head, :meth:`pointwise_split`
gives the members' features side by side and one block-diagonal 1 x 1 (x 1) convolution to all their logits,
so the blended channels are the features (``K x F``) whenever that is fewer. The inferer runs the members
(or their bodies, :attr:`ModelEnsemble.members`) one after another on each window and blends each member's
output before the next runs, so one member's output is alive at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medseg.networks.heads import split_pointwise_head

__all__ = ["ModelEnsemble"]


class ModelEnsemble(torch.nn.Module):
    """``K`` networks of the same input channels and outputs; ``forward(x)`` is ``cat([net(x) ...], dim=1)``.

    Raises
    ------
    ValueError
        No network.
    """

    def __init__(self, networks: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not networks:
            raise ValueError("an ensemble needs at least one network")
        self.members = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([network(x) for network in self.members], dim=1)

    def pointwise_split(self) -> tuple[torch.nn.Module, torch.nn.Module, int] | None:
        """``(body, head, K x F)`` with ``self(x) == head(body(x))`` (``body``: the members' bodies as a
        :class:`ModelEnsemble`), or None unless every member splits
        (:func:`medseg.networks.split_pointwise_head`) into heads of one kind."""
        splits = [split_pointwise_head(network) for network in self.members]
        if any(split is None for split in splits):
            return None
        parts = [split for split in splits if split is not None]
        # each head holds one pointwise convolution (what split_pointwise_head checked), maybe in a wrapper
        convs = [next(m for m in head.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))  # noqa: SLF001
                 for _, head, _ in parts]
        if len({c.weight.ndim for c in convs}) != 1:
            return None
        features = [int(c.in_channels) for c in convs]
        outputs = [int(c.out_channels) for c in convs]
        conv_class: type[torch.nn.Module] = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[convs[0].weight.ndim - 2]
        head: torch.nn.Module = conv_class(sum(features), sum(outputs), kernel_size=1,
                                           bias=all(c.bias is not None for c in convs))
        assert isinstance(head, torch.nn.modules.conv._ConvNd)  # noqa: SLF001
        with torch.no_grad():
            head.weight.zero_()
            f0 = o0 = 0
            for conv, f, o in zip(convs, features, outputs, strict=True):
                head.weight[o0 : o0 + o, f0 : f0 + f].copy_(conv.weight)  # block-diagonal: member k's features only
                if head.bias is not None and conv.bias is not None:
                    head.bias[o0 : o0 + o].copy_(conv.bias)
                f0, o0 = f0 + f, o0 + o
        head = head.to(convs[0].weight.device).eval()
        return ModelEnsemble([body for body, _, _ in parts]), head, sum(features)

