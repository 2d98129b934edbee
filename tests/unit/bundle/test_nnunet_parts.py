"""Several nnU-Net model folders imported as one bundle (TotalSegmentator's multi-part layout): the merged label map
is each part's own prediction painted in folder order with the values of the class map, through both doors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.bundle.nnunet_import import import_nnunet
from medseg.bundle.nnunet_parts import load_parts
from medseg.errors import InputError
from tests.nnunet_folders import model_folder

ABDOMEN = {"background": 0, "liver": 1, "spleen": 2}
KIDNEY = {"background": 0, "kidney": 1}


def _medseg(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _predict(bundle: Path, image: Path, out: Path) -> np.ndarray:
    _medseg("predict", "--model", str(bundle), "--input", str(image), "--output", str(out), "--no-tta")
    written = nib.load(out / "case_seg.nii.gz")
    assert written.shape == nib.load(image).shape
    np.testing.assert_allclose(written.affine, nib.load(image).affine, atol=1e-5)
    return np.asarray(written.dataobj)


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two model folders segmenting disjoint labels, and an anisotropic CT-like image."""
    first = model_folder(tmp_path, labels=ABDOMEN, dataset="Dataset901_Abdomen", seed=6)
    second = model_folder(tmp_path, labels=KIDNEY, dataset="Dataset902_Kidney", seed=1)
    rng = np.random.default_rng(0)
    image = rng.normal(100, 60, (22, 20, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([0.9, 1.1, 2.5, 1.0])), tmp_path / "case.nii.gz")
    return first, second, tmp_path / "case.nii.gz"


def test_parts_merge_into_one_label_map_by_the_class_map(tmp_path: Path, parts: tuple[Path, Path, Path]) -> None:
    first, second, image = parts
    a = _predict(import_nnunet(first, tmp_path / "a"), image, tmp_path / "pred-a")
    b = _predict(import_nnunet(second, tmp_path / "b"), image, tmp_path / "pred-b")
    assert {1, 2} <= set(np.unique(a)) and 1 in set(np.unique(b)) and ((a > 0) & (b > 0)).any(), \
        "the random parts must segment each label and overlap, or the merge is not tested"
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"1": "spleen", "2": "kidney", "3": "liver"}))
    bundle = tmp_path / "merged"
    _medseg("bundle", "import-nnunet", str(first), str(second), "--out", str(bundle), "--class-map", str(class_map))
    _medseg("bundle", "verify", str(bundle))  # metadata, segments, every part's weights
    plan = json.loads((bundle / "configs" / "plan.json").read_text())
    assert plan["labels"] == {"0": "background", "1": "spleen", "2": "kidney", "3": "liver"}
    assert [p.label_values for p in load_parts(bundle)] == [(0, 3, 1), (0, 2)]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert all(meta["segments"][v]["snomed"]["code"] for v in ("1", "2", "3"))  # codes from medseg's table
    assert [p["folder"] for p in meta["source"]["parts"]] == [first.name, second.name]
    assert sorted(p.relative_to(bundle).as_posix() for p in (bundle / "models").rglob("*.pt")) == \
        ["models/part_0/fold_0.pt", "models/part_1/fold_0.pt"]
    expected = np.zeros_like(a)
    expected[a == 1], expected[a == 2] = 3, 1
    expected[b == 1] = 2  # the later part wins where both claim a voxel
    np.testing.assert_array_equal(_predict(bundle, image, tmp_path / "pred"), expected)
    # the bundle-run door (MONAI's parser over the config, in safe mode) writes the same label map
    data = tmp_path / "data" / "imagesTs"
    data.mkdir(parents=True)
    (data / "case.nii.gz").write_bytes(image.read_bytes())
    _medseg("bundle", "run", str(bundle), "--set", f"dataset_dir={data.parent}", "--set",
            f"output_dir={tmp_path / 'run'}", "--set", "tta=false")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "run" / "case_seg.nii.gz").dataobj), expected)


def test_without_a_class_map_labels_are_numbered_in_folder_order(tmp_path: Path, parts: tuple[Path, Path, Path]) -> None:
    first, second, _ = parts
    bundle = import_nnunet([second, first], tmp_path / "merged")
    plan = json.loads((bundle / "configs" / "plan.json").read_text())
    assert plan["labels"] == {"0": "background", "1": "kidney", "2": "liver", "3": "spleen"}


@pytest.mark.parametrize(("case", "message"), [
    ("overlap", r"label 'liver' is also segmented by .*Dataset901_Abdomen.*disjoint labels"),
    ("missing", r"map\.json: no value for 'kidney'"),
    ("unused", r"map\.json: no part segments 'heart'"),
    ("single", r"map\.json: a class map merges several model folders"),
    ("twice", r"the name 'liver' is given to two label values"),
])
def test_parts_that_cannot_be_merged_are_refused_naming_the_file(tmp_path: Path, parts: tuple[Path, Path, Path],
                                                                 case: str, message: str) -> None:
    first, second, _ = parts
    class_map = tmp_path / "map.json"
    mapping = {"1": "spleen", "2": "kidney", "3": "liver"}
    folders = [first, second]
    if case == "overlap":
        folders[1] = model_folder(tmp_path, labels={"background": 0, "liver": 1}, dataset="Dataset903_Liver")
    elif case == "missing":
        del mapping["2"]
    elif case == "unused":
        mapping["4"] = "heart"
    elif case == "single":
        folders = [first]
    elif case == "twice":
        mapping["4"] = "liver"
    class_map.write_text(json.dumps(mapping))
    out = tmp_path / "merged"
    with pytest.raises(InputError, match=message):
        import_nnunet(folders, out, class_map=class_map)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
