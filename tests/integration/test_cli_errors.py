"""Bad input: one line ``medseg: error: <file>: <problem>``, exit status 2, no traceback, no output left."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["--quiet", *args])
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("medseg: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---- bad image files -------------------------------------------------------------------------

def _truncated(folder: Path, source: Path) -> Path:
    data = source.read_bytes()
    path = folder / "truncated.nii.gz"
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def _non_image(folder: Path, source: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("not an image\n")
    return path


def _fake_nifti(folder: Path, source: Path) -> Path:
    path = folder / "fake.nii.gz"
    path.write_bytes(gzip.compress(b"this is text, not NIfTI" * 20))
    return path


def _four_d(folder: Path, source: Path) -> Path:
    path = folder / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.int16), np.eye(4)), str(path))
    return path


def _nan_voxels(folder: Path, source: Path) -> Path:
    image = nib.load(str(source))
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[data.shape[0] // 2, data.shape[1] // 2, data.shape[2] // 2] = np.nan
    path = folder / "nan_voxel.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), str(path))
    return path


def _missing(folder: Path, source: Path) -> Path:
    return folder / "does_not_exist.nii.gz"


def _empty_folder(folder: Path, source: Path) -> Path:
    path = folder / "empty"
    path.mkdir()
    return path


BAD_INPUTS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "missing": (_missing, "no such file"),
    "non-image": (_non_image, "not a supported image"),
    "fake-nifti": (_fake_nifti, "not a readable image"),
    "truncated": (_truncated, "truncated"),
    "4d": (_four_d, "4D"),
    "empty-folder": (_empty_folder, "no image files"),
    "nan-voxel": (_nan_voxels, "NaN or infinite voxel values"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_predict_bad_input(kind: str, tmp_path: Path, ct_dataset: Path, untrained_run: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    make, fragment = BAD_INPUTS[kind]
    source = next((ct_dataset.parent / "imagesTs").iterdir())
    bad = make(tmp_path, source)
    before = {p: p.read_bytes() for p in files_under(tmp_path)}
    out = tmp_path / "predictions"
    code, err = run_cli(capsys, "predict", "--model", str(untrained_run), "--input", str(bad), "--output", str(out))
    assert_one_error(code, err, str(bad), fragment)
    assert not out.exists(), "no partial output"
    assert {p: p.read_bytes() for p in files_under(tmp_path)} == before, "user files untouched"


def test_predict_folder_with_one_bad_case_leaves_nothing(tmp_path: Path, ct_dataset: Path, untrained_run: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated case after good ones: the error names it and the good outputs are withdrawn."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = sorted((ct_dataset.parent / "imagesTs").iterdir())[0]
    shutil.copy(good, inputs / "a_good.nii.gz")
    _truncated(inputs, good).rename(inputs / "b_truncated.nii.gz")
    out = tmp_path / "predictions"
    code, err = run_cli(capsys, "predict", "--model", str(untrained_run), "--input", str(inputs), "--output", str(out))
    assert_one_error(code, err, "b_truncated.nii.gz")
    assert files_under(out) == []


def test_predict_missing_model(tmp_path: Path, ct_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = next((ct_dataset.parent / "imagesTs").iterdir())
    code, err = run_cli(capsys, "predict", "--model", str(tmp_path / "no_run"), "--input", str(image),
                        "--output", str(tmp_path / "out"))
    assert_one_error(code, err, "no_run")


def test_predict_refuses_to_overwrite(tmp_path: Path, ct_dataset: Path, untrained_run: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    image = next((ct_dataset.parent / "imagesTs").iterdir())
    out = tmp_path / "out"
    out.mkdir()
    existing = out / image.name.replace(".nii.gz", "_seg.nii.gz")
    existing.write_bytes(b"precious")
    code, err = run_cli(capsys, "predict", "--model", str(untrained_run), "--input", str(image), "--output", str(out))
    assert_one_error(code, err, "already exists")
    assert existing.read_bytes() == b"precious"


# ---- bad training data -----------------------------------------------------------------------

def _copy_dataset(src_json: Path, dst: Path) -> Path:
    shutil.copytree(src_json.parent, dst)
    return dst / "dataset.json"


def _first_training(dataset_json: Path, key: str) -> Path:
    entry = json.loads(dataset_json.read_text())["training"][0]
    return (dataset_json.parent / entry[key]).resolve()


def _set_voxels(path: Path, index: tuple, value: int) -> None:
    """Overwrite voxels (numpy index in SimpleITK's z, y, x order) of a label file, keeping its grid."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[index] = value
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(path))


def _label_out_of_range(dataset_json: Path) -> tuple[Path, str]:
    label_path = _first_training(dataset_json, "label")
    _set_voxels(label_path, (0, 0, slice(0, 3)), 9)
    return label_path, "[9]"


