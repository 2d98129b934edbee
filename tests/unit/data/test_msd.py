"""Converting an MSD dataset with 4D multi-channel images to the nnU-Net v2 raw layout (medseg.data.msd)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data.datalist import load_datalist, validate_datalist
from medseg.data.fingerprint import extract_fingerprint
from medseg.data.msd import convert_msd
from medseg.data.synthetic import write_dataset
from medseg.errors import InputError


def _as_msd(raw_json: Path, out: Path, scaled: bool = False) -> Path:
    """The raw-layout dataset of ``raw_json`` in the MSD layout: each case one 4D file (channels on the
    fourth axis), listed in ``training`` / ``test``; ``scaled``: int16 voxels with a slope and intercept."""
    raw = json.loads(raw_json.read_text())
    root = raw_json.parent
    names = raw["channel_names"]
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (out / folder).mkdir(parents=True)
    entries: dict[str, list] = {"training": [], "test": []}
    for part, key in (("Tr", "training"), ("Ts", "test")):
        for label in sorted((root / f"labels{part}").iterdir()):
            case = label.name[: -len(".nii.gz")]
            volumes = [nib.load(root / f"images{part}" / f"{case}_{k:04d}.nii.gz") for k in range(len(names))]
            stacked = np.stack([np.asanyarray(v.dataobj) for v in volumes], axis=-1)
            target = out / f"images{part}" / f"{case}.nii.gz"
            if scaled:  # int16 voxels with scl_slope 0.5, scl_inter 10, written byte by byte (nibabel's save
                # would choose its own scaling)
                header = nib.Nifti1Image(np.zeros(stacked.shape, np.int16), volumes[0].affine, volumes[0].header).header
                header.set_data_dtype(np.int16)
                header.set_slope_inter(0.5, 10.0)
                header.set_data_offset(352)
                voxels = np.round(stacked).astype("<i2" if header.endianness == "<" else ">i2")
                target.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + voxels.tobytes(order="F")))
            else:
                nib.save(nib.Nifti1Image(stacked.astype(np.float32), volumes[0].affine, volumes[0].header), target)
            if part == "Tr":
                shutil.copyfile(label, out / "labelsTr" / label.name)
                entries[key].append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{label.name}"})
            else:
                entries[key].append(f"./imagesTs/{case}.nii.gz")
    msd = {"name": "Task99_Phantom", "description": "4D MSD copy", "licence": "CC-BY-SA 4.0",
           "tensorImageSize": "4D", "modality": {str(k): n for k, n in names.items()},
           "labels": {str(v): n for n, v in raw["labels"].items()}, "numTraining": len(entries["training"]),
           "numTest": len(entries["test"]), **entries}
    path = out / "dataset.json"
    path.write_text(json.dumps(msd))
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-channel phantom dataset in the raw layout (the reference), 4 cases (3 training, 1 test)."""
    return write_dataset(tmp_path_factory.mktemp("msd") / "raw", "mr", cases=4, seed=3, size=32, channels=2)


