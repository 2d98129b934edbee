"""The training cases a run reads (medseg.engines.data.find_training_cases): an nnU-Net v2 raw folder is
found, and a dataset whose regions, ignore label or channels differ from the plan's is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from medseg.data.datalist import load_datalist, validate_datalist
from medseg.data.synthetic import write_dataset
from medseg.engines.data import find_training_cases, training_datalist
from medseg.errors import InputError
from medseg.labels import Region
from medseg.plan import Channel, Intensity, make_plan


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = write_dataset(tmp_path_factory.mktemp("cases") / "mr2", "mr", cases=3, size=32, channels=2,
                         regions=True).parent
    datalist = load_datalist(root)
    return root, make_plan(datalist, validate_datalist(datalist))


def test_a_raw_folder_is_found_with_its_channels(raw: tuple) -> None:
    root, plan = raw
    datalist = training_datalist(root, plan)
    assert [len(c.images) for c in datalist.training] == [2, 2] and datalist.regions == plan.regions


@pytest.mark.parametrize("change", [
    {"regions": (Region("organs", (1, 2, 3), 1), Region("liver", (2,), 2), Region("lesion", (3,), 3))},
    {"ignore_label": 4},
    {"channels": (Channel("T1", Intensity("mr")),)},
])
def test_a_dataset_unlike_the_plan_is_refused(raw: tuple, change: dict) -> None:
    root, plan = raw
    with pytest.raises(InputError) as excinfo:
        find_training_cases(root, dataclasses.replace(plan, **change))
    assert str(excinfo.value).startswith(str((root / "dataset.json").resolve()))


def test_ignore_label_in_the_dataset_must_be_in_the_plan(raw: tuple, tmp_path: Path) -> None:
    root, plan = raw
    data = json.loads((root / "dataset.json").read_text())
    data["labels"]["ignore"] = 4
    copy = tmp_path / "mr2"
    copy.mkdir()
    for folder in ("imagesTr", "labelsTr"):
        (copy / folder).symlink_to(root / folder)
    (copy / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="ignore label 4"):
        find_training_cases(copy, plan)
    assert find_training_cases(copy, dataclasses.replace(plan, ignore_label=4)).ignore_label == 4
