"""Slab-streamed sliding-window inference: same result as MONAI's, memory bounded by a slab."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from torch.utils._python_dispatch import TorchDispatchMode

from medseg.errors import InputError
from medseg.inference.memory import estimate_slab_bytes, label_dtype
from medseg.inference.sliding import SlabResult, slab_sliding_window


def unet(classes: int, dims: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return UNet(dims, 1, classes, (4, 8), (2,), num_res_units=1).eval()


def conv_net(classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(6, classes, 3, padding=1)
    ).eval()


def volume(*spatial: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, *spatial, generator=g)


def monai_logits(x, roi, net, overlap, sw_batch_size=4, **kw) -> torch.Tensor:
    with torch.no_grad():
        return sliding_window_inference(x, roi, sw_batch_size, net, overlap, mode="gaussian", **kw)[0]


def assert_matches(result: SlabResult, ref_logits: torch.Tensor) -> None:
    ref_labels = ref_logits.argmax(0)
    assert result.labels.shape == ref_labels.shape
    assert result.labels.dtype == torch.uint8
    agreement = (result.labels.long() == ref_labels).double().mean().item()
    assert agreement >= 0.9999, agreement
    if result.probabilities is not None:
        probs = torch.from_numpy(np.asarray(result.probabilities, dtype=np.float32))
        assert probs.shape == ref_logits.shape
        assert (probs - torch.softmax(ref_logits, 0)).abs().max().item() < 1e-3


@pytest.mark.parametrize(
    ("net_kind", "classes", "shape", "roi", "overlap"),
    [
        ("unet", 2, (45, 37, 29), (16, 16, 8), 0.25),
        ("unet", 7, (45, 37, 29), (16, 16, 8), 0.5),
        ("unet", 7, (25, 21, 13), (16, 16, 8), 0.75),  # smaller: 0.75 on (45, 37, 29) is 756 windows
        ("unet", 2, (45, 37, 29), (32, 32, 16), 0.5),
        ("unet", 7, (45, 37, 29), (32, 32, 16), 0.75),
        ("conv", 7, (45, 37, 29), (16, 16, 8), 0.25),
        ("conv", 2, (45, 37, 29), (32, 32, 16), 0.5),
    ],
)
def test_matches_monai(tmp_path, net_kind, classes, shape, roi, overlap):
    net = unet(classes) if net_kind == "unet" else conv_net(classes)
    x = volume(*shape)
    result = slab_sliding_window(x, roi, net, classes, overlap=overlap, sw_batch_size=4,
                                 probabilities_path=tmp_path / "p.npy")
    assert_matches(result, monai_logits(x, roi, net, overlap))
    # the file on disk is a plain .npy
    reopened = np.load(tmp_path / "p.npy", mmap_mode="r")
    assert reopened.shape == (classes, *shape) and reopened.dtype == np.float16
    np.testing.assert_allclose(reopened.astype(np.float32).sum(0), 1.0, atol=5e-3)


@pytest.mark.parametrize("sw_batch_size", [1, 3, 7])
def test_batch_size_does_not_change_the_result(sw_batch_size):
    # batches that span several z-starts (and a window count that is not a multiple of the batch size)
    net, x = unet(7), volume(45, 37, 29)
    reference = slab_sliding_window(x, (16, 16, 8), net, 7, overlap=0.5, sw_batch_size=4)
    result = slab_sliding_window(x, (16, 16, 8), net, 7, overlap=0.5, sw_batch_size=sw_batch_size)
    assert torch.equal(result.labels, reference.labels)


def test_per_axis_overlap_and_whole_axis_roi():
    net, x = conv_net(2), volume(30, 26, 21)
    for roi, overlap in [((16, -1, 8), (0.5, 0.25, 0.0)), ((16, 16, 21), 0.5), ((16, 16, 8), 0.0)]:
        assert_matches(slab_sliding_window(x, roi, net, 2, overlap=overlap), monai_logits(x, roi, net, overlap))


def test_identity_network_gives_the_blended_input_back():
    # a per-voxel network (its logits are the input and its negative, whatever the window): blending the
    # overlapping windows gives the same logits back, and mirroring changes nothing either
    x = volume(30, 26, 21)

    def two(w):
        return torch.cat([w, -w], 1)

    result = slab_sliding_window(x, (16, 16, 8), two, 2, overlap=0.5, mirror_axes=(1,))
    assert torch.equal(result.labels, (x[0, 0] < 0).to(torch.uint8))


@pytest.mark.parametrize("padding_mode", ["constant", "reflect"])
def test_volume_smaller_than_roi_is_padded_like_monai(tmp_path, padding_mode):
    net, x = unet(7), volume(10, 37, 5)  # smaller than the roi along x and z (odd and even padding)
    cval = 0.5 if padding_mode == "constant" else 0.0  # MONAI refuses a non-zero cval for "reflect"
    result = slab_sliding_window(x, (16, 16, 8), net, 7, overlap=0.5, padding_mode=padding_mode, cval=cval,
                                 probabilities_path=tmp_path / "p.npy")
    assert result.labels.shape == (10, 37, 5)
    assert_matches(result, monai_logits(x, (16, 16, 8), net, 0.5, padding_mode=padding_mode, cval=cval))


def test_2d_input(tmp_path):
    net, x = unet(3, dims=2), volume(40, 33)
    result = slab_sliding_window(x, (16, 16), net, 3, overlap=0.5, probabilities_path=tmp_path / "p.npy")
    assert result.labels.shape == (40, 33)
    assert result.buffer_channels == 3 and result.peak_buffer_voxels < 40 * 33
    assert_matches(result, monai_logits(x, (16, 16), net, 0.5))


def test_mirror_axes_average_flipped_predictions(tmp_path):
    net, x, roi = unet(7), volume(45, 37, 29), (16, 16, 8)
    result = slab_sliding_window(x, roi, net, 7, overlap=0.5, mirror_axes=(0, -1),
                                 probabilities_path=tmp_path / "p.npy")
    runs = [monai_logits(x, roi, net, 0.5)]
    for dim in (2, 4):  # spatial axes 0 and 2 of the (N, C, X, Y, Z) windows
        runs.append(monai_logits(x, roi, lambda w, d=dim: net(w.flip(d)).flip(d), 0.5))
    assert_matches(result, torch.stack(runs).mean(0))
    assert not torch.equal(result.labels, slab_sliding_window(x, roi, net, 7, overlap=0.5).labels)


def test_mirror_axes_equal_monai_on_flipped_volumes_for_a_symmetric_grid():
    # 40 - 16 and 24 - 8 are multiples of the step (8, 4): the flipped volume has the same window grid
    net, x, roi = unet(2), volume(40, 37, 24), (16, 16, 8)
    result = slab_sliding_window(x, roi, net, 2, overlap=0.5, mirror_axes=(0, 2))
    runs = [monai_logits(x, roi, net, 0.5)]
    for dim in (2, 4):
        runs.append(monai_logits(x.flip(dim), roi, net, 0.5).flip(dim - 1))
    assert_matches(result, torch.stack(runs).mean(0))


def test_estimate_is_far_below_monai_buffer_for_a_large_ct():
    classes, shape = 105, (512, 512, 400)
    monai_buffer = classes * math.prod(shape) * 4  # ~44 GB
    estimate = estimate_slab_bytes(shape, (96, 96, 96), 0.5, classes, buffer_bytes=None)
    half_window = classes * 512 * 512 * 48 * 4  # planes that every z-step leaves to the next one
    assert half_window <= estimate < monai_buffer / 5
    # the buffer does not grow with depth (MONAI's doubles): twice the depth adds the label map (uint8)
    # and at most a few planes, depending on where MONAI's last window falls
    extra = estimate_slab_bytes((512, 512, 800), (96, 96, 96), 0.5, classes, buffer_bytes=None) - estimate
    assert 512 * 512 * 400 <= extra <= 512 * 512 * 400 + (classes + 1) * 512 * 512 * 16 * 4
    # swept in x-strips (the default budget on the CPU), the buffer is a fraction of a whole cross-section
    assert estimate_slab_bytes(shape, (96, 96, 96), 0.5, classes) < 0.6 * estimate


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op produces (network, blending, normalisation, argmax)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shape = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


def test_never_allocates_classes_times_volume(tmp_path):
    classes, shape, roi = 7, (40, 36, 64), (16, 16, 8)
    net, x = conv_net(classes), volume(*shape)
    with _LargestTensor() as mode:
        result = slab_sliding_window(x, roi, net, classes, overlap=0.5, sw_batch_size=2,
                                     probabilities_path=tmp_path / "p.npy")
    assert result.buffer_channels == classes and result.peak_buffer_voxels < math.prod(shape) / 4
    # the largest tensors are volume-sized single-channel ones (the label map, the finite check)
    assert mode.largest <= math.prod(shape), mode.shape
    assert mode.largest <= classes * math.prod(shape) // 7
    # ... and still the same answer as MONAI, which needs classes x volume
    with _LargestTensor() as monai_mode:
        ref = monai_logits(x, roi, net, 0.5, sw_batch_size=2)
    assert monai_mode.largest >= classes * math.prod(shape)
    assert_matches(result, ref)


def test_labels_are_an_ordinary_tensor():
    result = slab_sliding_window(volume(20, 20, 10), (16, 16, 8), unet(2), 2, overlap=0.5)
    assert not result.labels.is_inference()
    result.labels[0] = 1  # callers may edit the label map in place
    assert result.probabilities is None


def test_label_dtype():
    assert label_dtype(2) == label_dtype(256) == torch.uint8
    assert label_dtype(257) == torch.int16
    assert label_dtype(40000) == torch.int32


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused(bad):
    x = volume(20, 20, 10)
    x[0, 0, 3, 4, 9] = bad
    with pytest.raises(InputError, match="NaN or infinite voxel values"):
        slab_sliding_window(x, (16, 16, 8), unet(2), 2)


def test_impossible_memory_estimate_is_refused_up_front():
    # a 4096^3 volume that costs no memory (one voxel, expanded): the slab for 105 classes is ~680 GB
    x = torch.zeros(1, 1, 1, 1, 1).expand(1, 1, 4096, 4096, 4096)
    calls = []

    def network(batch):  # never reached
        calls.append(batch.shape)
        raise AssertionError("the network ran")

    with pytest.raises(InputError, match=r"needs \d+(\.\d)? GB for the slab buffer.*GB available"):
        slab_sliding_window(x, (96, 96, 96), network, 105)
    assert not calls


def test_bad_arguments():
    net, x = unet(2), volume(20, 20, 10)
    with pytest.raises(ValueError, match="roi_size"):
        slab_sliding_window(x, (16, 16), net, 2)
    with pytest.raises(ValueError, match="overlap"):
        slab_sliding_window(x, (16, 16, 8), net, 2, overlap=1.0)
    with pytest.raises(ValueError, match="mirror axis"):
        slab_sliding_window(x, (16, 16, 8), net, 2, mirror_axes=(3,))
    with pytest.raises(ValueError, match="expected"):
        slab_sliding_window(x, (16, 16, 8), net, 3)  # the network returns 2 channels
    with pytest.raises(ValueError, match="inputs must be"):
        slab_sliding_window(torch.zeros(2, 1, 20, 20, 10), (16, 16, 8), net, 2)


def _pointwise_head_networks(classes: int) -> dict[str, torch.nn.Module]:
    from monai.networks.nets import BasicUNet, DynUNet, SegResNet

    torch.manual_seed(0)
    return {
        "dynunet": DynUNet(3, 1, classes, [3, 3, 3], [1, 2, 2], [2, 2], filters=[6, 8, 16]).eval(),
        "basicunet": BasicUNet(3, 1, classes, features=(6, 8, 8, 16, 16, 6)).eval(),
        "segresnet": SegResNet(3, 8, 1, classes, blocks_down=(1, 1), blocks_up=(1,)).eval(),
    }


@pytest.mark.parametrize("name", ["dynunet", "basicunet", "segresnet"])
def test_blending_features_before_a_pointwise_head_matches_monai(tmp_path, name):
    from medseg.networks import split_pointwise_head

    classes = 30
    net = _pointwise_head_networks(classes)[name]
    body, head, features = split_pointwise_head(net)
    x = volume(45, 37, 40)
    result = slab_sliding_window(x, (32, 32, 32), body, classes, overlap=0.5, sw_batch_size=2, head=head,
                                 feature_channels=features, probabilities_path=tmp_path / "p.npy")
    # the buffer holds the network's feature channels, not the 30 classes
    assert result.buffer_channels == features < classes
    assert_matches(result, monai_logits(x, (32, 32, 32), net, 0.5, sw_batch_size=2))
    # the original network is untouched: it still returns class logits
    with torch.no_grad():
        assert net(x[..., :32, :32, :32]).shape[1] == classes


def test_ring_with_a_head_does_not_grow_with_the_classes():
    sizes = {c: estimate_slab_bytes((512, 512, 400), (96, 96, 64), 0.5, c, sw_batch_size=2, feature_channels=8)
             for c in (2, 15, 105)}
    # only the label map (uint8 up to 256 classes) and bounded chunk temporaries depend on the classes
    assert sizes[105] - sizes[2] <= 0.2 * 1024**3
    assert sizes[105] <= 1.0 * 1024**3


def test_with_a_head_the_cpu_body_takes_one_window_at_a_time():
    from medseg.networks import split_pointwise_head

    body, head, features = split_pointwise_head(_pointwise_head_networks(5)["dynunet"])
    batches: list[int] = []

    def counting(batch: torch.Tensor) -> torch.Tensor:
        batches.append(batch.shape[0])
        return body(batch)

    x = volume(40, 36, 30)
    with_head = slab_sliding_window(x, (16, 16, 16), counting, 5, sw_batch_size=4, head=head, feature_channels=features)
    assert set(batches) == {1} and len(batches) == with_head.num_windows
    batches.clear()
    # without a head the window batch is kept
    slab_sliding_window(x, (16, 16, 16), counting, features, sw_batch_size=4)
    assert max(batches) == 4


def test_split_pointwise_head_refuses_networks_without_one():
    from medseg.networks import split_pointwise_head

    assert split_pointwise_head(unet(4)) is None  # MONAI UNet: last layer is a 3x3x3 convolution
    assert split_pointwise_head(conv_net(4)) is None


def test_split_pointwise_head_takes_a_deep_supervision_dynunet_at_its_main_output():
    """Issue 14: planned networks train with deep-supervision heads and infer with the main output;
    the split is the main output's, so the bounded-memory inferer blends its features."""
    from monai.networks.nets import DynUNet

    from medseg.networks import split_pointwise_head

    deep = DynUNet(3, 1, 4, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[4, 8, 8, 8], deep_supervision=True).eval()
    split = split_pointwise_head(deep)
    assert split is not None
    body, head, features = split
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(body(x)), deep(x))
    assert features == 4


