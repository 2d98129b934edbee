"""Network factory: MONAI U-Net family for 2D and 3D segmentation."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from medseg.errors import BundleError
from medseg.plan import NetworkSpec, Plan


def build_network(plan: Plan, spec: NetworkSpec | None = None) -> torch.nn.Module:
    """Build the segmentation network of ``plan`` (``spatial_dims`` = plan.dims, one input channel,
    one output channel per label including background).

    Raises
    ------
    BundleError
        For an unknown network name.
    """
    spec = spec or plan.network
    if spec.name == "unet":
        return UNet(
            spatial_dims=plan.dims,
            in_channels=1,
            out_channels=plan.num_classes,
            channels=spec.channels,
            strides=spec.strides,
            num_res_units=spec.num_res_units,
            norm=spec.norm,
            dropout=spec.dropout,
        )
    raise BundleError(f"unknown network {spec.name!r}; available: unet")
