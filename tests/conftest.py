"""Shared fixtures: small synthetic datasets, an untrained run folder and a briefly trained one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def ct_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3D CT phantom dataset (12 cases: 9 training, 3 test; 96 voxels in-plane); returns dataset.json."""
    from medseg.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "ct", modality="ct", cases=12, seed=3, size=96)


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory: pytest.TempPathFactory, ct_dataset: Path) -> Path:
    """A valid bundle (plan, configs, random weights): enough for input-validation tests."""
    from medseg.bundle.create import write_bundle
    from medseg.data.datalist import load_datalist, validate_datalist
    from medseg.networks import build_network
    from medseg.plan import NetworkSpec, make_plan

    datalist = load_datalist(ct_dataset)
    plan = make_plan(datalist, validate_datalist(datalist), network=NetworkSpec(channels=(8, 16, 32), strides=(2, 2)))
    run = write_bundle(tmp_path_factory.mktemp("runs") / "untrained", plan, data_source="synthetic CT (tests)")
    torch.manual_seed(0)
    torch.save(build_network(plan).state_dict(), run / "models" / "model.pt")
    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, ct_dataset: Path) -> Path:
    """A 3D U-Net trained for 12 epochs of 20 iterations (about 1 min on 2 free cores) on the CT phantoms:
    a real, if brief, run."""
    from medseg.bundle.training import TrainOptions, train

    run = tmp_path_factory.mktemp("runs") / "trained"
    # bounded by epochs only, never by a time budget: a loaded machine makes it slower, not worse
    train(ct_dataset, run, TrainOptions(epochs=12, val_interval=2, seed=0))
    return run


@pytest.fixture(scope="session")
def imported_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles imported from nnU-Net model folders of random networks (no nnU-Net needed): ``"single"`` (liver and
    spleen) and ``"parts"`` (that folder and a kidney model merged into one label map): enough for the downstream
    tests of imported models (PACS, DICOM outputs)."""
    from medseg.bundle.nnunet_import import import_nnunet
    from tests.nnunet_folders import model_folder

    root = tmp_path_factory.mktemp("nnunet-models")
    first = model_folder(root, labels={"background": 0, "liver": 1, "spleen": 2}, dataset="Dataset901_Abdomen", seed=6)
    second = model_folder(root, labels={"background": 0, "kidney": 1}, dataset="Dataset902_Kidney", seed=1)
    return {"single": import_nnunet(first, root / "single"), "parts": import_nnunet([first, second], root / "parts")}

