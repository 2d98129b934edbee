"""The training recipe of planned plans (nnU-Net v2's defaults) beside the one of "custom" plans:
what configs/train.json names, the per-iteration LR decay, the loss (deep supervision, regions,
ignore label), gradient clipping and mixed precision, the epoch length, the on-disk cache of
preprocessed cases."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.engines import IterationEvents
from monai.losses import DiceCELoss

from medseg.architectures import NetworkSpec
from medseg.bundle.create import train_config, write_bundle
from medseg.bundle.safety import check_bundle, scan_bundle
from medseg.engines.data import (
    epoch_length,
    has_workers,
    plan_key,
    preprocessed_dataset,
    training_transforms,
    worker_count,
)
from medseg.engines.loss import deep_supervision_weights, segmentation_loss
from medseg.engines.parts import (
    GradientClipping,
    mixed_precision,
    plan_value,
    poly_lr_schedule,
    validation_postprocessing,
)
from medseg.engines.progress import Pace
from medseg.errors import BundleError
from medseg.labels import Region
from medseg.networks import build_network
from medseg.plan import Intensity, Plan

LABELS = {0: "background", 1: "liver", 2: "lesion"}


def _plan(configuration: str = "3d_fullres", **fields: object) -> Plan:
    plan = Plan(3, "CT", dict(LABELS), (1.0, 1.0, 1.0), (32, 32, 32), Intensity("ct", -100.0, 300.0, 50.0, 60.0),
                NetworkSpec("dynunet", deep_supervision=True), configuration=configuration, batch_size=3)
    return dataclasses.replace(plan, **fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ configs/train.json


def test_planned_plans_get_nnunet_defaults_and_custom_plans_keep_their_recipe() -> None:
    planned, custom = train_config(_plan()), train_config(_plan("custom"))
    assert train_config() == custom  # no plan: the recipe of custom plans
    optimizer = planned["optimizer"]
    assert (optimizer["_target_"], optimizer["momentum"], optimizer["nesterov"], optimizer["weight_decay"]) == \
        ("torch.optim.SGD", 0.99, True, 3e-5)
    assert (planned["learning_rate"], planned["iterations_per_epoch"], planned["samples_per_case"]) == (0.01, 250, 1)
    assert planned["batch_size"]["field"] == "batch_size"  # the plan's batch
    assert planned["lr_scheduler"]["epoch_length"] == "@iterations_per_epoch"
    handlers = planned["train"]["handlers"]
    assert handlers[0] == {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False,
                           "epoch_level": False}  # stepped per iteration
    assert any(h["_target_"].endswith("GradientClipping") and h["max_norm"] == 12.0 for h in handlers)
    assert handlers[-1]["_target_"].endswith("RunBudget")  # still attached last
    assert planned["train"]["dataset"]["_target_"].endswith("preprocessed_dataset")
    assert planned["validate"]["dataset"]["_target_"].endswith("preprocessed_dataset")
    assert planned["train"]["trainer"]["amp"]["_target_"].endswith("mixed_precision")
    # custom: today's recipe, with the loss factory (identical numbers for class plans)
    assert (custom["optimizer"]["_target_"], custom["learning_rate"], custom["iterations_per_epoch"]) == \
        ("torch.optim.AdamW", 0.002, None)
    assert custom["loss"] == {"_target_": "medseg.engines.loss.segmentation_loss", "plan": "@plan",
                              "batch_dice": False, "include_background": True}
    assert custom["train"]["dataset"]["_target_"] == "CacheDataset" and custom["train"]["trainer"]["amp"] is False
    assert "epoch_level" not in custom["train"]["handlers"][0]
    for config in (planned, custom):
        assert "$" not in json.dumps(config) and config["mlflow_uri"] is None


def test_bfloat16_autocast_on_the_cpu_where_the_planner_measured_it_faster() -> None:
    """The planner chooses bfloat16 from two measured iterations; training on the CPU then runs the forward pass
    under bfloat16 autocast (weights and outputs float32, close to a float32 pass); on CUDA, or for a float32 plan,
    MONAI's SimpleInferer."""
    from monai.inferers import SimpleInferer

    from medseg.engines.parts import CpuAutocastInferer, training_inferer
    from medseg.planning.recipe import BFLOAT16_MIN_GAIN, choose_precision

    faster = choose_precision(0.8, 0.33)
    assert faster["name"] == "bfloat16" and faster["gain"] == 2.42 and "2.42 x faster" in faster["reason"]
    assert choose_precision(0.8, 0.8 / (BFLOAT16_MIN_GAIN - 0.01))["name"] == "float32"
    bf16 = _plan(planning={"precision": faster})
    config = train_config(bf16)
    assert config["train"]["inferer"]["_target_"] == "medseg.engines.parts.training_inferer"
    assert isinstance(training_inferer(bf16, "cpu"), CpuAutocastInferer)
    assert type(training_inferer(bf16, "cuda")) is SimpleInferer
    assert type(training_inferer(_plan(planning={"precision": choose_precision(0.8, 0.8)}), "cpu")) is SimpleInferer
    assert type(training_inferer(_plan(), "cpu")) is SimpleInferer
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 1))
    x = torch.randn(2, 1, 8, 8, 8)
    out = CpuAutocastInferer()(x, network)
    assert out.dtype == torch.float32 and all(p.dtype == torch.float32 for p in network.parameters())
    torch.testing.assert_close(out, network(x), atol=0.05, rtol=0.05)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in network.parameters())


