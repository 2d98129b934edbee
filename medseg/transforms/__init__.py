"""MONAI transform chains of a plan: preprocessing (:mod:`~medseg.transforms.chains`), training patch
sampling and augmentation (:mod:`~medseg.transforms.augment`), and the conversions between a label map
and region channels (:mod:`~medseg.transforms.regions`)."""

from medseg.transforms.augment import augmentation
from medseg.transforms.chains import (
    BodyMask,
    ChannelBodyMask,
    ChannelIntensityd,
    RequireChannelsd,
    crop_transforms,
    intensity_transforms,
    load_transforms,
    preprocessing,
    readers,
    spatial_transforms,
)
from medseg.transforms.regions import RegionsToLabelMapd, label_map_to_regions, regions_to_label_map

__all__ = ["BodyMask", "ChannelBodyMask", "ChannelIntensityd", "RegionsToLabelMapd", "RequireChannelsd", "augmentation",
           "crop_transforms", "intensity_transforms", "label_map_to_regions", "load_transforms", "preprocessing",
           "readers", "regions_to_label_map", "spatial_transforms"]
