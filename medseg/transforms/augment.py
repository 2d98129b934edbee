"""Training patch sampling and augmentation, built from MONAI transforms."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from medseg.plan import Plan

__all__ = ["augmentation"]


def augmentation(plan: Plan, num_samples: int = 2) -> Compose:
    """Random patch sampling balanced over classes (background included) plus augmentation:
    flips, small rotations and scaling, intensity scale/shift and Gaussian noise."""
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
