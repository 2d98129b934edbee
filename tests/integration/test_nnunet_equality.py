"""Models trained by nnU-Net v2 itself, imported with ``medseg bundle import-nnunet`` and predicted with ``medseg
predict``: the label maps agree with ``nnUNetv2_predict``'s on >= 99.9 % of the voxels (one fold and a five-fold
ensemble, with and without mirroring; an anisotropic configuration; the 2d configuration, slice by slice; two
models of disjoint labels merged as TotalSegmentator merges its parts), in the same geometry.

nnU-Net runs in its own venv (``make nnunet-peer``, created by ``make test``; ``MEDSEG_NNUNET_VENV`` overrides the
folder). The models are tiny (a 3-stage U-Net of 8-32 features on a 32^3 patch, edited from nnU-Net's own plans of
the phantoms) and trained for a fixed number of iterations (300), seeded: about a minute per fold on one core.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.synthetic import write_dataset
from medseg.data.synthetic.dicom import phantom_series
from tests.tools import IN_CI, dciodvfy_errors, load_script, needs, needs_dciodvfy

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("MEDSEG_NNUNET_VENV", ROOT / ".venv-nnunet"))
DATASET_ID, DATASET = 901, "Dataset901_Phantoms"
TRAINER, PLANS, ANISO, PLANS_2D = ("nnUNetTrainerFixedIterations", "nnUNetPlansTiny", "nnUNetPlansTinyAniso",
                                   "nnUNetPlansTiny2d")

pytestmark = [pytest.mark.slow, pytest.mark.nnunet,
              needs((VENV / "bin" / "python").exists(), f"nnU-Net v2 in {VENV} (make nnunet-peer)")]


def _model(work: Path, plans: str, configuration: str = "3d_fullres") -> Path:
    return work / "nnUNet_results" / DATASET / f"{TRAINER}__{plans}__{configuration}"


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Phantoms in nnU-Net's raw layout; nnU-Net's plan and preprocessing; five folds of a tiny model (300 iterations
    for folds 0 and 1, 100 for the others), one fold of an anisotropic one and one of a 2d configuration (300 each),
    trained by nnU-Net; their predictions of the test images by nnUNetv2_predict (fold 0 with and without
    mirroring, the 5-fold ensemble, the anisotropic and the 2d model without)."""
    assert (VENV / "bin" / "python").exists() or not IN_CI, f"CI needs nnU-Net in {VENV}: make nnunet-peer"
    module = load_script("nnunet_peer")
    work = tmp_path_factory.mktemp("nnunet")
    peer = module.Peer(VENV, work, 1, work / "logs")
    peer.install_trainer()
    raw = work / "nnUNet_raw" / DATASET
    write_dataset(raw, modality="ct", cases=8, seed=5, size=48, layout="nnunet")
    peer.run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "2d", "-np", "1", "1",
             "-npfp", "1", log="plan")
    preprocessed = work / "nnUNet_preprocessed" / DATASET
    module.tiny_plans(preprocessed, PLANS)
    module.tiny_plans(preprocessed, ANISO, anisotropic=True)
    module.tiny_plans(preprocessed, PLANS_2D, configuration="2d")
    peer.run("nnUNetv2_preprocess", "-d", str(DATASET_ID), "-plans_name", ANISO, "-c", "3d_fullres", "-np", "1",
             log="preprocess-aniso")
    # folds 2-4 complete a 5-fold ensemble; they train shorter (100 iterations), the ensemble's members need not be good
    for plans, configuration, fold, epochs in ((PLANS, "3d_fullres", "0", 12), (PLANS, "3d_fullres", "1", 12),
                                               (PLANS, "3d_fullres", "2", 4), (PLANS, "3d_fullres", "3", 4),
                                               (PLANS, "3d_fullres", "4", 4), (ANISO, "3d_fullres", "0", 12),
                                               (PLANS_2D, "2d", "0", 12)):
        peer.run("nnUNetv2_train", str(DATASET_ID), configuration, fold, "-p", plans, "-tr", TRAINER, "-device", "cpu",
                 log=f"train-{plans}-{fold}", MEDSEG_NNUNET_EPOCHS=str(epochs), MEDSEG_NNUNET_ITERATIONS="25",
                 nnUNet_n_proc_DA="0")
    outputs = {"raw": raw, "model": _model(work, PLANS), "aniso-model": _model(work, ANISO),
               "2d-model": _model(work, PLANS_2D, "2d")}
    for name, plans, configuration, folds, tta in (
            ("fold0-tta", PLANS, "3d_fullres", ["0"], True), ("fold0", PLANS, "3d_fullres", ["0"], False),
            ("folds5", PLANS, "3d_fullres", ["0", "1", "2", "3", "4"], False),
            ("aniso", ANISO, "3d_fullres", ["0"], False),
            ("2d", PLANS_2D, "2d", ["0"], False)):
        outputs[name] = work / f"nnunet-{name}"
        peer.run("nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(outputs[name]), "-d", str(DATASET_ID),
                 "-c", configuration, "-p", plans, "-tr", TRAINER, "-f", *folds, "-device", "cpu", "-npp", "1",
                 "-nps", "1", *([] if tta else ["--disable_tta"]), log=f"predict-{name}")
    return outputs


