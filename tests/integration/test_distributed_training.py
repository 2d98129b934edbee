"""Training on two processes (``torchrun --nproc_per_node 2``, gloo, one thread each): one model, one
set of outputs, resume after a kill, and the model zoo's door (``configs/multi_gpu_train.json``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medseg.data.synthetic import write_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, ITERATIONS = 3, 4
IDENTICAL = re.compile(r"epoch (\d+): weights identical on all 2 processes")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", _port(), *args]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 small 2D CT phantoms: 9 training cases (7 train, 2 validate: one per process), 3 test."""
    return write_dataset(tmp_path_factory.mktemp("ddp-data") / "ct2d", modality="ct", cases=12, seed=5, size=64, dims=2)


def _train_args(data: Path, run: Path, epochs: int, *extra: str) -> list[str]:
    return ["-m", "medseg", "train", "--plan", "default", "--data", str(data), "--out", str(run), "--epochs",
            str(epochs), "--val-interval", "1", "--iterations-per-epoch", str(ITERATIONS), *extra]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    run = tmp_path_factory.mktemp("ddp-runs") / "run"
    return run, _run(_torchrun(*_train_args(data, run, EPOCHS)))


def test_two_processes_train_one_model_with_one_set_of_outputs(ddp_run: tuple[Path, subprocess.CompletedProcess[str]]
                                                               ) -> None:
    run, result = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    # the processes compared their weights after every epoch (ReplicaCheck fails the run if they differ)
    assert sorted(int(e) for e in IDENTICAL.findall(result.stderr)) == list(range(1, EPOCHS + 1)), result.stderr[-3000:]
    assert "process group of 2 processes joined (gloo backend)" in result.stderr
    # one report, from the main process
    assert len([line for line in result.stdout.splitlines() if line.startswith("model: ")]) == 1
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["iterations"] == EPOCHS * ITERATIONS and summary["epochs_completed"] == EPOCHS
    # one set of outputs: one checkpoint, one model, one history, one split, TensorBoard files of one process
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert sorted(p.name for p in (run / "models").iterdir()) == ["model.pt"]
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == ["curves.png", "history.json", "split.json",
                                                                    "train_summary.json"]
    events = list((run / "logs").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one writer for the trainer, one for the evaluator
    assert len({name.name.split(".")[-2] for name in events}) == 1  # ... of one process (the pid in the name)
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in checkpoint["network"])  # the network, not DDP's wrapper
    assert checkpoint["trainer"]["iteration"] == EPOCHS * ITERATIONS
    meta = json.loads((run / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.2.0"  # recorded once
    # the loss goes down
    history = json.loads((run / "history.json").read_text())
    assert history["epoch"] == list(range(1, EPOCHS + 1))
    assert history["loss"][-1] < history["loss"][0]
    assert len(history["val_mean_dice"]) == EPOCHS


def test_killed_run_resumes_under_torchrun(tmp_path: Path, data: Path) -> None:
    """SIGKILL to torchrun and its workers after the first checkpoint; --resume under torchrun continues there."""
    run = tmp_path / "run"
    process = subprocess.Popen(_torchrun(*_train_args(data, run, 200)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 600  # a hang guard only
    try:
        while not last.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
    finally:  # torchrun starts its workers in sessions of their own: kill them all, as a crash of the machine would
        for pid in [*_descendants(process.pid), process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=60)
    assert last.exists(), "training wrote no checkpoint"
    epoch = torch.load(last, weights_only=True)["trainer"]["epoch"]
    assert 1 <= epoch < 200

    resumed = _run(_torchrun(*_train_args(data, run, epoch + 2, "--resume")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from epoch {epoch}" in resumed.stderr
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed"] and summary["processes"] == 2
    assert summary["epochs_completed"] == epoch + 2
    assert summary["iterations"] == (epoch + 2) * ITERATIONS
    assert summary["iterations_this_run"] == 2 * ITERATIONS
    assert sorted(int(e) for e in IDENTICAL.findall(resumed.stderr)) == [epoch + 1, epoch + 2]
    assert torch.load(last, weights_only=True)["trainer"]["iteration"] == (epoch + 2) * ITERATIONS


def _descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, and theirs (Linux ``/proc``)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _fresh_bundle(trained: Path, folder: Path) -> Path:
    """A copy of a run's bundle files (configs, docs), untrained."""
    for part in ("configs", "docs"):
        shutil.copytree(trained / part, folder / part)
    (folder / "models").mkdir()
    return folder


MONAI_RUN = ["-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
             "--bundle_root", "."]


def test_monai_bundle_door_trains_on_two_processes(tmp_path: Path, data: Path,
                                                   ddp_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """``python -m monai.bundle run --config_file "['configs/train.json','configs/multi_gpu_train.json']"``
    under torchrun: the same pipeline."""
    bundle = _fresh_bundle(ddp_run[0], tmp_path / "bundle")
    result = _run(_torchrun(*MONAI_RUN, "--dataset_dir", str(data), "--epochs", "2", "--val_interval", "1",
                            "--iterations_per_epoch", "3"), cwd=bundle)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(int(e) for e in IDENTICAL.findall(result.stderr)) == [1, 2]
    summary = json.loads((bundle / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["iterations"] == 6
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "checkpoints" / "last.pt").is_file()


def test_replica_check_fails_a_run_whose_network_is_not_wrapped_in_ddp(
        tmp_path: Path, data: Path, ddp_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """The check behind "weights identical": the trainer given the bare network (no DDP) trains two
    different models, and the run stops after its first epoch."""
    bundle = _fresh_bundle(ddp_run[0], tmp_path / "bundle")
    result = _run(_torchrun(*MONAI_RUN, "--dataset_dir", str(data), "--epochs", "2", "--val_interval", "1",
                            "--iterations_per_epoch", "3", "--train#trainer#network", "@network"), cwd=bundle)
    assert result.returncode != 0
    assert "after epoch 1 the 2 training processes hold different weights" in result.stderr
