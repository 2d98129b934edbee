"""scripts/boundary_errors.py: errors sorted by their distance to the reference's boundary, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.tools import load_script

script = load_script("boundary_errors")


def _write(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), str(path))


def _cube() -> np.ndarray:
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    return ref


def test_boundary_voxels_are_both_sides_of_a_change() -> None:
    ref = np.zeros((6, 1, 1), np.uint8)
    ref[3:] = 1
    assert script.boundary(ref)[:, 0, 0].tolist() == [False, False, True, True, False, False]


def test_surface_shift_and_far_error_are_told_apart(tmp_path: Path) -> None:
    ref = _cube()
    pred = ref.copy()
    pred[15, 5:15, 5:15] = 1  # the surface grown by one voxel: all on the boundary
    pred[0, 0, 0] = 1  # one invented voxel far from any boundary
    _write(tmp_path / "ref" / "c1.nii.gz", ref)
    _write(tmp_path / "pred" / "c1_seg.nii.gz", pred)
    out = tmp_path / "e.json"
    assert script.main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["case"] == "c1" and record["wrong_voxels"] == 101
    assert record["on_boundary"] == pytest.approx(100 / 101, abs=1e-4)
    assert record["beyond_5_voxels"] == 1
    assert record["boundary_wrong"] == pytest.approx(100 / record["boundary_voxels"], abs=1e-4)


@pytest.mark.parametrize("problem", ["missing_pred", "other_grid", "corrupt"])
def test_bad_input_names_the_file(tmp_path: Path, problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "ref" / "c1.nii.gz", _cube())
    pred = tmp_path / "pred" / "c1_seg.nii.gz"
    if problem == "other_grid":
        _write(pred, np.zeros((20, 20, 19), np.uint8))
    elif problem == "corrupt":
        pred.parent.mkdir()
        pred.write_bytes(b"not a nifti")
    else:  # c2 predicted, c1 not
        _write(tmp_path / "ref" / "c2.nii.gz", _cube())
        _write(tmp_path / "pred" / "c2_seg.nii.gz", _cube())
    out = tmp_path / "e.json"
    assert script.main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--json", str(out)]) == 2
    error = capsys.readouterr().err
    assert "error:" in error and ("c1" in error) and not out.exists()


def test_a_label_map_of_one_label_has_no_boundary() -> None:
    ref = np.zeros((4, 4, 4), np.uint8)
    pred = ref.copy()
    pred[0, 0, 0] = 1
    record = script.case_errors(pred, ref)
    assert record["boundary_voxels"] == 0 and record["boundary_wrong"] == 0.0 and record["wrong_voxels"] == 1