def test_a_head_needs_the_feature_channels():
    with pytest.raises(ValueError, match="feature_channels"):
        slab_sliding_window(volume(20, 20, 10), (16, 16, 8), conv_net(4), 4, head=torch.nn.Identity())


@pytest.mark.parametrize(("with_head", "mirror"), [(False, ()), (True, ()), (False, (0,))])
def test_a_small_buffer_budget_sweeps_x_strips_with_the_same_result(tmp_path, with_head, mirror):
    from medseg.networks import split_pointwise_head

    classes, shape, roi = 7, (90, 30, 40), (20, 16, 16)  # 8 window columns along x at overlap 0.5
    x = volume(*shape)
    if with_head:
        net = _pointwise_head_networks(classes)["dynunet"]
        body, head, features = split_pointwise_head(net)
        kw = dict(head=head, feature_channels=features)
    else:
        net = body = conv_net(classes)
        kw = {}
    whole = slab_sliding_window(x, roi, body, classes, overlap=0.5, mirror_axes=mirror, buffer_bytes=None, **kw)
    swept = slab_sliding_window(x, roi, body, classes, overlap=0.5, mirror_axes=mirror,
                                buffer_bytes=whole.buffer_channels * whole.peak_buffer_voxels * 4 // 3,
                                probabilities_path=tmp_path / "p.npy", **kw)
    assert whole.strips == 1 and swept.strips >= 2
    # a smaller buffer, paid for by the windows that straddle a cut (one column each at overlap 0.5)
    assert swept.peak_buffer_voxels < 0.6 * whole.peak_buffer_voxels
    assert whole.num_windows < swept.num_windows <= 1.3 * whole.num_windows
    runs = [monai_logits(x, roi, net, 0.5)]
    for a in mirror:
        runs.append(monai_logits(x, roi, lambda w, d=a + 2: net(w.flip(d)).flip(d), 0.5))
    assert_matches(swept, torch.stack(runs).mean(0))
    assert torch.equal(swept.labels, whole.labels)


