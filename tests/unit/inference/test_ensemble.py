"""An ensemble inferred block by block equals averaging its members' own probability maps (issue 15, item 3)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet

from medseg.inference.inferer import SlabInferer
from medseg.labels import Region
from medseg.networks import split_pointwise_head
from medseg.networks.ensemble import ModelEnsemble

CLASSES = 3
ROI = (16, 16, 16)


def _plain(seed: int) -> torch.nn.Module:
    """A network without a pointwise head (its last layer is 3 x 3 x 3): the blocks hold its logits."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, CLASSES, 3, padding=1)).eval()


def _headed(seed: int) -> torch.nn.Module:
    """A DynUNet (pointwise head, 8 features): the blocks hold the members' features."""
    torch.manual_seed(seed)
    net = DynUNet(3, 1, CLASSES, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                  filters=[8, 16, 16])
    return net.eval()


def _image() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(1, 1, 40, 36, 28)


@pytest.mark.parametrize("make", [_plain, _headed])
@pytest.mark.parametrize("mirror", [(), (0, 2)])
def test_the_ensemble_equals_the_mean_of_its_members_probabilities(make, mirror) -> None:
    members = [make(seed) for seed in (1, 2, 3)]
    image = _image()
    single = SlabInferer(ROI, CLASSES, overlap=0.5, output="probabilities", mirror_axes=mirror)
    mean = torch.stack([single(image, network) for network in members]).mean(dim=0)
    ensemble = SlabInferer(ROI, CLASSES, overlap=0.5, output="probabilities", mirror_axes=mirror, members=3)
    together = ensemble(image, ModelEnsemble(members))
    assert together.shape == mean.shape == (1, CLASSES, 40, 36, 28)
    assert torch.allclose(together, mean, atol=1e-5)
    labels = SlabInferer(ROI, CLASSES, overlap=0.5, output="labels", mirror_axes=mirror, members=3)(
        image, ModelEnsemble(members))
    agree = (labels[0, 0] == mean[0].argmax(dim=0)).float().mean().item()
    assert agree >= 0.9999


def test_headed_members_blend_their_features_and_plain_ones_their_logits() -> None:
    split = split_pointwise_head(ModelEnsemble([_headed(1), _headed(2)]))
    assert split is not None
    body, head, features = split
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert features == 16 and head(body(x)).shape == (1, 2 * CLASSES, 16, 16, 16)
        assert torch.allclose(head(body(x)), ModelEnsemble([_headed(1), _headed(2)])(x), atol=1e-5)
    assert split_pointwise_head(ModelEnsemble([_headed(1), _plain(2)])) is None
    with pytest.raises(ValueError, match="at least one network"):
        ModelEnsemble([])


def test_a_region_ensemble_averages_the_members_sigmoids() -> None:
    regions = (Region("whole", (1, 2), 1), Region("core", (2,), 2))
    members = [torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1)).eval() for _ in range(2)]
    image = _image()
    single = SlabInferer(ROI, 2, overlap=0.25, output="probabilities", regions=regions)
    mean = torch.stack([single(image, network) for network in members]).mean(dim=0)
    together = SlabInferer(ROI, 2, overlap=0.25, output="probabilities", regions=regions, members=2)(
        image, ModelEnsemble(members))
    assert torch.allclose(together, mean, atol=1e-5)


def test_many_classes_blend_the_members_features_and_still_equal_the_mean() -> None:
    classes = 6

    def member(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return DynUNet(3, 1, classes, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                       filters=[4, 8, 8]).eval()

    members = [member(seed) for seed in (4, 5, 6)]
    split = split_pointwise_head(ModelEnsemble(members))
    assert split is not None and split[2] == 12 < 3 * classes  # 12 features blended instead of 18 logits
    image = _image()
    single = SlabInferer(ROI, classes, overlap=0.5, output="probabilities")
    mean = torch.stack([single(image, network) for network in members]).mean(dim=0)
    together = SlabInferer(ROI, classes, overlap=0.5, output="probabilities", members=3)(image, ModelEnsemble(members))
    assert torch.allclose(together, mean, atol=1e-5)


@pytest.mark.parametrize("make", [_plain, _headed])
def test_a_small_budget_cuts_the_ensemble_into_strips_and_tiles_with_the_same_result(make) -> None:
    """The members run one after another on each window (a list of networks), the sweep cut along x and y."""
    from medseg.inference.sliding import slab_sliding_window

    members = [make(seed) for seed in (1, 2, 3)]
    image = torch.randn(1, 1, 64, 64, 28, generator=torch.Generator().manual_seed(4))
    split = split_pointwise_head(ModelEnsemble(members))
    if make is _headed:
        assert split is not None
        body, head, features = split
        parts, kw = list(body.members), dict(head=head, feature_channels=features)
    else:
        parts, kw = members, {}
    whole = slab_sliding_window(image, ROI, parts, CLASSES, probabilities_in_memory=True, members=3,
                                buffer_bytes=None, **kw)
    tiled = slab_sliding_window(image, ROI, parts, CLASSES, probabilities_in_memory=True, members=3,
                                buffer_bytes=1, **kw)
    assert whole.strips == 1 and tiled.strips > 4
    assert tiled.peak_buffer_voxels < 0.5 * whole.peak_buffer_voxels
    assert whole.num_windows < tiled.num_windows <= 2 * whole.num_windows
    assert abs(tiled.probabilities - whole.probabilities).max() < 1e-5
    assert torch.equal(tiled.labels, whole.labels)
    # one network returning the members' outputs side by side: the same
    joined = slab_sliding_window(image, ROI, ModelEnsemble(parts), CLASSES, probabilities_in_memory=True,
                                 members=3, buffer_bytes=1, **kw)
    assert abs(joined.probabilities - tiled.probabilities).max() < 1e-6


def test_a_member_returning_its_window_does_not_change_what_the_next_member_sees() -> None:
    from medseg.inference.sliding import slab_sliding_window

    image = torch.randn(1, 2, 24, 20, 18, generator=torch.Generator().manual_seed(5))
    one = slab_sliding_window(image, ROI, lambda x: x, 2, probabilities_in_memory=True, sw_batch_size=1)
    two = slab_sliding_window(image, ROI, [lambda x: x, lambda x: x], 2, probabilities_in_memory=True,
                              sw_batch_size=1, members=2)
    assert abs(two.probabilities - one.probabilities).max() < 1e-6


def test_on_the_cpu_an_ensemble_gets_the_larger_default_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """One model sweeps within 96 MiB, an ensemble within 220 MiB (fewer strips, fewer windows run twice)."""
    from medseg.inference import sliding
    from medseg.inference.memory import DEFAULT_BUFFER_BYTES, DEFAULT_ENSEMBLE_BUFFER_BYTES

    budgets: list[int | None] = []
    plan_sweep = sliding.plan_sweep

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        budgets.append(args[4])
        return plan_sweep(*args, **kwargs)

    monkeypatch.setattr(sliding, "plan_sweep", spy)
    image = torch.randn(1, 1, 20, 20, 20)
    members = [_plain(1), _plain(2)]
    sliding.slab_sliding_window(image, ROI, members[0], CLASSES)
    sliding.slab_sliding_window(image, ROI, members, CLASSES, members=2)
    sliding.slab_sliding_window(image, ROI, members, CLASSES, members=2, buffer_bytes=1234)
    assert budgets == [DEFAULT_BUFFER_BYTES, DEFAULT_ENSEMBLE_BUFFER_BYTES, 1234]
    assert DEFAULT_ENSEMBLE_BUFFER_BYTES == 220 * 1024**2
