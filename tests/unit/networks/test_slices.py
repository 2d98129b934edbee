"""A 2D network over the slices of 3D images (the 2d configuration of 3D data): each slice on its own, the
slice axis wherever the plan puts it, deep-supervision heads and the pointwise head kept."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet

from medseg.networks import split_pointwise_head
from medseg.networks.slices import SliceNetwork


def _dynunet(deep_supervision: bool = False) -> DynUNet:
    torch.manual_seed(0)
    return DynUNet(2, 2, 4, [[3, 3]] * 4, [[1, 1]] + [[2, 2]] * 3, [[2, 2]] * 3, filters=[8, 16, 32, 64],
                   norm_name=("instance", {"affine": True}), deep_supervision=deep_supervision, deep_supr_num=1)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_every_slice_is_the_2d_networks_output_of_that_slice_alone(axis: int) -> None:
    network = _dynunet().eval()
    sliced = SliceNetwork(network, axis)
    shape = [32, 32, 32]
    shape[axis] = 5
    image = torch.randn(2, 2, *shape)
    with torch.no_grad():
        out = sliced(image)
        assert out.shape == (2, 4, *shape)
        for index in range(5):
            alone = network(image.select(2 + axis, index))
            assert torch.allclose(out.select(2 + axis, index), alone, atol=1e-5)
            one = sliced(image.narrow(2 + axis, index, 1))  # a window one slice thick
            assert torch.allclose(one.squeeze(2 + axis), alone, atol=1e-5)


def test_training_outputs_keep_the_deep_supervision_heads_and_the_head_splits_as_a_3d_convolution() -> None:
    sliced = SliceNetwork(_dynunet(deep_supervision=True), 2).train()
    assert sliced(torch.randn(3, 2, 32, 32, 1)).shape == (3, 2, 4, 32, 32, 1)  # (B, 1 + heads, C, *patch)
    sliced.eval()
    split = split_pointwise_head(sliced)
    assert split is not None
    body, head, features = split
    assert isinstance(head, torch.nn.Conv3d) and features == 8
    image = torch.randn(1, 2, 32, 32, 4)
    with torch.no_grad():
        assert torch.allclose(head(body(image)), sliced(image), atol=1e-5)


def test_input_that_is_not_a_3d_batch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"takes \(B, C, X, Y, Z\) input"):
        SliceNetwork(_dynunet(), 2)(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match="slice axis must be 0, 1 or 2"):
        SliceNetwork(_dynunet(), 3)
