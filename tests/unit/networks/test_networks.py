"""The network factory (medseg.networks.build_network) and the architectures a plan can name
(medseg.architectures): U-Net, DynUNet and SegResNet in 2D and 3D."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from medseg.architectures import ARCHITECTURES, FIELDS, NetworkSpec, dynunet_topology
from medseg.bundle.create import metadata
from medseg.cli import build_parser
from medseg.cli.commands import _train_options
from medseg.errors import BundleError, InputError
from medseg.networks import build_network, split_pointwise_head
from medseg.plan import Intensity, Plan

PATCHES = {3: ((32, 32, 16), (0.8, 0.8, 2.5)), 2: ((64, 48), (0.7, 0.7))}


def _plan(name: str, dims: int, classes: int = 4, **spec: object) -> Plan:
    patch, spacing = PATCHES[dims]
    labels = {k: f"structure {k}" if k else "background" for k in range(classes)}
    return Plan(dims, "CT", labels, spacing, patch, Intensity("ct", -100.0, 400.0, 100.0, 50.0),
                NetworkSpec(name, **spec))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_maps_a_patch_to_class_logits_of_its_size(name: str, dims: int) -> None:
    """What ``--network NAME`` builds (NetworkSpec's defaults) maps a patch of the plan to num_classes channels
    of the same spatial size; the pointwise-head networks split into body and head, the U-Net does not."""
    plan = _plan(name, dims, classes=5)
    torch.manual_seed(0)
    network = build_network(plan).eval()
    x = torch.rand(1, 1, *plan.patch_size)
    with torch.no_grad():
        y = network(x)
    assert tuple(y.shape) == (1, plan.num_classes, *plan.patch_size)
    split = split_pointwise_head(network)
    if name == "unet":
        assert split is None
        return
    assert split is not None
    body, head, features = split
    assert features == 16  # the first level's channels: fewer than the classes of a large atlas
    with torch.no_grad():
        torch.testing.assert_close(head(body(x)), y)


def test_build_network_refuses_an_unknown_architecture() -> None:
    with pytest.raises(BundleError, match="unknown network architecture 'vnet'; available: unet, dynunet, segresnet"):
        build_network(_plan("unet", 3), NetworkSpec("vnet"))


def test_a_dynunet_spec_without_topology_is_planned_from_the_plan() -> None:
    """NetworkSpec("dynunet") from code: build_network plans it as make_plan would."""
    plan = _plan("dynunet", 3)
    network = build_network(plan)
    kernels, strides = dynunet_topology(plan.patch_size, plan.target_spacing)
    assert network.kernel_size == [list(k) for k in kernels] and network.strides == [list(s) for s in strides]
    assert network.deep_supervision is False and network.filters == [16, 32, 64, 128][: len(strides)]


def test_dynunet_topology_pools_in_plane_first_on_thick_slices() -> None:
    """0.8 x 0.8 x 2.5 mm: the first pooling and convolution stay in-plane; then all axes together."""
    kernels, strides = dynunet_topology((64, 64, 32), (0.8, 0.8, 2.5))
    assert strides == ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert kernels == ((3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))


def test_dynunet_topology_stops_an_axis_at_four_voxels_and_at_five_poolings() -> None:
    _, strides = dynunet_topology((64, 64, 8), (1.0, 1.0, 1.0))  # z: 8 -> 4, then only x and y
    assert strides == ((1, 1, 1), (2, 2, 2), (2, 2, 1), (2, 2, 1), (2, 2, 1))
    _, strides = dynunet_topology((512, 512), (0.5, 0.5))
    assert len(strides) == 6 and all(s == (2, 2) for s in strides[1:])  # at most 5 poolings
    _, strides = dynunet_topology((40, 36), (1.0, 1.0))  # 36 -> 18 -> 9: odd, no further pooling
    assert [s[1] for s in strides] == [1, 2, 2, 1]
    with pytest.raises(ValueError, match="too small for a DynUNet"):
        dynunet_topology((12, 12, 12), (1.0, 1.0, 1.0))


@pytest.mark.parametrize(("spec", "divisors"), [
    (NetworkSpec(), (8, 8, 8)),
    (NetworkSpec(channels=(8, 16), strides=(3,)), (3, 3, 3)),
    (NetworkSpec("segresnet", blocks_down=(1, 2, 2), blocks_up=(1, 1)), (4, 4, 4)),
    (NetworkSpec("dynunet").planned((64, 64, 32), (0.8, 0.8, 2.5)), (16, 16, 8)),
    (NetworkSpec("unet_head").planned((64, 64, 32), (0.8, 0.8, 2.5)), (16, 16, 8)),
])
def test_patch_divisors_per_architecture(spec: NetworkSpec, divisors: tuple[int, ...]) -> None:
    assert spec.patch_divisors(3) == divisors


def test_bundle_metadata_declares_the_divisors_per_axis() -> None:
    """MONAI's verify_net_in_out builds its fake input from these: a DynUNet's differ per axis."""
    plan = _plan("dynunet", 3)
    plan.network = plan.network.planned(plan.patch_size, plan.target_spacing)
    shape = metadata(plan, "x", "y", "z")["network_data_format"]["inputs"]["image"]["spatial_shape"]
    assert shape == [f"{d}*n" for d in plan.network.patch_divisors(3)] == ["8*n", "8*n", "4*n"]
    unet = metadata(_plan("unet", 2), "x", "y", "z")["network_data_format"]["outputs"]["pred"]["spatial_shape"]
    assert unet == ["8*n", "8*n"]


@pytest.mark.parametrize("name", ["dynunet", "segresnet", "unet_head"])
def test_a_plan_with_the_new_fields_round_trips(tmp_path: Path, name: str) -> None:
    """plan.json holds the architecture's own fields only, and loads back equal."""
    extra = {"dynunet": {"filters": (8, 16, 32, 64), "res_block": True, "dropout": 0.1},
             "segresnet": {"init_filters": 8, "blocks_down": (1, 2, 2), "blocks_up": (1, 1), "norm": "batch"},
             "unet_head": {"channels": (8, 16, 32, 64), "num_res_units": 2}}
    plan = _plan(name, 3, **extra[name])
    plan.network = plan.network.planned(plan.patch_size, plan.target_spacing)
    path = plan.save(tmp_path / "plan.json")
    network = json.loads(path.read_text())["network"]
    assert set(network) == {"name", *FIELDS[name]} and network["name"] == name
    loaded = Plan.load(path)
    assert loaded == plan and loaded.network.name == name
    assert Plan.from_json(plan.to_json()) == plan  # the in-memory form (tuples) too


def test_a_unet_head_takes_the_dynunet_strides_per_axis_and_refuses_a_strided_first_level() -> None:
    """The planner's lean network: MONAI's U-Net with per-axis strides (in-plane first on thick slices),
    then a pointwise head; level_strides as a DynUNet's (first level full resolution)."""
    plan = _plan("unet_head", 3)
    plan.network = plan.network.planned(plan.patch_size, plan.target_spacing)
    assert plan.network.level_strides == dynunet_topology(plan.patch_size, plan.target_spacing)[1]
    assert plan.network.level_strides[1] == (2, 2, 1) and len(plan.network.channels) == len(plan.network.level_strides)
    data = plan.to_json()
    data["network"]["level_strides"] = [[2, 2, 2], *data["network"]["level_strides"][1:]]
    with pytest.raises(ValueError, match="must start with a level of strides 1"):
        Plan.from_json(data)
    data["network"]["level_strides"] = [[1, 1, 1], [2, 2, 2]]
    with pytest.raises(ValueError, match=r"'network\.channels' must have one entry per level"):
        Plan.from_json(data)


def test_a_dynunet_plan_without_topology_is_planned_on_load(tmp_path: Path) -> None:
    data = _plan("unet", 3).to_json()
    data["network"] = {"name": "dynunet"}
    plan = Plan.from_json(data)
    assert plan.network == NetworkSpec("dynunet").planned(plan.patch_size, plan.target_spacing)
    assert plan.network.filters == (16, 32, 64, 128) and plan.network.level_strides[0] == (1, 1, 1)


def test_an_old_plan_without_architecture_loads_as_the_same_unet(tmp_path: Path) -> None:
    """A plan.json written before --network (no name, or only some U-Net fields) is a U-Net, written back
    unchanged."""
    data = _plan("unet", 3).to_json()
    old = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 2, "norm": "batch", "dropout": 0.0}
    data["network"] = dict(old)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    plan = Plan.load(path)
    assert plan.network == NetworkSpec(channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm="batch")
    assert json.loads(json.dumps(plan.to_json()))["network"] == {"name": "unet", **old}
    data["network"] = {}
    path.write_text(json.dumps(data))
    assert Plan.load(path).network == NetworkSpec()


