"""``medseg synth --channels N --regions --layout``: several co-registered contrasts of one phantom and
nested regions, written as an nnU-Net v2 raw dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.data.datalist import load_datalist, validate_datalist
from medseg.data.synthetic import write_dataset

#: phantom label (liver 1, spleen 2, kidney 3, bone 4, lesion 5) -> value in a region dataset
REGION_VALUE = np.array([0, 2, 1, 1, 1, 3])


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _geometry(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.fixture(scope="module")
def mr2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "mr2"
    code = main(["--quiet", "synth", "--out", str(out), "--modality", "mr", "--channels", "2", "--regions",
                 "--cases", "3", "--size", "40"])
    assert code == 0
    return out


def test_cli_writes_an_nnunet_raw_dataset(mr2: Path) -> None:
    files = sorted(p.relative_to(mr2).as_posix() for p in mr2.rglob("*") if p.is_file())
    assert files == ["dataset.json", "imagesTr/mr_000_0000.nii.gz", "imagesTr/mr_000_0001.nii.gz",
                     "imagesTr/mr_001_0000.nii.gz", "imagesTr/mr_001_0001.nii.gz", "imagesTs/mr_002_0000.nii.gz",
                     "imagesTs/mr_002_0001.nii.gz", "labelsTr/mr_000.nii.gz", "labelsTr/mr_001.nii.gz",
                     "labelsTs/mr_002.nii.gz"]
    description = json.loads((mr2 / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "T1", "1": "T2"}
    assert description["labels"] == {"background": 0, "organs": [1, 2, 3], "liver": [2, 3], "lesion": [3]}
    assert list(description["labels"]) == ["background", "organs", "liver", "lesion"]  # painting order
    assert description["regions_class_order"] == [1, 2, 3]
    assert (description["numTraining"], description["file_ending"]) == (2, ".nii.gz")
    assert "training" not in description and "modality" not in description
    datalist = load_datalist(mr2)
    assert [r.name for r in datalist.regions] == ["organs", "liver", "lesion"]
    assert len(validate_datalist(datalist, include_test=True)) == 3


def test_channels_are_two_contrasts_of_one_patient_on_one_grid(mr2: Path) -> None:
    for case in load_datalist(mr2).training + load_datalist(mr2).test:
        t1, t2 = (_array(p) for p in case.images)
        label = _array(case.label)
        assert _geometry(case.images[0]) == _geometry(case.images[1]) == _geometry(case.label)
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
        liver, lesion = label == 2, label == 3
        assert np.median(t1[lesion]) < np.median(t1[liver])  # T1: a dark lesion
        assert np.median(t2[lesion]) > 1.5 * np.median(t2[liver])  # T2: a bright lesion
        assert not np.allclose(t1, t2)


def test_first_channel_and_label_map_are_those_of_the_one_channel_dataset(mr2: Path, tmp_path: Path) -> None:
    plain = write_dataset(tmp_path / "mr", "mr", cases=3, seed=0, size=40).parent
    for name, split in (("mr_000", "Tr"), ("mr_002", "Ts")):
        assert np.array_equal(_array(mr2 / f"images{split}" / f"{name}_0000.nii.gz"),
                              _array(plain / f"images{split}" / f"{name}.nii.gz"))
        assert np.array_equal(_array(mr2 / f"labels{split}" / f"{name}.nii.gz"),
                              REGION_VALUE[_array(plain / f"labels{split}" / f"{name}.nii.gz")])


def test_ct_with_mr_channels(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ct3", "ct", cases=2, size=32, channels=3).parent
    description = json.loads((root / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "CT", "1": "T1", "2": "T2"}
    assert description["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "bone": 4, "lesion": 5}
    assert "regions_class_order" not in description
    datalist = load_datalist(root)
    assert datalist.channel_presets == ("ct", "mr", "mr") and datalist.regions == ()
    pixel_types = [sitk.ReadImage(str(p)).GetPixelID() for p in datalist.training[0].images]
    assert pixel_types == [sitk.sitkInt16, sitk.sitkFloat32, sitk.sitkFloat32]


@pytest.mark.parametrize("options", [["--channels", "2", "--layout", "msd"], ["--regions", "--layout", "msd"],
                                     ["--channels", "5"], ["--channels", "0"]])
def test_cli_refuses_what_the_layout_or_the_phantom_cannot_hold(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 options: list[str]) -> None:
    code = main(["--quiet", "synth", "--out", str(tmp_path / "out"), "--size", "32", "--cases", "2", *options])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("medseg: error: ") and len(err.splitlines()) == 1
    assert ("--layout nnunet" in err) == ("msd" in options)
    assert not (tmp_path / "out").exists()