@pytest.fixture(scope="module")
def msd(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _as_msd(raw, tmp_path_factory.mktemp("msd4d") / "Task99")


def test_a_4d_msd_dataset_is_refused_with_the_command_that_converts_it(msd: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        load_datalist(msd)
    assert "multi-channel MSD images are 4D" in str(excinfo.value) and "medseg convert-msd" in str(excinfo.value)


def test_the_converted_dataset_equals_the_raw_layout_it_came_from(raw: Path, msd: Path, tmp_path: Path) -> None:
    result = convert_msd(msd, tmp_path / "converted")
    assert (result.training, result.test, result.channels) == (3, 1, 2)
    description = json.loads(result.dataset_json.read_text())
    reference = json.loads(raw.read_text())
    assert description["channel_names"] == reference["channel_names"]
    assert description["labels"] == reference["labels"] and description["file_ending"] == ".nii.gz"
    assert description["numTraining"] == 3 and description["licence"] == "CC-BY-SA 4.0"
    assert "training" not in description and "modality" not in description
    converted, original = load_datalist(result.dataset_json), load_datalist(raw)
    validate_datalist(converted, include_test=True)
    assert [c.name for c in converted.training] == [c.name for c in original.training]
    assert [c.name for c in converted.test] == [c.name for c in original.test]
    for mine, theirs in zip(converted.training + converted.test, original.training + original.test, strict=True):
        assert len(mine.images) == 2
        for a, b in zip(mine.images, theirs.images, strict=True):
            image, expected = nib.load(a), nib.load(b)
            assert image.shape == expected.shape and image.get_data_dtype() == np.float32
            np.testing.assert_allclose(image.affine, expected.affine, atol=1e-6)
            np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(expected.dataobj).astype(np.float32))
        if theirs.label is not None and mine.label is not None:
            assert gzip.decompress(mine.label.read_bytes()) == gzip.decompress(theirs.label.read_bytes())
    fingerprint = extract_fingerprint(converted)  # what medseg plan reads first
    assert len(fingerprint.channels) == 2 and len(fingerprint.cases) == 3


def test_stored_type_and_scaling_are_kept_not_re_encoded(raw: Path, tmp_path: Path) -> None:
    msd = _as_msd(raw, tmp_path / "Task98", scaled=True)
    converted = load_datalist(convert_msd(msd, tmp_path / "converted").dataset_json)
    case = converted.training[0]
    source = nib.load(msd.parent / "imagesTr" / f"{case.name}.nii.gz")
    assert (source.dataobj.slope, source.dataobj.inter) == (0.5, 10.0)  # nibabel moves the scaling to the proxy
    for k, file in enumerate(case.images):
        channel = nib.load(file)
        assert channel.get_data_dtype() == np.int16 and (channel.dataobj.slope, channel.dataobj.inter) == (0.5, 10.0)
        np.testing.assert_array_equal(channel.dataobj.get_unscaled(), source.dataobj.get_unscaled()[..., k])
        assert channel.header["dim"][0] == 3 and channel.header["qform_code"] == source.header["qform_code"]
        assert channel.header["sform_code"] == source.header["sform_code"]


def _copy(msd: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(msd.parent, tmp_path / "Task99")) / "dataset.json"


def test_a_case_with_the_wrong_number_of_volumes_is_named_and_nothing_is_written(msd: Path, tmp_path: Path) -> None:
    path = _copy(msd, tmp_path)
    data = json.loads(path.read_text())
    data["modality"]["2"] = "FLAIR"  # three channels declared, two volumes stored
    path.write_text(json.dumps(data))
    out = tmp_path / "converted"
    with pytest.raises(InputError) as excinfo:
        convert_msd(path, out)
    first = path.parent / data["training"][0]["image"]
    assert str(excinfo.value).startswith(str(first.resolve())), excinfo.value
    assert "of 2 volumes" in str(excinfo.value) and "declares 3 channel(s)" in str(excinfo.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["Task99"]


def test_a_label_map_off_the_image_grid_is_named(msd: Path, tmp_path: Path) -> None:
    path = _copy(msd, tmp_path)
    label = path.parent / "labelsTr" / Path(json.loads(path.read_text())["training"][1]["label"]).name
    image = nib.load(label)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:-2], image.affine, image.header), label)
    with pytest.raises(InputError) as excinfo:
        convert_msd(path, tmp_path / "converted")
    assert str(excinfo.value).startswith(str(label)) and "does not match its image" in str(excinfo.value)
    assert not (tmp_path / "converted").exists()


def test_a_truncated_image_is_named(msd: Path, tmp_path: Path) -> None:
    path = _copy(msd, tmp_path)
    image = path.parent / "imagesTr" / Path(json.loads(path.read_text())["training"][2]["image"]).name
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(InputError) as excinfo:
        convert_msd(path, tmp_path / "converted")
    assert str(excinfo.value).startswith(str(image))
    assert not (tmp_path / "converted").exists()


def test_an_existing_output_folder_is_never_written_into(msd: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="exists and is not empty"):
        convert_msd(msd, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_the_command_prints_the_new_dataset_json_and_reports_bad_input_in_one_line(msd: Path, tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture) -> None:
    assert main(["convert-msd", "--data", str(msd.parent), "--out", str(tmp_path / "raw")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "raw" / "dataset.json")
    assert main(["convert-msd", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "raw2")]) != 0
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err and not (tmp_path / "raw2").exists()