def _label_shape_mismatch(dataset_json: Path) -> tuple[Path, str]:
    label_path = _first_training(dataset_json, "label")
    label = sitk.ReadImage(str(label_path))
    sitk.WriteImage(label[:-2, :, :], str(label_path))
    return label_path, "does not match"


def _truncated_training_image(dataset_json: Path) -> tuple[Path, str]:
    image_path = _first_training(dataset_json, "image")
    data = image_path.read_bytes()
    image_path.write_bytes(data[: int(len(data) * 0.6)])
    return image_path, "truncated"


def _missing_training_file(dataset_json: Path) -> tuple[Path, str]:
    image_path = _first_training(dataset_json, "image")
    image_path.unlink()
    return image_path, "does not exist"


def _four_d_training_image(dataset_json: Path) -> tuple[Path, str]:
    image_path = _first_training(dataset_json, "image")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.int16), np.eye(4)), str(image_path))
    return image_path, "4D"


def _broken_json(dataset_json: Path) -> tuple[Path, str]:
    dataset_json.write_text("{ not json")
    return dataset_json, "not a valid JSON"


BAD_DATASETS = {
    "label-values": _label_out_of_range,
    "label-shape": _label_shape_mismatch,
    "truncated-image": _truncated_training_image,
    "missing-file": _missing_training_file,
    "4d-image": _four_d_training_image,
    "broken-json": _broken_json,
}


@pytest.mark.parametrize("kind", sorted(BAD_DATASETS))
def test_train_bad_dataset(kind: str, tmp_path: Path, ct_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset_json = _copy_dataset(ct_dataset, tmp_path / "data")
    bad_file, fragment = BAD_DATASETS[kind](dataset_json)
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--data", str(dataset_json), "--out", str(run), "--epochs", "1")
    assert_one_error(code, err, bad_file.name, fragment)
    assert not run.exists(), "no run folder for bad data"


def test_train_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "train", "--data", str(tmp_path / "dataset.json"), "--out", str(tmp_path / "run"))
    assert_one_error(code, err, "dataset.json", "no such file")


def test_train_refuses_non_empty_run_folder(tmp_path: Path, ct_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "train", "--data", str(ct_dataset), "--out", str(run), "--epochs", "1")
    assert_one_error(code, err, "not empty")
    assert (run / "keep.txt").read_text() == "mine"


# ---- bad evaluation input --------------------------------------------------------------------

def test_evaluate_label_values_outside_labels(tmp_path: Path, ct_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = ct_dataset.parent / "labelsTs"
    pred = tmp_path / "pred"
    shutil.copytree(ref, pred)
    victim = sorted(pred.iterdir())[0]
    _set_voxels(victim, (1, 1, 1), 12)
    out = tmp_path / "eval"
    code, err = run_cli(capsys, "evaluate", "--pred", str(pred), "--ref", str(ref), "--labels", str(ct_dataset),
                        "--out", str(out))
    assert_one_error(code, err, victim.name, "12")
    assert files_under(out) == []


@pytest.mark.parametrize("kind", ["missing", "empty-folder", "non-image-only"])
def test_evaluate_bad_folders(kind: str, tmp_path: Path, ct_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = tmp_path / "pred"
    if kind == "empty-folder":
        pred.mkdir()
    elif kind == "non-image-only":
        pred.mkdir()
        (pred / "readme.txt").write_text("x")
    out = tmp_path / "eval"
    code, err = run_cli(capsys, "evaluate", "--pred", str(pred), "--ref", str(ct_dataset.parent / "labelsTs"),
                        "--out", str(out))
    assert_one_error(code, err, str(pred))
    assert files_under(out) == []


def test_evaluate_geometry_mismatch(tmp_path: Path, ct_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = ct_dataset.parent / "labelsTs"
    pred = tmp_path / "pred"
    shutil.copytree(ref, pred)
    victim = sorted(pred.iterdir())[0]
    image = sitk.ReadImage(str(victim))
    image.SetSpacing([s * 1.5 for s in image.GetSpacing()])
    sitk.WriteImage(image, str(victim))
    code, err = run_cli(capsys, "evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "eval"))
    assert_one_error(code, err, victim.name, "spacing")


# ---- the real console script -----------------------------------------------------------------

def _medseg() -> list[str]:
    exe = Path(sys.executable).with_name("medseg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "medseg"]


def test_console_script_exit_status_and_debug(tmp_path: Path, untrained_run: Path) -> None:
    """The installed command: status 2, one line, no traceback; ``--debug`` adds the traceback."""
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    args = ["predict", "--model", str(untrained_run), "--input", str(bad), "--output", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([*_medseg(), *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"medseg: error: {bad}: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    debug = subprocess.run([*_medseg(), "--debug", *args], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_python_dash_m_medseg_runs(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "medseg", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("medseg ")
