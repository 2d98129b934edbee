"""make_plan on datasets of several channels, regions and an ignore label (medseg.plan.derive)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.datalist import load_datalist, validate_datalist
from medseg.data.synthetic import write_dataset
from medseg.labels import Region
from medseg.plan import Intensity, Plan, make_plan


@pytest.fixture(scope="module")
def ct_t1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CT + T1 channels with regions, nnU-Net raw layout (do not modify)."""
    return write_dataset(tmp_path_factory.mktemp("plan") / "ct2", "ct", cases=3, size=32, channels=2,
                         regions=True).parent


def test_two_channels_and_regions(ct_t1: Path, tmp_path: Path) -> None:
    datalist = load_datalist(ct_t1)
    plan = make_plan(datalist, validate_datalist(datalist))
    assert [c.name for c in plan.channels] == ["CT", "T1"] and plan.num_channels == 2
    ct, t1 = (c.intensity for c in plan.channels)
    assert ct.preset == "ct" and -200.0 < ct.a_min < ct.mean < ct.a_max and 300.0 < ct.a_max < 1500.0
    assert t1 == Intensity("mr") and plan.intensity == ct and plan.modality == "CT"
    assert plan.regions == (Region("organs", (1, 2, 3), 1), Region("liver", (2, 3), 2), Region("lesion", (3,), 3))
    assert plan.labels == {0: "background", 1: "organs", 2: "liver", 3: "lesion"} and plan.num_outputs == 3
    assert plan.ignore_label is None
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan  # a valid plan


def test_one_channel_dataset_keeps_the_old_plan(tmp_path: Path) -> None:
    msd = load_datalist(write_dataset(tmp_path / "msd", "mr", cases=2, size=32))
    raw = load_datalist(write_dataset(tmp_path / "raw", "mr", cases=2, size=32, layout="nnunet"))
    plans = [make_plan(d, validate_datalist(d)) for d in (msd, raw)]
    assert plans[0].channels == () == plans[1].channels and plans[0].regions == () and plans[0].ignore_label is None
    assert plans[0].to_json() == plans[1].to_json()


def test_ignore_label_is_left_out_of_the_ct_statistics(ct_t1: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(ct_t1, tmp_path / "ct2"))
    for label_path in (root / "labelsTr").iterdir():  # an ignored block of air in a corner of every label map
        label = sitk.ReadImage(str(label_path))
        array = sitk.GetArrayFromImage(label)
        array[:4, :10, :10] = 4
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(label)
        sitk.WriteImage(out, str(label_path), True)
    data = json.loads((root / "dataset.json").read_text())
    data["labels"]["ignore"] = 4
    (root / "dataset.json").write_text(json.dumps(data))
    datalist = load_datalist(root)
    plan = make_plan(datalist, validate_datalist(datalist))
    assert plan.ignore_label == 4 and 4 not in plan.labels
    assert plan.channels[0].intensity.a_min > -200.0  # the ignored air (-1000 HU) is not foreground
    # counted as foreground, the same block would pull the lower clip to air
    data["labels"]["air"] = data["labels"].pop("ignore")
    data["regions_class_order"] = [1, 2, 3, 4]
    (root / "dataset.json").write_text(json.dumps(data))
    datalist = load_datalist(root)
    assert np.isclose(make_plan(datalist, validate_datalist(datalist)).channels[0].intensity.a_min, -1000.0, atol=60)
