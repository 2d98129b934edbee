"""nnU-Net v2's export of a prediction, in bounded memory: class scores on the preprocessed grid -> the label map
on the input file's grid.

nnU-Net resamples the logits of every class to the cropped input grid (spline order 1, or with "separate z"
order 1 in-plane and nearest neighbour along the coarse axis), takes the argmax (regions: a positive logit),
puts the result into the uncropped volume (background outside the crop box) and transposes back. It holds
every class at the input's resolution: classes x voxels float32 (105 classes of 512 x 512 x 400: 44 GB).

:func:`export_label_map` computes the same labels slab by slab along the first axis: for a few output planes
it takes the input planes they interpolate from, resamples them along each axis (linear interpolation with
the edge value beyond the border, the coordinate ``(i + 0.5) x n_in / n_out - 0.5`` of scikit-image's
``resize`` that nnU-Net calls; the separate axis by its nearest plane) and reduces them to labels at once, so
memory holds one slab of classes, not the volume. The class scores are log-probabilities: they differ from the
logits by one value per voxel, the same for every class, which linear resampling keeps, so the argmax is the
logits' argmax (regions: the logit, from the sigmoid). A plans file asking for another spline order resamples
one class at a time with scikit-image instead (memory: two maps of the input grid).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from medseg.transforms.nnunet import (
    NnUNetPreprocessing,
    nearest_source,
    resample_to_shape,
    separate_axis,
    source_coordinates,
)

__all__ = ["SLAB_BYTES", "NnUNetExportd", "export_label_map"]

#: Bytes of float32 class scores one output slab may hold.
SLAB_BYTES = 64 * 1024**2
#: Smallest score kept for a zero probability (float32 log underflows to -inf).
_LOG_FLOOR = -80.0


def _scores(probabilities: Any, regions: bool) -> torch.Tensor:
    """Class scores (float32) from probabilities: log-probabilities for softmax classes, logits for regions."""
    p = torch.as_tensor(np.asarray(probabilities, dtype=np.float32))
    if regions:
        p = p.clamp(1e-7, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)
    return torch.log(p).clamp_min(_LOG_FLOOR)


def _axis_map(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index along one axis: the two input indices it interpolates linearly (the edge value
    beyond the border) and the second one's weight."""
    where = np.clip(source_coordinates(n_out, n_in), 0, n_in - 1)
    low = np.floor(where).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return torch.from_numpy(low), torch.from_numpy(high), torch.from_numpy((where - low).astype(np.float32))


