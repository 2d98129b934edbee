"""medseg.engines.distributed: the helpers alone (one process) and in a process group of two (gloo)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ignite.engine import Engine

from medseg.engines.budget import TimeBudget
from medseg.engines.distributed import (
    EpochSampler,
    ReplicaCheck,
    any_rank,
    close_distributed,
    data_parallel,
    is_main_process,
    mean_over_ranks,
    rank,
    rank_device,
    rank_seed,
    share_from_main,
    unwrap,
    validation_sampler,
    weights_digest,
)
from medseg.engines.parts import poly_lr_schedule
from medseg.engines.progress import Pace, Schedule
from medseg.errors import InputError, MedsegError

ROOT = Path(__file__).resolve().parents[3]


def test_one_process_is_the_main_one_and_decides_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    network = torch.nn.Linear(2, 2)
    assert rank() == 0 and is_main_process()
    assert any_rank(True) and not any_rank(False)
    assert mean_over_ranks([1.0, 2.0]) == 1.5
    assert share_from_main({"a": 1}) == {"a": 1}
    assert rank_seed(7) == 7
    assert data_parallel(network) is network and unwrap(network) is network
    assert rank_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda") == torch.device("cuda", 1)  # one GPU per process
    assert rank_device("cuda:0") == torch.device("cuda", 0)  # a device named by the user stays


def test_epoch_sampler_splits_each_pass_and_reshuffles_every_pass() -> None:
    """The two shares of a pass are disjoint and cover the cases; the next pass, the next epoch and another
    seed order them differently; the same epoch and pass give the same order (on every process)."""
    dataset = list(range(10))
    samplers = [EpochSampler(dataset, seed=3, num_replicas=2, rank=r) for r in range(2)]
    passes = []
    for sampler in samplers:
        sampler.set_epoch(1)
        passes.append([list(sampler) for _ in range(3)])
    for p in range(3):
        first, second = passes[0][p], passes[1][p]
        assert len(first) == len(second) == 5 and sorted(first + second) == dataset
    assert passes[0][0] != passes[0][1] != passes[0][2]
    samplers[0].set_epoch(1)
    assert list(samplers[0]) == passes[0][0]  # set_epoch starts the epoch's passes again
    samplers[0].set_epoch(2)
    assert list(samplers[0]) != passes[0][0]
    other = EpochSampler(dataset, seed=4, num_replicas=2, rank=0)
    other.set_epoch(1)
    assert list(other) != passes[0][0]
    odd = [EpochSampler(list(range(5)), num_replicas=2, rank=r) for r in range(2)]
    assert [len(list(s)) for s in odd] == [3, 3] and set(itertools.chain(*odd)) == set(range(5))


def test_weights_digest_follows_the_weights() -> None:
    torch.manual_seed(0)
    first = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    second = torch.nn.Linear(3, 2)
    assert weights_digest(first) == weights_digest(second)
    with torch.no_grad():
        second.bias[0] += 1e-6
    assert weights_digest(first) != weights_digest(second)


# ------------------------------------------------------------------------------------ two processes (gloo)

def _budget_stop(process: int) -> int:
    """A trainer of 10 epochs x 5 iterations with a 100 s budget whose clock runs out in process 1 only."""
    ticks = itertools.count(step=10 if process == 1 else 0)
    pace = Pace(started=0.0, clock=lambda: float(next(ticks)))
    trainer = Engine(lambda engine, batch: None)
    TimeBudget(100.0, pace, Schedule(epoch_length=5, max_epochs=10, val_interval=1)).attach(trainer)
    trainer.run(range(5), max_epochs=10)
    return trainer.state.iteration


def _in_group(process: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=process, world_size=2)
    results: dict[str, Any] = {"rank": rank(), "main": is_main_process(), "any": any_rank(process == 1),
                               "none": any_rank(False), "mean": mean_over_ranks([float(process)] * 2),
                               "shared": share_from_main(f"from {process}"), "stopped_at": _budget_stop(process)}
    shares = validation_sampler(list(range(3)))
    results["validation_share"] = list(shares)
    # a planned recipe's learning rate under a time budget: from the largest share of the budget gone
    pace = Pace(started=0.0, clock=lambda: 20.0 * (process + 1))  # process 1 is further into its budget
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = poly_lr_schedule(optimizer, epochs=10, epoch_length=10, pace=pace, max_minutes=1.0)
    schedule.step()
    results["lr"] = optimizer.param_groups[0]["lr"]
    try:
        validation_sampler([0])
    except InputError as exc:
        results["too_few"] = str(exc)
    torch.manual_seed(0)
    network = torch.nn.Linear(2, 2)
    wrapped = data_parallel(network)
    results["wrapped"] = type(wrapped).__name__
    results["unwrapped"] = unwrap(wrapped) is network
    engine = SimpleNamespace(state=SimpleNamespace(epoch=1))
    ReplicaCheck(network).check(engine)  # type: ignore[arg-type]  # identical (DDP broadcast): passes
    with torch.no_grad():
        network.weight[0, 0] += process  # the copies differ
    try:
        ReplicaCheck(network).check(engine)  # type: ignore[arg-type]
    except MedsegError as exc:
        results["differ"] = str(exc)
    Path(out, f"{process}.json").write_text(json.dumps(results))
    del wrapped  # DDP's reducer holds the process group: gone before the group is
    close_distributed()  # a barrier, then the group destroyed


def test_two_processes_decide_together(tmp_path: Path) -> None:
    """In a group of two: rank 0 is the main process, any_rank and the time budget are collective (the
    process whose clock runs out stops both at the same iteration; the learning rate of a time budget
    follows the process furthest into it), the loss mean covers both, validation cases are shared without
    repeats, and ReplicaCheck fails when the copies of the weights differ."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import faulthandler, sys; faulthandler.dump_traceback_later(150, exit=True); "
            "from tests.unit.engines.test_distributed import _in_group; "
            f"_in_group(int(sys.argv[1]), {port}, {str(tmp_path)!r})")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "GLOO_SOCKET_IFNAME": "lo"}
    processes = [subprocess.Popen([sys.executable, "-c", code, str(p)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for p in range(2)]
    outputs = [process.communicate(timeout=200)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    results = [json.loads((tmp_path / f"{p}.json").read_text()) for p in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and [r["main"] for r in results] == [True, False]
    assert all(r["any"] and not r["none"] for r in results)
    assert [r["mean"] for r in results] == [0.5, 0.5]
    assert [r["shared"] for r in results] == ["from 0", "from 0"]
    stops = [r["stopped_at"] for r in results]
    assert stops[0] == stops[1] < 50, stops  # process 0 alone would have run all 50 iterations
    assert [r["validation_share"] for r in results] == [[0, 2], [1]]
    assert [r["lr"] for r in results] == [pytest.approx((1 - 40 / 58) ** 0.9)] * 2  # 60 s budget, 2 s reserve
    assert all("1 validation case(s) for 2 training processes" in r["too_few"] for r in results)
    assert [r["wrapped"] for r in results] == ["DistributedDataParallel"] * 2 and all(r["unwrapped"] for r in results)
    assert all("hold different weights" in r["differ"] for r in results)
