"""nnU-Net v2 raw datasets (cases found in imagesTr/ by name), several channels, regions and the ignore
label (medseg.data.datalist.load_datalist, validate_datalist)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.datalist import load_datalist, validate_datalist
from medseg.data.synthetic import write_dataset
from medseg.errors import InputError
from medseg.labels import Region


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine 4-case MR phantom dataset, 2 channels (T1, T2), regions, nnU-Net layout; use ``copy``."""
    return write_dataset(tmp_path_factory.mktemp("raw") / "mr2", "mr", cases=4, seed=0, size=32,
                         channels=2, regions=True).parent


@pytest.fixture
def copy(dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "mr2"))


def _edit_json(root: Path, **changes: object) -> Path:
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path.resolve()


def _refused(root: Path, validate: bool = False) -> str:
    with pytest.raises(InputError) as excinfo:
        datalist = load_datalist(root)
        if validate:
            validate_datalist(datalist, include_test=True)
    return str(excinfo.value)


def _rewrite(path: Path, change) -> None:
    sitk.WriteImage(change(sitk.ReadImage(str(path))), str(path), True)


def test_reads_the_raw_layout_with_two_channels_and_regions(dataset: Path) -> None:
    for source in (dataset, dataset / "dataset.json"):
        datalist = load_datalist(source)
        assert datalist.path == (dataset / "dataset.json").resolve() and datalist.file_ending == ".nii.gz"
        assert datalist.channel_names == ("T1", "T2") and datalist.modality == "MR"
        assert datalist.channel_presets == ("mr", "mr") and datalist.num_channels == 2
        assert [c.name for c in datalist.training] == ["mr_000", "mr_001", "mr_002"]
        for case in datalist.training:
            assert case.images == tuple((dataset / "imagesTr" / f"{case.name}_{k:04d}.nii.gz").resolve()
                                        for k in range(2))
            assert case.image == case.images[0]
            assert case.label == (dataset / "labelsTr" / f"{case.name}.nii.gz").resolve()
        [test] = datalist.test
        assert test.name == "mr_003" and test.label == (dataset / "labelsTs" / "mr_003.nii.gz").resolve()
        assert len(test.images) == 2
        assert datalist.regions == (Region("organs", (1, 2, 3), 1), Region("liver", (2, 3), 2),
                                    Region("lesion", (3,), 3))
        assert datalist.labels == {0: "background", 1: "organs", 2: "liver", 3: "lesion"}
        assert datalist.ignore_label is None
    geometries = validate_datalist(load_datalist(dataset), include_test=True)
    assert len(geometries) == 4


def test_one_channel_raw_dataset_reads_like_the_msd_one(tmp_path: Path) -> None:
    msd = load_datalist(write_dataset(tmp_path / "msd", "ct", cases=2, size=32))
    raw = load_datalist(write_dataset(tmp_path / "raw", "ct", cases=2, size=32, layout="nnunet"))
    assert (raw.labels, raw.modality, raw.channel_names, raw.regions) == (msd.labels, "CT", ("CT",), ())
    assert raw.training[0].channels == () and raw.training[0].images == (raw.training[0].image,)
    assert raw.training[0].image.name == "ct_000_0000.nii.gz"
    # the same case, the same pixels
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(raw.training[0].image))).tobytes() == \
        sitk.GetArrayFromImage(sitk.ReadImage(str(msd.training[0].image))).tobytes()


def test_missing_channel_file(copy: Path) -> None:
    missing = copy / "imagesTr" / "mr_001_0001.nii.gz"
    missing.unlink()
    message = _refused(copy)
    assert message.startswith(str(missing)) and "channel 1 (T2) of case mr_001" in message


def test_extra_channel_file(copy: Path) -> None:
    extra = copy / "imagesTr" / "mr_000_0002.nii.gz"
    shutil.copy(copy / "imagesTr" / "mr_000_0001.nii.gz", extra)
    message = _refused(copy)
    assert message.startswith(str(extra)) and "declares 2 channel(s)" in message and "extra" in message


@pytest.mark.parametrize("name", ["mr_009.nii.gz", "notes.nrrd"])
def test_file_that_is_not_a_channel_file(copy: Path, name: str) -> None:
    stray = copy / "imagesTr" / name
    shutil.copy(copy / "labelsTr" / "mr_000.nii.gz", stray)
    assert _refused(copy).startswith(str(stray))


def test_files_that_are_not_images_are_left_alone(copy: Path) -> None:
    (copy / "imagesTr" / "README.txt").write_text("T1 and T2")
    assert len(load_datalist(copy).training) == 3


def test_label_map_without_images(copy: Path) -> None:
    orphan = copy / "labelsTr" / "mr_042.nii.gz"
    shutil.copy(copy / "labelsTr" / "mr_000.nii.gz", orphan)
    message = _refused(copy)
    assert message.startswith(str(orphan)) and "without images" in message