def _along(x: torch.Tensor, dim: int, low: torch.Tensor, high: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at the given index pairs and weights."""
    shape = [1] * x.ndim
    shape[dim] = -1
    w = weight.view(shape)
    a = x.index_select(dim, low)
    if not bool(weight.any()):
        return a
    return torch.lerp(a, x.index_select(dim, high), w)


def _linear(block: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Linear interpolation of ``block`` along ``dim`` to ``size`` (PyTorch's, without corner alignment: the
    coordinates of :func:`~medseg.transforms.nnunet.source_coordinates`, the edge beyond the border)."""
    moved = block.movedim(dim, -1)
    lead = moved.shape[:-1]
    out = torch.nn.functional.interpolate(moved.reshape(-1, 1, moved.shape[-1]), size=int(size), mode="linear",
                                          align_corners=False)
    return out.reshape(*lead, int(size)).movedim(-1, dim)


def _in_plane(block: torch.Tensor, shape: Sequence[int], nearest: Sequence[bool]) -> torch.Tensor:
    """``(C, rows, *plane)`` resampled to ``(C, rows, *shape)`` along the plane's axes: the nearest-plane axes first
    (a gather, while the block is small), then the linear ones by PyTorch's interpolation without corner alignment
    (:func:`~medseg.transforms.nnunet.source_coordinates`, edge beyond the border): bilinear at once when both are."""
    for axis, is_nearest in enumerate(nearest):
        if is_nearest:
            index = torch.from_numpy(nearest_source(int(shape[axis]), int(block.shape[axis + 2])))
            block = block.index_select(axis + 2, index)
    linear = [axis for axis, is_nearest in enumerate(nearest) if not is_nearest]
    if len(linear) == 2:
        channels, rows = block.shape[:2]
        flat = block.reshape(channels * rows, 1, *block.shape[2:])
        out = torch.nn.functional.interpolate(flat, size=tuple(int(s) for s in shape), mode="bilinear",
                                              align_corners=False)
        return out.reshape(channels, rows, *out.shape[2:])
    for axis in linear:
        block = _linear(block, axis + 2, shape[axis])
    return block


def _argmax(block: torch.Tensor) -> torch.Tensor:
    """The first class of highest score per voxel (as ``argmax(0)``, in one contiguous pass per class: about three
    times faster on the CPU for a few classes over many voxels)."""
    best = block[0].clone()
    labels = torch.zeros(block.shape[1:], dtype=torch.int64)
    for channel in range(1, block.shape[0]):
        better = torch.gt(block[channel], best)
        torch.maximum(best, block[channel], out=best)
        labels.masked_fill_(better, channel)
    return labels


def _slab_labels(probabilities: Any, shape: Sequence[int], current: Sequence[float], original: Sequence[float],
                 config: NnUNetPreprocessing, dtype: type[np.integer[Any]]) -> np.ndarray:
    """Labels on ``shape`` from ``(C, *processed)`` probabilities, slab by slab along axis 0 (order-1 resampling)."""
    resampling = config.probability_resampling
    regions = config.regions
    channels = int(probabilities.shape[0])
    processed = tuple(int(s) for s in probabilities.shape[1:])
    separate = separate_axis(current, original, resampling.force_separate_z)
    nearest = [axis == separate and resampling.order_z == 0 for axis in range(len(shape))]
    if nearest[0]:
        index = torch.from_numpy(nearest_source(int(shape[0]), processed[0]))
        low0, high0, weight0 = index, index, torch.zeros(len(index), dtype=torch.float32)
    else:
        low0, high0, weight0 = _axis_map(int(shape[0]), processed[0])
    plane = math.prod(int(s) for s in shape[1:]) + math.prod(processed[1:])
    rows = max(1, SLAB_BYTES // max(1, 4 * channels * plane))
    labels = np.zeros(tuple(int(s) for s in shape), dtype=dtype)
    for start in range(0, int(shape[0]), rows):
        stop = min(int(shape[0]), start + rows)
        needed = torch.unique(torch.cat([low0[start:stop], high0[start:stop]]))
        first, last = int(needed.min()), int(needed.max()) + 1
        block = _scores(probabilities[:, first:last], bool(regions))
        block = _along(block, 1, low0[start:stop] - first, high0[start:stop] - first, weight0[start:stop])
        block = _in_plane(block, shape[1:], nearest[1:])
        if regions:
            out = torch.zeros(block.shape[1:], dtype=torch.int64)
            for channel, region in enumerate(regions):
                out[block[channel] > 0] = region.value
        else:
            out = _argmax(block)
        labels[start:stop] = out.numpy().astype(dtype)
    return labels


def _classwise_labels(probabilities: Any, shape: Sequence[int], current: Sequence[float], original: Sequence[float],
                      config: NnUNetPreprocessing, dtype: type[np.integer[Any]]) -> np.ndarray:
    """Labels on ``shape`` resampling one class at a time with scikit-image (any spline order)."""
    labels = np.zeros(tuple(int(s) for s in shape), dtype=dtype)
    best = None if config.regions else np.full(labels.shape, -np.inf, dtype=np.float32)
    for c in range(int(probabilities.shape[0])):
        score = _scores(probabilities[c][None], bool(config.regions)).numpy()
        score = resample_to_shape(score, shape, current, original, config.probability_resampling)[0]
        if best is None:
            labels[score > 0] = config.regions[c].value
        else:
            better = score > best
            best[better] = score[better]
            labels[better] = c
    return labels


def export_label_map(probabilities: Any, properties: Mapping[str, Any], config: NnUNetPreprocessing,
                     dtype: type[np.integer[Any]] = np.uint8) -> np.ndarray:
    """``(C, *processed)`` probabilities (softmax, or region sigmoids; an array, a memory map or a tensor) -> the
    label map ``(x, y, z)`` in the input file's voxel order, as nnU-Net exports it (see the module docstring)."""
    if isinstance(probabilities, torch.Tensor):
        probabilities = probabilities.detach().cpu().numpy()
    shape = tuple(int(s) for s in properties["shape_after_crop"])
    current, original = properties["target_spacing"], properties["spacing"]
    if config.probability_resampling.order == 1 or tuple(probabilities.shape[1:]) == shape:
        labels = _slab_labels(probabilities, shape, current, original, config, dtype)
    else:
        labels = _classwise_labels(probabilities, shape, current, original, config, dtype)
    full = np.zeros(properties["shape_before_crop"], dtype=dtype)
    full[tuple(slice(lo, hi) for lo, hi in properties["box"])] = labels
    full = np.transpose(full, config.transpose_backward)
    return np.ascontiguousarray(np.transpose(full, tuple(range(full.ndim - 1, -1, -1))))


class NnUNetExportd(MapTransform):
    """``keys`` (``(C, *processed)`` probabilities from the inferer, or a batch of one) -> the ``(1, x, y, z)``
    label map of :func:`export_label_map`, with the properties :class:`~medseg.transforms.nnunet.NnUNetPreprocessd`
    stored under ``properties_key``."""

    def __init__(self, keys: Any, config: NnUNetPreprocessing, properties_key: str = "nnunet",
                 dtype: str = "uint8") -> None:
        super().__init__(keys)
        self.config, self.properties_key, self.dtype = config, properties_key, np.dtype(dtype).type

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if array.ndim == len(self.config.transpose_forward) + 2:
                array = array[0]
            labels = export_label_map(array, d[self.properties_key], self.config, self.dtype)
            d[key] = torch.from_numpy(labels[None])
        return d
