"""medseg's sliding-window inferer: the accelerated network, label or probability output, inversion."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet, UNet

from medseg.inference.accelerate import ChannelsLast, OneDNNConv3d, inference_network
from medseg.inference.inferer import SlabInferer


def _unet(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, classes, (4, 8, 16), (2, 2), num_res_units=1, norm="instance").eval()


def test_inference_network_is_the_same_function_and_leaves_the_original_alone():
    net = _unet(2)
    fast = inference_network(net)
    convs = [m for m in net.modules() if type(m) is torch.nn.Conv3d]
    onednn = [m for m in fast.modules() if isinstance(m, OneDNNConv3d)]
    # every convolution runs through oneDNN; the thin ones (1 input channel; 2 output classes) in channels-last
    assert len(onednn) == len(convs)
    assert {m.channels_last for m in onednn} == {True, False}
    assert all(m.channels_last == (min(m.conv.in_channels, m.conv.out_channels) <= 2) for m in onednn)
    transposed = [m for m in fast.modules() if isinstance(m, ChannelsLast)]
    assert len(transposed) == sum(type(m) is torch.nn.ConvTranspose3d for m in net.modules()) > 0
    assert not any(isinstance(m, (ChannelsLast, OneDNNConv3d)) for m in net.modules())
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.inference_mode():
        ref, out = net(x), fast(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the original keeps its own parameters, in their own layout
    assert all(p.is_contiguous() for p in net.parameters())
    assert not any(m.channels_last for m in inference_network(net, thin_channels=0).modules()
                   if isinstance(m, OneDNNConv3d))


def test_onednn_convolution_runs_small_inputs_in_onednn_and_keeps_autocast():
    conv = torch.nn.Conv3d(1, 8, 3, padding=1).eval()  # a CT network's first layer, one window
    x = torch.randn(1, 1, 24, 24, 16)
    fast = OneDNNConv3d(conv, channels_last=True)
    with torch.inference_mode():
        with torch.profiler.profile() as prof:
            out = fast(x)
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous()
        names = {e.key for e in prof.key_averages()}
        assert "aten::mkldnn_convolution" in names and "aten::slow_conv3d_forward" not in names
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fast(x).dtype == torch.bfloat16  # under autocast: the module's own (autocast) path


def test_retained_heap_keeps_activations_in_the_heap_and_gives_them_back():
    import os

    from medseg.inference.accelerate import _glibc, retained_heap

    if _glibc() is None:
        pytest.skip("not glibc")

    def resident_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    with retained_heap():
        with retained_heap():  # a nested block (an evaluator inside a run) does not end the outer one
            pass
        block = torch.ones(40 << 20, dtype=torch.uint8)  # a window's activation of 40 MB, written
        peak = resident_mb()
        del block
        kept = resident_mb()  # freed but kept in the heap: the next window reuses the pages
    released = resident_mb()
    assert kept >= peak - 5, (peak, kept)
    assert released <= peak - 35, (peak, released)



def test_labels_and_probabilities_agree_with_monai():
    net, x = _unet(3), torch.randn(1, 1, 40, 36, 20)
    with torch.inference_mode():
        ref = sliding_window_inference(x, (16, 16, 16), 2, net, 0.5, mode="gaussian")
    labels = SlabInferer((16, 16, 16), 3, output="labels")(x, net)
    probs = SlabInferer((16, 16, 16), 3, output="probabilities")(x, net)
    assert labels.shape == (1, 1, 40, 36, 20) and probs.shape == (1, 3, 40, 36, 20)
    assert (labels[0, 0].long() == ref.argmax(1)[0]).double().mean() >= 0.9999
    assert (probs - ref.softmax(1)).abs().max() < 1e-3


def test_auto_output_puts_probabilities_on_disk_when_they_would_not_fit_in_memory():
    x = MetaTensor(torch.zeros(1, 1, 40, 36, 20), meta={"spatial_shape": torch.tensor([[80, 72, 40]])})
    assert SlabInferer((16, 16, 16), 105, max_probability_bytes=1024**3).resolve_output(x) == "probabilities"
    # the input's native grid (8x the processed one here) counts, not only the processed grid
    tight = SlabInferer((16, 16, 16), 105, max_probability_bytes=105 * 40 * 36 * 20 * 4 * 2)
    assert tight.resolve_output(x) == "disk"
    assert SlabInferer((16, 16, 16), 105, output="labels").resolve_output(x) == "labels"


def test_probabilities_on_disk_are_float16_and_leave_no_file():
    net, x = _unet(3), torch.randn(1, 1, 40, 36, 20)
    before = set(Path(tempfile.gettempdir()).glob("medseg-probs-*"))
    disk = SlabInferer((16, 16, 16), 3, output="disk")(x, net)
    ram = SlabInferer((16, 16, 16), 3, output="probabilities")(x, net)
    assert disk.dtype == torch.float16 and disk.shape == ram.shape
    assert (disk.float() - ram).abs().max() < 1e-3
    assert set(Path(tempfile.gettempdir()).glob("medseg-probs-*")) == before


def test_networks_with_a_pointwise_head_blend_features_when_there_are_more_classes():
    torch.manual_seed(0)
    net = DynUNet(3, 1, 12, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 8]).eval()
    inferer = SlabInferer((16, 16, 16), 12, output="labels")
    x = torch.randn(1, 1, 30, 30, 30)
    labels = inferer(x, net)
    _, head, features = inferer._prepare(net, x.device)  # which path was taken
    assert head is not None and features == 4
    with torch.inference_mode():
        ref = sliding_window_inference(x, (16, 16, 16), 2, net, 0.5, mode="gaussian")
    assert (labels[0, 0].long() == ref.argmax(1)[0]).double().mean() >= 0.9999


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        SlabInferer((16, 16, 16), 2, overlap=1.0)
    with pytest.raises(ValueError, match="sw_batch_size"):
        SlabInferer((16, 16, 16), 2, sw_batch_size=0)
    with pytest.raises(ValueError, match="output"):
        SlabInferer((16, 16, 16), 2, output="logits")
    with pytest.raises(ValueError, match="one image"):
        SlabInferer((16, 16, 16), 2)(torch.zeros(2, 1, 16, 16, 16), _unet(2))


class _SignNet(torch.nn.Module):
    """Two classes by the sign of a smoothed input: well-separated logits, so bfloat16 may only flip
    voxels where the input is near zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1)
        torch.nn.init.constant_(self.conv.weight, 1.0 / 27)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y, -y], 1)


