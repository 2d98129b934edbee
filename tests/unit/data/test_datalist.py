"""Tests of dataset.json parsing, case validation and fold splitting (medseg.data.datalist)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data import validation
from medseg.data.datalist import (
    Case,
    load_datalist,
    split_cases,
    validate_case,
    validate_datalist,
)
from medseg.data.synthetic import CT_LABELS, write_dataset
from medseg.data.validation import read_label_map
from medseg.errors import InputError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine 4-case CT phantom dataset (3 training, 1 test); do not modify, use ``copy``."""
    return write_dataset(tmp_path_factory.mktemp("datalist") / "ct", "ct", cases=4, seed=0, size=32).parent


@pytest.fixture
def copy(dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the dataset that a test may alter."""
    return Path(shutil.copytree(dataset, tmp_path / "ct"))


def _json(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _write_json(root: Path, data: dict) -> Path:
    path = root / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def _message(excinfo: pytest.ExceptionInfo, path: Path) -> str:
    message = str(excinfo.value)
    assert message.startswith(str(path)), message
    return message


# --------------------------------------------------------------------------------------------
# load_datalist
# --------------------------------------------------------------------------------------------


def test_loads_msd_dataset_json(dataset: Path) -> None:
    datalist = load_datalist(dataset / "dataset.json")
    assert datalist.labels == CT_LABELS and all(isinstance(k, int) for k in datalist.labels)
    assert datalist.foreground_labels == {k: v for k, v in CT_LABELS.items() if k}
    assert datalist.modality == "CT" and datalist.preset == "ct"
    assert datalist.name == "medseg-synthetic-ct"
    assert datalist.root == dataset.resolve()
    assert [c.name for c in datalist.training] == ["ct_000", "ct_001", "ct_002"]
    for case in datalist.training:
        assert case.image.is_absolute() and case.label.is_absolute()
        assert case.image == (dataset / "imagesTr" / f"{case.name}.nii.gz").resolve()
        assert case.label == (dataset / "labelsTr" / f"{case.name}.nii.gz").resolve()
        assert case.image.is_file() and case.label.is_file()
    # test cases get their reference label map from labelsTs/
    assert [c.name for c in datalist.test] == ["ct_003"]
    assert datalist.test[0].image == (dataset / "imagesTs" / "ct_003.nii.gz").resolve()
    assert datalist.test[0].label is not None
    assert datalist.test[0].label.resolve() == (dataset / "labelsTs" / "ct_003.nii.gz").resolve()
    assert datalist.extra["numTraining"] == 3 and "training" not in datalist.extra


def test_loads_from_the_dataset_folder(dataset: Path) -> None:
    assert load_datalist(dataset).path == (dataset / "dataset.json").resolve()


def test_test_case_without_reference_has_no_label(copy: Path) -> None:
    (copy / "labelsTs" / "ct_003.nii.gz").unlink()
    datalist = load_datalist(copy)
    assert [(c.name, c.label) for c in datalist.test] == [("ct_003", None)]


def test_accepts_nnunet_v2_labels_and_channel_names(copy: Path) -> None:
    data = _json(copy)
    del data["modality"]
    data["channel_names"] = {"0": "CT"}
    data["labels"] = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "bone": 4, "lesion": 5}
    _write_json(copy, data)
    datalist = load_datalist(copy)
    assert datalist.labels == CT_LABELS
    assert datalist.modality == "CT"


@pytest.mark.parametrize(("channel", "modality", "preset"), [("T2", "MR", "mr"), ("MRI", "MR", "mr"), ("ct", "CT", "ct")])
def test_modality_names(copy: Path, channel: str, modality: str, preset: str) -> None:
    data = _json(copy)
    data["modality"] = data["channel_names"] = {"0": channel}
    _write_json(copy, data)
    datalist = load_datalist(copy)
    assert (datalist.modality, datalist.preset) == (modality, preset)


def test_missing_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        load_datalist(tmp_path)
    _message(excinfo, tmp_path / "dataset.json")
    with pytest.raises(InputError) as excinfo:
        load_datalist(tmp_path / "other.json")
    _message(excinfo, tmp_path / "other.json")


def test_invalid_json(copy: Path) -> None:
    (copy / "dataset.json").write_text('{"labels": {"0": "background",}')
    with pytest.raises(InputError) as excinfo:
        load_datalist(copy)
    assert "JSON" in _message(excinfo, copy / "dataset.json")


def test_missing_labels(copy: Path) -> None:
    data = _json(copy)
    del data["labels"]
    path = _write_json(copy, data)
    with pytest.raises(InputError) as excinfo:
        load_datalist(path)
    assert "'labels'" in _message(excinfo, path.resolve())


def test_listed_label_file_missing(copy: Path) -> None:
    missing = copy / "labelsTr" / "ct_001.nii.gz"
    missing.unlink()
    with pytest.raises(InputError) as excinfo:
        load_datalist(copy)
    assert "does not exist" in _message(excinfo, missing.resolve())


def test_duplicate_case_names(copy: Path) -> None:
    data = _json(copy)
    (copy / "more").mkdir()
    shutil.copy(copy / "imagesTr" / "ct_000.nii.gz", copy / "more" / "ct_000.nii.gz")
    data["training"].append({"image": "./more/ct_000.nii.gz", "label": "./labelsTr/ct_000.nii.gz"})
    path = _write_json(copy, data)
    with pytest.raises(InputError) as excinfo:
        load_datalist(path)
    message = _message(excinfo, path.resolve())
    assert "ct_000" in message and "twice" in message


def test_multi_channel_modality(copy: Path) -> None:
    data = _json(copy)
    data["modality"] = data["channel_names"] = {"0": "T1", "1": "T2"}
    path = _write_json(copy, data)
    with pytest.raises(InputError) as excinfo:
        load_datalist(path)
    assert "multi-channel" in _message(excinfo, path.resolve())


# --------------------------------------------------------------------------------------------
# validate_datalist
# --------------------------------------------------------------------------------------------


def test_validate_returns_the_image_geometries(dataset: Path) -> None:
    datalist = load_datalist(dataset)
    geometries = validate_datalist(datalist)
    assert len(geometries) == 3
    for case, geometry in zip(datalist.training, geometries):
        image = sitk.ReadImage(str(case.image))
        assert geometry.size == image.GetSize() and geometry.dims == 3
        np.testing.assert_allclose(geometry.spacing, image.GetSpacing())
    assert len(validate_datalist(datalist, include_test=True)) == 4


def _replace_label(copy: Path, name: str, change) -> Path:
    """Rewrite labelsTr/<name> with ``change(label_image) -> new image``; return its resolved path."""
    path = copy / "labelsTr" / name
    sitk.WriteImage(change(sitk.ReadImage(str(path))), str(path), True)
    return path.resolve()


def _validate_error(copy: Path) -> InputError:
    datalist = load_datalist(copy)
    with pytest.raises(InputError) as excinfo:
        validate_datalist(datalist)
    return excinfo


def test_label_map_of_different_shape(copy: Path) -> None:
    def crop(label: sitk.Image) -> sitk.Image:
        return label[:, :, 1:]

    path = _replace_label(copy, "ct_001.nii.gz", crop)
    message = _message(_validate_error(copy), path)
    assert "size" in message and "ct_001.nii.gz" in message


@pytest.mark.parametrize("what", ["spacing", "origin"])
def test_label_map_with_different_grid(copy: Path, what: str) -> None:
    def move(label: sitk.Image) -> sitk.Image:
        if what == "spacing":
            label.SetSpacing(tuple(s * 1.1 for s in label.GetSpacing()))
        else:
            label.SetOrigin(tuple(o + 5.0 for o in label.GetOrigin()))
        return label

    path = _replace_label(copy, "ct_002.nii.gz", move)
    assert what in _message(_validate_error(copy), path)


def test_undeclared_label_values(copy: Path) -> None:
    def add_values(label: sitk.Image) -> sitk.Image:
        array = sitk.GetArrayFromImage(label)
        array[0, 0, 0], array[0, 0, 1] = 7, 9
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(label)
        return out

    path = _replace_label(copy, "ct_000.nii.gz", add_values)
    message = _message(_validate_error(copy), path)
    assert "[7, 9]" in message and "not declared" in message


def test_label_values_far_outside_the_declared_ones_are_named(copy: Path) -> None:
    """A stray value of 2**30 (or a negative one) is named, without counting up to it (a bincount
    array of a billion entries)."""
    def add_values(label: sitk.Image) -> sitk.Image:
        array = sitk.GetArrayFromImage(label).astype(np.int32)
        array[0, 0, 0], array[1, 2, 3] = 2**30, -4
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(label)
        return out

    path = _replace_label(copy, "ct_000.nii.gz", add_values)
    message = _message(_validate_error(copy), path)
    assert f"[-4, {2**30}]" in message and "not declared" in message, message


def test_label_map_counted_in_slabs_matches_a_whole_map_count(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = load_datalist(copy).training[0]
    assert case.label is not None
    geometry = validate_case(case, CT_LABELS)
    monkeypatch.setattr(validation, "_SLAB_VOXELS", 1000)  # many slabs, the last one partial
    array, counts = read_label_map(case.label, case.image, geometry, CT_LABELS)
    assert array.shape == tuple(geometry.size) and array.size % 1000 != 0
    expected = np.bincount(sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))).ravel(), minlength=len(counts))
    assert counts.tolist() == expected.tolist() and counts.sum() == array.size


def test_non_integer_float_label_map(copy: Path) -> None:
    def to_float(label: sitk.Image) -> sitk.Image:
        array = sitk.GetArrayFromImage(label).astype(np.float32)
        array[0, 0, 0] = 0.5
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(label)
        return out

    path = _replace_label(copy, "ct_001.nii.gz", to_float)
    assert "non-integer" in _message(_validate_error(copy), path)


def test_integer_valued_float_label_map_is_accepted(copy: Path) -> None:
    _replace_label(copy, "ct_001.nii.gz", lambda label: sitk.Cast(label, sitk.sitkFloat32))
    assert len(validate_datalist(load_datalist(copy))) == 3


def test_truncated_image(copy: Path) -> None:
    path = copy / "imagesTr" / "ct_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    assert "truncated" in _message(_validate_error(copy), path.resolve())


def test_truncated_image_in_a_format_simpleitk_checks(tmp_path: Path, dataset: Path) -> None:
    case = load_datalist(dataset).training[0]
    image = tmp_path / "ct_000.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(case.image)), str(image), True)
    data = image.read_bytes()
    image.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(InputError) as excinfo:
        validate_case(Case("ct_000", image, case.label), CT_LABELS)
    assert "truncated" in _message(excinfo, image)


# --------------------------------------------------------------------------------------------
# split_cases
# --------------------------------------------------------------------------------------------


def _cases(n: int) -> list[Case]:
    return [Case(f"case_{i:02d}", Path(f"/data/case_{i:02d}.nii.gz")) for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    cases = _cases(12)
    validation_sets = []
    for fold in range(5):
        train, val = split_cases(cases, fold)
        assert split_cases(cases, fold) == (train, val)  # same call, same split
        assert val and train
        assert not {c.name for c in train} & {c.name for c in val}
        assert sorted(train + val, key=lambda c: c.name) == cases
        validation_sets.append({c.name for c in val})
    # the five validation folds partition the cases
    assert sum(len(v) for v in validation_sets) == len(cases)
    assert set().union(*validation_sets) == {c.name for c in cases}
    assert sorted(map(len, validation_sets)) == [2, 2, 2, 3, 3]  # balanced folds


def test_split_depends_on_seed_not_on_call_order() -> None:
    cases = _cases(20)
    first = split_cases(cases, 0, seed=0)[1]
    assert split_cases(cases, 0, seed=0)[1] == first
    assert any(split_cases(cases, 0, seed=s)[1] != first for s in (1, 2, 3))


def test_every_fold_is_valid_with_fewer_cases_than_folds() -> None:
    cases = _cases(3)
    for fold in range(5):
        train, val = split_cases(cases, fold)
        assert train and val and len(train) + len(val) == 3


@pytest.mark.parametrize("fold", [5, -1])
def test_fold_out_of_range(fold: int) -> None:
    with pytest.raises(InputError, match="--fold"):
        split_cases(_cases(10), fold)


def test_split_needs_two_cases() -> None:
    with pytest.raises(InputError, match="at least 2"):
        split_cases(_cases(1), 0)
