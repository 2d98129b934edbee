"""Training patch sampling and augmentation, built from MONAI transforms.

Two recipes: :func:`augmentation`, the one of plans made before the planner (``configuration``
``"custom"``), and :func:`planned_augmentation` for planned plans: nnU-Net v2's rules, or for short budgets
a light variant (:func:`light_augmentation`, the planner's choice: :mod:`medseg.planning.recipe`). The planned
one splits in two: :func:`sampling_preparation` (deterministic: pad to the enlarged patch, locate each
class's voxels; cached with the preprocessed case) and the random part (patch sampling with
:class:`ForegroundOversampled`, rotation and scaling, intensity augmentation, mirroring).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandAffineGrid,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    SpatialPadd,
)
from monai.transforms.utils import create_rotate
from monai.utils import convert_to_tensor, ensure_tuple

from medseg.plan import Plan
from medseg.transforms.cascade import PREVIOUS_KEY, AttachPreviousd, PerturbPreviousd

__all__ = ["ANISOTROPY", "FOREGROUND_FRACTION", "ForegroundOversampled", "SliceView", "SpatialAugmentation",
           "augmentation", "coarse_axis", "enlarged_patch", "light_augmentation", "nnunet_augmentation",
           "planned_augmentation", "rotation_range", "sampling_preparation"]

#: nnU-Net's oversample_foreground_percent: the share of patches centred on a foreground voxel.
FOREGROUND_FRACTION = 1 / 3
#: Target spacings whose largest / smallest ratio exceeds this are anisotropic: rotation and scaling in-plane.
ANISOTROPY = 3.0
#: Scaling range of the planned recipe (a factor above 1 samples a larger region: the content shrinks).
SCALING = (0.7, 1.4)
#: Probability of one rotation + scaling resampling: 1 - 0.8 ** 2 (nnU-Net: 0.2 each, independently).
SPATIAL_PROBABILITY = 0.36
#: Class voxels kept per class for foreground sampling (nnU-Net keeps 10,000).
CLASS_SAMPLES = 10_000
INDICES_KEY = "label_cls_indices"


def augmentation(plan: Plan, num_samples: int = 2) -> Compose:
    """The recipe of ``"custom"`` plans: random patch sampling balanced over classes (background
    included) plus augmentation: flips, small rotations and scaling, intensity scale/shift and Gaussian noise."""
    keys = ["image", "label"]
    dims = plan.dims
    rotate = (np.deg2rad(15),) * (3 if dims == 3 else 1)
    return Compose(
        [
            SpatialPadd(keys=keys, spatial_size=plan.patch_size),
            RandCropByLabelClassesd(
                keys=keys,
                label_key="label",
                spatial_size=plan.patch_size,
                num_classes=plan.num_classes,
                num_samples=num_samples,
                warn=False,
            ),
            RandAffined(
                keys=keys,
                prob=0.2,
                rotate_range=rotate,
                scale_range=(0.1,) * dims,
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            *[RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(dims)],
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandGaussianNoised(keys="image", prob=0.15, std=0.05),
            EnsureTyped(keys=keys, dtype=[torch.float32, torch.int64], track_meta=False),
        ]
    )


# ----------------------------------------------------------------------------- the planned recipe


def coarse_axis(plan: Plan) -> int | None:
    """The axis of an anisotropic 3D plan (largest / smallest target spacing above :data:`ANISOTROPY`)
    with the largest spacing, else None."""
    spacing = plan.target_spacing
    if plan.dims != 3 or max(spacing) / min(spacing) <= ANISOTROPY:
        return None
    return int(np.argmax(spacing))


def rotation_range(plan: Plan) -> tuple[float, ...]:
    """Rotation limits in radians per axis of MONAI's ``rotate_range`` (nnU-Net's rules): 3D ±30° about
    each axis; anisotropic 3D only about the coarse axis (in-plane), ±180°; 2D ±180°, or ±15° for a
    patch more than 1.5 times longer than wide."""
    if plan.dims == 2:
        elongated = max(plan.patch_size) / min(plan.patch_size) > 1.5
        return (math.radians(15 if elongated else 180),)
    coarse = coarse_axis(plan)
    if coarse is None:
        return (math.radians(30),) * 3
    return tuple(math.pi if axis == coarse else 0.0 for axis in range(3))


def _scaled_axes(plan: Plan) -> tuple[bool, ...]:
    coarse = coarse_axis(plan)
    return tuple(axis != coarse for axis in range(plan.dims))


def enlarged_patch(plan: Plan) -> tuple[int, ...]:
    """The region cropped before rotation and scaling so that the resampled patch comes from image
    content, not padding: the bounding box of the patch rotated within :func:`rotation_range`, times the
    largest scaling; each axis differs from the patch by an even number of voxels (the patch stays on
    the voxel grid when no resampling is drawn). A plan with a slice axis: its in-plane region, one
    slice thick."""
    flat = plan.slice_axis
    if flat is not None:
        region = list(enlarged_patch(plan.in_plane()))
        region.insert(flat, 1)
        return tuple(region)
    patch = np.asarray(plan.patch_size, dtype=float)
    limits = rotation_range(plan)
    steps = [np.linspace(-limit, limit, 9) if limit else np.zeros(1) for limit in limits]
    corners = np.array(list(itertools.product(*[(-s / 2, s / 2) for s in patch])))
    extent = patch.copy()
    for angles in itertools.product(*steps):
        rotation = np.asarray(create_rotate(plan.dims, angles if plan.dims == 3 else angles[0]))[:-1, :-1]
        extent = np.maximum(extent, 2 * np.abs(corners @ rotation.T).max(axis=0))
    scale = np.where(_scaled_axes(plan), SCALING[1], 1.0)
    size = np.ceil(extent * scale - 1e-6).astype(int)
    size += (size - patch.astype(int)) % 2
    return tuple(int(s) for s in size)


def sampling_preparation(plan: Plan) -> list[MapTransform]:
    """The deterministic end of the planned training chain (cached with the preprocessed case): up to
    10,000 voxels of each class of the label map (``label_cls_indices``)."""
    return [ClassesToIndicesd(keys="label", num_classes=plan.num_classes, max_samples_per_class=CLASS_SAMPLES)]


class ForegroundOversampled(Randomizable, MapTransform):
    """``num_samples`` crops of ``spatial_size`` from one case, for a patch of ``patch_size`` at their
    centre (the crop is larger when rotation and scaling follow, :func:`enlarged_patch`): each crop,
    with probability ``foreground``, is centred on a voxel of a foreground class drawn uniformly among
    the classes present in the case (the background and the ``exclude``\\ d values, such as an ignore
    label, are never drawn), else its patch lies at a uniformly random position inside the image (or
    covers an image smaller than the patch) -- nnU-Net's ``oversample_foreground_percent``, drawn per
    patch. A case without foreground gives random patches. Whatever a crop takes from outside the
    image is 0 (image and label).

    Why not MONAI's ``RandCropByLabelClassesd`` / ``RandSpatialCropd``: they move a crop that would
    leave the image back inside it, so a voxel near the border is no longer at the patch centre, and
    the border of a large image is never at the centre of a random patch.

    The class voxels come from ``indices_key`` (``ClassesToIndicesd``, flat indices of the label's
    spatial shape). A patch holds ``keys`` only: what else the case carries (the crop's foreground
    box, numpy arrays on a first load and tensors when read from the cache) would not batch.
    """

    def __init__(self, keys: KeysCollection, label_key: str, spatial_size: Sequence[int], num_classes: int,
                 foreground: float = FOREGROUND_FRACTION, num_samples: int = 1, indices_key: str = INDICES_KEY,
                 exclude: Sequence[int] = (), patch_size: Sequence[int] | None = None) -> None:
        MapTransform.__init__(self, keys)
        if not 0 <= foreground <= 1:
            raise ValueError(f"foreground must be a probability, got {foreground}")
        self.classes = [c for c in range(1, num_classes) if c not in exclude]
        self.label_key, self.size = label_key, tuple(int(s) for s in spatial_size)
        self.patch = tuple(int(s) for s in (patch_size or spatial_size))
        self.foreground, self.num_samples, self.indices_key = foreground, num_samples, indices_key

    def randomize(self, data: Any = None) -> None:
        pass  # each crop draws in __call__ (their number of draws depends on the case)

    def _start(self, shape: Sequence[int], indices: Sequence[Any]) -> list[int]:
        """The crop's first voxel per axis."""
        present = [c for c in self.classes if c < len(indices) and len(indices[c])]
        if present and self.R.rand() < self.foreground:
            voxels = indices[present[self.R.randint(len(present))]]
            flat = int(voxels[self.R.randint(len(voxels))])
            centre = np.unravel_index(flat, tuple(shape))
            return [int(c) - s // 2 for c, s in zip(centre, self.size)]
        starts = []
        for n, size, patch in zip(shape, self.size, self.patch):
            low, high = min(0, n - patch), max(0, n - patch)
            starts.append(int(self.R.randint(low, high + 1)) - (size - patch) // 2)
        return starts

    def _crop(self, value: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
        value = convert_to_tensor(value, track_meta=False)
        shape = value.shape[1:]
        slices = [slice(max(0, s), min(n, s + size)) for s, n, size in zip(start, shape, self.size)]
        cut = value[(slice(None), *slices)]
        pads: list[int] = []
        for s, n, size in reversed(list(zip(start, shape, self.size))):
            pads += [max(0, -s), max(0, s + size - n)]
        return torch.nn.functional.pad(cut, pads) if any(pads) else cut.clone()

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        indices = d.pop(self.indices_key, ())
        shape = tuple(d[self.label_key].shape[1:])
        patches = []
        for _ in range(self.num_samples):
            start = self._start(shape, indices)
            patches.append({key: self._crop(d[key], start) for key in self.key_iterator(d)})
        return patches


class _SynchronisedScaling(RandAffineGrid):
    """MONAI's random affine grid with one scaling factor for every scaled axis (nnU-Net scales
    isotropically); an axis whose range is 0 keeps the factor 1."""

    def randomize(self, data: Any | None = None) -> None:
        super().randomize(data)
        if self.scale_params:
            factor = next((p for p in self.scale_params if p != 1.0), 1.0)
            self.scale_params = [factor if r not in (0, 0.0, None) else 1.0 for r in self.scale_range]


class SpatialAugmentation(RandAffined):
    """Rotation and isotropic scaling in one resampling (MONAI's ``RandAffined`` with one scaling
    factor for all scaled axes), cutting the centred patch of ``spatial_size`` out of a larger crop;
    ``image`` linearly, any other key (label maps) by nearest neighbour."""

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], prob: float,
                 rotate_range: Sequence[float], scale_range: Sequence[tuple[float, float] | float]) -> None:
        modes = ["bilinear" if key == "image" else "nearest" for key in ensure_tuple(keys)]
        super().__init__(keys, spatial_size=spatial_size, prob=prob, rotate_range=rotate_range,
                         scale_range=scale_range, mode=modes, padding_mode="zeros")
        grid = self.rand_affine.rand_affine_grid
        self.rand_affine.rand_affine_grid = _SynchronisedScaling(rotate_range=rotate_range, scale_range=scale_range,
                                                                 device=grid.device)


class SliceView(MapTransform):
    """Drop (``squeeze=True``) or restore the slice axis ``axis`` (spatial, 0-based) of ``keys``: the transforms
    between two of them see 2D patches (the ``2d`` configuration of 3D data augments in-plane, as nnU-Net's)."""

    def __init__(self, keys: KeysCollection, axis: int, squeeze: bool) -> None:
        super().__init__(keys)
        self.axis, self.squeeze = int(axis), squeeze

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = convert_to_tensor(d[key], track_meta=False)
            d[key] = value.squeeze(1 + self.axis) if self.squeeze else value.unsqueeze(1 + self.axis)
        return d


def _keys(plan: Plan) -> list[str]:
    """The keys a patch carries: image and label, and a cascade stage's previous label map."""
    return ["image", "label"] + ([PREVIOUS_KEY] if plan.previous_stage else [])


def _chain(plan: Plan, num_samples: int, foreground: float, steps: list[Any]) -> Compose:
    """The planned chain: the patch sampling of ``plan``, then ``steps`` (built for :meth:`~medseg.plan.Plan.in_plane` of a plan
    with a slice axis: they run on the 2D patch between two :class:`SliceView` steps), then the dtypes. A cascade
    stage's previous label map goes through the spatial steps with the label, is perturbed
    (:class:`~medseg.transforms.cascade.PerturbPreviousd`) and ends as the image's last channel."""
    keys = _keys(plan)
    exclude = () if plan.ignore_label is None else (plan.ignore_label,)
    flat = plan.slice_axis
    if flat is not None:
        steps = [SliceView(keys, flat, squeeze=True), *steps, SliceView(keys, flat, squeeze=False)]
    end: list[Any] = [PerturbPreviousd(PREVIOUS_KEY), AttachPreviousd()] if plan.previous_stage else []
    return Compose([
        ForegroundOversampled(keys, "label", enlarged_patch(plan), plan.num_classes, foreground=foreground,
                              num_samples=num_samples, exclude=exclude, patch_size=plan.patch_size),
        *steps,
        *end,
        EnsureTyped(keys=["image", "label"], dtype=[torch.float32, torch.int64], track_meta=False),
    ])


def planned_augmentation(plan: Plan, num_samples: int = 1) -> Compose:
    """The random part of the planned training chain (after :func:`sampling_preparation`): the recipe the plan
    names in ``planning["augmentation"]["name"]`` (:func:`light_augmentation` for ``"light"``, the planner's
    choice for short budgets), else :func:`nnunet_augmentation`.

    Raises
    ------
    ValueError
        An unknown recipe name.
    """
    chosen = plan.planning.get("augmentation") or {}
    name = chosen.get("name", "nnunet") if isinstance(chosen, dict) else chosen
    if name == "light":
        return light_augmentation(plan, num_samples)
    if name != "nnunet":
        raise ValueError(f"plan.json: 'planning.augmentation.name' must be \"nnunet\" or \"light\", got {name!r}")
    return nnunet_augmentation(plan, num_samples)


def light_augmentation(plan: Plan, num_samples: int = 1) -> Compose:
    """The light recipe of short budgets: the planned sampling with two patches in three centred on a foreground
    class (as class-balanced as the default plan's), rotation up to 15 degrees (in-plane for anisotropic plans)
    and scaling 0.9-1.1 in one resampling (probability 0.2), mirroring, and the default plan's intensity
    augmentation (scale and shift by up to 10 %, p 0.5 each; Gaussian noise, p 0.15). A plan with a slice
    axis: all of it in-plane (:meth:`~medseg.plan.Plan.in_plane`)."""
    keys = _keys(plan)
    inner = plan.in_plane()
    dims = inner.dims
    limit = math.radians(15)
    coarse = coarse_axis(inner)
    rotation = (limit,) if dims == 2 else tuple(limit if coarse is None or axis == coarse else 0.0 for axis in range(3))
    scaling = [(-0.1, 0.1) if scaled else 0.0 for scaled in _scaled_axes(inner)]
    return _chain(plan, num_samples, 2 / 3, [
        SpatialAugmentation(keys, inner.patch_size, 0.2, rotation, scaling),
        *[RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(dims)],
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        RandGaussianNoised(keys="image", prob=0.15, std=0.05),
    ])


def nnunet_augmentation(plan: Plan, num_samples: int = 1) -> Compose:
    """nnU-Net v2's recipe, its parameters and probabilities:

    patches (:class:`ForegroundOversampled`, one third at foreground) of the :func:`enlarged_patch`;
    rotation (:func:`rotation_range`) and scaling 0.7-1.4 (in-plane for anisotropic plans) in one
    resampling to the patch (probability 0.36); Gaussian noise (variance up to 0.1, p 0.1); Gaussian
    blur (sigma 0.5-1, p 0.2); multiplicative brightness (0.75-1.25, p 0.15); contrast about the mean
    (0.75-1.25, range kept, p 0.15); low-resolution simulation (zoom 0.5-1, p 0.25); gamma 0.7-1.5 on
    the inverted image (p 0.1) and on the image (p 0.3), statistics kept; mirroring of every axis (p 0.5 each).
    A plan with a slice axis (nnU-Net's 2d configuration of 3D data): all of it in-plane, as for 2D data
    (:meth:`~medseg.plan.Plan.in_plane`).
    """
    keys = _keys(plan)
    inner = plan.in_plane()
    dims = inner.dims
    scaling = [(SCALING[0] - 1, SCALING[1] - 1) if scaled else 0.0 for scaled in _scaled_axes(inner)]
    sigma = (0.5, 1.0)
    return _chain(plan, num_samples, FOREGROUND_FRACTION, [
        SpatialAugmentation(keys, inner.patch_size, SPATIAL_PROBABILITY, rotation_range(inner), scaling),
        RandGaussianNoised(keys="image", prob=0.1, std=math.sqrt(0.1), sample_std=True),
        RandGaussianSmoothd(keys="image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.2),
        RandScaleIntensityd(keys="image", factors=0.25, prob=0.15, channel_wise=True),
        RandScaleIntensityFixedMeand(keys="image", factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15,
                                     channel_wise=True),
        RandSimulateLowResolutiond(keys="image", zoom_range=(0.5, 1.0), prob=0.25,
                                   upsample_mode="trilinear" if dims == 3 else "bilinear"),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), invert_image=True, retain_stats=True, prob=0.1),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), invert_image=False, retain_stats=True, prob=0.3),
        *[RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(dims)],
    ])