def test_strips_stay_within_30_percent_more_windows_when_the_budget_cannot_be_met():
    x = volume(90, 30, 40)
    result = slab_sliding_window(x, (20, 16, 16), conv_net(3), 3, overlap=0.5, buffer_bytes=1)
    monai_windows = 8 * 3 * 4  # x: 0, 10, .., 70; y: 0, 8, 14; z: 0, 8, 16, 24
    assert result.strips >= 2 and monai_windows < result.num_windows <= 1.3 * monai_windows


def test_nnunet_window_starts() -> None:
    from medseg.inference.windows import nnunet_starts

    assert nnunet_starts(49, 32, 0.5) == (0, 8, 17)  # MONAI: (0, 17)
    assert nnunet_starts(100, 32, 0.5) == (0, 14, 27, 41, 54, 68)  # MONAI: (0, 16, 32, 48, 64, 68)
    assert nnunet_starts(96, 32, 0.5) == (0, 16, 32, 48, 64)
    assert nnunet_starts(32, 32, 0.5) == (0,)


def test_nnunet_grid_blends_nnunets_windows_with_its_gaussian(tmp_path) -> None:
    """grid="nnunet" (models imported from nnU-Net): the blend of every window of nnU-Net's grid weighted by
    nnU-Net's Gaussian, as nnUNetv2_predict computes it (here in float64), also when swept in x-strips."""
    import itertools

    from scipy.ndimage import gaussian_filter

    from medseg.inference.windows import nnunet_starts

    net, x, roi = conv_net(5), volume(49, 40, 37), (32, 16, 16)
    g = np.zeros(roi)
    g[tuple(r // 2 for r in roi)] = 1
    g = gaussian_filter(g, [r / 8 for r in roi], 0, mode="constant", cval=0)
    g[g == 0] = g[g > 0].min()
    total, weight = np.zeros((5, 49, 40, 37)), np.zeros((49, 40, 37))
    with torch.no_grad():
        for start in itertools.product(*[nnunet_starts(n, r, 0.5) for n, r in zip(x.shape[2:], roi)]):
            where = tuple(slice(s, s + r) for s, r in zip(start, roi))
            total[(slice(None), *where)] += net(x[(slice(None), slice(None), *where)])[0].double().numpy() * g
            weight[where] += g
    reference = torch.from_numpy(total / weight)
    for buffer_bytes in (None, 200_000):
        result = slab_sliding_window(x, roi, net, 5, 0.5, probabilities_in_memory=True, grid="nnunet",
                                     buffer_bytes=buffer_bytes)
        assert (result.labels.long() == reference.argmax(0)).double().mean().item() >= 0.9999
        probs = torch.from_numpy(np.asarray(result.probabilities))
        assert (probs.double() - torch.softmax(reference, 0)).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="grid must be one of monai, nnunet"):
        slab_sliding_window(x, roi, net, 5, 0.5, grid="other")