#: The phantoms' labels split into two parts (TotalSegmentator's layout): part label -> phantom label.
PARTS = {"Dataset902_PartOrgans": {"liver": 1, "spleen": 2},
         "Dataset903_PartOthers": {"kidney": 3, "bone": 4, "lesion": 5}}


@pytest.fixture(scope="module")
def nnunet_parts(nnunet: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny models trained by nnU-Net on the same phantoms, each on a disjoint subset of the labels (the others
    background), and nnUNetv2_predict's label maps of the test images merged as TotalSegmentator merges its parts:
    in part order, each part's foreground over the parts before it, values by name from the whole dataset."""
    module = load_script("nnunet_peer")
    work = tmp_path_factory.mktemp("nnunet-parts")
    peer = module.Peer(VENV, work, 1, work / "logs")
    source = nnunet["raw"]
    dataset = json.loads((source / "dataset.json").read_text())
    merged: dict[str, np.ndarray] = {}
    outputs: dict[str, Path] = {}
    for number, (name, labels) in enumerate(PARTS.items()):
        raw = work / "nnUNet_raw" / name
        for folder in ("imagesTr", "imagesTs"):
            shutil.copytree(source / folder, raw / folder)
        (raw / "labelsTr").mkdir(parents=True)
        for path in sorted((source / "labelsTr").glob("*.nii.gz")):
            label = nib.load(path)
            values = np.asarray(label.dataobj)
            part = np.zeros_like(values)
            for value, (_, phantom) in enumerate(labels.items(), start=1):
                part[values == phantom] = value
            nib.save(nib.Nifti1Image(part, label.affine, label.header), raw / "labelsTr" / path.name)
        (raw / "dataset.json").write_text(json.dumps({**dataset, "labels": {"background": 0, **{
            label: value for value, label in enumerate(labels, start=1)}}}))
        dataset_id = name[len("Dataset"):len("Dataset") + 3]
        peer.run("nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1", "-npfp", "1",
                 log=f"plan-{name}")
        module.tiny_plans(work / "nnUNet_preprocessed" / name, PLANS)
        peer.run("nnUNetv2_train", dataset_id, "3d_fullres", "0", "-p", PLANS, "-tr", TRAINER, "-device", "cpu",
                 log=f"train-{name}", MEDSEG_NNUNET_EPOCHS="8", MEDSEG_NNUNET_ITERATIONS="25", nnUNet_n_proc_DA="0")
        predicted = work / f"nnunet-{name}"
        peer.run("nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(predicted), "-d", dataset_id, "-c",
                 "3d_fullres", "-p", PLANS, "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
                 "--disable_tta", log=f"predict-{name}")
        outputs[f"model-{number}"] = work / "nnUNet_results" / name / f"{TRAINER}__{PLANS}__3d_fullres"
        segmented = []
        for path in sorted(predicted.glob("*.nii.gz")):
            part = np.asarray(nib.load(path).dataobj)
            if len(np.unique(part)) > 1:
                segmented.append(path.name)
            into = merged.setdefault(path.name, np.zeros_like(part))
            for value, (_, phantom) in enumerate(labels.items(), start=1):
                into[part == value] = phantom
        # the 200-iteration part model, unseeded then, once called every case background only (a CI run); the test
        # trainer is seeded since (MEDSEG_NNUNET_SEED), and the merge is compared as long as it segments some case
        assert segmented, f"{predicted}: the part model {name} predicted background only in every case"
    outputs["merged"] = work / "nnunet-merged"
    outputs["merged"].mkdir()
    for case, labels_of_case in merged.items():
        reference = nib.load(outputs["merged"].parent / f"nnunet-{next(iter(PARTS))}" / case)
        nib.save(nib.Nifti1Image(labels_of_case, reference.affine, reference.header), outputs["merged"] / case)
    return outputs


def _medseg(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _agreement(medseg_dir: Path, nnunet_dir: Path) -> dict[str, float]:
    """Per case, the fraction of voxels with equal labels; also checks the geometry, that nnU-Net's model segments
    some case, and that the two agree on >= 97 % of the voxels either calls foreground (the few voxels that differ
    are near-ties on the structures' edges: nnU-Net blends in float16 on the CPU; a model trained 300 iterations has
    soft edges, and a 2d one with 2,000 foreground voxels differed on 24 edge voxels, 98.9 %, in one CI run)."""
    agreement, segmented = {}, []
    for reference in sorted(nnunet_dir.glob("*.nii.gz")):
        case = reference.name[: -len(".nii.gz")]
        ours, theirs = nib.load(medseg_dir / f"{case}_0000_seg.nii.gz"), nib.load(reference)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
        a, b = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
        if len(np.unique(b)) > 1:
            segmented.append(case)
        foreground = (a > 0) | (b > 0)  # empty only where both call every voxel background
        assert not foreground.any() or (a[foreground] == b[foreground]).mean() >= 0.97, f"{case}: the foregrounds differ"
        agreement[case] = float((a == b).mean())
    # nnU-Net's 300-iteration 2d model, unseeded then, once missed a whole case (background only, in one CI run);
    # the comparison is not vacuous as long as its model segments some case
    assert agreement and segmented, "nnU-Net predicted background only in every case; the model learnt nothing"
    return agreement


@pytest.mark.parametrize(("reference", "model", "folds", "tta"), [
    ("fold0", "model", "0", False), ("fold0-tta", "model", "0", True), ("folds5", "model", "0,1,2,3,4", False),
    ("aniso", "aniso-model", "0", False), ("2d", "2d-model", "0", False)])
def test_medseg_predict_agrees_with_nnunet_predict(nnunet: dict[str, Path], tmp_path: Path, reference: str,
                                                   model: str, folds: str, tta: bool) -> None:
    bundle = tmp_path / "bundle"
    _medseg("bundle", "import-nnunet", str(nnunet[model]), "--out", str(bundle), "--folds", folds)
    out = tmp_path / "pred"
    _medseg("predict", "--model", str(bundle), "--input", str(nnunet["raw"] / "imagesTs"), "--output", str(out),
            "--tta" if tta else "--no-tta")
    agreement = _agreement(out, nnunet[reference])
    assert min(agreement.values()) >= 0.999, agreement


def test_bundle_run_door_writes_the_same_label_maps(nnunet: dict[str, Path], tmp_path: Path) -> None:
    """``medseg bundle run`` (MONAI's ConfigParser over the imported inference.json, in safe mode) writes what
    ``medseg predict`` writes."""
    bundle = tmp_path / "bundle"
    _medseg("bundle", "import-nnunet", str(nnunet["model"]), "--out", str(bundle), "--folds", "0")
    data = tmp_path / "data"
    shutil.copytree(nnunet["raw"] / "imagesTs", data / "imagesTs")
    _medseg("bundle", "run", str(bundle), "--set", f"dataset_dir={data}", "--set", f"output_dir={tmp_path / 'run'}",
            "--set", "tta=false")
    agreement = _agreement(tmp_path / "run", nnunet["fold0"])
    assert min(agreement.values()) >= 0.999, agreement


def test_parts_trained_on_disjoint_labels_merge_as_nnunet_predictions_do(nnunet_parts: dict[str, Path],
                                                                         nnunet: dict[str, Path], tmp_path: Path) -> None:
    """Two nnU-Net models, each trained on a subset of the labels, imported as one bundle with a class map: its label
    map equals nnUNetv2_predict's label maps of the two merged (part order, values by name)."""
    class_map = tmp_path / "classes.json"
    class_map.write_text(json.dumps({"liver": 1, "spleen": 2, "kidney": 3, "bone": 4, "lesion": 5}))
    bundle = tmp_path / "bundle"
    _medseg("bundle", "import-nnunet", str(nnunet_parts["model-0"]), str(nnunet_parts["model-1"]), "--out",
            str(bundle), "--class-map", str(class_map))
    out = tmp_path / "pred"
    _medseg("predict", "--model", str(bundle), "--input", str(nnunet["raw"] / "imagesTs"), "--output", str(out),
            "--no-tta")
    agreement = _agreement(out, nnunet_parts["merged"])
    assert min(agreement.values()) >= 0.999, agreement


def test_evaluate_and_report_of_an_imported_model(nnunet: dict[str, Path], tmp_path: Path) -> None:
    """Downstream of an imported model on nnU-Net's raw layout: ``medseg evaluate`` pairs the predictions of
    ``imagesTs/CASE_0000`` with ``CASE`` references (here nnUNetv2_predict's label maps: Dice ~1 per label, named by
    the bundle), ``medseg report`` measures each structure of each case."""
    bundle = tmp_path / "bundle"
    _medseg("bundle", "import-nnunet", str(nnunet["model"]), "--out", str(bundle), "--folds", "0")
    out = tmp_path / "pred"
    images = nnunet["raw"] / "imagesTs"
    _medseg("predict", "--model", str(bundle), "--input", str(images), "--output", str(out), "--no-tta")
    _medseg("evaluate", "--pred", str(out), "--ref", str(nnunet["fold0"]), "--labels", str(bundle), "--out",
            str(tmp_path / "evaluation"))
    summary = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert summary["cases"] == len(list(images.iterdir()))
    scored = {item["name"]: item["dice"]["mean"] for item in summary["labels"].values() if item["dice"]["mean"] is not None}
    assert scored and set(scored) <= {"liver", "spleen", "kidney", "bone", "lesion"}
    assert min(scored.values()) >= 0.98, scored
    _medseg("report", "--pred", str(out), "--images", str(images), "--labels", str(bundle), "--out",
            str(tmp_path / "report"))
    rows = (tmp_path / "report" / "structures.csv").read_text().splitlines()
    assert any(",liver," in row for row in rows) and (tmp_path / "report" / "report.html").is_file()


@needs_dciodvfy
def test_imported_model_writes_dicom_seg_and_rtstruct_of_a_series(nnunet: dict[str, Path], tmp_path: Path) -> None:
    """Downstream of an imported model: a CT series in, DICOM SEG and RTSTRUCT out, dciodvfy clean, the segments
    named by the model's labels."""
    import pydicom

    bundle = tmp_path / "bundle"
    _medseg("bundle", "import-nnunet", str(nnunet["model"]), "--out", str(bundle), "--folds", "0")
    files, _, _ = phantom_series(tmp_path / "series", "ct", seed=11, size=48)
    for fmt in ("dicom-seg", "rtstruct"):
        out = tmp_path / fmt
        _medseg("predict", "--model", str(bundle), "--input", str(files[0].parent), "--output", str(out),
                "--format", fmt, "--no-tta")
        written = sorted(out.iterdir())
        assert len(written) == 1 and written[0].suffix == ".dcm"
        assert dciodvfy_errors(written[0]) == []
        dataset = pydicom.dcmread(written[0])
        names = ([s.SegmentLabel for s in dataset.SegmentSequence] if fmt == "dicom-seg"
                 else [r.ROIName for r in dataset.StructureSetROISequence])
        assert names and set(names) <= {"liver", "spleen", "kidney", "bone", "lesion"}
