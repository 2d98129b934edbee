"""Bundles: medseg's pipelines as MONAI bundles, both doors, third-party zoo bundles, transfer learning."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.cli import main
from medseg.inference.cohort import JOURNAL_FOLDER
from medseg.io.image import read_geometry, to_array

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def monai_bundle_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], capture_output=True, text=True,
                          env=ENV, timeout=1800)  # a hang guard: a loaded machine is slower, not red


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory, ct_dataset: Path) -> Path:
    """``medseg bundle init`` then ``medseg train --bundle`` for 3 epochs (small patches, fast)."""
    bundle = tmp_path_factory.mktemp("bundles") / "ct_small"
    assert main(["bundle", "init", "--data", str(ct_dataset), "--out", str(bundle), "--patch-size", "32,32,16",
                 "--name", "ct_small"]) == 0
    assert main(["train", "--bundle", str(bundle), "--data", str(ct_dataset), "--epochs", "3", "--val-interval", "3"]) == 0
    return bundle


def test_bundle_init_layout_and_metadata(small_bundle: Path) -> None:
    for name in ("metadata.json", "plan.json", "train.json", "inference.json", "evaluate.json", "logging.conf"):
        assert (small_bundle / "configs" / name).is_file(), name
    assert (small_bundle / "docs" / "README.md").is_file()
    assert (small_bundle / "models" / "model.pt").is_file()
    meta = json.loads((small_bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "name", "task", "description", "authors", "copyright", "data_source", "data_type", "image_classes",
                "label_classes", "pred_classes", "eval_metrics", "intended_use", "references", "network_data_format"):
        assert key in meta, key
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 6
    assert meta["segments"]["1"]["snomed"]["code"] == "10200004"  # liver
    assert meta["segments"]["5"]["category"]["meaning"] == "Morphologically Abnormal Structure"
    plan = json.loads((small_bundle / "configs" / "plan.json").read_text())
    assert plan["patch_size"] == [32, 32, 16] and plan["modality"] == "CT"
    for name in ("inference.json", "train.json", "evaluate.json"):
        assert "$" not in (small_bundle / "configs" / name).read_text(), f"{name} must pass safe mode"


def test_bundle_init_describes_the_data_without_local_paths_and_training_records_itself(
        small_bundle: Path, ct_dataset: Path, tmp_path: Path) -> None:
    """`bundle init` says "Not trained yet" and names the dataset without its absolute path; after
    `medseg train --bundle` the version, changelog, eval_metrics and docs/README.md describe the
    trained weights, and `bundle verify` checks exactly that."""
    from medseg.bundle.create import local_paths
    from medseg.bundle.verify import verify_bundle
    from medseg.errors import BundleError

    fresh = tmp_path / "fresh"
    assert main(["--quiet", "bundle", "init", "--data", str(ct_dataset), "--out", str(fresh)]) == 0
    meta = json.loads((fresh / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"] == {} and meta["version"] == "0.1.0"
    assert not local_paths(meta["data_source"]) and str(ct_dataset.parent) not in meta["data_source"]
    assert "Not trained yet." in (fresh / "docs" / "README.md").read_text()
    verify_bundle(fresh)  # no weights yet: fine

    meta = json.loads((small_bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.2.0" and list(meta["changelog"]) == ["0.2.0", "0.1.0"]
    assert "trained 3 epochs (60 iterations of 20 per epoch)" in meta["changelog"]["0.2.0"]
    assert set(meta["eval_metrics"]) == {"val_mean_dice", "val_dice_liver", "val_dice_spleen", "val_dice_kidney",
                                         "val_dice_bone", "val_dice_lesion"}
    summary = json.loads((small_bundle / "train_summary.json").read_text())
    assert meta["eval_metrics"]["val_mean_dice"] == round(summary["best_val_mean_dice"], 4)
    assert not local_paths(meta["data_source"])
    readme = (small_bundle / "docs" / "README.md").read_text()
    assert "Not trained yet" not in readme and "| 1 | liver |" in readme
    verify_bundle(small_bundle)

    (fresh / "models" / "model.pt").write_bytes((small_bundle / "models" / "model.pt").read_bytes())
    with pytest.raises(BundleError, match="eval_metrics is empty"):  # weights copied in without training
        verify_bundle(fresh)


def test_two_doors_give_identical_predictions(tmp_path: Path, small_bundle: Path, ct_dataset: Path) -> None:
    """`python -m monai.bundle run` on inference.json and `medseg predict` write the same label maps."""
    data = ct_dataset.parent
    via_monai = tmp_path / "monai"
    result = monai_bundle_run("--config_file", str(small_bundle / "configs" / "inference.json"),
                              "--meta_file", str(small_bundle / "configs" / "metadata.json"),
                              "--bundle_root", str(small_bundle), "--dataset_dir", str(data),
                              "--output_dir", str(via_monai))
    assert result.returncode == 0, result.stderr[-3000:]
    via_cli = tmp_path / "cli"
    assert main(["predict", "--model", str(small_bundle), "--input", str(data / "imagesTs"), "--output", str(via_cli)]) == 0
    names = sorted(p.name for p in via_cli.iterdir() if p.name != JOURNAL_FOLDER)
    assert names == sorted(p.name for p in via_monai.iterdir()) and len(names) == 3
    for name in names:
        a, b = via_cli / name, via_monai / name
        assert read_geometry(a).mismatch(read_geometry(b)) is None
        np.testing.assert_array_equal(to_array(sitk.ReadImage(str(a))), to_array(sitk.ReadImage(str(b))))
        header_a, header_b = nib.load(str(a)).header, nib.load(str(b)).header  # the whole header, affines included
        assert header_a.binaryblock == header_b.binaryblock
        np.testing.assert_array_equal(nib.load(str(a)).affine, nib.load(str(b)).affine)


def test_the_config_door_refuses_to_overwrite_a_label_map(tmp_path: Path, small_bundle: Path, ct_dataset: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """inference.json, like `medseg predict`, replaces an existing output only when told to (overwrite)."""
    image = min((ct_dataset.parent / "imagesTs").iterdir())
    out = tmp_path / "out"
    out.mkdir()
    existing = out / image.name.replace(".nii.gz", "_seg.nii.gz")
    existing.write_bytes(b"precious")
    run = ["bundle", "run", str(small_bundle), "--set", f"dataset_dir={image}", "--set", f"output_dir={out}"]
    capsys.readouterr()
    assert main(run) == 2
    assert "already exists; set overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"precious"
    assert main([*run, "--set", "overwrite=true"]) == 0
    assert read_geometry(existing).mismatch(read_geometry(image)) is None


def test_evaluate_layered_on_inference_two_doors_give_the_same_metrics(tmp_path: Path, small_bundle: Path,
                                                                      ct_dataset: Path) -> None:
    """`medseg bundle run --config evaluate` and MONAI's runner given inference.json then evaluate.json (as
    model-zoo bundles are run) score the same predictions into the same metrics.csv."""
    data = ct_dataset.parent
    configs = small_bundle / "configs"
    via_medseg, via_monai = tmp_path / "medseg", tmp_path / "monai"
    assert main(["bundle", "run", str(small_bundle), "--config", "evaluate", "--set", f"dataset_dir={data}",
                 "--set", f"output_dir={via_medseg}"]) == 0
    files = f"['{configs / 'inference.json'}','{configs / 'evaluate.json'}']"
    result = monai_bundle_run("--config_file", files, "--meta_file", str(configs / "metadata.json"),
                              "--bundle_root", str(small_bundle), "--dataset_dir", str(data),
                              "--output_dir", str(via_monai))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (via_medseg / "metrics.csv").read_text() == (via_monai / "metrics.csv").read_text()
    assert len((via_medseg / "metrics.csv").read_text().splitlines()) == 1 + 3 * 5  # 3 cases x 5 labels
    assert sorted(p.name for p in (via_medseg / "predictions").iterdir()) == sorted(
        p.name.replace(".nii.gz", "_seg.nii.gz") for p in (data / "imagesTs").iterdir())


def test_monai_bundle_run_train_config(tmp_path: Path, small_bundle: Path, ct_dataset: Path) -> None:
    """configs/train.json through MONAI's own runner, with the zoo's override keys."""
    import shutil

    bundle = tmp_path / "copy"
    shutil.copytree(small_bundle, bundle)
    for leftover in ("checkpoints", "logs", "split.json", "train_summary.json"):
        path = bundle / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (bundle / "models" / "model.pt").unlink()
    result = monai_bundle_run("--config_file", str(bundle / "configs" / "train.json"), "--bundle_root", str(bundle),
                              "--dataset_dir", str(ct_dataset.parent), "--epochs", "2", "--val_interval", "1",
                              "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((bundle / "train_summary.json").read_text())
    assert summary["epochs_completed"] == 2
    torch.load(bundle / "models" / "model.pt", weights_only=True)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.3.0" and meta["eval_metrics"]["val_mean_dice"] == round(summary["best_val_mean_dice"], 4)


def test_medseg_bundle_run_evaluate(tmp_path: Path, small_bundle: Path, ct_dataset: Path) -> None:
    out = tmp_path / "evaluation"
    assert main(["bundle", "run", str(small_bundle), "--config", "evaluate", "--set", f"dataset_dir={ct_dataset.parent}",
                 "--set", f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 3 and set(summary["labels"]) == {"1", "2", "3", "4", "5"}
    assert (out / "metrics.csv").read_text().startswith("case,label,dice,iou,hd95_mm,assd_mm,nsd,vol_pred_ml,vol_ref_ml")


def _zoo_bundle(root: Path, with_expressions: bool) -> Path:
    """A third-party bundle in the MONAI model-zoo style (spleen_ct_segmentation's shape)."""
    from monai.networks.nets import UNet

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=1)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    config = {
        "bundle_root": ".",
        "dataset_dir": ".",
        "output_dir": "eval",
        "device": "cpu",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                        "channels": [8, 16], "strides": [2], "num_res_units": 1},
        "network": "@network_def",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -200, "a_max": 300, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 2, "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "resample": False, "separate_folder": False}]},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "@checkpoint", "load_dict": {"model": "@network"}},
        "handlers": ["@checkpointloader", {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "initialize": [],
    }
    if with_expressions:
        config.update({
            "imports": ["$import glob", "$import os"],
            "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, 'imagesTs', '*.nii.gz')))]",
            "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
            "initialize": ["$monai.utils.set_determinism(seed=0)"],
            "run": ["$@evaluator.run()"],
        })
    else:
        config.update({
            "datalist": {"_target_": "medseg.bundle.components.image_list", "dataset_dir": "@dataset_dir"},
            "checkpoint": {"_target_": "medseg.bundle.components.bundle_path", "bundle_root": "@bundle_root",
                           "parts": ["models", "model.pt"]},
            "run": [{"_target_": "medseg.bundle.components.run_engine", "engine": "@evaluator"}],
        })
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps({"name": "zoo_style", "version": "0.1.0"}))
    return root


