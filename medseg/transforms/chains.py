"""CT and MR preprocessing chains, built from MONAI transforms only.

Deterministic part (cached during training, inverted after inference)::

    LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(target) -> CropForegroundd(body)
    -> intensity (CT: clip + z-score with dataset statistics; MR: per-image z-score on non-zero voxels)

Training adds patch sampling and augmentation (:mod:`medseg.transforms.augment`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from medseg.io.image import label_map_dtype
from medseg.io.reader import ImageFileReader, LoadImageFiled
from medseg.plan import Plan

__all__ = [
    "BodyMask",
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


def readers() -> list[ImageFileReader]:
    """The MONAI reader of medseg's image files: one, choosing nibabel (NIfTI) or SimpleITK by file ending."""
    return [ImageFileReader()]


def load_transforms(keys: Sequence[str]) -> list[MapTransform]:
    """Read with :class:`~medseg.io.reader.LoadImageFiled`: a bad file raises its InputError, not MONAI's
    try-every-reader RuntimeError."""
    return [
        LoadImageFiled(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
    ]


def spatial_transforms(plan: Plan, keys: Sequence[str]) -> list[MapTransform]:
    """Orientation to RAS and resampling to the plan's spacing (image bilinear, label nearest)."""
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [
        # the labels MONAI uses today, stated (its default changes in 1.8 and warns until then)
        Orientationd(keys=keys, axcodes=plan.axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=plan.target_spacing, mode=modes),
    ]


def crop_transforms(plan: Plan, keys: Sequence[str]) -> list[MapTransform]:
    """Crop to the body: above -500 HU for CT, above 5 % of the 99th percentile for MR."""
    threshold = -500.0 if plan.intensity.preset == "ct" else None
    return [CropForegroundd(keys=keys, source_key="image", select_fn=BodyMask(threshold), margin=2, allow_smaller=True)]


def intensity_transforms(plan: Plan) -> list[MapTransform]:
    """CT: clip to [a_min, a_max] HU and z-score with the training foreground statistics, in one
    linear ``ScaleIntensityRanged``. MR: ``NormalizeIntensityd`` on non-zero voxels."""
    it = plan.intensity
    if it.preset == "ct":
        assert it.a_min is not None and it.a_max is not None and it.mean is not None and it.std is not None
        return [
            ScaleIntensityRanged(
                keys="image",
                a_min=it.a_min,
                a_max=it.a_max,
                b_min=(it.a_min - it.mean) / it.std,
                b_max=(it.a_max - it.mean) / it.std,
                clip=True,
            )
        ]
    return [NormalizeIntensityd(keys="image", nonzero=True)]


def preprocessing(plan: Plan, keys: Sequence[str] = ("image",), crop: bool = True) -> Compose:
    """The deterministic chain for ``keys`` (``("image",)`` at inference, ``("image", "label")`` in training)."""
    keys = list(keys)
    chain: list[MapTransform] = load_transforms(keys) + spatial_transforms(plan, keys)
    if crop:
        chain += crop_transforms(plan, keys)
    chain += intensity_transforms(plan)
    label_type = getattr(torch, label_map_dtype(plan.num_classes - 1, torch_compatible=True).name)
    chain.append(EnsureTyped(keys=keys, dtype=[torch.float32 if k == "image" else label_type for k in keys]))
    return Compose(chain)
