"""The dataset fingerprint: values of a known image, workers, checks, the JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.datalist import load_datalist
from medseg.data.fingerprint import Fingerprint, extract_fingerprint
from medseg.errors import InputError


def _write(path: Path, array_zyx: np.ndarray, spacing: tuple[float, float, float]) -> None:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


@pytest.fixture()
def known_dataset(tmp_path: Path) -> Path:
    """Two cases of 10 x 8 x 6 voxels (x, y, z) at 0.5 x 1 x 2 mm: zero outside a 4 x 3 x 2 box; the label
    covers the box, values 100..123 (case 0) and 200..223 (case 1); label 2 on one voxel."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    training = []
    for number, offset in ((0, 100), (1, 200)):
        image = np.zeros((6, 8, 10), np.float32)  # z, y, x
        label = np.zeros((6, 8, 10), np.uint8)
        image[2:4, 1:4, 3:7] = offset + np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        label[2:4, 1:4, 3:7] = 1
        label[2, 1, 3] = 2
        name = f"case_{number}.nii.gz"
        _write(tmp_path / "imagesTr" / name, image, (0.5, 1.0, 2.0))
        _write(tmp_path / "labelsTr" / name, label, (0.5, 1.0, 2.0))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    description = {"name": "known", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "lesion",
                                                                        "3": "spleen"},
                   "training": training}
    (tmp_path / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return tmp_path / "dataset.json"


def test_fingerprint_of_a_known_image(known_dataset: Path) -> None:
    fingerprint = extract_fingerprint(load_datalist(known_dataset), samples=100_000, progress=False)
    case = fingerprint.cases[0]
    assert case.name == "case_0" and fingerprint.dims == 3 and fingerprint.channels == ("CT",)
    assert case.spacing == pytest.approx((0.5, 1.0, 2.0)) and case.shape == (10, 8, 6)
    assert case.shape_after_crop == (4, 3, 2)  # the non-zero box
    assert case.class_voxels == {0: 480 - 24, 1: 23, 2: 1, 3: 0}
    values = np.arange(100, 124, dtype=float)
    stats = case.intensity[0]
    assert stats.mean == pytest.approx(values.mean()) and stats.std == pytest.approx(values.std())
    assert (stats.min, stats.max) == (100.0, 123.0)
    assert stats.percentile_00_5 == pytest.approx(np.percentile(values, 0.5))
    assert stats.median == pytest.approx(111.5) and stats.percentile_99_5 == pytest.approx(np.percentile(values, 99.5))
    pooled = fingerprint.intensity[0]  # sampled evenly from both cases: about half 100..123, half 200..223
    assert pooled.mean == pytest.approx(161.5, abs=1.0) and pooled.min == 100.0 and pooled.max == 223.0
    assert fingerprint.median_relative_size_after_cropping == pytest.approx(24 / 480)


def test_the_ignore_label_is_counted_but_not_foreground(known_dataset: Path) -> None:
    """Voxels of the ignore label are counted, and their intensities left out of the foreground's."""
    description = json.loads(known_dataset.read_text(encoding="utf-8"))
    description["labels"] = {"background": 0, "liver": 1, "lesion": 2, "spleen": 3, "ignore": 5}
    known_dataset.write_text(json.dumps(description), encoding="utf-8")
    label = known_dataset.parent / "labelsTr" / "case_0.nii.gz"
    array = np.zeros((6, 8, 10), np.uint8)
    array[2:4, 1:4, 3:7] = 1
    array[3, 1:4, 3:7] = 5  # the upper half of the box: values 112..123
    _write(label, array, (0.5, 1.0, 2.0))
    fingerprint = extract_fingerprint(load_datalist(known_dataset), samples=1000, progress=False)
    case = fingerprint.cases[0]
    assert fingerprint.ignore_label == 5 and case.class_voxels[5] == 12 and case.class_voxels[1] == 12
    assert (case.intensity[0].min, case.intensity[0].max) == (100.0, 111.0)


def test_worker_processes_give_the_same_fingerprint(known_dataset: Path) -> None:
    datalist = load_datalist(known_dataset)
    alone = extract_fingerprint(datalist, workers=1, samples=1000, progress=False)
    pooled = extract_fingerprint(datalist, workers=2, samples=1000, progress=False)
    assert pooled.to_json() == alone.to_json()


def test_fingerprint_round_trips_through_json(known_dataset: Path, tmp_path: Path) -> None:
    fingerprint = extract_fingerprint(load_datalist(known_dataset), samples=1000, progress=False)
    path = fingerprint.save(tmp_path / "out" / "fingerprint.json")
    assert Fingerprint.load(path).to_json() == fingerprint.to_json()
    assert "imagesTr" not in path.read_text(encoding="utf-8")  # case names only, no paths


def test_bad_cases_are_refused_naming_the_file(known_dataset: Path) -> None:
    label = known_dataset.parent / "labelsTr" / "case_1.nii.gz"
    array = np.zeros((6, 8, 10), np.uint8)
    array[0, 0, 0] = 7
    _write(label, array, (0.5, 1.0, 2.0))
    with pytest.raises(InputError, match=r"case_1\.nii\.gz: label values \[7\] are not declared"):
        extract_fingerprint(load_datalist(known_dataset), workers=2, samples=100, progress=False)
    negative = np.zeros((6, 8, 10), np.int16)
    negative[1, 1, 1] = -3
    _write(label, negative, (0.5, 1.0, 2.0))
    with pytest.raises(InputError, match=r"case_1\.nii\.gz: label values \[-3\] are not declared"):
        extract_fingerprint(load_datalist(known_dataset), samples=100, progress=False)
    _write(label, np.zeros((6, 8, 10), np.uint8), (0.5, 1.0, 3.0))
    with pytest.raises(InputError, match=r"label map does not match its image case_1\.nii\.gz: spacing"):
        extract_fingerprint(load_datalist(known_dataset), samples=100, progress=False)
    with pytest.raises(InputError, match="--workers must be an integer of at least 1"):
        extract_fingerprint(load_datalist(known_dataset), workers=0)