def test_a_plan_whose_budget_is_short_trains_with_adamw_and_a_long_or_no_budget_with_sgd() -> None:
    from medseg.planning.recipe import SGD_MIN_ITERATIONS, choose_optimizer

    short = train_config(_plan(planning={"optimizer": choose_optimizer(700)}))
    assert (short["optimizer"]["_target_"], short["learning_rate"]) == ("torch.optim.AdamW", 0.002)
    assert short["iterations_per_epoch"] == 250 and short["lr_scheduler"]["max_minutes"] == "@max_minutes"
    for iterations in (None, SGD_MIN_ITERATIONS):
        config = train_config(_plan(planning={"optimizer": choose_optimizer(iterations)}))
        assert (config["optimizer"]["_target_"], config["learning_rate"]) == ("torch.optim.SGD", 0.01)
    assert "700 iterations expected" in choose_optimizer(700)["reason"]
    with pytest.raises(BundleError, match=r"'planning\.optimizer\.name' must be one of SGD, AdamW, got 'Adam'"):
        train_config(_plan(planning={"optimizer": {"name": "Adam"}}))  # a hand-edited plan: refused, not SGD


def test_safe_mode_accepts_a_planned_bundle_and_confines_mlflow_and_the_cache(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", _plan())
    assert scan_bundle(bundle) == []
    mlruns = tmp_path / "mlruns"
    check_bundle(bundle, {"dataset_dir": str(tmp_path / "data"), "mlflow_uri": str(mlruns), "bundle_root": str(bundle)},
                 config="configs/train.json")  # a folder named on the command line
    config = json.loads((bundle / "configs" / "train.json").read_text())
    config["mlflow_uri"], config["cache_dir"] = "/elsewhere/mlruns", "/elsewhere/cache"
    (bundle / "configs" / "train.json").write_text(json.dumps(config))
    problems = " ".join(str(f) for f in scan_bundle(bundle))
    assert "/elsewhere/mlruns" in problems and "/elsewhere/cache" in problems


# ------------------------------------------------------------------------------ learning rate


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)


def test_planned_decay_is_stepped_per_iteration_over_the_whole_run() -> None:
    optimizer = _optimizer()
    schedule = poly_lr_schedule(optimizer, epochs=2, epoch_length=10)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.01)
    assert rates[10] == pytest.approx(0.01 * 0.5**0.9)  # half-way through, not a step at the epoch end
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert rates[-1] == pytest.approx(0.01 * (1 / 20) ** 0.9)
    limited = poly_lr_schedule(_optimizer(), epochs=100, epoch_length=250, max_iterations=100)
    assert limited.lr_lambdas[0](50) == pytest.approx(0.5**0.9)  # --max-iterations is the horizon
    assert poly_lr_schedule(_optimizer(), epochs=4).lr_lambdas[0](2) == pytest.approx(0.5**0.9)  # custom: per epoch


def test_with_a_time_budget_the_decay_follows_the_time_gone_when_that_is_further() -> None:
    now = [0.0]
    pace = Pace(started=0.0, clock=lambda: now[0])
    factor = poly_lr_schedule(_optimizer(), epochs=1000, epoch_length=250, pace=pace, max_minutes=10).lr_lambdas[0]
    now[0] = 299.0  # half of the 10 minutes less the 2 s kept for the final writes
    assert factor(10) == pytest.approx(0.5**0.9)
    now[0] = 600.0  # the budget is spent: the floor
    assert factor(11) == pytest.approx((1 / 250_000) ** 0.9)
    assert factor(0) == 1.0


# ------------------------------------------------------------------------------ loss


