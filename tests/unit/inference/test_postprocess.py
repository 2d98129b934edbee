"""Largest-connected-component postprocessing: applied as the rules say, chosen only where Dice rises, rules
files read strictly, folders written whole or not at all, in the predictions' own grids."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.cli import main
from medseg.errors import InputError
from medseg.inference.postprocess import (
    PostprocessingRules,
    apply_rules,
    choose_rules,
    folder_cases,
    postprocess_folder,
    read_rules,
    write_rules,
)
from medseg.io import read_geometry


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A reference with two true blobs of label 1 (left and right kidney) and one of label 2, and a prediction
    that finds all three and adds a false island of label 2 far away and a false speck of label 1 touching
    nothing but a diagonal neighbour of the right kidney."""
    ref = np.zeros((40, 24, 20), np.uint8)
    ref[4:12, 6:14, 5:13] = 1  # left kidney
    ref[28:36, 6:14, 5:13] = 1  # right kidney
    ref[14:26, 14:22, 4:16] = 2  # liver, between them
    pred = ref.copy()
    pred[16:19, 2:5, 16:19] = 2  # a false island of label 2, touching nothing
    pred[36, 14, 13] = 1  # touches the right kidney only by a corner: its own component with face connectivity
    return pred, ref


def _dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    p, r = pred == label, ref == label
    return 2 * np.logical_and(p, r).sum() / (p.sum() + r.sum())


def test_the_rules_remove_islands_of_the_labels_they_name_and_nothing_else():
    pred, ref = _scene()
    given = pred.copy()
    only_2 = apply_rules(pred, PostprocessingRules(largest_component_labels=(2,)))
    np.testing.assert_array_equal(only_2[pred != 2], pred[pred != 2])  # label 1 untouched, corner speck too
    assert (only_2 == 2).sum() == (ref == 2).sum()  # the island is gone
    np.testing.assert_array_equal(only_2 == 2, ref == 2)
    only_1 = apply_rules(pred, PostprocessingRules(largest_component_labels=(1,)))
    assert (only_1 == 1).sum() == (ref == 1).sum() // 2  # one kidney kept: the rule is blind to anatomy
    foreground = apply_rules(pred, PostprocessingRules(foreground_largest_component=True))
    # the liver touches neither kidney: the largest foreground component is the liver alone
    np.testing.assert_array_equal(foreground, np.where(ref == 2, 2, 0))
    assert apply_rules(pred, PostprocessingRules()) is pred  # no rule: the map itself, unchanged
    assert only_2.dtype == pred.dtype
    np.testing.assert_array_equal(pred, given)  # the given label map is never changed in place


def test_a_rule_is_kept_only_where_it_raises_the_mean_dice():
    pred, ref = _scene()
    rules = choose_rules([("a", pred, ref), ("b", pred, ref)], [1, 2], source="oof")
    # the foreground's largest component would drop both kidneys; label 1's would drop one; label 2's helps
    assert rules.foreground_largest_component is False
    assert rules.largest_component_labels == (2,)
    evidence = rules.evidence
    assert evidence["cases"] == 2 and evidence["source"] == "oof" and evidence["labels"] == [1, 2]
    per_label = evidence["dice_per_label"]
    assert per_label["2"]["none"] == pytest.approx(_dice(pred, ref, 2), abs=1e-5)
    assert per_label["2"]["chosen"] == pytest.approx(1.0)
    assert per_label["1"]["chosen"] == per_label["1"]["none"]
    assert per_label["1"]["label_largest_component"] < per_label["1"]["none"]
    assert per_label["1"]["foreground_largest_component"] == 0.0
    assert evidence["mean_dice"]["chosen"] > evidence["mean_dice"]["none"] > evidence["mean_dice"][
        "foreground_largest_component"]


def test_the_foreground_rule_is_kept_where_one_organ_and_false_islands_are_all_there_is():
    ref = np.zeros((30, 30, 30), np.uint8)
    ref[5:20, 5:20, 5:20] = 1
    ref[8:14, 8:14, 8:14] = 2  # a lesion inside the organ
    pred = ref.copy()
    pred[25:28, 25:28, 25:28] = 1
    pred[1:3, 25:28, 1:3] = 2
    rules = choose_rules([("c", pred, ref)], [1, 2])
    assert rules.foreground_largest_component is True
    assert rules.largest_component_labels == ()  # nothing left to gain on top of it
    np.testing.assert_array_equal(apply_rules(pred, rules), ref)


