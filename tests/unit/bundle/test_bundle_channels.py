"""Bundles of multi-channel, region-based plans: metadata that states the input channels and the sigmoid
region outputs, and verify_bundle (with MONAI's verify_net_in_out) checking them against the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from medseg.bundle.create import write_bundle
from medseg.bundle.runner import run_bundle
from medseg.bundle.verify import verify_bundle
from medseg.data.datalist import load_datalist, validate_datalist
from medseg.data.synthetic import write_dataset
from medseg.errors import BundleError
from medseg.labels import Region, read_label_names
from medseg.networks import build_network
from medseg.plan import Channel, Intensity, NetworkSpec, Plan, make_plan

LABELS = {0: "background", 1: "edema", 2: "necrosis", 3: "enhancing tumour"}
REGIONS = (Region("whole tumour", (1, 2, 3), 1), Region("tumour core", (2, 3), 2), Region("enhancing tumour", (3,), 3))


def region_plan() -> Plan:
    mr = Intensity("mr")
    return Plan(3, "MR", dict(LABELS), (1.0, 1.0, 1.0), (16, 16, 16), mr,
                NetworkSpec(name="dynunet", filters=(4, 8, 16)), channels=(Channel("T1", mr), Channel("FLAIR", mr)),
                regions=REGIONS)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("bundles") / "brain", region_plan(), data_source="test")


def test_metadata_states_the_input_channels_and_the_sigmoid_regions(bundle: Path) -> None:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 2 and image["channel_def"] == {"0": "T1", "1": "FLAIR"}
    assert pred["num_channels"] == 3
    assert pred["channel_def"] == {"0": "whole tumour", "1": "tumour core", "2": "enhancing tumour"}
    assert "sigmoid per region" in meta["pred_classes"] and "2 channels" in meta["image_classes"]
    # the label names of the bundle are the label map's values, not the output channels
    assert read_label_names(bundle / "configs" / "metadata.json") == LABELS


def test_verify_passes_a_region_bundle_and_refuses_a_one_channel_input(bundle: Path, tmp_path: Path) -> None:
    lines = verify_bundle(bundle)
    assert any(line.startswith("network_data_format: 2 input channels, 3 output channels (regions, sigmoid: "
                               "whole tumour, tumour core, enhancing tumour)") for line in lines)
    assert any(line.startswith("MONAI verify_net_in_out:") for line in lines)
    copy = write_bundle(tmp_path / "copy", region_plan(), data_source="test")
    path = copy / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = 1
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 4
    path.write_text(json.dumps(meta))
    with pytest.raises(BundleError) as info:
        verify_bundle(copy)
    assert "inputs.image.num_channels is 1; the network takes 2 channels" in str(info.value)
    assert "outputs.pred.num_channels is 4; the plan has 3 regions (sigmoid)" in str(info.value)


def test_bundle_run_predicts_the_channel_files_of_each_case(tmp_path: Path) -> None:
    """``medseg bundle run`` (MONAI's runner, safe mode) of a two-channel region bundle: the nnU-Net channel
    files of the test folder are grouped into cases, one label map per case on its first channel's grid."""
    dataset = write_dataset(tmp_path / "data", "ct", cases=3, seed=0, size=32, channels=2, regions=True)
    datalist = load_datalist(dataset)
    plan = make_plan(datalist, validate_datalist(datalist), network=NetworkSpec(name="dynunet", filters=(4, 8, 8, 8)))
    bundle = write_bundle(tmp_path / "bundle", plan)
    torch.manual_seed(0)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(build_network(plan).state_dict(), bundle / "models" / "model.pt")
    run_bundle(bundle, "inference", {"dataset_dir": str(dataset.parent), "output_dir": str(tmp_path / "out")})
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"{c.name}_seg.nii.gz" for c in datalist.test]
    out = sitk.ReadImage(str(tmp_path / "out" / written[0]))
    assert out.GetSize() == sitk.ReadImage(str(datalist.test[0].images[0])).GetSize()