def test_bfloat16_runs_the_network_under_autocast_and_agrees_with_float32():
    seen = []

    class Spy(_SignNet):
        def forward(self, x):
            out = super().forward(x)
            seen.append(out.dtype)
            return out

    x = torch.randn(1, 1, 40, 36, 20)
    fp32 = SlabInferer((16, 16, 16), 2, output="labels")(x, _SignNet().eval())
    bf16 = SlabInferer((16, 16, 16), 2, output="labels", precision="bfloat16")(x, Spy().eval())
    assert set(seen) == {torch.bfloat16}
    assert (fp32 == bf16).double().mean() > 0.98
    with pytest.raises(ValueError, match="precision"):
        SlabInferer((16, 16, 16), 2, precision="float16")


def test_label_map_by_class_is_argmax_with_first_maximum_or_regions_painted_in_order():
    """The class-by-class reduction of InvertPredictiond (float16 probabilities) and of ConfigurationEnsemble."""
    from medseg.inference.inferer import label_map_by_class
    from medseg.labels import Region

    probs = torch.rand(4, 6, 5, 3, generator=torch.Generator().manual_seed(0))
    probs[2, 0, 0, 0] = probs[1, 0, 0, 0] = 2.0  # a tie: the first maximum wins, as argmax
    made: list[int] = []

    def channel(c: int) -> torch.Tensor:
        made.append(c)
        return probs[c].clone()

    labels = label_map_by_class(4, channel)
    assert made == [0, 1, 2, 3] and labels.dtype == torch.int32
    assert torch.equal(labels, probs.argmax(dim=0).to(torch.int32)) and labels[0, 0, 0] == 1
    regions = [Region("a", (1, 2), 1), Region("b", (2,), 2), Region("c", (3,), 3), Region("d", (4,), 4)]
    painted = label_map_by_class(4, lambda c: probs[c], regions, torch.float32)
    expected = torch.zeros(6, 5, 3)
    for c, region in enumerate(regions):
        expected[probs[c] > 0.5] = region.value
    assert painted.dtype == torch.float32 and torch.equal(painted, expected)
    with pytest.raises(ValueError, match="num_channels"):
        label_map_by_class(0, channel)
