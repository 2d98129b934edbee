"""The planned training recipe end to end through ``medseg train``: a bundle whose plan the planner made
(``configuration: 3d_fullres``, a DynUNet with deep supervision) trains with its fixed epoch length,
preprocessed cases cached on disk and reused by ``--resume``, MLflow tracking into a local folder,
and its weights (deep-supervision heads included) predict; an older train.json refuses the new options."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from medseg.architectures import NetworkSpec
from medseg.bundle.create import plan_bundle, write_bundle
from medseg.cli import main
from medseg.data.synthetic import write_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 small CT phantoms (48 voxels in-plane)."""
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny", modality="ct", cases=6, seed=5, size=48)


def _planned_bundle(data: Path, folder: Path) -> Path:
    _, plan = plan_bundle(data, folder, patch_size=(32, 32, 32), network=NetworkSpec("dynunet", deep_supervision=True))
    return write_bundle(folder, dataclasses.replace(plan, configuration="3d_fullres", batch_size=2))


def test_a_planned_bundle_trains_with_its_recipe_tracks_mlflow_resumes_from_the_cache_and_predicts(
        tmp_path: Path, tiny_ct: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mlflow = pytest.importorskip("mlflow")
    bundle = _planned_bundle(tiny_ct, tmp_path / "B")
    runs = tmp_path / "mlruns"
    args = ["train", "--data", str(tiny_ct), "--bundle", str(bundle), "--epochs", "1", "--iterations-per-epoch", "3",
            "--val-interval", "1", "--mlflow", runs.as_uri()]
    assert main(args) == 0
    summary = json.loads((bundle / "train_summary.json").read_text())
    assert (summary["iterations"], summary["epoch_length"]) == (3, 3)
    options = summary["options"]
    assert (options["learning_rate"], options["batch_size"], options["samples_per_case"]) == (0.01, 2, 1)
    cached = sorted((bundle / "preprocessed").glob("*/*/*.pt"))
    parts = [p.parent.name for p in cached]  # 3 training cases (those drawn so far) and 1 validation case
    assert parts.count("validation") == 1 and 2 <= parts.count("training") <= 3
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert run.info.run_name == "B" and run.data.params["configuration"] == "3d_fullres"
    assert {"train_loss", "learning_rate", "val_mean_dice"} <= set(run.data.metrics)

    stamps = {p: p.stat().st_mtime_ns for p in cached}
    assert main(["train", "--data", str(tiny_ct), "--out", str(bundle), "--resume", "--epochs", "2",
                 "--iterations-per-epoch", "3", "--val-interval", "1"]) == 0
    assert json.loads((bundle / "train_summary.json").read_text())["iterations"] == 6
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())  # read back, not preprocessed again

    capsys.readouterr()
    images = tiny_ct.parent / "imagesTs"
    assert main(["predict", "--model", str(bundle), "--input", str(images), "--output", str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == len(list(images.iterdir()))


def test_an_older_train_json_refuses_the_options_it_would_ignore(tmp_path: Path, tiny_ct: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _planned_bundle(tiny_ct, tmp_path / "B")
    config = json.loads((bundle / "configs" / "train.json").read_text())
    del config["iterations_per_epoch"]
    (bundle / "configs" / "train.json").write_text(json.dumps(config))
    assert main(["train", "--data", str(tiny_ct), "--bundle", str(bundle), "--iterations-per-epoch", "5"]) == 2
    assert "does not read --iterations-per-epoch" in capsys.readouterr().err
    assert not (bundle / "preprocessed").exists()
