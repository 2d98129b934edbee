"""``medseg plan``: the bundle it writes loads, builds and maps a patch; bad input is one message, exit 2;
``medseg train --plan`` options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medseg.cli import main
from medseg.data.synthetic import write_dataset
from medseg.networks import build_network
from medseg.plan import Plan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "ct", modality="ct", cases=3, size=32)


def test_plan_writes_a_bundle_that_loads_builds_and_maps_its_patch(tiny: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "planned"
    # a budget too short for anything: only the lean network on the smallest patch is timed (the choice is
    # tested in test_budget)
    assert main(["plan", "--data", str(tiny), "--out", str(out), "--workers", "1", "--time-budget", "0.01",
                 "--precision", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "configuration: 3d_fullres" in printed and "expected iterations:" in printed and "patch:" in printed
    configs = out / "configs"
    plan = Plan.load(configs / "plan.json")
    fingerprint = json.loads((configs / "fingerprint.json").read_text(encoding="utf-8"))
    plans = json.loads((configs / "plans.json").read_text(encoding="utf-8"))
    assert len(fingerprint["cases"]) == 2 and fingerprint["cases"][0]["class_voxels"]
    assert set(plans["configurations"]) == {"2d", "3d_fullres"} and plans["chosen"]["configuration"] == "3d_fullres"
    assert plan.configuration == "3d_fullres" and plan.network.name == "unet_head" and "U-Net (pointwise head)" in printed
    record = plan.planning
    assert record["device"] == "cpu" and record["time_budget_hours"] == 0.01 and record["seconds_per_iteration"] > 0
    # --precision auto: chosen from two measured iterations of the smallest candidate
    precision = record["precision"]
    assert precision["name"] in ("float32", "bfloat16") and precision["float32_seconds"] > 0
    assert precision["bfloat16_seconds"] > 0 and ("faster" in precision["reason"] or "gains" in precision["reason"])
    assert record["memory_measured_gb"] is None or record["memory_measured_gb"] <= record["memory_target_gb"]
    network = build_network(plan).eval()
    with torch.no_grad():
        output = network(torch.zeros(plan.batch_size, 1, *plan.patch_size))
    assert output.shape == (plan.batch_size, plan.num_classes, *plan.patch_size)


def test_a_two_channel_region_dataset_is_planned_per_channel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """nnU-Net raw layout, channels CT and T1, nested regions: one normalisation per channel, one sigmoid
    output per region."""
    data = write_dataset(tmp_path / "regions", cases=3, size=32, channels=2, regions=True)
    out = tmp_path / "planned"
    assert main(["plan", "--data", str(data), "--out", str(out), "--workers", "1", "--device", "cuda"]) == 0
    plan = Plan.load(out / "configs" / "plan.json")
    assert [c.name for c in plan.input_channels] == ["CT", "T1"] and plan.modality == "CT"
    assert [c.intensity.preset for c in plan.input_channels] == ["ct", "mr"]
    assert [r.name for r in plan.regions] == ["organs", "liver", "lesion"] and plan.num_outputs == 3
    network = build_network(plan).eval()
    with torch.no_grad():
        assert network(torch.zeros(1, 2, *plan.patch_size)).shape == (1, 3, *plan.patch_size)
    capsys.readouterr()


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "{missing}"], "dataset.json: no such file"),
    (["--memory-gb", "0"], "--memory-gb must be a positive number, got 0.0"),
    (["--time-budget", "-1"], "--time-budget must be a positive number"),
    (["--workers", "0"], "--workers must be an integer of at least 1"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
])
def test_bad_plan_input_is_one_message_and_exit_2(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  args: list[str], message: str) -> None:
    data = str(tmp_path / "nowhere" / "dataset.json") if "{missing}" in args else str(tiny)
    argv = ["plan", "--data", data, "--out", str(tmp_path / "b"), "--workers", "1"]
    argv += [a for a in args if a not in ("--data", "{missing}")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("medseg: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_cuda_time_budget_needs_the_gpu(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CUDA plan can be made without a GPU, but timing iterations for a budget cannot."""
    argv = ["plan", "--data", str(tiny), "--out", str(tmp_path / "b"), "--workers", "1", "--device", "cuda"]
    assert main([*argv, "--time-budget", "1"]) == 2
    assert "CUDA is not available on this machine" in capsys.readouterr().err
    assert main(argv) == 0 and Plan.load(tmp_path / "b" / "configs" / "plan.json").planning["memory_measured_gb"] is None