def test_third_party_zoo_bundle_safe_mode_and_trust(tmp_path: Path, ct_dataset: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A zoo-style bundle with `$` expressions is refused in safe mode (each key listed) and runs
    with --trust; the same bundle without expressions runs in safe mode."""
    data = ct_dataset.parent
    bundle = _zoo_bundle(tmp_path / "zoo", with_expressions=True)
    out = tmp_path / "out"
    code = main(["bundle", "run", str(bundle), "--set", f"dataset_dir={data}", "--set", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "safe mode" in err
    for key in ("imports", "datalist", "checkpoint", "initialize", "run"):
        assert key in err, key
    assert not out.exists()

    assert main(["bundle", "run", str(bundle), "--trust", "--set", f"dataset_dir={data}", "--set", f"output_dir={out}"]) == 0
    assert len(list(out.glob("*seg.nii.gz"))) == 3

    clean = _zoo_bundle(tmp_path / "zoo_clean", with_expressions=False)
    out2 = tmp_path / "out2"
    assert main(["bundle", "run", str(clean), "--set", f"dataset_dir={data}", "--set", f"output_dir={out2}"]) == 0
    assert len(list(out2.glob("*seg.nii.gz"))) == 3


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would run os.system
        return (os.system, (f"touch {self.marker}",))


def test_pickled_checkpoint_never_executes(tmp_path: Path, ct_dataset: Path, small_bundle: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint whose unpickling runs a shell command: refused by medseg predict and by a
    --trust'ed bundle run (torch.load is forced to weights_only=True)."""
    import shutil

    marker = tmp_path / "PWNED"
    bundle = tmp_path / "evil"
    shutil.copytree(small_bundle, bundle)
    with open(bundle / "models" / "model.pt", "wb") as f:
        pickle.dump({"network": _Payload(marker)}, f)
    image = next((ct_dataset.parent / "imagesTs").iterdir())
    code = main(["predict", "--model", str(bundle), "--input", str(image), "--output", str(tmp_path / "p")])
    assert code == 2 and "model.pt" in capsys.readouterr().err
    assert not marker.exists()

    zoo = _zoo_bundle(tmp_path / "zoo_evil", with_expressions=True)
    with open(zoo / "models" / "model.pt", "wb") as f:
        pickle.dump(_Payload(marker), f)
    code = main(["bundle", "run", str(zoo), "--trust", "--set", f"dataset_dir={ct_dataset.parent}",
                 "--set", f"output_dir={tmp_path / 'o'}"])
    assert code != 0
    assert not marker.exists()


def test_init_weights_transfers_matching_tensors(tmp_path: Path, small_bundle: Path, ct_dataset: Path) -> None:
    from medseg.engines.weights import load_matching_weights
    from medseg.networks import build_network
    from medseg.plan import Plan

    plan = Plan.load(small_bundle / "configs" / "plan.json")
    fewer = Plan.from_json({**plan.to_json(), "labels": {"0": "background", "1": "liver", "2": "spleen"}})
    target = build_network(fewer)
    report = load_matching_weights(target, small_bundle)
    source = torch.load(small_bundle / "models" / "model.pt", weights_only=True)
    assert report["skipped"] and all(k in source for k in report["loaded"])
    for key in report["loaded"]:
        torch.testing.assert_close(target.state_dict()[key], source[key])
    assert all(target.state_dict()[k].shape != source[k].shape for k in report["skipped"] if k in source)

    run = tmp_path / "finetuned"
    assert main(["train", "--plan", "default",
                 "--data", str(ct_dataset), "--out", str(run), "--epochs", "1", "--val-interval", "1",
                 "--patch-size", "32,32,16", "--init-weights", str(small_bundle)]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["init_weights"]["loaded"] == len(source) and summary["init_weights"]["skipped"] == []


def test_cli_verify_and_export(tmp_path: Path, small_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "verify", str(small_bundle)]) == 0
    assert capsys.readouterr().out.strip().endswith("verified")
    out = tmp_path / "model.ts"
    assert main(["bundle", "export", str(small_bundle), "--format", "torchscript", "--out", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    from medseg.bundle.components import load_plan, load_weights
    from medseg.networks import build_network

    plan = load_plan(small_bundle)
    network = load_weights(build_network(plan), small_bundle / "models" / "model.pt")
    x = torch.randn(1, 1, *plan.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network(x), atol=1e-5, rtol=1e-5)


def test_training_a_trained_bundle_again_is_refused(small_bundle: Path, ct_dataset: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    weights = (small_bundle / "models" / "model.pt").read_bytes()
    code = main(["--quiet", "train", "--bundle", str(small_bundle), "--data", str(ct_dataset), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "already trained" in err
    assert (small_bundle / "models" / "model.pt").read_bytes() == weights
