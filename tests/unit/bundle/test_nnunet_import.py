"""medseg bundle import-nnunet without nnU-Net installed: a model folder laid out as nnU-Net v2 writes it (plans,
dataset.json, checkpoints as its trainer saves them), built here with nnU-Net's own network classes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.bundle.nnunet import load_imported
from medseg.bundle.nnunet_import import import_nnunet
from medseg.errors import BundleError, InputError
from medseg.networks.heads import split_pointwise_head
from medseg.networks.nnunet import NnUNetEnsemble, nnunet_network, read_nnunet_checkpoint
from tests.nnunet_folders import ARCH, Payload, checkpoint, model_folder, plans


def test_checkpoint_read_with_the_types_nnunet_stores(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    read = read_nnunet_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    assert read.mirror_axes == (0, 1, 2) and read.trainer == "nnUNetTrainer" and read.epoch == 3
    assert all(isinstance(v, torch.Tensor) for v in read.weights.values())


def test_checkpoint_with_a_pickle_payload_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, payload=Payload())
    with pytest.raises(BundleError, match=r"refused: the checkpoint holds Python objects .*posix\.system"):
        read_nnunet_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match="refused"):
        import_nnunet(folder, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_network_classes_and_layers_outside_the_allow_list_are_refused() -> None:
    other = {**ARCH, "network_class_name": "os.system"}
    with pytest.raises(BundleError, match=r"network class 'os\.system' is not one medseg builds"):
        nnunet_network(other, 1, 3)
    layer = {**ARCH, "arch_kwargs": {**ARCH["arch_kwargs"], "nonlin": "subprocess.Popen"}}
    with pytest.raises(BundleError, match=r"architecture 'nonlin' 'subprocess\.Popen' is not one of the layers"):
        nnunet_network(layer, 1, 3)
    extra = {**ARCH, "arch_kwargs": {**ARCH["arch_kwargs"], "callback": "x"}}
    with pytest.raises(BundleError, match="unknown architecture argument"):
        nnunet_network(extra, 1, 3)


def test_ensemble_equals_the_mean_of_mirrored_folds_and_splits_into_features_and_a_pointwise_head() -> None:
    torch.manual_seed(0)
    folds = [nnunet_network(ARCH, 1, 3).eval() for _ in range(2)]
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = []
        for network in folds:
            passes = [network(x)]
            for dims in [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
                passes.append(torch.flip(network(torch.flip(x, dims)), dims))
            expected.append(torch.stack(passes).mean(0))
        ensemble = NnUNetEnsemble(folds, (0, 1, 2)).eval()
        out = ensemble(x)
        torch.testing.assert_close(out, torch.stack(expected).mean(0), rtol=1e-4, atol=1e-5)
        split = split_pointwise_head(ensemble)
        assert split is not None
        body, head, features = split
        assert features == 8  # 4 full-resolution features per fold
        torch.testing.assert_close(head(body(x)), out, rtol=1e-4, atol=1e-5)


def test_import_writes_a_bundle_that_predicts_in_the_input_geometry(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, folds=(0, 1))
    bundle = import_nnunet(folder, tmp_path / "bundle")
    model = load_imported(bundle)
    assert model.folds == (0, 1) and model.mirror_axes == (0, 1, 2) and model.num_outputs == 3
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["license"] == "CC-BY 4.0" and meta["source"]["tool"] == "nnU-Net v2"
    assert meta["segments"]["1"]["snomed"]["code"]  # liver: in medseg's table
    plan = json.loads((bundle / "configs" / "plan.json").read_text())
    assert plan["network"] == {"name": "nnunet"} and plan["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    done = subprocess.run([sys.executable, "-m", "medseg", "bundle", "verify", str(bundle)], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "MONAI verify_net_in_out: network" in done.stdout, done.stderr
    # an oblique, non-RAS, anisotropic CT
    angle = np.deg2rad(12)
    rotation = np.array([[0, -np.cos(angle), np.sin(angle)], [1, 0, 0], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation @ np.diag([0.9, 1.2, 2.5]), [10, -5, 3]
    rng = np.random.default_rng(0)
    image = rng.normal(100, 40, (20, 18, 9)).astype(np.float32)
    image[:2] = 0
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "case.nii.gz")
    out = tmp_path / "pred"
    done = subprocess.run([sys.executable, "-m", "medseg", "predict", "--model", str(bundle), "--input",
                           str(tmp_path / "case.nii.gz"), "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = nib.load(out / "case_seg.nii.gz")
    assert written.shape == image.shape and np.allclose(written.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}


def test_inherited_configuration_and_folds_chosen(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, folds=(0, 1))
    bundle = import_nnunet(folder, tmp_path / "low", configuration="3d_lowres", folds=[1])
    model = load_imported(bundle)
    assert model.folds == (1,) and model.preprocessing.spacing == (4.0, 3.0, 3.0)
    assert model.preprocessing.patch_size == (16, 16, 16)  # inherited from 3d_fullres
    assert not (bundle / "models" / "fold_0.pt").exists()


@pytest.mark.parametrize(("change", "message"), [
    ("no-plans", r"plans.json: no such file"),
    ("configuration", r"no configuration '2d' \(it has: 3d_fullres, 3d_lowres\)"),
    ("fold", r"fold_3/checkpoint_final.pth: no such checkpoint \(folds with checkpoint_final.pth: 0\)"),
    ("normalization", r"normalization_schemes"),
    ("exists", r"already exists"),
])
def test_bad_model_folders_are_refused_naming_the_file(tmp_path: Path, change: str, message: str) -> None:
    folder = model_folder(tmp_path, normalization="SomeCustomNormalization" if change == "normalization"
                          else "CTNormalization")
    out = tmp_path / "bundle"
    kwargs: dict[str, Any] = {}
    if change == "no-plans":
        (folder / "plans.json").unlink()
    elif change == "configuration":
        kwargs["configuration"] = "2d"
    elif change == "fold":
        kwargs["folds"] = [3]
    elif change == "exists":
        out.mkdir()
    with pytest.raises(InputError, match=message):
        import_nnunet(folder, out, **kwargs)
    assert change == "exists" or not out.exists()


def test_cli_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "medseg", "bundle", "import-nnunet", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("medseg: error:") and "no such folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_plans_of_nnunet_before_2_4_give_the_same_network(tmp_path: Path) -> None:
    """TotalSegmentator's plans list the U-Net as separate fields (UNet_class_name, ...): read as nnU-Net reads them."""
    folder = model_folder(tmp_path)
    legacy = plans()
    config = legacy["configurations"]["3d_fullres"]
    del config["architecture"]
    config.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=16,
                  n_conv_per_stage_encoder=[2, 2, 2], n_conv_per_stage_decoder=[2, 2],
                  conv_kernel_sizes=[[3, 3, 3]] * 3, pool_op_kernel_sizes=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                  num_pool_per_axis=[2, 2, 2])
    (folder / "plans.json").write_text(json.dumps(legacy))
    bundle = import_nnunet(folder, tmp_path / "bundle")
    model = load_imported(bundle)
    assert model.architecture["arch_kwargs"]["features_per_stage"] == [4, 8, 16]
    assert set(nnunet_network(model.architecture, 1, 3).state_dict()) == set(nnunet_network(ARCH, 1, 3).state_dict())


