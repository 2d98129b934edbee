"""nnU-Net's cascade: a cross-validated 3d_lowres run, then ``medseg train --configuration 3d_cascade_fullres
--previous-stage LOWRES --fold all``, whose folds train and are cross-validated on the lowres run's out-of-fold
label maps, and whose run keeps the lowres folds (``previous/``); ``medseg select`` compares it with the lowres
run, and its bundle predicts new images: the lowres fold ensemble first, its label map an input of the cascade."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.bundle.pipeline import inference_pipeline
from medseg.cli import main
from medseg.data.synthetic import write_dataset
from medseg.io.image import read_geometry
from medseg.plan import load_plan

pytestmark = pytest.mark.slow

#: bounded by iterations, never by minutes
SHORT = ["--plan", "auto", "--epochs", "1", "--max-iterations", "2", "--iterations-per-epoch", "2",
         "--val-interval", "1", "--device", "cpu"]


def _train(data: Path, run: Path, *extra: str) -> int:
    return main(["--quiet", "train", "--data", str(data / "dataset.json"), "--out", str(run), "--fold", "all",
                 *SHORT, *extra])


def test_a_cascade_trains_on_the_lowres_run_s_out_of_fold_maps(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    write_dataset(data, modality="ct", cases=7, seed=5, size=32)
    training = sorted(p.name.removesuffix(".nii.gz") for p in (data / "labelsTr").iterdir())
    lowres, cascade = tmp_path / "lowres", tmp_path / "cascade"

    # a cascade needs its previous stage, of the right configuration, finished: refused before anything is written
    assert _train(data, cascade, "--configuration", "3d_cascade_fullres") == 2
    assert "--previous-stage RUN" in capsys.readouterr().err and not cascade.exists()
    assert _train(data, cascade, "--configuration", "3d_cascade_fullres", "--previous-stage",
                  str(tmp_path / "nowhere")) == 2
    assert "not a cross-validation run" in capsys.readouterr().err and not cascade.exists()

    assert _train(data, lowres, "--configuration", "3d_lowres") == 0
    assert load_plan(lowres / "fold_0").configuration == "3d_lowres"
    assert _train(data, tmp_path / "other", "--configuration", "3d_fullres", "--previous-stage", str(lowres)) == 2
    assert "--previous-stage is for --configuration 3d_cascade_fullres" in capsys.readouterr().err

    assert _train(data, cascade, "--configuration", "3d_cascade_fullres", "--previous-stage", str(lowres)) == 0
    plan = load_plan(cascade / "fold_0")
    assert plan.configuration == "3d_cascade_fullres" and plan.previous_stage == "3d_lowres"
    assert plan.target_spacing != load_plan(lowres / "fold_0").target_spacing
    for fold in range(5):  # every fold keeps the maps it trains on: the lowres run's out-of-fold predictions
        maps = cascade / f"fold_{fold}" / "previous" / "predictions"
        assert sorted(p.name for p in maps.iterdir()) == [f"{c}_seg.nii.gz" for c in training]
        assert (maps / f"{training[0]}_seg.nii.gz").read_bytes() == \
            (lowres / "cv" / "predictions" / f"{training[0]}_seg.nii.gz").read_bytes()
    summary = json.loads((cascade / "cv_summary.json").read_text())
    assert summary["overall"]["cases"] == len(training)
    assert sorted(p.name for p in (cascade / "cv" / "predictions").glob("*.nii.gz")) == [f"{c}_seg.nii.gz" for c in training]

    previous = load_plan(cascade / "previous")  # the lowres fold ensemble, to predict new images' first stage
    assert previous.to_json() == load_plan(lowres / "fold_0").to_json()
    assert all((cascade / "previous" / f"fold_{k}" / "models" / "model.pt").is_file() for k in range(5))

    assert main(["--quiet", "select", str(lowres), str(cascade)]) == 0
    chosen = json.loads(next(run for run in (lowres, cascade) if (run / "configs" / "selection.json").exists())
                        .joinpath("configs", "selection.json").read_text())
    assert [r["configuration"] for r in chosen["runs"]] == ["3d_lowres", "3d_cascade_fullres"]
    assert len(chosen["pairs"]) == 1

    assert main(["--quiet", "select", str(cascade)]) == 0  # the cascade alone: its bundle predicts new images
    pipeline = inference_pipeline(cascade)
    assert pipeline.previous is not None and pipeline.previous.plan.configuration == "3d_lowres"
    test_image = sorted((data / "imagesTs").iterdir())[0]
    out = tmp_path / "predicted"
    assert main(["--quiet", "predict", "--model", str(cascade), "--input", str(test_image), "--output", str(out)]) == 0
    written = out / test_image.name.replace(".nii.gz", "_seg.nii.gz")
    assert read_geometry(written).mismatch(read_geometry(test_image)) is None

    # a fold alone has the out-of-fold maps of the training cases only: another image is refused, named
    assert main(["--quiet", "predict", "--model", str(cascade / "fold_0"), "--input", str(test_image), "--output",
                 str(tmp_path / "fold")]) == 2
    err = capsys.readouterr().err
    assert "has none of case" in err and test_image.name in err
    assert not list((tmp_path / "fold").glob("*.nii.gz"))
