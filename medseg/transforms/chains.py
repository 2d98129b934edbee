"""CT and MR preprocessing chains, built from MONAI transforms only.

Deterministic part (cached during training, inverted after inference)::

    LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(target) -> CropForegroundd(body)
    -> intensity (CT: clip + z-score with dataset statistics; MR: per-image z-score on non-zero voxels)

A plan with several input channels (``plan.channels``) reads one file per channel into one
``(C, *spatial)`` image (MONAI's ``LoadImaged`` stacks a list of files; the reader refuses channels on
different grids), so orientation, resampling and crop apply to all channels together; the body is the
union of each channel's body (each judged by its own preset), and each channel is normalised by its own
:class:`~medseg.plan.Intensity` (:class:`ChannelIntensityd`). A one-channel plan builds the same chain as before.

Training adds patch sampling and augmentation (:mod:`medseg.transforms.augment`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacingd,
)

from medseg.errors import InputError
from medseg.io.image import label_map_dtype
from medseg.io.reader import ImageFileReader, LoadImageFiled
from medseg.plan import Intensity, Plan
from medseg.transforms.cascade import PREVIOUS_KEY, AttachPreviousd, RequirePreviousd

__all__ = [
    "BodyMask",
    "ChannelBodyMask",
    "ChannelIntensityd",
    "RequireChannelsd",
    "crop_transforms",
    "intensity_transforms",
    "load_transforms",
    "preprocessing",
    "readers",
    "spatial_transforms",
]


class BodyMask:
    """Foreground (body) selector for ``CropForegroundd``: voxels above ``threshold``.

    For MR (``threshold=None``) the threshold is 5 % of the image's 99th percentile.
    A class rather than a lambda so it pickles into DataLoader workers and bundle configs.
    """

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = threshold

    def __call__(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if self.threshold is not None:
            return image > self.threshold
        values = torch.as_tensor(image, dtype=torch.float32).flatten()
        if values.numel() > 1_000_000:
            values = values[:: values.numel() // 1_000_000 + 1]
        top = torch.quantile(values, 0.99)
        return image > 0.05 * float(top)


class ChannelBodyMask:
    """Foreground (body) of a multi-channel image for ``CropForegroundd``: the union over channels of each
    channel's :class:`BodyMask` (``thresholds``: one per channel, as :class:`BodyMask` takes it), so that
    a channel with another intensity scale (CT in HU beside MR) is judged by its own rule.

    Raises
    ------
    ValueError
        From ``__call__``: an image with another number of channels than ``thresholds``.
    """

    def __init__(self, thresholds: Sequence[float | None]) -> None:
        self.masks = [BodyMask(t) for t in thresholds]

    def __call__(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if image.shape[0] != len(self.masks):
            raise ValueError(f"{len(self.masks)} channels expected, got an image of shape {tuple(image.shape)}")
        union = self.masks[0](image[0:1])
        for channel, mask in enumerate(self.masks[1:], 1):
            union = union | mask(image[channel : channel + 1])
        return union


class ChannelIntensityd(MapTransform):
    """Normalise each channel of ``keys`` with its own transform (``transforms[c]`` takes the ``(1, *spatial)``
    channel ``c``), e.g. a CT channel clipped and z-scored with its dataset statistics beside an MR channel
    z-scored on its own non-zero voxels. The metadata and the record of applied transforms are kept.

    Raises
    ------
    ValueError
        From ``__call__``: an image with another number of channels than ``transforms``.
    """

    def __init__(self, keys: Any, transforms: Sequence[Callable[[torch.Tensor], Any]],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transforms = list(transforms)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.transforms):
                raise ValueError(f"{key}: {len(self.transforms)} channels expected, got shape {tuple(image.shape)}")
            plain = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image)
            values = torch.cat([torch.as_tensor(t(plain[c : c + 1])) for c, t in enumerate(self.transforms)])
            d[key] = (MetaTensor(values, meta=image.meta, applied_operations=image.applied_operations)
                      if isinstance(image, MetaTensor) else values)
        return d


class RequireChannelsd(MapTransform):
    """Refuse an image of ``keys`` with another number of channels than ``channels`` (e.g. one file given
    to a two-channel model), naming its (first) file.

    Raises
    ------
    InputError
        From ``__call__``: the wrong number of channels.
    """

    def __init__(self, keys: Any, channels: int) -> None:
        super().__init__(keys)
        self.channels = int(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            got = int(d[key].shape[0])
            if got != self.channels:
                source = d[key].meta.get("filename_or_obj") if isinstance(d[key], MetaTensor) else None
                raise InputError(source or None, f"{got} channel(s) read, the model takes {self.channels} "
                                                 "(one file per channel)")
        return d


def readers() -> list[ImageFileReader]:
    """The MONAI reader of medseg's image files: one, choosing nibabel (NIfTI) or SimpleITK by file ending."""
    return [ImageFileReader()]


