"""nnU-Net's spacing, patch and batch rules."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.planning.rules import batch_limit, initial_patch, needs_lowres, resampled_median_shape, target_spacing


def test_target_spacing_is_the_median() -> None:
    spacings = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.5], [3.0, 3.0, 2.0]])
    shapes = np.array([[100, 100, 100]] * 3)
    assert target_spacing(spacings, shapes).tolist() == [2.0, 2.0, 2.0]


def test_anisotropic_data_take_the_tenth_percentile_of_the_coarse_axis() -> None:
    spacings = np.array([[0.8, 0.8, 5.0], [0.8, 0.8, 4.0], [0.8, 0.8, 6.0], [0.8, 0.8, 2.5]])
    few_slices = np.array([[400, 400, 30]] * 4)
    assert target_spacing(spacings, few_slices) == pytest.approx([0.8, 0.8, np.percentile([5, 4, 6, 2.5], 10)])
    many_slices = np.array([[400, 400, 400]] * 4)  # anisotropic spacing, but as many voxels: the median
    assert target_spacing(spacings, many_slices) == pytest.approx([0.8, 0.8, 4.5])


def test_the_coarse_axis_never_gets_finer_than_the_others() -> None:
    spacings = np.array([[1.0, 1.0, 5.0], [1.0, 1.0, 4.0], [1.0, 1.0, 6.0], [1.0, 1.0, 0.3], [1.0, 1.0, 0.3]])
    target = target_spacing(spacings, np.array([[400, 400, 30]] * 5))  # 10th percentile 0.3: raised to 1 mm
    assert target[2] == pytest.approx(1.0, abs=1e-4) and target[2] > 1.0


def test_median_shape_first_patch_batch_and_lowres_rules() -> None:
    spacings, shapes = np.array([[1.0, 1.0, 2.0], [0.5, 0.5, 2.0]]), np.array([[100, 100, 50], [200, 200, 50]])
    assert resampled_median_shape(spacings, shapes, (1.0, 1.0, 1.0)).tolist() == [100, 100, 100]
    patch = initial_patch((1.0, 1.0, 2.0), (1000, 1000, 1000))  # the spacing's aspect ratio, 256^3 voxels
    assert patch[0] == patch[1] == pytest.approx(2 * patch[2], abs=1) and np.prod(patch) == pytest.approx(256**3, rel=0.01)
    assert initial_patch((1.0, 1.0, 1.0), (90, 300, 40)) == (90, 256, 40)  # clipped to the median image
    assert batch_limit((64, 64, 64), 100 * 64**3) == 5 and batch_limit((64, 64, 64), 64**3) == 2
    assert needs_lowres((128, 128, 128), (512, 512, 400)) and not needs_lowres((96, 96, 48), (96, 96, 45))
