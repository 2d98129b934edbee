"""Tests of the synthetic MSD-style phantom generator (medseg.data.synthetic)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.synthetic import (
    CT_LABELS,
    MR_LABELS,
    Grid,
    make_phantom,
    random_grid,
    render,
    sample_anatomy,
    write_dataset,
)
from medseg.data.synthetic import dataset as synthetic_dataset
from medseg.data.synthetic.grid import rotation
from medseg.errors import InputError

RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def _cases(root: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of every case listed in dataset.json, training then test."""
    description = json.loads((root / "dataset.json").read_text())
    pairs = [(root / e["image"], root / e["label"]) for e in description["training"]]
    pairs += [(root / e, root / e.replace("imagesTs", "labelsTs")) for e in description["test"]]
    return pairs


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def ct_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "ct"
    json_path = write_dataset(root, modality="ct", cases=8, seed=0, size=96)
    assert json_path == root / "dataset.json"
    return root


def test_dataset_json_matches_the_files(ct_dataset: Path) -> None:
    description = json.loads((ct_dataset / "dataset.json").read_text())
    assert description["name"] == "medseg-synthetic-ct"
    assert description["tensorImageSize"] == "3D"
    assert description["modality"] == {"0": "CT"} == description["channel_names"]
    assert description["labels"] == {str(k): v for k, v in CT_LABELS.items()}
    assert description["file_ending"] == ".nii.gz"
    assert description["seed"] == 0 and description["generator"] == "medseg.data.synthetic"
    # 8 cases: round(8 * 0.25) = 2 test cases, the last ones
    assert (description["numTraining"], description["numTest"]) == (6, 2)
    assert [e["image"] for e in description["training"]] == [f"./imagesTr/ct_{i:03d}.nii.gz" for i in range(6)]
    assert [e["label"] for e in description["training"]] == [f"./labelsTr/ct_{i:03d}.nii.gz" for i in range(6)]
    assert description["test"] == ["./imagesTs/ct_006.nii.gz", "./imagesTs/ct_007.nii.gz"]
    listed = {p.resolve() for pair in _cases(ct_dataset) for p in pair} | {(ct_dataset / "dataset.json").resolve()}
    on_disk = {p.resolve() for p in ct_dataset.rglob("*") if p.is_file()}
    assert listed == on_disk  # every listed file exists, and nothing else was written
    assert not [p for p in ct_dataset.parent.iterdir() if ".tmp-" in p.name]


def test_label_maps_hold_every_declared_label_and_nothing_else(ct_dataset: Path) -> None:
    for image_path, label_path in _cases(ct_dataset):
        image, _ = _read(image_path)
        label, labels = _read(label_path)
        assert label.GetPixelID() == sitk.sitkUInt8 and image.GetPixelID() == sitk.sitkInt16
        assert set(np.unique(labels).tolist()) == set(CT_LABELS), label_path.name
        # image and label map share the grid exactly
        assert _geometry(image) == _geometry(label)


def test_grids_are_anisotropic_and_variously_oriented(ct_dataset: Path) -> None:
    non_ras = oblique = 0
    for image_path, _ in _cases(ct_dataset):
        image = sitk.ReadImage(str(image_path))
        spacing = image.GetSpacing()
        assert math.isclose(spacing[0], spacing[1]) and 2.0 <= spacing[2] <= 3.0 and spacing[2] > 1.3 * spacing[0]
        assert 100.0 <= spacing[2] * image.GetSize()[2] <= 140.0  # slice-direction field of view
        direction = np.asarray(image.GetDirection())
        non_ras += not np.allclose(direction, RAS, atol=1e-4)
        oblique += bool(np.any((np.abs(direction) > 1e-3) & (np.abs(direction) < 0.999)))
        # thick-slice axis roughly along S-I (axial CT)
        assert abs(direction[8]) > math.cos(math.radians(25.0))
    assert non_ras >= 1 and oblique >= 1


def test_written_geometry_is_the_sampled_grid(ct_dataset: Path) -> None:
    children = np.random.SeedSequence(0).spawn(8)
    for child, (image_path, _) in zip(children, _cases(ct_dataset)):
        grid = random_grid(np.random.default_rng(child), 96, 3, "ct")
        written = Grid.from_image(sitk.ReadImage(str(image_path)))
        assert written.size == grid.size
        np.testing.assert_allclose(written.spacing, grid.spacing, rtol=1e-5)
        np.testing.assert_allclose(written.origin, grid.origin, atol=1e-3)
        np.testing.assert_allclose(written.direction, grid.direction, atol=1e-5)