def load_transforms(keys: Sequence[str], channels: int = 1) -> list[MapTransform]:
    """Read with :class:`~medseg.io.reader.LoadImageFiled`: a bad file raises its InputError, not MONAI's
    try-every-reader RuntimeError. With ``channels`` > 1, ``"image"`` holds one file per channel, stacked
    into the first axis as read (channels on different grids are refused by the reader); every other key
    (the label map) and a one-channel image get a channel axis; an image of another channel count is
    refused (:class:`RequireChannelsd`)."""
    keys = list(keys)
    stacked = ["image"] if channels > 1 and "image" in keys else []
    single = [k for k in keys if k not in stacked]
    chain: list[MapTransform] = [LoadImageFiled(keys=keys, image_only=True)]
    if single:
        chain.append(EnsureChannelFirstd(keys=single, channel_dim="no_channel"))
    if stacked:
        chain.append(EnsureChannelFirstd(keys=stacked))  # from the reader: 0 if stacked, else none (one file)
        chain.append(RequireChannelsd(keys=stacked, channels=channels))
    return chain


def spatial_transforms(plan: Plan, keys: Sequence[str]) -> list[MapTransform]:
    """Orientation to RAS and resampling to the plan's spacing (image bilinear, label nearest)."""
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [
        # the labels MONAI uses today, stated (its default changes in 1.8 and warns until then)
        Orientationd(keys=keys, axcodes=plan.axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=plan.target_spacing, mode=modes),
    ]


def _body_threshold(intensity: Intensity) -> float | None:
    return -500.0 if intensity.preset == "ct" else None


def crop_transforms(plan: Plan, keys: Sequence[str]) -> list[MapTransform]:
    """Crop to the body: above -500 HU for CT, above 5 % of the 99th percentile for MR; with several
    channels, the union of each channel's body (:class:`ChannelBodyMask`)."""
    channels = plan.input_channels
    select: BodyMask | ChannelBodyMask = (BodyMask(_body_threshold(plan.intensity)) if len(channels) == 1
                                          else ChannelBodyMask([_body_threshold(c.intensity) for c in channels]))
    return [CropForegroundd(keys=keys, source_key="image", select_fn=select, margin=2, allow_smaller=True)]


def _ct_range(it: Intensity) -> tuple[float, float, float, float]:
    """``ScaleIntensityRange``'s ``a_min, a_max, b_min, b_max``: clip to [a_min, a_max] HU and z-score with
    mean and std, in one linear map."""
    assert it.a_min is not None and it.a_max is not None and it.mean is not None and it.std is not None
    return it.a_min, it.a_max, (it.a_min - it.mean) / it.std, (it.a_max - it.mean) / it.std


def intensity_transforms(plan: Plan) -> list[MapTransform]:
    """CT: clip to [a_min, a_max] HU and z-score with the training foreground statistics, in one
    linear ``ScaleIntensityRanged``. MR: ``NormalizeIntensityd`` on non-zero voxels. With several channels,
    each channel by its own :class:`~medseg.plan.Intensity` (:class:`ChannelIntensityd`): a CT channel with
    its own statistics, an MR channel on its own non-zero voxels."""
    channels = plan.input_channels
    if len(channels) > 1:
        per_channel = [ScaleIntensityRange(*_ct_range(c.intensity), clip=True) if c.intensity.preset == "ct"
                       else NormalizeIntensity(nonzero=True) for c in channels]
        return [ChannelIntensityd(keys="image", transforms=per_channel)]
    if plan.intensity.preset == "ct":
        a_min, a_max, b_min, b_max = _ct_range(plan.intensity)
        return [ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True)]
    return [NormalizeIntensityd(keys="image", nonzero=True)]


def preprocessing(plan: Plan, keys: Sequence[str] = ("image",), crop: bool = True, attach: bool = True) -> Compose:
    """The deterministic chain for ``keys`` (``("image",)`` at inference, ``("image", "label")`` in training);
    ``"image"`` holds one file (or image in memory) per input channel of the plan, a one-channel image may be
    given as itself. Bad files raise their :class:`~medseg.errors.InputError` (inside ``Compose``, as the
    ``__cause__`` of MONAI's error), channels on different grids included.

    A cascade stage's plan (:attr:`~medseg.plan.Plan.previous_stage`) also reads ``"previous"``, the previous
    stage's label map of the image, treated as the label map is (nearest neighbour), and with ``attach`` ends by
    appending it to the image as its last channel (:class:`~medseg.transforms.cascade.AttachPreviousd`; training
    attaches it after augmentation)."""
    keys = list(keys)
    if plan.previous_stage and PREVIOUS_KEY not in keys:
        keys.append(PREVIOUS_KEY)
    chain: list[MapTransform] = [RequirePreviousd()] if plan.previous_stage else []
    chain += load_transforms(keys, plan.num_channels) + spatial_transforms(plan, keys)
    if crop:
        chain += crop_transforms(plan, keys)
    chain += intensity_transforms(plan)
    largest = max(plan.num_classes - 1, plan.ignore_label or 0)  # the ignore label may lie above the classes
    label_type = getattr(torch, label_map_dtype(largest, torch_compatible=True).name)
    chain.append(EnsureTyped(keys=keys, dtype=[torch.float32 if k == "image" else label_type for k in keys]))
    if plan.previous_stage and attach:
        chain.append(AttachPreviousd())
    return Compose(chain)
