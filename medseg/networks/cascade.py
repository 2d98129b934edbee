"""The input of a cascade stage (nnU-Net's ``3d_cascade_fullres``): the image channels and the previous stage's
label map of the same image, one-hot inside the network."""

from __future__ import annotations

import torch

from medseg.networks.heads import split_pointwise_head

__all__ = ["PreviousStageInput"]


class PreviousStageInput(torch.nn.Module):
    """``network`` fed the image channels of ``x`` and the one-hot foreground classes (1 .. ``classes`` - 1) of
    its last channel, the previous stage's label map (class values, rounded): ``(B, C + 1, ...)`` in, ``network``
    sees ``(B, C + classes - 1, ...)``.

    The one-hot is made per window, so sliding-window inference holds one channel of the previous stage, not one
    per class. Values outside 0 .. ``classes`` - 1 (a label map of another task) raise ValueError.
    """

    def __init__(self, network: torch.nn.Module, classes: int) -> None:
        super().__init__()
        if classes < 2:
            raise ValueError(f"a previous stage needs at least 2 classes, got {classes}")
        self.network = network
        self.classes = int(classes)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input: the image channels of ``x`` and the one-hot foreground of its last channel."""
        if x.shape[1] < 2:
            raise ValueError(f"a cascade stage takes the image and the previous stage's label map, got shape "
                             f"{tuple(x.shape)}")
        labels = torch.round(x[:, -1]).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.classes):
            raise ValueError(f"the previous stage's label map holds values {int(labels.min())}-{int(labels.max())}, "
                             f"this model's classes are 0-{self.classes - 1}")
        hot = torch.nn.functional.one_hot(labels, self.classes)[..., 1:].movedim(-1, 1).to(x.dtype)
        return torch.cat([x[:, :-1], hot], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.network(self.inputs(x))
        return out

    def pointwise_split(self) -> tuple[torch.nn.Module, torch.nn.Module, int] | None:
        """``(body, head, F)`` with ``self(x) == head(body(x))`` (:func:`medseg.networks.split_pointwise_head`): the
        wrapped network's body behind this input, its head; None when it has no pointwise head."""
        split = split_pointwise_head(self.network)
        if split is None:
            return None
        body, head, features = split
        return PreviousStageInput(body, self.classes), head, features