def test_a_label_absent_from_both_maps_scores_one_and_choosing_needs_cases_and_labels():
    pred, ref = _scene()
    rules = choose_rules([("a", pred, ref)], [1, 2, 7])
    assert rules.evidence["dice_per_label"]["7"] == {"none": 1.0, "foreground_largest_component": 1.0,
                                                     "label_largest_component": 1.0, "chosen": 1.0}
    with pytest.raises(ValueError, match="no case"):
        choose_rules([], [1])
    with pytest.raises(ValueError, match="no foreground label"):
        choose_rules([("a", pred, ref)], [0])
    with pytest.raises(ValueError, match="a: prediction shape"):
        choose_rules([("a", pred, ref[:-1])], [1])


def test_rules_files_round_trip_and_bad_ones_are_refused_naming_the_file(tmp_path: Path):
    rules = PostprocessingRules(True, (2, 5), {"cases": 3})
    path = write_rules(rules, tmp_path / "configs" / "postprocessing.json")
    assert read_rules(path) == rules
    bad = {
        "missing": None,
        "not-json": "{",
        "list": "[]",
        "format": json.dumps({"format": "nnunet", "largest_component_labels": []}),
        "unknown-key": json.dumps({"format": "medseg-postprocessing/1", "remove_small": 10}),
        "label-zero": json.dumps({"format": "medseg-postprocessing/1", "largest_component_labels": [0]}),
        "label-bool": json.dumps({"format": "medseg-postprocessing/1", "largest_component_labels": [True]}),
        "label-text": json.dumps({"format": "medseg-postprocessing/1", "largest_component_labels": ["2"]}),
        "foreground-text": json.dumps({"format": "medseg-postprocessing/1", "foreground_largest_component": "yes"}),
        "connectivity": json.dumps({"format": "medseg-postprocessing/1", "connectivity": 3}),
    }
    for name, text in bad.items():
        target = tmp_path / f"{name}.json"
        if text is not None:
            target.write_text(text)
        with pytest.raises(InputError) as caught:
            read_rules(target)
        assert str(caught.value).startswith(str(target)), (name, caught.value)


def _write_oblique(path: Path, labels: np.ndarray) -> None:
    """A label map on an anisotropic, rotated, shifted grid (NIfTI through nibabel, else SimpleITK)."""
    if path.name.endswith(".nii.gz"):
        angle = np.deg2rad(10)
        rotation = np.array([[0.0, -1.0, 0.0], [np.cos(angle), 0.0, -np.sin(angle)], [np.sin(angle), 0.0, np.cos(angle)]])
        affine = np.eye(4)
        affine[:3, :3] = rotation @ np.diag([0.9, 0.8, 2.5])
        affine[:3, 3] = (30.0, -12.0, 7.5)
        nib.save(nib.Nifti1Image(labels, affine), str(path))
        return
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.T))
    image.SetSpacing((0.7, 1.3, 3.0))
    image.SetOrigin((-5.0, 11.0, 2.0))
    angle = np.deg2rad(12)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    sitk.WriteImage(image, str(path))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_folder_is_postprocessed_in_each_file_own_grid_and_format(tmp_path: Path):
    pred, _ = _scene()
    preds = tmp_path / "pred"
    preds.mkdir()
    for name in ("a_seg.nii.gz", "b_seg.nrrd", "c_seg.mha"):
        _write_oblique(preds / name, pred)
    before = _digest(preds)
    rules = PostprocessingRules(largest_component_labels=(2,))
    written = postprocess_folder(preds, tmp_path / "out", rules)
    assert [p.name for p in written] == ["a_seg.nii.gz", "b_seg.nrrd", "c_seg.mha"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_seg.nii.gz", "b_seg.nrrd", "c_seg.mha"]
    expected = apply_rules(pred, rules)
    for path in written:
        assert read_geometry(path).mismatch(read_geometry(preds / path.name)) is None
        if path.name.endswith(".nii.gz"):
            out = np.asarray(nib.load(str(path)).dataobj)
            np.testing.assert_allclose(nib.load(str(path)).affine, nib.load(str(preds / path.name)).affine)
        else:
            out = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T
        np.testing.assert_array_equal(out, expected)
    assert _digest(preds) == before  # the predictions are never touched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_bad_file_leaves_no_output_and_nothing_is_overwritten(tmp_path: Path):
    pred, _ = _scene()
    preds = tmp_path / "pred"
    preds.mkdir()
    _write_oblique(preds / "a_seg.nii.gz", pred)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 1.5, np.float32), np.eye(4)), str(preds / "b_seg.nii.gz"))
    _write_oblique(preds / "c_seg.nii.gz", pred)
    rules = PostprocessingRules(foreground_largest_component=True)
    with pytest.raises(InputError, match=r"b_seg\.nii\.gz: not a label map"):
        postprocess_folder(preds, tmp_path / "out", rules)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]  # no staging folder, no partial output
    (preds / "b_seg.nii.gz").unlink()
    with pytest.raises(InputError, match="the output folder is the prediction folder"):
        postprocess_folder(preds, preds, rules)
    out = tmp_path / "out"
    out.mkdir()
    (out / "c_seg.nii.gz").write_bytes(b"the user's own file")
    with pytest.raises(InputError, match=r"c_seg\.nii\.gz: already exists"):
        postprocess_folder(preds, out, rules)
    assert (out / "c_seg.nii.gz").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in out.iterdir()) == ["c_seg.nii.gz"]
    with pytest.raises(InputError, match="missing: no such file or folder"):
        postprocess_folder(tmp_path / "missing", tmp_path / "o2", rules)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no image files"):
        postprocess_folder(tmp_path / "empty", tmp_path / "o2", rules)


