"""A dataset's labels as nnU-Net v2 declares them (medseg.labels.parse_dataset_labels): plain labels,
region-based labels with regions_class_order, and the ignore label."""

from __future__ import annotations

import pytest

from medseg.errors import InputError
from medseg.labels import Region, parse_dataset_labels, parse_labels

BRATS = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]}


def test_plain_labels_are_read_as_parse_labels_reads_them() -> None:
    for raw in ({"0": "background", "2": "spleen", "1": "liver"}, {"background": 0, "liver": 1, "spleen": 2}):
        parsed = parse_dataset_labels(raw, None, "dataset.json")
        assert parsed.labels == parse_labels(raw, "dataset.json") == {0: "background", 1: "liver", 2: "spleen"}
        assert (parsed.regions, parsed.ignore_label, parsed.label_values) == ((), None, (0, 1, 2))


def test_regions_in_painting_order_and_the_output_labels() -> None:
    parsed = parse_dataset_labels(BRATS, [1, 2, 3], "dataset.json")
    assert parsed.regions == (Region("whole tumour", (1, 2, 3), 1), Region("tumour core", (2, 3), 2),
                              Region("enhancing tumour", (3,), 3))
    assert parsed.labels == {0: "background", 1: "whole tumour", 2: "tumour core", 3: "enhancing tumour"}
    assert parsed.label_values == (0, 1, 2, 3) and parsed.ignore_label is None


def test_region_order_follows_the_json_order_and_regions_class_order() -> None:
    raw = {"background": 0, "lesion": 3, "organs": [1, 2, 3], "liver": [2, 3]}  # a single value is a region too
    parsed = parse_dataset_labels(raw, [5, 1, 2], "dataset.json")
    assert [(r.name, r.labels, r.value) for r in parsed.regions] == [
        ("lesion", (3,), 5), ("organs", (1, 2, 3), 1), ("liver", (2, 3), 2)]
    assert parsed.labels == {0: "background", 1: "organs", 2: "liver", 5: "lesion"}
    assert parsed.label_values == (0, 1, 2, 3)  # what the training label maps hold


def test_one_value_lists_alone_are_plain_labels() -> None:
    parsed = parse_dataset_labels({"background": 0, "liver": [1], "lesion": 2}, None, "dataset.json")
    assert parsed.regions == () and parsed.labels == {0: "background", 1: "liver", 2: "lesion"}


@pytest.mark.parametrize(("raw", "ignore"), [
    ({"background": 0, "liver": 1, "ignore": 2}, 2),
    ({"0": "background", "1": "liver", "7": "ignore"}, 7),  # the MSD form
])
def test_ignore_label_is_not_a_label(raw: dict, ignore: int) -> None:
    parsed = parse_dataset_labels(raw, None, "dataset.json")
    assert parsed.ignore_label == ignore and parsed.labels == {0: "background", 1: "liver"}
    assert parsed.label_values == (0, 1, ignore)


def test_ignore_label_with_regions() -> None:
    parsed = parse_dataset_labels({**BRATS, "ignore": 4}, [1, 2, 3], "dataset.json")
    assert parsed.ignore_label == 4 and 4 not in parsed.labels and len(parsed.regions) == 3
    assert parsed.label_values == (0, 1, 2, 3, 4)


@pytest.mark.parametrize(("raw", "order", "fragment"), [
    (BRATS, None, "need 'regions_class_order'"),
    (BRATS, [1, 2], "one label value per region (3"),
    (BRATS, [1, 1, 3], "its own non-zero value"),
    (BRATS, [0, 1, 2], "its own non-zero value"),
    (BRATS, "1,2,3", "one label value per region"),
    ({"whole tumour": [1, 2], "core": [2]}, [1, 2], "declare the background"),
    ({"background": 0, "all": [0, 1, 2], "core": [2]}, [1, 2], "mixes the background"),
    ({"background": 0, "a": [1, 2], "b": [2, 70000]}, [1, 2], "not a label value"),
    ({"background": 0, "a": [1, 2], "b": []}, [1, 2], "holds no label values"),
    ({**BRATS, "ignore": 2}, [1, 2, 3], "must be the highest label value"),
    ({**BRATS, "ignore": [4, 5]}, [1, 2, 3], "not a region"),
    ({"background": 0, "liver": 1, "ignore": 0}, None, "must be the highest label value"),
    ({"background": 0, "tumour": [1, 2]}, None, "need 'regions_class_order'"),
])
def test_bad_labels_are_refused_naming_the_file(raw: dict, order: object, fragment: str) -> None:
    with pytest.raises(InputError) as excinfo:
        parse_dataset_labels(raw, order, "/data/dataset.json")
    assert str(excinfo.value).startswith("/data/dataset.json") and fragment in str(excinfo.value)
