"""The items of the training datasets: one file per image channel, in the plan's channel order."""

from __future__ import annotations

from pathlib import Path

from medseg.data.datalist import Case
from medseg.engines.data import Split, case_items


def test_case_items_list_every_channel_file_and_keep_one_channel_cases_as_paths(tmp_path: Path) -> None:
    one = Case("a", tmp_path / "a.nii.gz", tmp_path / "a_label.nii.gz")
    two = Case("b", tmp_path / "b_0000.nii.gz", tmp_path / "b.nii.gz",
               (tmp_path / "b_0000.nii.gz", tmp_path / "b_0001.nii.gz"))
    split = Split(0, [one, two], [two])
    assert case_items(split) == [
        {"image": str(tmp_path / "a.nii.gz"), "label": str(tmp_path / "a_label.nii.gz")},
        {"image": [str(tmp_path / "b_0000.nii.gz"), str(tmp_path / "b_0001.nii.gz")], "label": str(tmp_path / "b.nii.gz")},
    ]
    assert case_items(split, "validation")[0]["image"] == [str(tmp_path / "b_0000.nii.gz"), str(tmp_path / "b_0001.nii.gz")]