def test_segment_codes_from_the_user(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps({"spleen": {"code": "78961009", "scheme": "SCT", "meaning": "Spleen (custom)"}}))
    bundle = import_nnunet(folder, tmp_path / "bundle", segments=codes)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["segments"]["2"]["snomed"] == {"code": "78961009", "scheme": "SCT", "meaning": "Spleen (custom)"}
    codes.write_text(json.dumps({"heart": {"code": "80891009", "scheme": "SCT", "meaning": "Heart"}}))
    with pytest.raises(InputError, match="'heart' is not a foreground label of the model"):
        import_nnunet(folder, tmp_path / "other", segments=codes)
    assert not (tmp_path / "other").exists()


def test_a_2d_configuration_predicts_a_3d_image_slice_by_slice(tmp_path: Path) -> None:
    """nnU-Net's 2d configuration: a 2D network over every slice of the first (transposed) axis; the folds and
    mirroring split into features and a pointwise head like the 3D ones."""
    arch2d = {**ARCH, "arch_kwargs": {**ARCH["arch_kwargs"], "conv_op": "torch.nn.modules.conv.Conv2d",
                                      "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                                      "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]]}}
    torch.manual_seed(0)
    folds = [nnunet_network(arch2d, 1, 3).eval() for _ in range(2)]
    ensemble = NnUNetEnsemble(folds, (0, 1)).eval()
    x = torch.randn(1, 1, 1, 16, 16)
    with torch.no_grad():
        out = ensemble(x)
        expected = torch.stack([(f(x[:, :, 0]) + torch.flip(f(torch.flip(x[:, :, 0], (2,))), (2,))
                                 + torch.flip(f(torch.flip(x[:, :, 0], (3,))), (3,))
                                 + torch.flip(f(torch.flip(x[:, :, 0], (2, 3))), (2, 3))) / 4 for f in folds]).mean(0)
        torch.testing.assert_close(out[:, :, 0], expected, rtol=1e-4, atol=1e-5)
        split = split_pointwise_head(ensemble)
        assert split is not None
        body, head, _ = split
        torch.testing.assert_close(head(body(x)), out, rtol=1e-4, atol=1e-5)
    folder = model_folder(tmp_path)
    two_d = plans()
    two_d["configurations"]["2d"] = {**two_d["configurations"]["3d_fullres"], "patch_size": [16, 16],
                                     "spacing": [1.5, 1.5], "architecture": arch2d}
    (folder / "plans.json").write_text(json.dumps(two_d))
    torch.save(checkpoint(folds[0], inference_allowed_mirroring_axes=(0, 1)), folder / "fold_0" / "checkpoint_final.pth")
    bundle = import_nnunet(folder, tmp_path / "bundle", configuration="2d")
    assert json.loads((bundle / "configs" / "plan.json").read_text())["patch_size"] == [1, 16, 16]
    verified = subprocess.run([sys.executable, "-m", "medseg", "bundle", "verify", str(bundle)], capture_output=True,
                              text=True)
    assert verified.returncode == 0, verified.stderr
    image = np.random.default_rng(1).normal(100, 40, (14, 12, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([1.2, 1.1, 2.0, 1.0])), tmp_path / "case.nii.gz")
    done = subprocess.run([sys.executable, "-m", "medseg", "predict", "--model", str(bundle), "--input",
                           str(tmp_path / "case.nii.gz"), "--output", str(tmp_path / "pred")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert nib.load(tmp_path / "pred" / "case_seg.nii.gz").shape == image.shape
