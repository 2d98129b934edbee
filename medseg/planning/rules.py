"""nnU-Net's published planning rules, as pure functions of the dataset fingerprint: the target
spacing, the median image at that spacing, the first patch, one step of shrinking it, the batch size
and when a low-resolution configuration is needed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from medseg.architectures import plan_topology

__all__ = [
    "ANISOTROPY_THRESHOLD",
    "LOWRES_COVERAGE",
    "MAX_DATASET_COVERED",
    "MIN_BATCH",
    "batch_limit",
    "initial_patch",
    "needs_lowres",
    "resampled_median_shape",
    "shrink_patch",
    "target_spacing",
]

#: Data are anisotropic when the coarsest axis' spacing is more than this times the next coarsest.
ANISOTROPY_THRESHOLD = 3.0
#: A 3d_lowres configuration is planned when the full-resolution patch covers less than this part of
#: the median image (in voxels).
LOWRES_COVERAGE = 0.25
#: A batch covers at most this part of the dataset's voxels (but holds at least MIN_BATCH patches).
MAX_DATASET_COVERED = 0.05
MIN_BATCH = 2
#: The first patch has the volume of 256^3 (3D) or 2048^2 (2D) voxels before it is clipped to the median image.
INITIAL_EDGE = {3: 256, 2: 2048}


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """The full-resolution target spacing: the median spacing per axis, except for anisotropic data
    (the coarsest median spacing more than :data:`ANISOTROPY_THRESHOLD` times the next coarsest, and
    fewer voxels along that axis than that factor times fewer than along any other) where the coarse axis
    takes the 10th percentile of its spacings, yet no finer than the other axes.

    ``spacings`` and ``shapes`` hold one row per case (shapes after cropping to non-zero).
    """
    target: np.ndarray = np.percentile(spacings, 50, axis=0)
    median_shape: np.ndarray = np.percentile(shapes, 50, axis=0)
    if len(target) < 2:
        return target
    coarse = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != coarse]
    anisotropic_spacing = target[coarse] > ANISOTROPY_THRESHOLD * max(target[a] for a in others)
    few_slices = median_shape[coarse] * ANISOTROPY_THRESHOLD < min(median_shape[a] for a in others)
    if anisotropic_spacing and few_slices:
        low = float(np.percentile(spacings[:, coarse], 10))
        finest_allowed = max(target[a] for a in others)
        target[coarse] = low if low >= finest_allowed else finest_allowed + 1e-5
    return target


def resampled_median_shape(spacings: np.ndarray, shapes: np.ndarray, spacing: Sequence[float] | np.ndarray
                           ) -> np.ndarray:
    """The median of the cases' shapes (after cropping) resampled to ``spacing``."""
    resampled = np.round(shapes * spacings / np.asarray(spacing, float))
    median: np.ndarray = np.median(resampled, axis=0)
    return median


def initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> tuple[int, ...]:
    """The first patch: the aspect ratio of the spacing (an isotropic field of view in mm), scaled to
    :data:`INITIAL_EDGE` voxels per axis on average, clipped to the median image."""
    dims = len(spacing)
    inverse = 1.0 / np.asarray(spacing, float)
    scaled = inverse * (INITIAL_EDGE[dims] ** dims / float(np.prod(inverse))) ** (1.0 / dims)
    return tuple(int(max(1, min(round(p), round(m)))) for p, m in zip(scaled, median_shape, strict=True))


def shrink_patch(spacing: Sequence[float], patch: Sequence[int], median_shape: Sequence[float]) -> tuple[int, ...]:
    """One step down: the axis largest relative to the median image loses what the topology of the
    smaller patch needs it to be a multiple of, so no valid size is skipped (then padded again)."""
    axis = int(np.argmax([p / max(m, 1.0) for p, m in zip(patch, median_shape, strict=True)]))
    reduced = list(patch)
    trial = list(patch)
    trial[axis] -= plan_topology(spacing, patch).divisors[axis]
    step = plan_topology(spacing, [max(1, n) for n in trial]).divisors[axis]
    reduced[axis] = max(1, reduced[axis] - step)
    return plan_topology(spacing, reduced).patch_size


def batch_limit(patch: Sequence[int], dataset_voxels: float) -> int:
    """The most patches a batch may hold so that it covers at most :data:`MAX_DATASET_COVERED` of the
    dataset (never below :data:`MIN_BATCH`)."""
    return max(MIN_BATCH, round(dataset_voxels * MAX_DATASET_COVERED / math.prod(patch)))


def needs_lowres(patch: Sequence[int], median_shape: Sequence[float]) -> bool:
    """Whether the full-resolution patch covers less than :data:`LOWRES_COVERAGE` of the median image."""
    return math.prod(patch) / float(np.prod(median_shape)) < LOWRES_COVERAGE
