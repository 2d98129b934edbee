"""Folds in parallel, one process per device (:func:`medseg.bundle.fold_pool.run_on_devices`): every fold once, the
workers at work at the same time, a fold's failure raised again naming the fold and its device, a worker that
dies named with the fold it was on. The jobs here stand in for training (files written); no test waits on speed:
each waits for the other's file, with a generous timeout only as a guard against a hang."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
import torch

from medseg.bundle.fold_pool import cpu_threads, run_on_devices, worker_threads
from medseg.errors import InputError, MedsegError

#: a guard against a hang, never reached when the pool works (each job waits for a file another one writes)
GUARD_S = 300.0


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + GUARD_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never came")
        time.sleep(0.05)


def _together(folder: Path, fold: int, device: str) -> None:
    """Fold 0 and fold 1 each wait for the other's start: they finish only if two processes run them at once."""
    (folder / f"started_{fold}").write_text(f"{os.getpid()} {device}")
    _wait_for(folder / f"started_{1 - fold}")
    (folder / f"done_{fold}").write_text(str(os.getpid()))


def _one_fails(folder: Path, fold: int, device: str) -> None:
    """Fold 1 fails as bad input; fold 0, already training, finishes once fold 1 has failed."""
    if fold == 1:
        (folder / "failing").write_text("")
        raise InputError(folder / "ct_007.nii.gz", "truncated image")
    if fold == 0:
        _wait_for(folder / "failing")
        (folder / "done_0").write_text("")


def _quick(folder: Path, fold: int, device: str) -> None:
    (folder / f"done_{fold}").write_text(device)


def _dies(folder: Path, fold: int, device: str) -> None:
    os._exit(3)  # killed as the out-of-memory killer would


def test_two_devices_train_two_folds_at_once_each_once(tmp_path: Path) -> None:
    done = run_on_devices(functools.partial(_together, tmp_path), [0, 1], ["cpu", "cpu"])
    assert sorted(done) == [0, 1]
    pids = {(tmp_path / f"done_{fold}").read_text() for fold in (0, 1)}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two worker processes, not this one


def test_a_failed_fold_is_raised_again_with_its_fold_and_device_after_the_running_fold_finished(tmp_path: Path) -> None:
    with pytest.raises(InputError) as raised:
        run_on_devices(functools.partial(_one_fails, tmp_path), [0, 1, 2, 3], ["cpu", "cpu"])
    assert str(raised.value) == f"fold 1 (cpu): {tmp_path / 'ct_007.nii.gz'}: truncated image"
    assert (tmp_path / "done_0").exists()  # the other worker finished the fold it was on


def test_a_worker_that_dies_is_named_with_its_fold(tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match=r"^fold 2 \(cpu\): its process stopped \(exit code 3\)$"):
        run_on_devices(functools.partial(_dies, tmp_path), [2], ["cpu"])


def test_cpu_workers_share_the_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(["cpu"]) == cores
    assert cpu_threads(["cpu", "cpu"]) == max(1, cores // 2)
    assert cpu_threads(["cuda:0", "cuda:1"]) == cores  # no CPU worker: nothing to share


def test_a_device_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    """A worker that fails before its first fold (here a CUDA device no machine has, which the callers
    refuse earlier): the failure names the device, and no fold is left unsaid."""
    with pytest.raises(MedsegError, match=r"^cuda:99: the worker failed before it took a fold: "):
        run_on_devices(functools.partial(_quick, tmp_path), [0, 1], ["cpu", "cuda:99"])
    assert all(done.read_text() == "cpu" for done in tmp_path.glob("done_*"))  # nothing ran on the missing GPU


def test_the_plan_is_timed_with_the_threads_of_one_cpu_worker() -> None:
    original = torch.get_num_threads()
    before = 2 * (os.cpu_count() or 1) + 1  # never what a worker gets
    torch.set_num_threads(before)
    try:
        with worker_threads(["cpu", "cpu"]):
            assert torch.get_num_threads() == cpu_threads(["cpu", "cpu"]) != before
        assert torch.get_num_threads() == before
        for devices in (["cpu"], ["cuda:0", "cuda:1"], []):  # one process, or GPUs: the threads are left as they are
            with worker_threads(devices):
                assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(original)