def test_ct_intensities_are_plausible_hounsfield_units(ct_dataset: Path) -> None:
    for image_path, label_path in _cases(ct_dataset):
        _, hu = _read(image_path)
        _, labels = _read(label_path)
        corners = np.concatenate([hu[z, y, x].ravel() for z in (0, -1) for y in (slice(0, 3), slice(-3, None))
                                  for x in (slice(0, 3), slice(-3, None))])
        assert abs(np.median(corners) + 1000.0) < 30.0  # air outside the body
        means = {name: hu[labels == value].mean() for value, name in CT_LABELS.items() if value}
        assert abs(means["liver"] - 100.0) <= 25.0
        assert abs(means["spleen"] - 130.0) <= 25.0 and abs(means["kidney"] - 180.0) <= 35.0
        assert means["bone"] > 350.0
        assert means["lesion"] < means["liver"] - 25.0  # hypodense lesion


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    first = write_dataset(tmp_path / "a", cases=2, seed=7, size=32).parent
    second = write_dataset(tmp_path / "b", cases=2, seed=7, size=32).parent
    other = write_dataset(tmp_path / "c", cases=2, seed=8, size=32).parent
    for name in ("imagesTr/ct_000.nii.gz", "labelsTr/ct_000.nii.gz", "imagesTs/ct_001.nii.gz", "labelsTs/ct_001.nii.gz"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        a, b = sitk.ReadImage(str(first / name)), sitk.ReadImage(str(other / name))
        assert _geometry(a) != _geometry(b) or not np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert (first / "dataset.json").read_text() == (second / "dataset.json").read_text()


def test_same_anatomy_on_oblique_and_ras_grids_is_the_same_patient() -> None:
    centre = (12.0, -25.0, 40.0)
    anatomy = sample_anatomy(np.random.default_rng(3), 125.0, centre, "ct")
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    rotation_15 = rotation(axis, math.radians(15.0))
    oblique_rpi = rotation_15 @ np.diag([-1.0, 1.0, -1.0])
    oblique = Grid.centred((110, 100, 48), (1.1, 1.3, 2.6), centre, oblique_rpi.ravel())
    ras = Grid.centred((130, 130, 100), (1.0, 1.0, 1.2), centre, RAS)

    _, label_oblique = render(anatomy, oblique, np.random.default_rng(1))
    image_ras, label_ras = render(anatomy, ras, np.random.default_rng(2))
    assert Grid.from_image(image_ras) == ras
    resampled = sitk.Resample(label_oblique, label_ras, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    moved, fixed = sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(label_ras)
    assert _dice(moved == 1, fixed == 1) > 0.9  # liver
    for value in (2, 3, 4):
        assert _dice(moved == value, fixed == value) > 0.8, CT_LABELS[value]
    # organ centroids agree in world space
    stats = []
    for label in (label_oblique, label_ras):
        shape = sitk.LabelShapeStatisticsImageFilter()
        shape.Execute(label)
        stats.append(shape)
    for value in (1, 2, 3, 5):
        assert np.allclose(stats[0].GetCentroid(value), stats[1].GetCentroid(value), atol=1.5), CT_LABELS[value]
    # the vertebral body runs along S-I through both grids: compare its x, y only
    assert np.allclose(stats[0].GetCentroid(4)[:2], stats[1].GetCentroid(4)[:2], atol=1.5)


def test_liver_lies_on_the_patient_right_and_spleen_on_the_left() -> None:
    grid = Grid.centred((96, 96, 40), (1.3, 1.3, 2.5), (0.0, 0.0, 0.0), RAS)
    _, label = make_phantom(np.random.default_rng(0), grid, "ct", center_lps=(0.0, 0.0, 0.0))
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(label)
    assert shape.GetCentroid(1)[0] < -5.0 < 5.0 < shape.GetCentroid(2)[0]  # LPS: +x is the patient's left
    assert shape.GetCentroid(4)[1] > shape.GetCentroid(1)[1]  # bone posterior to the liver


def test_mr_dataset(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "mr", modality="MR", cases=2, seed=1, size=40).parent
    description = json.loads((root / "dataset.json").read_text())
    assert description["modality"] == {"0": "MRI"} and description["name"] == "medseg-synthetic-mr"
    assert description["labels"] == {str(k): v for k, v in MR_LABELS.items()}
    for image_path, label_path in _cases(root):
        assert image_path.name.startswith("mr_")
        image, signal = _read(image_path)
        _, labels = _read(label_path)
        assert image.GetPixelID() == sitk.sitkFloat32 and signal.min() >= 0.0
        assert set(np.unique(labels).tolist()) == set(MR_LABELS)
        liver, lesion = np.median(signal[labels == 1]), np.median(signal[labels == 5])
        assert lesion < 0.75 * liver
        assert np.median(signal[labels == 0]) < liver


def test_two_dimensional_dataset_has_every_label_in_each_slice(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ct2d", cases=4, seed=2, size=64, dims=2).parent
    assert json.loads((root / "dataset.json").read_text())["tensorImageSize"] == "2D"
    for image_path, label_path in _cases(root):
        image, _ = _read(image_path)
        label, labels = _read(label_path)
        assert image.GetDimension() == 2 == label.GetDimension() and image.GetSize() == (64, 64)
        assert len(image.GetDirection()) == 4 and _geometry(image) == _geometry(label)
        assert set(np.unique(labels).tolist()) == set(CT_LABELS), label_path.name


def test_refuses_a_non_empty_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="exists and is not empty"):
        write_dataset(out, cases=2, size=32)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_accepts_an_existing_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert write_dataset(out, cases=2, size=32).is_file()


def test_failure_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return make_phantom(*args, **kwargs)

    monkeypatch.setattr(synthetic_dataset, "make_phantom", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(tmp_path / "out", cases=3, size=32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "xr"}, "modality"),
        ({"dims": 4}, "dims"),
        ({"size": 16}, "size"),
        ({"cases": 1}, "need at least 2 cases"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        write_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
