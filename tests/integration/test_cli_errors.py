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
from medseg.inference.cohort import JOURNAL_FOLDER


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
    code, err = run_cli(capsys, "train", "--plan", "default", "--data", str(dataset_json), "--out", str(run), "--epochs", "1")
    assert_one_error(code, err, bad_file.name, fragment)
    assert not run.exists(), "no run folder for bad data"


def test_train_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "train", "--plan", "default",
                        "--data", str(tmp_path / "dataset.json"), "--out", str(tmp_path / "run"))
    assert_one_error(code, err, "dataset.json", "no such file")


def test_train_refuses_non_empty_run_folder(tmp_path: Path, ct_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "train", "--plan", "default", "--data", str(ct_dataset), "--out", str(run), "--epochs", "1")
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


# ---- bad input through the console script: one process per case ------------------------------
# Each case is run as a user runs it (a new process, stderr as the terminal sees it, native writes of
# ITK/MONAI included): exit status 2, exactly one line "medseg: error: <file>: <problem>", nothing written.
# --quiet: predict's "[1/1] scan -> out" progress line is logged before the pixels are read (see issue 12,
# "print progress only once the input has been read"); readers' own output is what these tests watch.

def _console(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*_medseg(), "--quiet", *args], capture_output=True, env=env, timeout=timeout)