def test_custom_plans_keep_today_s_dice_ce_and_planned_plans_use_batch_dice_of_the_foreground() -> None:
    torch.manual_seed(0)
    logits, label = torch.randn(2, 3, 8, 8, 8), torch.randint(0, 3, (2, 1, 8, 8, 8))
    plain = _plan("custom", network=NetworkSpec("unet"))
    today = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    assert segmentation_loss(plain, batch_dice=False, include_background=True)(logits, label) == pytest.approx(float(today))
    nnunet = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)(logits, label)
    assert segmentation_loss(dataclasses.replace(plain, configuration="3d_fullres"))(logits, label) == \
        pytest.approx(float(nnunet))


def test_deep_supervision_weights_halve_per_level_and_the_stacked_outputs_of_dynunet_are_taken() -> None:
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    plan = _plan()
    network = build_network(plan).train()
    assert network.deep_supervision and network.deep_supr_num == 1  # 4 levels: one head (the lowest has none)
    torch.manual_seed(0)
    x, label = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 1, 32, 32, 32))
    with torch.no_grad():
        out = network(x)
    assert out.shape == (2, 2, 3, 32, 32, 32)
    loss = segmentation_loss(plan)
    single = segmentation_loss(dataclasses.replace(plan, network=NetworkSpec("dynunet")))
    expected = 2 / 3 * single(out[:, 0], label) + 1 / 3 * single(out[:, 1], label)
    assert float(loss(out, label)) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss(list(out.unbind(1)), label)) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="the network gave 2 output channels, the plan has 3"):
        single(torch.randn(1, 2, 4, 4, 4), label[:1, :, :4, :4, :4])


def test_ignored_voxels_count_neither_in_dice_nor_in_cross_entropy() -> None:
    plan = _plan(ignore_label=9, network=NetworkSpec("unet"))
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    label[:, :, :3] = 9
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    loss = segmentation_loss(plan)
    value = loss(logits, label)
    value.backward()
    assert logits.grad is not None and float(logits.grad[:, :, :3].abs().max()) == 0.0
    changed = logits.detach().clone()
    changed[:, :, :3] = torch.randn(2, 3, 3, 8, 8) * 10
    assert float(loss(changed, label)) == pytest.approx(float(value))
    # with nothing ignored the masked loss is MONAI's DiceCE
    clean = torch.randint(0, 3, (2, 1, 8, 8, 8))
    reference = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)(logits, clean)
    assert float(loss(logits, clean)) == pytest.approx(float(reference), rel=1e-5)


def test_region_plans_use_sigmoid_dice_and_binary_cross_entropy_of_each_region() -> None:
    regions = (Region("whole", (1, 2), 1), Region("core", (2,), 2))
    plan = _plan(regions=regions, network=NetworkSpec("unet"))
    torch.manual_seed(0)
    logits, label = torch.randn(2, 2, 8, 8, 8), torch.randint(0, 3, (2, 1, 8, 8, 8))
    targets = torch.cat([(label >= 1), (label == 2)], dim=1).float()
    probabilities = torch.sigmoid(logits)
    inter, total = (probabilities * targets).sum((0, 2, 3, 4)), (probabilities + targets).sum((0, 2, 3, 4))
    dice = 1 - ((2 * inter + 1e-5) / (total + 1e-5)).mean()
    expected = dice + F.binary_cross_entropy_with_logits(logits, targets)
    assert float(segmentation_loss(plan)(logits, label)) == pytest.approx(float(expected), rel=1e-5)


def test_validation_scores_painted_regions_per_label_and_leaves_ignored_voxels_out() -> None:
    from monai.metrics import DiceMetric

    regions = (Region("whole", (1, 2), 1), Region("core", (2,), 2))
    plan = _plan(regions=regions, ignore_label=7, network=NetworkSpec("unet"))
    label = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    label[0, 1:5, 1:5, 1:5] = 1
    label[0, 2:4, 2:4, 2:4] = 2
    label[0, 0] = 7  # ignored slice
    logits = torch.full((2, 6, 6, 6), -10.0)
    logits[0][label[0] >= 1] = 10.0  # "whole" right
    logits[1][label[0] == 2] = 10.0  # "core" right
    logits[:, 0] = 10.0  # nonsense on the ignored slice
    out = validation_postprocessing(plan)({"pred": logits, "label": label})
    assert out["pred"].shape == (3, 6, 6, 6)  # one-hot of the plan's classes
    dice = DiceMetric(include_background=False)(out["pred"][None], out["label"][None])
    assert dice.tolist() == [[1.0, 1.0]]
    plain = _plan(network=NetworkSpec("unet"))
    assert [type(t).__name__ for t in validation_postprocessing(plain).transforms] == ["AsDiscreted"]  # as before


# ------------------------------------------------------------------------------ small parts


