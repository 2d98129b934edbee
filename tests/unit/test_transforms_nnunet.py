"""nnU-Net's preprocessing and export numerics (medseg.transforms.nnunet) against direct computations of the same
rules; the end-to-end equality with nnUNetv2_predict is tests/integration/test_nnunet_equality.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.transform import resize

from medseg.labels import Region
from medseg.transforms.nnunet import (
    NnUNetPreprocessing,
    Resampling,
    crop_to_nonzero,
    new_shape,
    normalise_channel,
    resample_to_shape,
    separate_axis,
)
from medseg.transforms.nnunet_export import _classwise_labels, export_label_map


def test_separate_axis_follows_the_spacings() -> None:
    assert separate_axis((1, 1, 5), (1, 1, 1), None) == 2  # anisotropic input: its coarse axis
    assert separate_axis((1, 1, 1), (4, 1, 1), None) == 0  # else the target's
    assert separate_axis((1, 1, 2), (1, 1, 1), None) is None
    assert separate_axis((5, 5, 1), (1, 1, 1), None) is None  # two coarse axes: resampled in one go
    assert separate_axis((1, 1, 5), (1, 1, 1), False) is None


def test_separate_z_resampling_matches_the_in_plane_spline_then_nearest_along_z() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1, 7, 12, 10)).astype(np.float32)
    shape = (17, 9, 15)
    out = resample_to_shape(data, shape, (5.0, 1.0, 1.0), (2.0, 1.3, 0.7), Resampling(3, 0, None))
    # the reference: each slice across axis 0 by skimage (order 3, edge), then scipy map_coordinates order 0
    slices = np.stack([resize(data[0, i].astype(float), shape[1:], 3, mode="edge", anti_aliasing=False)
                       for i in range(7)])
    grid = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(float)
    grid[0] = 7 / shape[0] * (grid[0] + 0.5) - 0.5
    expected = ndimage.map_coordinates(slices, grid, order=0, mode="nearest")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected.astype(np.float32), rtol=0, atol=0)


def test_isotropic_resampling_is_one_spline_and_an_unchanged_shape_is_untouched() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2, 8, 9, 10)).astype(np.float32)
    out = resample_to_shape(data, (11, 7, 10), (1.0, 1.0, 1.0), (0.8, 1.2, 1.0), Resampling(1))
    np.testing.assert_allclose(out[1], resize(data[1].astype(float), (11, 7, 10), 1, mode="edge",
                                              anti_aliasing=False).astype(np.float32))
    assert resample_to_shape(data, (8, 9, 10), (1, 1, 1), (1, 1, 1), Resampling(3)) is data
    assert new_shape((100, 51, 7), (0.8, 1.0, 5.0), (1.0, 1.0, 2.5)) == (80, 51, 14)


def test_crop_to_nonzero_fills_holes_and_spans_every_channel() -> None:
    data = np.zeros((2, 10, 10, 10), np.float32)
    data[0, 2:6, 3:7, 4:8] = 1
    data[0, 3:5, 4:6, 5:7] = 0  # a hole inside: part of the mask
    data[1, 8, 8, 8] = 5
    cropped, mask, box = crop_to_nonzero(data)
    assert box == ((2, 9), (3, 9), (4, 9)) and cropped.shape == (2, 7, 6, 5)
    assert mask is not None and mask[1:3, 1:3, 1:3].all() and not mask[-1, 0, 0]
    assert crop_to_nonzero(data, need_mask=False)[1] is None


def test_holes_filled_in_the_box_are_the_holes_of_the_image() -> None:
    """nnU-Net fills the holes of the whole image's mask; filling them in the box gives the same mask."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        data = (rng.random((1, 14, 13, 12)) < 0.55).astype(np.float32)
        data[:, :2] = 0
        _, mask, box = crop_to_nonzero(data)
        expected = ndimage.binary_fill_holes(data[0] != 0)[tuple(slice(lo, hi) for lo, hi in box)]
        assert mask is not None and np.array_equal(mask, expected)


