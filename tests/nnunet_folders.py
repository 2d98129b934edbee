"""nnU-Net v2 trained-model folders for tests, without nnU-Net installed: plans, dataset.json and checkpoints laid
out as nnU-Net v2 writes them, the networks built with nnU-Net's own classes (random weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.networks.nnunet import nnunet_network

ARCH: dict[str, Any] = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                    "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
LABELS = {"background": 0, "liver": 1, "spleen": 2}


def plans(normalization: str = "CTNormalization") -> dict[str, Any]:
    return {
        "dataset_name": "Dataset901_Test", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0],
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "foreground_intensity_properties_per_channel": {"0": {"mean": 100.0, "std": 50.0, "percentile_00_5": 0.0,
                                                              "percentile_99_5": 300.0, "max": 400.0, "min": -5.0,
                                                              "median": 90.0}},
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": [16, 16, 16], "spacing": [2.0, 1.5, 1.5],
                "normalization_schemes": [normalization], "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": ARCH, "batch_dice": False},
            "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [4.0, 3.0, 3.0]},
        },
    }


class Payload:
    """Pickled, this runs a command when loaded: what a weights_only load must refuse."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def checkpoint(network: torch.nn.Module, **extra: Any) -> dict[str, Any]:
    """A checkpoint as nnU-Net's trainer saves it (numpy scalars, torch.device and all)."""
    return {"network_weights": network.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None, "logging": {"mean_fg_dice": [np.float64(0.5)], "train_losses": [np.float32(1.0)]},
            "_best_ema": np.float32(0.4), "current_epoch": 3,
            "init_args": {"plans": {}, "configuration": "3d_fullres", "fold": 0, "dataset_json": {},
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2), **extra}


def model_folder(root: Path, folds: tuple[int, ...] = (0,), normalization: str = "CTNormalization",
                 labels: dict[str, int] | None = None, dataset: str = "Dataset901_Test", seed: int = 0,
                 **extra: Any) -> Path:
    """An nnU-Net results folder of random networks, one per fold (``labels``: dataset.json's, default :data:`LABELS`)."""
    labels = LABELS if labels is None else labels
    folder = root / dataset / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans(normalization)))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 4, "file_ending": ".nii.gz",
                                                     "name": "Test", "licence": "CC-BY 4.0"}))
    for fold in folds:
        torch.manual_seed(seed + fold)
        network = nnunet_network(ARCH, 1, len(labels))
        (folder / f"fold_{fold}").mkdir()
        torch.save(checkpoint(network, **extra), folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder
