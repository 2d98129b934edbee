"""Folds trained in parallel, one process per device: ``medseg train --fold all --device cuda:0,cuda:1``.

:func:`run_on_devices` starts one worker process per device named (``spawn``: a CUDA context is never
inherited; ``cpu,cpu`` gives two CPU processes, each with its share of the cores). A worker takes the next
fold not yet taken, runs the job on it (train, then predict its held-out cases), and takes another until none
is left, so that a device whose folds are quicker trains more of them. Each fold writes only its own folder
and record, as in a run one fold after another; what a stopped parallel run leaves resumes the same way.

A fold that fails stops the handing out of folds: the other workers finish the fold they are on (its
checkpoints and record are kept) and take no new one; then the first failure is raised, naming the fold and
its device. An interrupt (Ctrl-C) stops every worker at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from medseg.errors import BundleError, InputError, MedsegError
from medseg.logs import setup_logging

__all__ = ["FoldJob", "cpu_threads", "run_on_devices", "worker_threads"]

log = logging.getLogger(__name__)

#: What a worker runs for one fold: ``job(fold, device)`` (picklable: a module-level function or a partial of one).
FoldJob = Callable[[int, str], None]
#: Seconds the main process waits for a worker's message before it looks for workers that died.
POLL_S = 1.0


@dataclass(frozen=True)
class _Failure:
    """A fold's failure as it crosses the process boundary (the exception itself may not pickle)."""

    fold: int
    device: str
    kind: str  # "input", "bundle", "medseg" or "internal": the class raised again in the main process
    message: str

    def error(self) -> MedsegError:
        text = (f"fold {self.fold} ({self.device}): {self.message}" if self.fold >= 0
                else f"{self.device}: the worker failed before it took a fold: {self.message}")
        if self.kind == "input":
            return InputError(None, text)
        if self.kind == "bundle":
            return BundleError(text)
        return MedsegError(text)


def _failure(fold: int, device: str, exc: BaseException) -> _Failure:
    if isinstance(exc, InputError):
        return _Failure(fold, device, "input", str(exc))
    if isinstance(exc, BundleError):
        return _Failure(fold, device, "bundle", str(exc))
    if isinstance(exc, MedsegError):
        return _Failure(fold, device, "medseg", str(exc))
    if isinstance(exc, KeyboardInterrupt):
        return _Failure(fold, device, "internal", "interrupted")
    return _Failure(fold, device, "internal", f"{type(exc).__name__}: {exc} (--debug shows the traceback)")


def cpu_threads(devices: Sequence[str]) -> int:
    """Threads of each CPU worker: the cores this process may use shared among the CPU workers (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    workers = sum(1 for device in devices if device == "cpu")
    return max(1, cores // max(1, workers))


@contextlib.contextmanager
def worker_threads(devices: Sequence[str]) -> Iterator[None]:
    """While the block runs, this process has the torch threads of one worker on ``devices[0]`` if that is the CPU
    (what the planner's timing of training iterations must see: with ``cpu,cpu`` each worker has half the
    cores); restored afterwards. Other devices, or one device: nothing changes."""
    import torch

    before = torch.get_num_threads()
    if len(devices) > 1 and devices[0] == "cpu":
        torch.set_num_threads(cpu_threads(devices))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker(index: int, device: str, job: FoldJob, folds: Sequence[int], taken: Any, current: Any, messages: Any,
            stop: Any, log_level: int, threads: int) -> None:
    """One device's process: take folds until none is left or a fold failed; report each on ``messages`` (and the
    fold it is on in ``current[index]``, written before the job starts: what the main process names if this
    process dies)."""
    setup_logging(debug=log_level <= logging.DEBUG, quiet=log_level >= logging.WARNING, prefix=f"{device} #{index}")
    try:
        _use_device(device, threads)
        while not stop.is_set():
            with taken.get_lock():
                position = taken.value
                taken.value += 1
            if position >= len(folds):
                break
            fold = folds[position]
            current[index] = fold
            messages.put(("start", index, fold, None))
            job(fold, device)
            current[index] = -1
            messages.put(("done", index, fold, None))
    except BaseException as exc:  # reported, whatever it is; the main process raises it again
        stop.set()  # no other worker takes a new fold from now on
        log.debug("the worker on %s failed", device, exc_info=True)
        messages.put(("failed", index, current[index], _failure(current[index], device, exc)))
    finally:
        messages.put(("exit", index, None, None))


def _use_device(device: str, threads: int) -> None:
    """A worker's device: its share of the CPU threads, or its GPU as the current CUDA device (what libraries use
    by default)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.cuda.set_device(torch.device(device))


def run_on_devices(job: FoldJob, folds: Sequence[int], devices: Sequence[str]) -> list[int]:
    """Run ``job(fold, device)`` for every fold of ``folds`` (in that order of hand-out), one worker process per
    entry of ``devices`` (a device may be named twice: two processes share it). Returns the folds done.

    Raises
    ------
    InputError, BundleError, MedsegError
        The first fold that failed, its error raised again with the fold and device in front (after the other
        workers finished the folds they were on); a worker that died (killed, out of memory) as a MedsegError.
    """
    context = multiprocessing.get_context("spawn")
    taken = context.Value("i", 0)
    current = context.Array("i", [-1] * len(devices))
    messages = context.Queue()
    stop = context.Event()
    level = logging.getLogger("medseg").getEffectiveLevel()
    threads = cpu_threads(devices)
    workers = [context.Process(target=_worker, name=f"medseg-fold-worker-{i}", args=(
        i, device, job, list(folds), taken, current, messages, stop, level, threads)) for i, device in enumerate(devices)]
    log.info("%d fold(s) on %d processes: %s", len(folds), len(workers), ", ".join(devices))
    for worker in workers:
        worker.start()
    done: list[int] = []
    failures: list[_Failure] = []
    exited: set[int] = set()
    suspects: set[int] = set()  # workers seen gone at one poll; their last words, if any, come by the next
    try:
        while len(exited) < len(workers):
            try:
                kind, index, fold, failure = messages.get(timeout=POLL_S)
            except queue.Empty:
                for index, worker in enumerate(workers):
                    if index in exited or worker.exitcode is None:
                        continue
                    if index in suspects:  # gone, and a whole poll later still without a word: killed
                        exited.add(index)
                        failures.append(_Failure(current[index], devices[index], "internal",
                                                 f"its process stopped (exit code {worker.exitcode})"))
                        stop.set()
                    suspects.add(index)
                continue
            if kind == "start":
                log.info("fold %d: training on %s", fold, devices[index])
            elif kind == "done":
                done.append(fold)
            elif kind == "failed":
                if not failures:
                    log.error("%s; the other devices finish the folds they are on and start no other",
                              failure.error())
                failures.append(failure)
            else:
                exited.add(index)
    except BaseException:  # interrupted: stop every worker now (their checkpoints resume with --resume)
        for worker in workers:
            worker.terminate()
        raise
    finally:
        for worker in workers:
            worker.join()
        messages.close()
    if failures:
        raise failures[0].error()
    if sorted(done) != sorted(folds):  # a worker that stopped without a word; never left unsaid
        missing = sorted(set(folds) - set(done))
        raise MedsegError(f"fold(s) {', '.join(map(str, missing))} were not trained: their processes stopped")
    return done