@pytest.mark.parametrize("scheme", ["CTNormalization", "ZScoreNormalization", "RescaleTo01Normalization"])
def test_normalisations(scheme: str) -> None:
    rng = np.random.default_rng(2)
    image = rng.normal(100, 30, (6, 6, 6)).astype(np.float32)
    props = {"mean": 90.0, "std": 20.0, "percentile_00_5": 40.0, "percentile_99_5": 150.0}
    out = normalise_channel(image.copy(), scheme, False, np.ones_like(image, bool), props)
    if scheme == "CTNormalization":
        expected = (np.clip(image, 40, 150) - 90) / 20
    elif scheme == "ZScoreNormalization":
        expected = (image - image.mean()) / image.std()
    else:
        expected = (image - image.min()) / (image.max() - image.min())
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown normalization"):
        normalise_channel(image, "Custom", False, np.ones_like(image, bool), props)


def test_export_one_class_at_a_time_equals_the_argmax_of_all_logits_resampled_together() -> None:
    """nnU-Net resamples the logits of every class (order 1), then argmax; medseg resamples log-probabilities one
    class at a time with a running maximum: the same labels."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 6, 8, 7)).astype(np.float32) * 3
    probabilities = torch.softmax(torch.from_numpy(logits), 0).numpy()
    config = NnUNetPreprocessing((2, 0, 1), (1, 2, 0), (2.0, 1.0, 1.0), (4, 4, 4), ("CTNormalization",), (False,),
                                 ({},), Resampling(3), Resampling(1))
    properties = {"shape_after_crop": (9, 11, 12), "shape_before_crop": (12, 13, 15), "box": ((1, 10), (2, 13), (0, 12)),
                  "target_spacing": (2.0, 1.0, 1.0), "spacing": (1.3, 0.7, 0.6)}
    labels = export_label_map(probabilities, properties, config)
    resampled = resample_to_shape(logits, (9, 11, 12), (2.0, 1.0, 1.0), (1.3, 0.7, 0.6), Resampling(1))
    expected = np.zeros((12, 13, 15), np.uint8)
    expected[1:10, 2:13, 0:12] = resampled.argmax(0)
    expected = np.transpose(expected, (1, 2, 0)).transpose(2, 1, 0)  # transpose_backward, then the file's order
    assert labels.shape == expected.shape
    assert (labels == expected).mean() > 0.999


@pytest.mark.parametrize(("processed", "target", "original", "separate"), [
    ((6, 8, 7), (2.0, 1.0, 1.0), (1.3, 0.7, 0.6), None),
    ((5, 9, 8), (4.0, 1.0, 1.0), (1.1, 0.8, 0.9), 0),  # anisotropic target: nearest along axis 0
    ((7, 10, 6), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), None),  # same grid: no resampling
    ((8, 9, 5), (1.0, 1.0, 4.0), (0.9, 0.8, 1.1), 2),  # the coarse axis in the plane of the slabs
])
@pytest.mark.parametrize("regions", [False, True])
def test_slab_export_equals_scikit_image_class_by_class(monkeypatch: pytest.MonkeyPatch, processed: tuple[int, ...],
                                                        target: tuple[float, ...], original: tuple[float, ...],
                                                        separate: int | None, regions: bool) -> None:
    """The slab export (torch, a few planes at a time) gives scikit-image's labels, also with slabs of one plane."""
    import medseg.transforms.nnunet_export as export

    assert separate_axis(target, original, None) == separate
    rng = np.random.default_rng(4)
    logits = torch.from_numpy(rng.normal(size=(3, *processed)).astype(np.float32) * 3)
    probabilities = (torch.sigmoid(logits) if regions else torch.softmax(logits, 0)).numpy()
    shape = new_shape(processed, target, original)
    config = NnUNetPreprocessing((0, 1, 2), (0, 1, 2), target, (4, 4, 4), ("CTNormalization",), (False,), ({},),
                                 Resampling(3), Resampling(1),
                                 tuple(Region(f"r{i}", (i + 1,), i + 1) for i in range(3)) if regions else ())
    expected = _classwise_labels(probabilities, shape, target, original, config, np.uint8)
    for slab_bytes in (export.SLAB_BYTES, 1):
        monkeypatch.setattr(export, "SLAB_BYTES", slab_bytes)
        labels = export._slab_labels(probabilities, shape, target, original, config, np.uint8)
        assert (labels == expected).mean() >= 0.9999