def _assert_refused(result: subprocess.CompletedProcess, folder: Path, before: set[Path], *fragments: str) -> str:
    err = result.stderr.decode("utf-8", "backslashreplace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("medseg: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert set(files_under(folder)) == before, "nothing written"
    return lines[0]


def _sitk_copy(source: Path, path: Path, compress: bool = False) -> Path:
    sitk.WriteImage(sitk.ReadImage(str(source)), str(path), compress)
    return path


def _cut(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _header_line(path: Path, key: bytes, line: bytes) -> Path:
    data = path.read_bytes()
    start = data.index(key)
    path.write_bytes(data[:start] + line + data[data.index(b"\n", start):])
    return path


def _nifti_pixdim(folder: Path, source: Path, value: float, name: str) -> Path:
    """A copy of ``source`` whose pixdim[1:4] is ``value`` in the header as written (qform only)."""
    image = nib.load(str(source))
    path = folder / name
    data = np.asarray(image.dataobj)
    out = nib.Nifti1Image(data, None)
    out.set_qform(image.affine, code=1)
    out.set_sform(None, code=0)
    raw = bytearray(out.header.binaryblock)
    header = nib.Nifti1Header(bytes(raw), check=False)
    pixdim = header["pixdim"]
    pixdim[1:4] = value
    header["pixdim"] = pixdim
    offset = int(out.header.get_data_offset()) or 352
    body = header.binaryblock + b"\0" * (offset - 348) + np.asarray(data, dtype=out.get_data_dtype()).tobytes("F")
    path.write_bytes(gzip.compress(body))
    return path


def _infinite(folder: Path, source: Path, value: float, corner: bool) -> Path:
    image = nib.load(str(source))
    data = np.asarray(image.dataobj, dtype=np.float32)
    index = (0, 0, 0) if corner else tuple(s // 2 for s in data.shape)
    data[index] = value
    path = folder / f"{'minus' if value < 0 else 'plus'}_inf.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), str(path))
    return path


FILE_CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "truncated-nrrd": (lambda d, s: _cut(_sitk_copy(s, d / "scan.nrrd")), "pixel data is truncated"),
    "truncated-compressed-mha": (lambda d, s: _cut(_sitk_copy(s, d / "scan.mha", True)),
                                 "compressed pixel data is truncated"),
    "mhd-without-raw": (lambda d, s: (_sitk_copy(s, d / "scan.mhd"), (d / "scan.raw").unlink())[0],
                        "its data file scan.raw is missing"),
    "mhd-short-raw": (lambda d, s: (_sitk_copy(s, d / "scan.mhd"), _cut(d / "scan.raw"))[0], "pixel data is truncated"),
    "header-100000-cubed": (lambda d, s: _header_line(_sitk_copy(s, d / "scan.mha"), b"DimSize",
                                                      b"DimSize = 100000 100000 100000"), "100000 x 100000 x 100000"),
    "zero-direction-mha": (lambda d, s: _header_line(_sitk_copy(s, d / "scan.mha"), b"TransformMatrix",
                                                     b"TransformMatrix = 0 0 0 0 0 0 0 0 0"), "direction matrix"),
    "nifti-pixdim-0": (lambda d, s: _nifti_pixdim(d, s, 0.0, "pixdim0.nii.gz"), "pixdim (voxel spacing) (0, 0, 0)"),
    "nifti-pixdim-nan": (lambda d, s: _nifti_pixdim(d, s, float("nan"), "pixdimnan.nii.gz"), "is not finite"),
    "plus-inf-voxel": (lambda d, s: _infinite(d, s, np.inf, corner=False), "1 infinite"),
    "minus-inf-in-background": (lambda d, s: _infinite(d, s, -np.inf, corner=True), "1 infinite"),
    "not-utf8-name-truncated": (lambda d, s: _cut(Path(shutil.copy(s, d / os.fsdecode(b"scan_\xff\xfe.nii.gz")))),
                                "scan_\\xff\\xfe.nii.gz': "),
    "newline-name-truncated": (lambda d, s: _cut(Path(shutil.copy(s, d / "a\nmedseg: error: fake.nii.gz"))),
                               "a\\nmedseg: error: fake.nii.gz': "),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(FILE_CASES))
def test_console_refuses_bad_image_file(kind: str, tmp_path: Path, ct_dataset: Path, untrained_run: Path) -> None:
    make, fragment = FILE_CASES[kind]
    source = sorted((ct_dataset.parent / "imagesTs").iterdir())[0]
    folder = tmp_path / "in"
    folder.mkdir()
    bad = make(folder, source)
    before = set(files_under(tmp_path))
    result = _console("predict", "--model", str(untrained_run), "--input", str(bad), "--output", str(tmp_path / "out"))
    line = _assert_refused(result, tmp_path, before, fragment)
    assert "Traceback" not in line and "RuntimeError" not in line


@pytest.mark.slow
def test_console_reads_and_writes_file_names_that_are_not_utf8(tmp_path: Path, ct_dataset: Path,
                                                              untrained_run: Path) -> None:
    """SimpleITK aborted the process (SIGABRT, exit 134) on such a name; now NIfTI and NRRD inputs are segmented."""
    source = sorted((ct_dataset.parent / "imagesTs").iterdir())[0]
    folder = tmp_path / os.fsdecode(b"in_\xe9")
    folder.mkdir()
    shutil.copy(source, folder / os.fsdecode(b"scan_\xff\xfe.nii.gz"))
    _sitk_copy(source, tmp_path / "plain.nrrd").rename(folder / os.fsdecode(b"vol_\xfe.nrrd"))  # (SimpleITK: UTF-8 only)
    out = tmp_path / "out"
    result = _console("predict", "--model", str(untrained_run), "--input", str(folder), "--output", str(out))
    assert result.returncode == 0, result.stderr.decode("utf-8", "backslashreplace")
    written = sorted(os.fsencode(p.name) for p in out.iterdir() if p.name != JOURNAL_FOLDER)
    assert written == [b"scan_\xff\xfe_seg.nii.gz", b"vol_\xfe_seg.nrrd"]
    from medseg.io.image import read_geometry, read_image

    for name in ("scan_\udcff\udcfe_seg.nii.gz", "vol_\udcfe_seg.nrrd"):  # the names as Python holds them
        assert read_geometry(out / name).mismatch(read_geometry(source)) is None
        assert read_image(out / name).GetPixelID() == sitk.sitkUInt8


def _dicom_series(folder: Path) -> list[Path]:
    from medseg.data.synthetic.dicom import phantom_series

    files, _, _ = phantom_series(folder, "ct", seed=2, size=32, file_names="im")
    return files


def _edit_dicom(path: Path, change: Callable) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.slow
def test_console_refuses_conflicting_duplicate_dicom_instances(tmp_path: Path, untrained_run: Path) -> None:
    """Two files with one SOPInstanceUID and different pixels: one was dropped silently (exit 0) before."""
    folder = tmp_path / "dicom"
    files = _dicom_series(folder)
    altered = folder / "ZZ_ALTERED"
    shutil.copy(files[3], altered)
    _edit_dicom(altered, lambda ds: setattr(ds, "PixelData", (ds.pixel_array + 5).astype(ds.pixel_array.dtype).tobytes()))
    before = set(files_under(tmp_path))
    result = _console("predict", "--model", str(untrained_run), "--input", str(folder), "--output", str(tmp_path / "out"))
    _assert_refused(result, tmp_path, before, "share SOPInstanceUID", "ZZ_ALTERED", "pixel data")


@pytest.mark.slow
def test_console_refuses_dicom_pixel_spacing_zero(tmp_path: Path, untrained_run: Path) -> None:
    """PixelSpacing 0 reached SimpleITK's SetSpacing: exit 1 "internal error" before."""
    folder = tmp_path / "dicom"
    files = _dicom_series(folder)
    for path in files:
        _edit_dicom(path, lambda ds: setattr(ds, "PixelSpacing", [0, 0]))
    before = set(files_under(tmp_path))
    result = _console("predict", "--model", str(untrained_run), "--input", str(folder), "--output", str(tmp_path / "out"))
    _assert_refused(result, tmp_path, before, "PixelSpacing (0, 0) is not positive", files[0].name)


@pytest.mark.slow
@pytest.mark.parametrize(("field", "value"), [("target_spacing", "abc"), ("patch_size", ["64", "64", "32"]),
                                              ("labels", ["background", "liver"])])
def test_console_refuses_plan_with_wrong_types(tmp_path: Path, ct_dataset: Path, untrained_run: Path, field: str,
                                               value: object) -> None:
    """A bundle's plan.json with wrong types: exit 1 "internal error" from Spacingd or the network before."""
    run = tmp_path / "run"
    shutil.copytree(untrained_run, run)
    plan = run / "configs" / "plan.json"
    data = json.loads(plan.read_text())
    data[field] = value
    plan.write_text(json.dumps(data))
    image = sorted((ct_dataset.parent / "imagesTs").iterdir())[0]
    before = set(files_under(tmp_path))
    result = _console("predict", "--model", str(run), "--input", str(image), "--output", str(tmp_path / "out"))
    _assert_refused(result, tmp_path, before, str(plan), f"'{field}'")


@pytest.mark.slow
def test_console_inspect_decode_gives_the_whole_reason_on_one_line(tmp_path: Path) -> None:
    """An undecodable file: a 21-line traceback and a reason cut after "plugins:" before."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from medseg.data.synthetic.dicom import phantom_series

    files, _, _ = phantom_series(tmp_path / "s", "ct", seed=1, size=32, transfer_syntax=JPEG2000Lossless)

    def garble(ds: pydicom.Dataset) -> None:
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * len(frame)])

    _edit_dicom(files[5], garble)
    before = set(files_under(tmp_path))
    result = _console("inspect", "--decode", str(tmp_path / "s"), timeout=300)
    _assert_refused(result, tmp_path, before, "1 file(s) could not be decoded")
    out = result.stdout.decode()
    reason = next(line for line in out.splitlines() if files[5].name in line and "cannot decode" in line)
    assert not reason.rstrip().endswith("plugins:") and len(reason.split("plugins:", 1)[-1].strip()) > 10, reason