def test_training_case_without_label_map(copy: Path) -> None:
    label = copy / "labelsTr" / "mr_002.nii.gz"
    label.unlink()
    message = _refused(copy)
    assert message.startswith(str(label)) and "label map of case mr_002" in message


def test_test_case_without_reference_has_no_label(copy: Path) -> None:
    (copy / "labelsTs" / "mr_003.nii.gz").unlink()
    assert load_datalist(copy).test[0].label is None


def test_num_training_mismatch(copy: Path) -> None:
    path = _edit_json(copy, numTraining=5)
    message = _refused(copy)
    assert message.startswith(str(path)) and "numTraining is 5 but 3 training case(s)" in message


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"file_ending": None}, "no 'file_ending'"),
    ({"file_ending": ".png"}, "not an image type medseg reads"),
    ({"channel_names": {"0": "T1", "2": "T2"}}, "must be 0, 1"),
])
def test_bad_raw_dataset_json(copy: Path, changes: dict, fragment: str) -> None:
    path = _edit_json(copy, **changes)
    message = _refused(copy)
    assert message.startswith(str(path)) and fragment in message


def test_no_training_list_and_no_images_folder(copy: Path) -> None:
    shutil.rmtree(copy / "imagesTr")
    assert "no imagesTr/ folder" in _refused(copy)


def test_dataset_mapping_names_the_training_files(copy: Path) -> None:
    (copy / "elsewhere").mkdir()
    for k in range(2):
        shutil.move(copy / "imagesTr" / f"mr_000_{k:04d}.nii.gz", copy / "elsewhere" / f"first_{k}.nii.gz")
    cases = {"first": {"images": ["elsewhere/first_0.nii.gz", "elsewhere/first_1.nii.gz"],
                       "label": "labelsTr/mr_000.nii.gz"}}
    _edit_json(copy, dataset=cases, numTraining=1)
    datalist = load_datalist(copy)
    assert [c.name for c in datalist.training] == ["first"]
    assert datalist.training[0].images == tuple((copy / "elsewhere" / f"first_{k}.nii.gz").resolve() for k in range(2))
    cases["first"]["images"] = ["elsewhere/first_0.nii.gz"]
    path = _edit_json(copy, dataset=cases)
    assert _refused(copy).startswith(str(path))


def test_channel_on_another_grid_is_refused_naming_the_file(copy: Path) -> None:
    channel = copy / "imagesTr" / "mr_001_0001.nii.gz"

    def shift(image: sitk.Image) -> sitk.Image:
        image.SetOrigin(tuple(o + 4.0 for o in image.GetOrigin()))
        return image

    _rewrite(channel, shift)
    message = _refused(copy, validate=True)
    assert message.startswith(str(channel.resolve())) and "channel 1 of case mr_001" in message and "origin" in message


def test_region_label_maps_hold_the_united_values_only(copy: Path) -> None:
    label = copy / "labelsTr" / "mr_000.nii.gz"

    def paint(value: int):
        def change(image: sitk.Image) -> sitk.Image:
            array = sitk.GetArrayFromImage(image)
            array[0, 0, :3] = value
            out = sitk.GetImageFromArray(array)
            out.CopyInformation(image)
            return out
        return change

    _rewrite(label, paint(4))
    message = _refused(copy, validate=True)
    assert message.startswith(str(label.resolve())) and "[4] are not declared" in message
    # declared as the ignore label, 4 is accepted, and is not one of the labels
    labels = json.loads((copy / "dataset.json").read_text())["labels"]
    _edit_json(copy, labels={**labels, "ignore": 4})
    datalist = load_datalist(copy)
    assert datalist.ignore_label == 4 and 4 not in datalist.labels
    assert len(validate_datalist(datalist)) == 3


def test_msd_lists_with_one_file_per_channel(copy: Path) -> None:
    training = [{"image": [f"imagesTr/mr_00{i}_0000.nii.gz", f"imagesTr/mr_00{i}_0001.nii.gz"],
                 "label": f"labelsTr/mr_00{i}.nii.gz"} for i in range(3)]
    _edit_json(copy, training=training)
    datalist = load_datalist(copy)
    assert [len(c.images) for c in datalist.training] == [2, 2, 2] and datalist.test == []
    assert len(validate_datalist(datalist)) == 3
    training[1]["image"] = training[1]["image"][:1]
    path = _edit_json(copy, training=training)
    message = _refused(copy)
    assert message.startswith(str(path)) and "1 image file(s) for 2 channel(s)" in message


def test_4d_msd_image_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ct", "ct", cases=2, size=32).parent
    image = root / "imagesTr" / "ct_000.nii.gz"
    volume = nib.load(image)
    four_d = np.stack([np.asarray(volume.dataobj)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(four_d, volume.affine), image)
    message = _refused(root, validate=True)
    assert message.startswith(str(image.resolve())) and "4D image" in message and "CASE_0000" in message
