"""The parts of slab-streamed sliding windows on their own: the Gaussian block merger, its reducer and
probability writer, and the memory model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import Merger, sliding_window_inference
from monai.networks.nets import DynUNet, UNet

from medseg.errors import InputError
from medseg.inference import memory
from medseg.inference.memory import estimate_slab_bytes, require_memory
from medseg.inference.merger import BlockReducer, GaussianBlockMerger, ProbabilityWriter
from medseg.inference.windows import plan_sweep, window_geometry
from medseg.networks import split_pointwise_head


def _unet(classes: int, dims: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(dims, 1, classes, (4, 8), (2,), num_res_units=1).eval()


def _volume(*spatial: int) -> torch.Tensor:
    return torch.randn(1, 1, *spatial, generator=torch.Generator().manual_seed(3))


def _merge(x, roi, network, num_classes, *, channels=None, head=None, budget=None, overlap=0.5, max_extra=0.3):
    """Every window of the plan through ``network``, aggregated in the plan's order; the merger's output."""
    spatial = tuple(x.shape[2:])
    geometry = window_geometry(spatial, roi, overlap)
    channels = channels or num_classes
    plan = plan_sweep(geometry.padded, geometry.window, geometry.scan, channels, budget, max_extra=max_extra)
    reducer = BlockReducer(spatial, num_classes, channels, head=head, probabilities_in_memory=True)
    merger = GaussianBlockMerger(plan, geometry, reducer)
    assert isinstance(merger, Merger)
    with torch.inference_mode():
        for strip in merger.strips:
            for start in strip.starts:
                window = x[(slice(None), slice(None), *(slice(s, s + w) for s, w in zip(start, geometry.window)))]
                merger.aggregate(network(window), start)
        labels, probs = merger.finalize()
    return merger, labels, probs


def _monai(x, roi, network, overlap=0.5) -> torch.Tensor:
    with torch.no_grad():
        return sliding_window_inference(x, roi, 2, network, overlap, mode="gaussian")[0]


@pytest.mark.parametrize(("shape", "roi", "budget", "max_extra", "strips"), [
    ((37, 30, 27), (16, 16, 8), None, 0.3, 1),
    ((64, 30, 27), (16, 16, 8), 20_000, 0.3, 3),  # a budget that cuts the volume into x-strips
    ((37, 64, 27), (16, 16, 8), 1, 1.0, 8),  # no budget met: 2 x-strips, each cut into 4 along y
    ((40, 33), (16, 16), None, 0.3, 1),
])
def test_merged_windows_equal_monai_gaussian_blending(shape, roi, budget, max_extra, strips):
    net, x = _unet(5, dims=len(shape)), _volume(*shape)
    merger, labels, probs = _merge(x, roi, net, 5, budget=budget, max_extra=max_extra)
    assert len(merger.strips) == strips
    reference = _monai(x, roi, net)
    assert probs.shape == reference.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs, torch.softmax(reference, 0).numpy(), atol=1e-5)
    assert (labels.long() == reference.argmax(0)).double().mean().item() >= 0.9999
    assert not labels.is_inference()  # the caller may edit the label map


def test_cutting_along_y_shrinks_the_buffer_for_windows_computed_twice():
    geometry = window_geometry((64, 64, 40), (16, 16, 8), 0.5)
    args = (geometry.padded, geometry.window, geometry.scan, 40)
    whole = plan_sweep(*args, None)
    x_only = plan_sweep(*args, 1)  # within 30 % more windows: x-strips only here
    tiles = plan_sweep(*args, 1, max_extra=1.0)
    monai = len(whole.starts)
    assert whole.num_windows == monai and x_only.y_edges is None
    assert tiles.y_edges is not None and len(tiles.y_edges) > 2
    assert tiles.arena_voxels < 0.5 * x_only.arena_voxels < x_only.arena_voxels < whole.arena_voxels
    assert x_only.num_windows <= 1.3 * monai < tiles.num_windows <= 2 * monai
    assert sum(len(strip.starts) for strip in tiles.strips()) == tiles.num_windows
    # a budget met within 30 % takes the fewest windows that meet it
    met = plan_sweep(*args, 40 * 4 * x_only.arena_voxels, max_extra=1.0)
    assert met.num_windows <= x_only.num_windows and met.arena_voxels <= x_only.arena_voxels


def test_members_add_their_channels_one_after_another_before_a_window_is_finished():
    geometry = window_geometry((20, 20, 10), (16, 16, 8), 0.5)
    plan = plan_sweep(geometry.padded, geometry.window, geometry.scan, 4, None)
    merger = GaussianBlockMerger(plan, geometry, BlockReducer((20, 20, 10), 2, 4, members=2))
    start = merger.strips[0].starts[0]
    merger.add(torch.ones(1, 2, *geometry.window), start, 0)
    with pytest.raises(ValueError, match="2 of 4 channels"):
        merger.finish(start)
    with pytest.raises(ValueError, match="from channel 3"):
        merger.add(torch.ones(1, 2, *geometry.window), start, 3)
    merger.add(torch.ones(1, 2, *geometry.window), start, 2)
    merger.finish(start)
    with pytest.raises(ValueError, match="not the one being added"):
        merger.finish(start)


def test_a_head_on_blended_features_equals_monai_on_the_whole_network():
    torch.manual_seed(0)
    net = DynUNet(3, 1, 9, [3, 3, 3], [1, 2, 2], [2, 2], filters=[6, 8, 16]).eval()
    body, head, features = split_pointwise_head(net)
    x = _volume(40, 37, 36)
    _, labels, probs = _merge(x, (32, 32, 32), body, 9, channels=features, head=head)
    reference = _monai(x, (32, 32, 32), net)
    np.testing.assert_allclose(probs, torch.softmax(reference, 0).numpy(), atol=1e-4)
    assert (labels.long() == reference.argmax(0)).double().mean().item() >= 0.9999


def _merger(shape=(20, 20, 10), roi=(16, 16, 8), classes=2) -> GaussianBlockMerger:
    geometry = window_geometry(shape, roi, 0.5)
    plan = plan_sweep(geometry.padded, geometry.window, geometry.scan, classes, None)
    return GaussianBlockMerger(plan, geometry, BlockReducer(shape, classes, classes))


def test_the_merger_refuses_windows_out_of_order_or_missing():
    merger = _merger()
    starts = merger.strips[0].starts
    values = torch.zeros(1, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="out of the plan's order"):
        merger.aggregate(values.clone(), starts[1])
    with pytest.raises(ValueError, match="expected"):
        merger.aggregate(torch.zeros(1, 3, 16, 16, 8), starts[0])  # 3 channels, the merger blends 2
    merger.aggregate(values.clone(), starts[0])
    with pytest.raises(ValueError, match="every window"):
        merger.finalize()
    for start in starts[1:]:
        merger.aggregate(values.clone(), start)
    labels, probs = merger.finalize()
    assert labels.shape == (20, 20, 10) and probs is None
    with pytest.raises(ValueError, match="finalized"):
        merger.aggregate(values.clone(), starts[0])


def test_probability_writer_in_pieces_equals_plain_assignment(tmp_path):
    values = np.random.default_rng(0).random((3, 7, 5, 4)).astype(np.float16)
    probs = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float16, shape=(3, 9, 5, 6))
    probs[:] = 0
    writer = ProbabilityWriter(probs, chunk_bytes=2 * 5 * 6 * 2)  # two rows at a time: several pieces
    index = (slice(1, 8), slice(0, 5), slice(2, 6))
    writer.write(values, index)
    expected = np.zeros((3, 9, 5, 6), dtype=np.float16)
    expected[(slice(None), *index)] = values
    probs.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), expected)


def test_the_estimate_grows_with_the_classes_when_logits_are_blended_not_features():
    shape, roi = (512, 512, 400), (96, 96, 64)
    geometry = window_geometry(shape, roi, 0.5)
    arena = plan_sweep(geometry.padded, geometry.window, geometry.scan, 1, None).arena_voxels

    def logits(classes: int) -> int:
        return estimate_slab_bytes(shape, roi, 0.5, classes, sw_batch_size=2, buffer_bytes=None)

    def features(classes: int) -> int:
        return estimate_slab_bytes(shape, roi, 0.5, classes, sw_batch_size=2, feature_channels=8, buffer_bytes=None)

    # blending logits: a float32 arena channel (and a window channel of the batch) per class
    assert logits(15) - logits(2) >= 13 * arena * 4
    assert logits(105) - logits(15) >= 90 * arena * 4
    # blending 8 features: the same arena whatever the classes; only the flush chunks differ (within 16 MiB)
    assert abs(features(105) - features(2)) < 16 * 1024**2
    assert features(105) < logits(105) / 5


def test_require_memory_refuses_more_than_is_available(monkeypatch):
    monkeypatch.setattr(memory, "available_device_bytes", lambda device: 2 * 1024**3)
    require_memory(1024**3, torch.device("cpu"), (512, 512, 400), 105, (96, 96, 64))
    with pytest.raises(InputError, match=r"needs 3\.0 GB for the slab buffer \(roi 96x96x64\), only 2\.0 GB"):
        require_memory(3 * 1024**3, torch.device("cpu"), (512, 512, 400), 105, (96, 96, 64))
    monkeypatch.setattr(memory, "available_device_bytes", lambda device: None)  # unknown: not refused
    require_memory(10**15, torch.device("cpu"), (512, 512, 400), 105, (96, 96, 64))
    assert (memory.available_host_bytes() or 1) > 0