def test_gradient_clipping_caps_the_norm_after_the_backward_pass() -> None:
    weight = torch.nn.Parameter(torch.zeros(4))
    trainer = Engine(lambda engine, batch: None)
    trainer.register_events(*IterationEvents)
    trainer.optimizer = torch.optim.SGD([weight], lr=0.1)  # type: ignore[attr-defined]
    GradientClipping(12.0).attach(trainer)
    weight.grad = torch.full((4,), 100.0)
    trainer.fire_event(IterationEvents.BACKWARD_COMPLETED)
    assert float(weight.grad.norm()) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="max_norm must be positive"):
        GradientClipping(0)


def test_mixed_precision_on_cuda_only_and_the_fixed_epoch_length() -> None:
    assert mixed_precision("cuda") and mixed_precision("cuda:1") and not mixed_precision("cpu")
    assert epoch_length(range(5), minimum=20, iterations=250) == 250
    assert epoch_length(range(5), minimum=20, iterations=None) == 20
    assert worker_count(limit=4) in range(5) and worker_count(limit=0) == 0
    assert has_workers(2) and not has_workers(0)
    assert plan_value(_plan(), "batch_size") == 3


# ------------------------------------------------------------------------------ preprocessed once


def _case(tmp_path: Path) -> dict[str, str]:
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray((rng.normal(50, 20, (20, 24, 24))).astype(np.float32))
    label = np.zeros((20, 24, 24), np.uint8)
    label[5:12, 6:14, 6:14] = 1
    label[8:10, 8:10, 8:10] = 2
    for name, array in (("image", None), ("label", label)):
        item = image if array is None else sitk.GetImageFromArray(array)
        item.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(item, str(tmp_path / f"{name}.nii.gz"))
    return {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}


def test_preprocessed_cases_are_written_once_per_plan_and_reread(tmp_path: Path) -> None:
    item = _case(tmp_path)
    plan = _plan(patch_size=(16, 16, 16))
    cache = tmp_path / "cache"
    dataset = preprocessed_dataset([item], training_transforms(plan, 1), plan, cache, "training")
    patch = dataset[0][0]
    assert patch["image"].shape == (1, 16, 16, 16) and patch["label"].dtype == torch.int64
    assert "label_cls_indices" not in patch
    files = list((cache / plan_key(plan) / "training").glob("*.pt"))
    assert len(files) == 1
    written = files[0].stat().st_mtime_ns
    again = preprocessed_dataset([item], training_transforms(plan, 1), plan, cache, "training")
    again[0]
    assert files[0].stat().st_mtime_ns == written  # read back, not preprocessed again
    other = dataclasses.replace(plan, target_spacing=(2.0, 2.0, 2.0))
    assert plan_key(other) != plan_key(plan)  # another plan: another folder
    os.utime(item["image"], ns=(written + 10**9, written + 10**9))  # a rewritten image: preprocessed again
    preprocessed_dataset([item], training_transforms(plan, 1), plan, cache, "training")[0]
    assert len(list((cache / plan_key(plan) / "training").glob("*.pt"))) == 2
    with pytest.raises(ValueError, match="part must be"):
        preprocessed_dataset([item], training_transforms(plan, 1), plan, cache, "test")  # type: ignore[arg-type]


def test_a_batch_mixing_a_first_load_and_a_cached_case_collates(tmp_path: Path) -> None:
    """A case met for the first time carries numpy arrays where a cached one has tensors: patches keep
    image and label only, so the two still batch (as DataLoader workers batch them)."""
    from monai.data import list_data_collate

    item = _case(tmp_path)
    plan = _plan(patch_size=(16, 16, 16))
    transform = training_transforms(plan, 1)
    cached = preprocessed_dataset([item], transform, plan, tmp_path / "cache", "training")
    fresh = preprocessed_dataset([item], transform, plan, tmp_path / "other", "training")
    cached[0]
    batch = list_data_collate([cached[0], fresh[0]])
    assert set(batch) == {"image", "label"} and batch["image"].shape == (2, 1, 16, 16, 16)


def test_custom_plans_keep_today_s_training_chain_and_planned_plans_get_nnunet_s() -> None:
    custom = [type(t).__name__ for t in training_transforms(_plan("custom"), 2).transforms]
    planned = [type(t).__name__ for t in training_transforms(_plan(), 1).transforms]
    assert "RandCropByLabelClassesd" in custom and "ForegroundOversampled" not in custom
    for name in ("ClassesToIndicesd", "ForegroundOversampled", "SpatialAugmentation", "RandGaussianSmoothd",
                 "RandScaleIntensityFixedMeand", "RandSimulateLowResolutiond", "RandAdjustContrastd"):
        assert name in planned, name
    assert math.isclose(sum(n == "RandFlipd" for n in planned), 3)