def test_plan_refuses_a_folder_that_is_not_empty(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x", encoding="utf-8")
    assert main(["plan", "--data", str(tiny), "--out", str(tmp_path / "b")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--plan", "default", "--preset", "resenc-m"], "--preset is an option of the planner: add --plan auto"),
    (["--plan", "auto", "--network", "unet"], "--network: with --plan auto the planner chooses the network"),
    (["--plan", "auto", "--patch-size", "32,32,16"], "--patch-size is chosen by the planner with --plan auto"),
])
def test_train_planner_options_are_checked(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           args: list[str], message: str) -> None:
    assert main(["train", "--data", str(tiny), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_plans_automatically_and_trains_the_planned_bundle(tiny: Path, tmp_path: Path) -> None:
    """No ``--plan``: the planner's bundle (fingerprint and plans beside the plan), trained for 2 iterations,
    the plan's batch as patches per iteration (cases x samples per case), AdamW for the short budget."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny), "--out", str(run), "--workers", "1",
                 "--max-minutes", "5", "--max-iterations", "2", "--epochs", "1"]) == 0  # 2 iterations on a slow machine too
    plan = Plan.load(run / "configs" / "plan.json")
    assert (run / "configs" / "fingerprint.json").is_file() and (run / "configs" / "plans.json").is_file()
    assert plan.network.name == "unet_head" and plan.planning["time_budget_hours"] == pytest.approx(5 / 60)
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["iterations"] == 2 and (run / "models" / "model.pt").is_file()
    assert summary["options"]["batch_size"] * summary["options"]["samples_per_case"] == plan.batch_size
    config = json.loads((run / "configs" / "train.json").read_text(encoding="utf-8"))
    assert plan.planning["optimizer"]["name"] == "AdamW" and config["optimizer"]["_target_"] == "torch.optim.AdamW"


@pytest.mark.parametrize(("args", "choice"), [
    ([], "auto"), (["--plan", "default"], "default"), (["--network", "segresnet"], "default"),
    (["--patch-size", "32,32,16"], "default"), (["--bundle", "B"], "default"), (["--resume"], "default"),
    (["--plan", "auto", "--max-minutes", "5"], "auto"),
])
def test_train_plans_automatically_unless_the_network_or_patch_is_chosen_by_hand(args: list[str], choice: str) -> None:
    from medseg.cli.commands import train_plan_choice
    from medseg.cli.parser import build_parser

    target = [] if "--bundle" in args else ["--out", "run"]
    assert train_plan_choice(build_parser().parse_args(["train", "--data", "d.json", *target, *args])) == choice


@pytest.mark.slow
def test_plan_preprocess_caches_what_training_then_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``medseg plan --preprocess``: fold 0's training and validation cases cached in 2 worker processes;
    ``medseg train`` on the bundle finds every case cached (writes no cache file, rewrites none)."""
    data = write_dataset(tmp_path / "ct", modality="ct", cases=8, size=32)
    out = tmp_path / "planned"
    assert main(["plan", "--data", str(data), "--out", str(out), "--workers", "2", "--device", "cuda",
                 "--preprocess"]) == 0
    split_sizes = {"training": 0, "validation": 0}
    cached = {p: p.stat().st_mtime_ns for p in (out / "preprocessed").rglob("*.pt")}
    for path in cached:
        split_sizes[path.parent.name] += 1
    assert split_sizes == {"training": 4, "validation": 2}  # 6 training cases, 5 folds: fold 0 validates 2
    capsys.readouterr()
    assert main(["--quiet", "train", "--data", str(data), "--bundle", str(out), "--device", "cpu",
                 "--max-iterations", "1", "--epochs", "1", "--iterations-per-epoch", "1"]) == 0
    after = {p: p.stat().st_mtime_ns for p in (out / "preprocessed").rglob("*.pt")}
    assert after == cached
    assert main(["plan", "--data", str(data), "--out", str(tmp_path / "again"), "--preprocess", "--workers", "-1"]) == 2


def test_the_2d_configuration_of_a_3d_dataset_trains_and_predicts_in_the_images_space(
        tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--configuration 2d`` of 3D data: a U-Net over slices, trained a few iterations, validated and
    predicted with thick windows of slices; the label maps come back on each input's own grid."""
    import nibabel as nib
    import numpy as np

    run = tmp_path / "slices"
    assert main(["plan", "--data", str(tiny), "--out", str(run), "--workers", "1", "--time-budget", "0.01",
                 "--configuration", "2d"]) == 0
    assert "configuration: 2d (of 2d, 3d_fullres)" in capsys.readouterr().out
    plan = Plan.load(run / "configs" / "plan.json")
    flat = plan.slice_axis  # the coarsest axis (the last of equally coarse ones)
    assert flat == max(a for a, s in enumerate(plan.target_spacing) if s == max(plan.target_spacing))
    assert flat is not None and plan.patch_size[flat] == 1
    assert plan.window_size[flat] == plan.batch_size and plan.window_overlap(0.5)[flat] == 0.0
    assert main(["train", "--data", str(tiny), "--bundle", str(run), "--max-iterations", "4",
                 "--iterations-per-epoch", "2", "--val-interval", "1"]) == 0
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert history["val_mean_dice"] and (run / "models" / "model.pt").is_file()
    out, images = tmp_path / "pred", tiny.parent / "imagesTs"
    assert main(["-q", "predict", "--model", str(run), "--input", str(images), "--output", str(out)]) == 0
    for image in sorted(images.glob("*.nii.gz")):
        source = nib.load(image)
        label_map = nib.load(out / image.name.replace(".nii.gz", "_seg.nii.gz"))
        assert label_map.shape == source.shape and np.allclose(label_map.affine, source.affine)
        assert set(np.unique(np.asarray(label_map.dataobj)).tolist()) <= set(plan.labels)
