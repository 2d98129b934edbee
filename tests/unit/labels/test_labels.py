"""Label names from every source a user has (medseg.labels.read_label_names) and label mappings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medseg.errors import InputError
from medseg.labels import parse_label_mapping, read_label_names

BUNDLE = Path(__file__).resolve().parents[3] / "bundles" / "ct_abdomen_phantom"
CT_NAMES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "bone", 5: "lesion"}


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_a_bundle_folder_its_plan_and_its_metadata_give_the_bundles_labels(tmp_path: Path) -> None:
    assert read_label_names(BUNDLE) == CT_NAMES
    assert read_label_names(BUNDLE / "configs" / "plan.json") == CT_NAMES
    assert read_label_names(BUNDLE / "configs" / "metadata.json") == CT_NAMES  # channel_def
    zoo = tmp_path / "zoo_bundle"  # a MONAI model-zoo bundle has metadata.json but no plan.json
    (zoo / "configs").mkdir(parents=True)
    shutil.copy(BUNDLE / "configs" / "metadata.json", zoo / "configs" / "metadata.json")
    assert read_label_names(zoo) == CT_NAMES


def test_full_and_labels_only_dataset_json_in_both_label_forms(tmp_path: Path) -> None:
    full = {"name": "x", "modality": {"0": "CT"}, "training": [{"image": "a.nii.gz", "label": "b.nii.gz"}],
            "labels": {"0": "background", "1": "liver"}}
    assert read_label_names(_write(tmp_path / "full" / "dataset.json", full)) == {0: "background", 1: "liver"}
    assert read_label_names(tmp_path / "full") == {0: "background", 1: "liver"}  # a dataset folder
    msd = _write(tmp_path / "msd.json", {"labels": {"1": "liver", "0": "background", "2": "spleen"}})
    assert read_label_names(msd) == {0: "background", 1: "liver", 2: "spleen"}
    assert list(read_label_names(msd)) == [0, 1, 2]
    v2 = _write(tmp_path / "v2.json", {"labels": {"background": 0, "liver": 1, "tumour": 2}})
    assert read_label_names(v2) == {0: "background", 1: "liver", 2: "tumour"}


def test_region_based_dataset_labels_name_the_painted_values(tmp_path: Path) -> None:
    brats = _write(tmp_path / "dataset.json", {"labels": {"background": 0, "whole tumour": [1, 2, 3],
                                                          "tumour core": [2, 3], "enhancing tumour": 3},
                                               "regions_class_order": [1, 2, 3]})
    assert read_label_names(brats) == {0: "background", 1: "whole tumour", 2: "tumour core", 3: "enhancing tumour"}


@pytest.mark.parametrize(("content", "fragment"), [
    ({"name": "no labels"}, "holds no \"labels\""),
    ({"labels": {"1": "liver"}}, "must declare 0 (background)"),
    ({"labels": {"background": 0, "tumour": [1, 2]}}, "need 'regions_class_order'"),
    ({"labels": {"0": "background", "70000": "x"}}, "outside 0..65535"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_label_sources_are_refused_naming_the_file(tmp_path: Path, content: object, fragment: str) -> None:
    path = _write(tmp_path / "labels.json", content)
    with pytest.raises(InputError) as excinfo:
        read_label_names(path)
    assert str(excinfo.value).startswith(str(path)) and fragment in str(excinfo.value)


def test_missing_path_invalid_json_and_a_folder_without_labels(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_label_names(tmp_path / "nothing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="not a valid JSON"):
        read_label_names(tmp_path / "broken.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no label names here"):
        read_label_names(tmp_path / "empty")


def test_parse_label_mapping() -> None:
    assert parse_label_mapping("6=5,7=5") == {6: 5, 7: 5}
    assert parse_label_mapping(" 3 = 0 ") == {3: 0}
    for bad in ("6", "6=x", "a=1", "-1=2", "6=5,6=4", "", "70000=1"):
        with pytest.raises(ValueError):
            parse_label_mapping(bad)