def test_train_and_bundle_init_take_network() -> None:
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d.json", "--out", "run", "--network", "segresnet"])
    assert _train_options(args).network == NetworkSpec("segresnet")
    args = parser.parse_args(["train", "--data", "d.json", "--out", "run"])
    assert _train_options(args).network == NetworkSpec()  # default: the U-Net, as before
    args = parser.parse_args(["bundle", "init", "--data", "d.json", "--out", "b", "--network", "dynunet"])
    assert args.network == "dynunet"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d.json", "--out", "run", "--network", "vnet"])


@pytest.mark.parametrize("where", [["--bundle", "b"], ["--out", "run", "--resume"]])
def test_network_is_refused_where_the_plan_exists(where: list[str]) -> None:
    args = build_parser().parse_args(["train", "--data", "d.json", *where, "--network", "dynunet"])
    with pytest.raises(InputError, match="--network chooses the network of a new plan"):
        _train_options(args)


# ------------------------------------------------------------------------------ deep supervision


def test_a_deep_supervision_dynunet_trains_with_heads_and_infers_with_its_main_output(tmp_path: Path) -> None:
    """Training mode stacks the main output and the heads' (one per decoder level below the full
    resolution except the lowest: n - 3 for n levels); eval mode gives the main output only, so the
    same network serves inference: its trained weights load strictly, and the bounded-memory inferer's
    body/head split reproduces the main output."""
    from medseg.networks import load_weights
    from medseg.networks.factory import deep_supervision_heads

    plan = _plan("dynunet", 3, deep_supervision=True)
    plan = dataclasses.replace(plan, patch_size=(64, 64, 32), target_spacing=(1.0, 1.0, 1.0))
    spec = plan.network.planned(plan.patch_size, plan.target_spacing)
    assert len(spec.level_strides) == 5 and deep_supervision_heads(spec) == 2
    torch.manual_seed(0)
    network = build_network(plan)
    x = torch.rand(1, 1, *plan.patch_size)
    with torch.no_grad():
        stacked = network.train()(x)
        main = network.eval()(x)
    assert stacked.shape == (1, 3, plan.num_classes, *plan.patch_size) and main.shape == (1, plan.num_classes, *plan.patch_size)
    assert any(key.startswith("deep_supervision_heads.") for key in network.state_dict())
    torch.save(network.state_dict(), tmp_path / "model.pt")
    inference = load_weights(build_network(plan), tmp_path / "model.pt")  # strict: heads included
    split = split_pointwise_head(inference)
    assert split is not None
    body, head, _ = split
    with torch.no_grad():
        torch.testing.assert_close(inference(x), main)
        torch.testing.assert_close(head(body.train()(x)), main)  # the body never stacks heads, even in training mode
    assert inference.deep_supervision  # the split left the network as it was
    few = dataclasses.replace(plan, patch_size=(16, 16, 16))  # 3 levels: no head below the lowest-but-one
    assert deep_supervision_heads(few.network.planned(few.patch_size, few.target_spacing)) == 0
    assert not build_network(few).deep_supervision
