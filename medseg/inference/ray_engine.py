"""Cohort prediction on Ray Data (``medseg predict --engine ray``): the same cases, checks, writer and completion
records as the serial engine (:mod:`medseg.inference.cohort`), spread over a Ray cluster or a local Ray.

The cases still to do (:func:`~medseg.inference.cohort.cohort_cases`) become a Ray Dataset, one case a block,
in two stages:

1. **read** (CPU tasks): each case's channels are read and checked (:func:`~medseg.inference.cohort.read_case`:
   header, pixels, grids, whether the model fits it) and handed on, pickled, with their pixels;
2. **predict** (``map_batches`` of :class:`CasePredictor`, one actor a worker, ``num_gpus`` each): the actor
   builds the bundle's predictor once (``load_predictor``: :func:`medseg.bundle.pipeline.inference_pipeline`,
   safe mode included), then preprocesses, infers and writes each case through
   :func:`~medseg.inference.cohort.predict_case` inside the journal's recording, and returns a small record
   (case, outputs, seconds, status).

Preprocessing stays in the actor (on its CPU share), not in the read stage: the label map is made by inverting it
(MONAI's ``Invertd``), and MONAI checks that each inverse is applied by the very transform object that recorded
it, which a case preprocessed in another process fails; the read stage ships what it read.

Fault tolerance: a dead actor is restarted (``max_restarts=-1``) and its unfinished case retried on a live one
(``max_task_retries``); a read task is retried by Ray Core. Exactly once: a case counts as written only when its
completion record is written (atomically, after its outputs); a retried case first removes what an interrupted
attempt left (:meth:`~medseg.inference.cohort.CaseJournal.recording`), and a retry of a case that was recorded
before its worker died is skipped. Ray is imported only here, and only when the engine runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from medseg.errors import InputError, MedsegError, one_line
from medseg.inference.cases import Shard
from medseg.inference.cohort import JOURNAL_FOLDER, CaseJournal, CohortCase, cohort_cases, predict_case, read_case
from medseg.inference.predictor import LabelMapPredictor
from medseg.plan import Plan

__all__ = ["FAULT_FILE_ENV", "CasePredictor", "RayOptions", "import_ray", "predict_files_ray"]

log = logging.getLogger(__name__)

#: Fault injection for the tests of worker death: when this variable names a file that exists, the first actor
#: that finishes writing a case's outputs renames the file (so it happens once) and kills its own process before
#: the case's completion record is written.
FAULT_FILE_ENV = "MEDSEG_RAY_FAULT_FILE"

#: Retries of one case whose actor died (a case that kills its worker every time fails the run after these).
MAX_TASK_RETRIES = 3


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray prediction runs: ``address`` of a running cluster (None: ``RAY_ADDRESS``, else a local Ray of
    ``workers`` x ``cpus_per_worker`` CPUs plus one for the read stage, or the Ray this process already joined),
    ``workers`` predictor actors of ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs (its torch threads, unless
    ``OMP_NUM_THREADS`` is set)."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1

    def check(self) -> None:
        """Check the options.

        Raises
        ------
        InputError
            Fewer than one worker or CPU per worker, a negative GPU count.
        """
        if self.workers < 1:
            raise InputError(None, f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise InputError(None, f"CPUs per worker must be at least 1, got {self.cpus_per_worker}")
        if not 0 <= self.gpus_per_worker < float("inf"):
            raise InputError(None, f"--gpus-per-worker must be a finite value >= 0, got {self.gpus_per_worker}")


def import_ray() -> ModuleType:
    """The ``ray`` module with Ray Data.

    Raises
    ------
    InputError
        Ray (or Ray Data's pyarrow / pandas) is not installed, naming the extra that installs it.
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise InputError(None, f"--engine ray needs Ray Data ({one_line(exc)}): pip install 'medseg[ray]'") from None
    return ray


def _read_row(row: dict[str, Any], plan: Plan, strict: bool) -> dict[str, Any]:
    """The read stage: one case's channels read and checked; a bad case becomes a row with its error."""
    item: CohortCase = pickle.loads(row["item"])
    started = time.monotonic()
    try:
        read = read_case(plan, item.case, strict)
        seconds = time.monotonic() - started
        sources, error = pickle.dumps(read, protocol=pickle.HIGHEST_PROTOCOL), ""
    except MedsegError as exc:
        sources, error, seconds = b"", str(exc), time.monotonic() - started
    return {"name": row["name"], "item": row["item"], "sources": sources, "read_seconds": seconds, "error": error}


class CasePredictor:
    """The predict stage, one instance an actor: the bundle's predictor built once, then each case predicted and
    written through the journal (:func:`~medseg.inference.cohort.predict_case`)."""

    def __init__(self, plan: Plan, load_predictor: Callable[[], LabelMapPredictor], output_dir: str,
                 settings: Mapping[str, Any], strict: bool, instance_values: Sequence[int] | None,
                 threads: int, fault_file: str | None = None) -> None:
        import torch

        if not os.environ.get("OMP_NUM_THREADS"):  # a thread count the user set (Ray passes it on) is kept
            torch.set_num_threads(threads)
        self.plan, self.strict, self.instance_values = plan, strict, instance_values
        self.journal = CaseJournal(output_dir, settings)
        self.predictor = load_predictor()
        if fault_file:
            self._inject_fault(fault_file)

    def _inject_fault(self, fault_file: str) -> None:
        """Kill this process once, right after a case's outputs are written and before its completion record
        (:data:`FAULT_FILE_ENV`)."""
        write = self.predictor.write

        def write_then_die(*args: Any, **kwargs: Any) -> Path:
            written = write(*args, **kwargs)
            try:
                os.rename(fault_file, fault_file + ".fired")  # one process wins; the fault happens once
            except OSError:
                return written
            log.warning("%s: killing this worker (pid %d) after writing %s", FAULT_FILE_ENV, os.getpid(), written)
            os.kill(os.getpid(), signal.SIGKILL)
            return written

        self.predictor.write = write_then_die  # type: ignore[method-assign]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predict and record the cases of ``batch`` (rows of the read stage); one small row back per case: its name,
        outputs, seconds, status (``written``, ``finished earlier``, ``failed``) and error. A case's own failure
        (a :class:`~medseg.errors.MedsegError`) is answered, not raised; anything else fails the job."""
        names, outputs, seconds, status, errors = [], [], [], [], []
        for name, item_bytes, sources_bytes, read_seconds, error in zip(batch["name"], batch["item"], batch["sources"],
                                                                        batch["read_seconds"], batch["error"]):
            item: CohortCase = pickle.loads(item_bytes)
            started = time.monotonic()
            outcome = "failed"
            if not error:
                try:
                    if self.journal.finished(item):  # recorded by an attempt whose worker died before answering
                        outcome = "finished earlier"
                    else:
                        predict_case(self.plan, self.predictor, item, self.journal, sources=pickle.loads(sources_bytes),
                                     strict=self.strict, instance_values=self.instance_values,
                                     read_seconds=float(read_seconds))
                        outcome = "written"
                except MedsegError as exc:  # nothing of the case is left (the journal removed it)
                    error = str(exc)
            names.append(str(name))
            outputs.append("\n".join(str(t) for t in item.targets))
            seconds.append(time.monotonic() - started)
            status.append(outcome)
            errors.append(str(error))
        return {"name": np.array(names, dtype=object), "outputs": np.array(outputs, dtype=object),
                "seconds": np.array(seconds), "status": np.array(status, dtype=object),
                "error": np.array(errors, dtype=object)}


def _check_reachable(address: str) -> None:
    """Refuse at once a ``host:port`` (or ``ray://host:port``) address where nothing listens: Ray itself waits for
    minutes.

    Raises
    ------
    InputError
        Nothing accepts a connection at the address within 10 s.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # "auto", or an address form Ray resolves itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise InputError(None, f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check "
                               "--ray-address (or RAY_ADDRESS)") from None


@contextlib.contextmanager
def _ray_session(ray: ModuleType, options: RayOptions) -> Iterator[None]:
    """Join ``options.address`` (or ``RAY_ADDRESS``), the Ray this process already joined (left running), or start
    a local one (shut down after)."""
    if ray.is_initialized():
        yield
        return
    common = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    address = options.address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit` (and KubeRay's RayJob)
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ray.exceptions.RayError) as exc:
            raise InputError(None, f"cannot join the Ray cluster at {address} ({type(exc).__name__}: "
                                   f"{one_line(exc, 300)}); check --ray-address (or RAY_ADDRESS), and that this "
                                   "machine has the cluster's authentication token or the same RAY_AUTH_MODE") from exc
    else:  # one more CPU than the actors take: the read stage must never wait for a CPU they hold
        ray.init(num_cpus=options.workers * options.cpus_per_worker + 1, **common)
    try:
        yield
    finally:
        ray.shutdown()


def predict_files_ray(plan: Plan, load_predictor: Callable[[], LabelMapPredictor], input_path: str | os.PathLike[str],
                      output_dir: str | os.PathLike[str], options: RayOptions = RayOptions(), *,
                      overwrite: bool = False, instance_values: Sequence[int] | None = None, strict: bool = False,
                      shard: Shard | None = None, settings: Mapping[str, Any] | None = None) -> list[Path]:
    """:func:`medseg.inference.cohort.predict_files` on Ray Data: the cases of ``input_path`` (in ``shard``) not
    yet recorded as finished in ``output_dir`` are read and checked in CPU tasks and predicted by
    ``options.workers`` actors, each building its predictor once with ``load_predictor`` (a picklable callable);
    ``instance_values``: also write instance maps of these labels. Returns the label maps of the shard, those
    finished earlier included.

    A case that fails (bad input, NaN voxels) does not stop the others: they are written and recorded, then the
    failures are raised together, and the same command redoes only the failed cases.

    Raises
    ------
    InputError
        As :func:`~medseg.inference.cohort.cohort_cases`; Ray not installed; bad options; a cluster that cannot
        be joined; cases that failed (all of them named in the one message).
    MedsegError
        The Ray job stopped (a case's worker died more often than it is retried, the cluster went away).
    """
    options.check()
    cohort = cohort_cases(plan, input_path, output_dir, shard=shard, overwrite=overwrite,
                          instances=instance_values is not None, settings=settings)
    label_maps = [item.targets[0] for item in cohort.cases]
    todo = cohort.todo
    if cohort.finished:
        log.info("%d case(s) already finished in %s (recorded in %s); %d to do", len(cohort.finished), output_dir,
                 JOURNAL_FOLDER, len(todo))
    if not todo:
        return label_maps
    ray = import_ray()
    with _ray_session(ray, options):
        failures = _run(ray, plan, load_predictor, todo, Path(output_dir), options, dict(cohort.journal.settings),
                        instance_values, strict)
    if failures:
        raise InputError(Path(input_path), f"{len(failures)} of {len(todo)} case(s) failed (the others are written "
                                           f"and recorded; the same command redoes these): " + "; ".join(failures))
    return label_maps


def _run(ray: ModuleType, plan: Plan, load_predictor: Callable[[], LabelMapPredictor], todo: list[CohortCase],
         output_dir: Path, options: RayOptions, settings: dict[str, Any], instance_values: Sequence[int] | None,
         strict: bool) -> list[str]:
    """Run the two stages over ``todo`` and log each case as it comes back; returns the failures."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # a line per case instead (below)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    rows = [{"name": item.name, "item": pickle.dumps(item)} for item in todo]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))  # one case a block
    dataset = dataset.map(_read_row, fn_kwargs={"plan": plan, "strict": strict}, num_cpus=1,
                          compute=ray.data.TaskPoolStrategy(size=options.workers))
    constructor = {"plan": plan, "load_predictor": load_predictor, "output_dir": str(output_dir),
                   "settings": settings, "strict": strict,
                   "instance_values": None if instance_values is None else list(instance_values),
                   "threads": options.cpus_per_worker, "fault_file": os.environ.get(FAULT_FILE_ENV) or None}
    with warnings.catch_warnings():
        # Ray 2.60 takes the actors' restart and retry limits only as "ray_remote_args", deprecated for 2.64
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        dataset = dataset.map_batches(CasePredictor, fn_constructor_kwargs=constructor, batch_size=1,
                                      compute=ray.data.ActorPoolStrategy(size=options.workers),
                                      num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker or None,
                                      max_restarts=-1, max_task_retries=MAX_TASK_RETRIES)
    failures: list[str] = []
    done = 0
    try:
        for row in dataset.iter_rows():
            done += 1
            if row["status"] == "failed":
                failures.append(str(row["error"]))
                log.error("[%d/%d] %s failed: %s", done, len(todo), row["name"], row["error"])
            else:
                log.info("[%d/%d] %s -> %s (%s, %.1f s)", done, len(todo), row["name"],
                         str(row["outputs"]).replace("\n", ", "), row["status"], row["seconds"])
    except Exception as exc:
        raise MedsegError(f"the Ray job stopped after {done} of {len(todo)} case(s) ({type(exc).__name__}: "
                          f"{one_line(exc, 400)}); the finished cases are recorded in {output_dir / JOURNAL_FOLDER} "
                          "and the same command continues with the rest") from exc
    return failures
