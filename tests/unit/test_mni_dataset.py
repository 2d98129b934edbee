"""scripts/mni_dataset.py on a stand-in for the nilearn wheel (small maps with the template's names): the
dataset layout and geometry, labels from the tissue maps, bad input as one message."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mni_dataset.py"
spec = importlib.util.spec_from_file_location("mni_dataset", SCRIPT)
assert spec is not None and spec.loader is not None
mni = importlib.util.module_from_spec(spec)
sys.modules["mni_dataset"] = mni
spec.loader.exec_module(mni)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zip with the three maps at nilearn's paths: a 'brain' ball, white matter inside grey matter."""
    folder = tmp_path_factory.mktemp("nilearn")
    shape = (24, 28, 20)
    centre = (np.array(shape) - 1) / 2
    distance = np.linalg.norm(np.indices(shape).transpose(1, 2, 3, 0) - centre, axis=-1)
    wm = (distance < 5).astype(np.uint8) * 255
    gm = ((distance >= 5) & (distance < 8)).astype(np.uint8) * 255
    t1 = np.where(distance < 5, 200, np.where(distance < 8, 120, 0)).astype(np.uint8)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-12.0, -14.0, -10.0)
    path = folder / "nilearn-0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for key, data in (("t1", t1), ("gm", gm), ("wm", wm)):
            file = folder / mni.MAPS[key]
            nib.save(nib.Nifti1Image(data, affine), file)
            archive.write(file, mni.DATA + mni.MAPS[key])
    return path


def test_cases_are_warped_copies_with_tissue_labels_on_the_template_grid(wheel: Path, tmp_path: Path) -> None:
    dataset_json = mni.write_dataset(wheel, tmp_path / "mni", cases=4, test=1, seed=0, rotate=10.0)
    description = json.loads(dataset_json.read_text())
    assert description["labels"] == {"0": "background", "1": "grey_matter", "2": "white_matter"}
    assert (description["numTraining"], description["numTest"]) == (3, 1)
    image = nib.load(tmp_path / "mni" / "imagesTr" / "mni_000.nii.gz")
    label = nib.load(tmp_path / "mni" / "labelsTr" / "mni_000.nii.gz")
    assert image.shape == label.shape == (24, 28, 20) and np.allclose(image.affine, label.affine)
    values = np.asarray(label.dataobj)
    assert set(np.unique(values).tolist()) == {0, 1, 2} and (values == 2).sum() > 100
    t1 = np.asarray(image.dataobj)
    assert t1[values == 2].mean() > t1[values == 1].mean() > t1[values == 0].mean()  # T1: WM brighter than GM
    assert (tmp_path / "mni" / "labelsTs" / "mni_003.nii.gz").is_file()
    half = mni.write_dataset(wheel, tmp_path / "fine", cases=2, test=1, seed=0, rotate=0.0, spacing=0.5)
    assert nib.load(half.parent / "imagesTr" / "mni_000.nii.gz").shape == (47, 55, 39)


def test_bad_input_is_one_message_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mni.main(["--nilearn", str(tmp_path / "missing.whl"), "--out", str(tmp_path / "out")]) == 2
    not_a_wheel = tmp_path / "bad.whl"
    not_a_wheel.write_bytes(b"not a zip")
    assert mni.main(["--nilearn", str(not_a_wheel), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no such file" in err[0] and "not a nilearn wheel" in err[1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
