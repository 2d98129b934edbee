"""nnU-Net v2's preprocessing and export, for models imported from nnU-Net (``medseg bundle import-nnunet``).

An imported model must see its inputs exactly as nnU-Net prepared its training data, so this chain does
what ``nnUNetv2_predict`` does, in its order and with its numerics, instead of medseg's RAS chain:

1. the image in SimpleITK's array order (``(z, y, x)``: the file's voxel axes reversed) and spacing, then
   the plans' ``transpose_forward``;
2. crop to the bounding box of the non-zero voxels of any channel (holes filled);
3. per-channel normalisation from the plans: ``CTNormalization`` (clip to the foreground's 0.5-99.5th
   percentiles, z-score with its mean and std), ``ZScoreNormalization`` (per image; inside the non-zero
   mask when ``use_mask_for_norm``), ``NoNormalization``, ``RescaleTo01Normalization``, ``RGBTo01Normalization``;
4. resampling to the configuration's spacing (shape rounded as nnU-Net does): spline order 3 (scikit-image
   ``resize``, edge mode, no anti-aliasing); when the spacing is anisotropic (largest / smallest > 3) in-plane
   slice by slice and along the coarse axis by nearest neighbour ("separate z").

The export that undoes it is :mod:`medseg.transforms.nnunet_export`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from medseg.labels import Region

__all__ = ["ANISOTROPY", "NORMALIZATIONS", "NnUNetPreprocessd", "NnUNetPreprocessing", "Resampling", "crop_to_nonzero",
           "nearest_source", "new_shape", "normalise_channel", "resample_to_shape", "separate_axis", "source_coordinates"]

#: nnU-Net's ANISO_THRESHOLD: a spacing whose largest / smallest exceeds it is resampled with "separate z".
ANISOTROPY = 3.0
#: The normalisation schemes of nnU-Net's default preprocessing (the plans' ``normalization_schemes``).
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                  "RGBTo01Normalization")


@dataclass(frozen=True)
class Resampling:
    """One of the plans' ``resampling_fn_*_kwargs``: spline ``order``, ``order_z`` along a coarse axis,
    ``force_separate_z`` (None: decide from the spacings)."""

    order: int
    order_z: int = 0
    force_separate_z: bool | None = None


@dataclass(frozen=True)
class NnUNetPreprocessing:
    """What a configuration of nnU-Net's plans needs to preprocess and export (all in nnU-Net's axis order,
    after ``transpose_forward``)."""

    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    normalization: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity: tuple[Mapping[str, float], ...]
    data_resampling: Resampling
    probability_resampling: Resampling
    regions: tuple[Region, ...] = field(default=())


def separate_axis(current: Sequence[float], new: Sequence[float], force: bool | None) -> int | None:
    """The axis resampled separately (nearest neighbour along it, in-plane spline), nnU-Net's rule: the
    coarsest axis of the current spacing if it is anisotropic, else of the new one; None if neither is (or
    ``force`` is False), or if the coarsest spacing is shared by two or more axes."""
    def coarse(spacing: Sequence[float]) -> list[int]:
        values = np.asarray(spacing, dtype=float)
        return [int(a) for a in np.where(values.max() / values == 1)[0]]

    if force is False:
        return None
    if force or max(current) / min(current) > ANISOTROPY:
        axes = coarse(current)
    elif max(new) / min(new) > ANISOTROPY:
        axes = coarse(new)
    else:
        return None
    return axes[0] if len(axes) == 1 else None


def source_coordinates(n_out: int, n_in: int) -> np.ndarray:
    """Where each of ``n_out`` output voxels samples an axis of ``n_in`` voxels: ``(i + 0.5) x n_in / n_out - 0.5``
    (scikit-image's ``resize`` and nnU-Net's ``map_coordinates`` along a separate axis)."""
    return (np.arange(n_out) + 0.5) * n_in / n_out - 0.5


def nearest_source(n_out: int, n_in: int) -> np.ndarray:
    """The input index nearest to each :func:`source_coordinates` (scipy's order-0 rule: halves rounded up; the
    edge beyond the border)."""
    return np.clip(np.floor(source_coordinates(n_out, n_in) + 0.5), 0, n_in - 1).astype(np.int64)


def _resize(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    from skimage.transform import resize

    resized: np.ndarray = resize(volume, tuple(int(s) for s in shape), order, mode="edge", anti_aliasing=False)
    return resized


def _resample_channel(volume: np.ndarray, shape: Sequence[int], axis: int | None, order: int, order_z: int) -> np.ndarray:
    """One channel (float64) to ``shape``: in one go, or slice by slice across ``axis`` and then along it."""
    if axis is None:
        return _resize(volume, shape, order)
    plane = [s for a, s in enumerate(shape) if a != axis]
    moved = np.moveaxis(volume, axis, 0)
    slices = np.stack([_resize(moved[i], plane, order) for i in range(moved.shape[0])])
    if slices.shape[0] != shape[axis]:
        # along the coarse axis: nnU-Net's map_coordinates at source_coordinates, mode nearest
        if order_z == 0:
            slices = slices[nearest_source(shape[axis], slices.shape[0])]
        else:
            where = source_coordinates(shape[axis], slices.shape[0])
            grid = np.meshgrid(where, *[np.arange(n, dtype=float) for n in slices.shape[1:]], indexing="ij")
            slices = ndimage.map_coordinates(slices, np.stack(grid), order=order_z, mode="nearest")  # type: ignore[call-overload]
    return np.moveaxis(slices, 0, axis)


def resample_to_shape(data: np.ndarray, shape: Sequence[int], current: Sequence[float], new: Sequence[float],
                      resampling: Resampling) -> np.ndarray:
    """``(C, *spatial)`` -> ``(C, *shape)`` as nnU-Net's ``resample_data_or_seg_to_shape`` resamples
    images and class scores (computed in float64, returned in ``data``'s dtype; unchanged if the shape is)."""
    shape = tuple(int(s) for s in shape)
    if tuple(data.shape[1:]) == shape:
        return data
    axis = separate_axis(current, new, resampling.force_separate_z)
    out = np.empty((data.shape[0], *shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        out[c] = _resample_channel(data[c].astype(float), shape, axis, resampling.order, resampling.order_z)
    return out


def new_shape(shape: Sequence[int], current: Sequence[float], new: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: each axis ``round(spacing / new spacing * size)``."""
    return tuple(int(round(c / n * s)) for s, c, n in zip(shape, current, new))


def crop_to_nonzero(data: np.ndarray, need_mask: bool = True) -> tuple[np.ndarray, np.ndarray | None,
                                                                         tuple[tuple[int, ...], ...]]:
    """``(C, *spatial)`` -> the box of voxels non-zero in any channel, the non-zero mask in that box with its holes
    filled (nnU-Net's, for ``use_mask_for_norm``; None without ``need_mask``), and the box (start, stop) per axis.
    An image without non-zero voxels keeps its whole extent.

    The box is taken before the holes are filled (filling never reaches past it) and the holes are filled in the
    box only: a background voxel on the box's faces reaches the image border through the background outside it,
    so the holes inside the box are the image's holes, at a fraction of the cost.
    """
    mask = np.any(data != 0, axis=0)
    found = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
             for axis in range(mask.ndim)]
    if any(f.size == 0 for f in found):
        box: tuple[tuple[int, ...], ...] = tuple((0, int(n)) for n in mask.shape)
    else:
        box = tuple((int(f[0]), int(f[-1]) + 1) for f in found)
    region = tuple(slice(lo, hi) for lo, hi in box)
    filled = ndimage.binary_fill_holes(mask[region]) if need_mask else None
    return data[(slice(None), *region)], filled, box


def normalise_channel(image: np.ndarray, scheme: str, use_mask: bool, mask: np.ndarray | None,
                      properties: Mapping[str, float]) -> np.ndarray:
    """One float32 channel normalised by nnU-Net's ``scheme`` (:data:`NORMALIZATIONS`), in place where it can
    (``mask``: the filled non-zero mask, needed with ``use_mask``).

    Raises
    ------
    ValueError
        An unknown scheme, RGB values outside 0-255, or ``use_mask`` without a mask.
    """
    image = image.astype(np.float32, copy=False)
    eps = 1e-8
    if scheme == "CTNormalization":
        np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"], out=image)
        image -= properties["mean"]
        image /= max(properties["std"], eps)
    elif scheme == "ZScoreNormalization":
        if use_mask:
            if mask is None:
                raise ValueError("use_mask_for_norm needs the non-zero mask")
            values = image[mask]
            mean, std = values.mean(), values.std()
            image[mask] = (image[mask] - mean) / max(std, eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    elif scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            raise ValueError("RGBTo01Normalization needs values in 0-255")
        image /= 255.0
    elif scheme != "NoNormalization":
        raise ValueError(f"unknown normalization scheme {scheme!r}")
    return image


def _file_spacing(affine: np.ndarray, dims: int) -> tuple[float, ...]:
    """Voxel spacing per axis of the file's voxel order from its affine."""
    return tuple(float(np.linalg.norm(np.asarray(affine)[:dims, a])) for a in range(dims))


class NnUNetPreprocessd(MapTransform):
    """``keys`` (``(C, x, y, z)`` as medseg reads it, with its affine) -> nnU-Net's preprocessed array
    ``(C, *spatial)`` float32 (see the module docstring); what the export needs is stored under
    ``properties_key``.

    Raises
    ------
    ValueError
        An image of other dimensions than the configuration's, or a normalisation that cannot apply.
    """

    def __init__(self, keys: Any, config: NnUNetPreprocessing, properties_key: str = "nnunet") -> None:
        super().__init__(keys)
        self.config, self.properties_key = config, properties_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        config = self.config
        for key in self.key_iterator(d):
            image = d[key]
            array = np.asarray(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image,
                               dtype=np.float32)
            dims = array.ndim - 1
            if dims != len(config.transpose_forward):
                raise ValueError(f"the model takes {len(config.transpose_forward)}D images, got {dims}D")
            affine = getattr(image, "affine", None)
            affine = np.eye(dims + 1) if affine is None else np.asarray(affine)
            spacing_file = _file_spacing(affine, dims)
            # SimpleITK's order: the file's voxel axes reversed; then the plans' transpose (views: the crop copies)
            array = np.transpose(array, (0, *range(dims, 0, -1)))
            spacing = tuple(spacing_file[::-1][a] for a in config.transpose_forward)
            array = np.transpose(array, (0, *[a + 1 for a in config.transpose_forward]))
            shape_before_crop = tuple(array.shape[1:])
            array, mask, box = crop_to_nonzero(array, need_mask=any(config.use_mask_for_norm))
            array = np.array(array, dtype=np.float32, order="C")
            for c in range(array.shape[0]):
                array[c] = normalise_channel(array[c], config.normalization[c], config.use_mask_for_norm[c], mask,
                                             config.intensity[c])
            target = config.spacing if len(config.spacing) == dims else (spacing[0], *config.spacing)
            shape_after_crop = tuple(array.shape[1:])
            array = resample_to_shape(array, new_shape(shape_after_crop, spacing, target), spacing, target,
                                      config.data_resampling)
            processed = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            # the input's metadata stays with it (its file name names the output); its affine is the input's
            d[key] = MetaTensor(processed, meta=dict(image.meta)) if isinstance(image, MetaTensor) else processed
            d[self.properties_key] = {"spacing": spacing, "target_spacing": target, "box": box,
                                      "shape_before_crop": shape_before_crop, "shape_after_crop": shape_after_crop,
                                      "dims": dims}
        return d