def test_folder_cases_pair_and_check_grids_as_evaluate_does(tmp_path: Path):
    pred, ref = _scene()
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    _write_oblique(tmp_path / "p" / "k_seg.nii.gz", pred)
    _write_oblique(tmp_path / "r" / "k.nii.gz", ref)
    rules = choose_rules(folder_cases(tmp_path / "p", tmp_path / "r"), [1, 2])
    assert rules.largest_component_labels == (2,)
    nib.save(nib.Nifti1Image(ref, np.eye(4)), str(tmp_path / "r" / "k.nii.gz"))  # same shape, other grid
    with pytest.raises(InputError, match="grid does not match its reference"):
        list(folder_cases(tmp_path / "p", tmp_path / "r"))


def test_medseg_postprocess_takes_a_rules_file_or_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pred, ref = _scene()
    preds = tmp_path / "pred"
    preds.mkdir()
    _write_oblique(preds / "a_seg.nii.gz", pred)
    bundle = tmp_path / "bundle"
    write_rules(PostprocessingRules(largest_component_labels=(2,)), bundle / "configs" / "postprocessing.json")
    assert main(["--quiet", "postprocess", "--pred", str(preds), "--out", str(tmp_path / "out"),
                 "--rules", str(bundle)]) == 0
    assert "1 label map(s)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "out" / "a_seg.nii.gz")).dataobj) == 2, ref == 2)
    code = main(["--quiet", "postprocess", "--pred", str(preds), "--out", str(tmp_path / "o2"),
                 "--rules", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"medseg: error: {tmp_path / 'missing.json'}: no such postprocessing rules file"
    assert not (tmp_path / "o2").exists()


def test_the_bundle_step_applies_the_rules_to_an_inverted_float_label_map_and_keeps_its_metadata():
    from monai.data import MetaTensor

    from medseg.inference.postprocess import LargestComponentsd

    pred, ref = _scene()
    value = MetaTensor(torch.from_numpy(pred.astype(np.float32))[None], meta={"filename_or_obj": "case.nii.gz"})
    out = LargestComponentsd(keys="pred", rules=PostprocessingRules(largest_component_labels=(2,)))({"pred": value})
    assert out["pred"].dtype == torch.float32 and out["pred"].meta["filename_or_obj"] == "case.nii.gz"
    np.testing.assert_array_equal(out["pred"][0].numpy() == 2, ref == 2)
    same = LargestComponentsd(keys="pred", rules=PostprocessingRules())({"pred": value})
    assert same["pred"] is value
