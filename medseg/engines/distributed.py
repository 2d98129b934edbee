"""Training on several processes (``torchrun --nproc_per_node N -m medseg train ...``): PyTorch's
DistributedDataParallel (DDP), as factories ``configs/multi_gpu_train.json`` names (safe mode refuses
``$`` expressions, so every computed value comes from here).

One process per device: ``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`init_distributed` joins the process group (``gloo`` on the CPU, ``nccl`` on CUDA, each process
on ``cuda:LOCAL_RANK``). The training network is wrapped in DDP (:func:`data_parallel`: gradients are
averaged over the processes after each backward pass, so every process holds the same weights); each
process loads its own share of the training cases (:class:`EpochSampler`, reshuffled on every pass
over the data) and of the validation cases (:func:`validation_sampler`; MONAI's ``MeanDice`` gathers
the per-case Dice of every process before averaging, so every process sees the same validation
Dice and selects the same best model). Only the main process (rank 0) writes files
(:func:`is_main_process`, checked by the writing handlers); a time budget stops every process at the
same iteration (:func:`any_rank`). :class:`ReplicaCheck` compares the weights of the processes after
every epoch.

With one process (no ``torchrun``, or ``WORLD_SIZE=1``) every helper here does nothing: the rank is 0,
the decision is the process's own.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from medseg.errors import InputError, MedsegError

__all__ = ["EpochSampler", "ReplicaCheck", "any_rank", "barrier", "close_distributed", "data_parallel",
           "init_distributed", "is_main_process", "launched_distributed", "max_over_ranks", "mean_over_ranks", "rank",
           "rank_device", "rank_seed", "share_from_main", "training_sampler", "unwrap", "validation_sampler",
           "weights_digest", "world_size"]

log = logging.getLogger("medseg.engines.training")


def launched_distributed() -> bool:
    """Whether this process was started as one of several (``WORLD_SIZE`` > 1, set by ``torchrun``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else ``RANK`` from the environment, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def world_size() -> int:
    """Processes in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process writes the run's files (rank 0; the only process without ``torchrun``)."""
    return rank() == 0


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def rank_device(device: str | torch.device = "cpu") -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for ``cuda`` (one process per GPU), else ``device``."""
    chosen = torch.device(device)
    if chosen.type == "cuda" and ":" not in str(device) and launched_distributed():  # no index given
        return torch.device("cuda", _local_rank())
    return chosen


def init_distributed(device: str | torch.device = "cpu", timeout_minutes: float = 30.0) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``gloo`` on the CPU, ``nccl``
    on CUDA, after selecting ``cuda:LOCAL_RANK``); processes other than the main one log warnings
    only (rank 0 reports the run). Does nothing without ``torchrun`` or when already joined. Returns
    whether a group of several processes is active.

    Raises
    ------
    InputError
        CUDA asked for where there is none, or with fewer visible GPUs than processes on this node.
    """
    if not launched_distributed() or not dist.is_available():
        return False
    if not dist.is_initialized():
        chosen = rank_device(device)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise InputError(None, f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if chosen.type == "cuda":
            if chosen.index is not None and chosen.index >= torch.cuda.device_count():
                raise InputError(None, f"--device cuda: process {_local_rank()} of this node has no GPU "
                                 f"({torch.cuda.device_count()} visible); start at most that many processes per node")
            torch.cuda.set_device(chosen)
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        from datetime import timedelta

        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        if rank() != 0:  # the main process reports the run
            for name in ("medseg", "ignite", "monai"):
                logging.getLogger(name).setLevel(logging.WARNING)
        log.info("process group of %d processes joined (%s backend)", world_size(), backend)
    return _active()


def close_distributed() -> None:
    """Leave the process group (``finalize`` of ``configs/multi_gpu_train.json``); nothing without one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (nothing with one process)."""
    if _active():
        dist.barrier()


def _collective_device() -> torch.device:
    """Where collective tensors live: the current GPU under ``nccl``, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a decision every process takes together: call it on all)."""
    if not _active():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of all processes (a value every process then shares: call it on all)."""
    if not _active():
        return value
    largest = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest.item())


def mean_over_ranks(values: list[float]) -> float:
    """The mean of ``values`` gathered over every process (NaN without any); call it on all processes."""
    if not _active():
        return float(sum(values) / len(values)) if values else float("nan")
    total = torch.tensor([math.fsum(values), len(values)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def share_from_main(value: Any) -> Any:
    """The main process's ``value`` on every process (``broadcast_object_list``); ``value`` itself with one."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_seed(seed: int = 0) -> int:
    """``seed + rank``: each process its own stream of patch sampling and augmentation (the initial
    weights are still the main process's: DDP copies them to every process when it wraps the network)."""
    return int(seed) + rank()


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP wrapper (its state dict has no ``module.`` prefix), else ``network``."""
    inner = getattr(network, "module", None)
    return inner if isinstance(network, DistributedDataParallel) and isinstance(inner, torch.nn.Module) else network


def data_parallel(network: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``network`` wrapped in PyTorch's ``DistributedDataParallel`` (the trainer's network; the evaluator,
    the optimiser and the checkpoints use ``network`` itself, which shares its parameters); ``network``
    unchanged without a process group of several processes.

    DDP copies the main process's parameters and buffers to every process here, and averages the
    gradients over the processes after each backward pass.
    """
    if not _active():
        return network
    chosen = torch.device(device)
    if chosen.type == "cuda":
        return DistributedDataParallel(network, device_ids=[chosen])
    return DistributedDataParallel(network)


class EpochSampler(DistributedSampler[int]):
    """PyTorch's ``DistributedSampler`` (this process's share of the cases, the same number on every
    process), reshuffled on every pass over the data and not only at each epoch: medseg's epochs have a
    fixed number of iterations, so one epoch of a small dataset passes over it several times.

    The order of a pass depends on ``seed``, the epoch (``set_epoch``, which MONAI's trainer calls at
    every epoch start) and the pass within the epoch: the same on every process, so the shares never
    overlap within a pass.
    """

    def __init__(self, dataset: Sized, seed: int = 0, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.passes = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.passes = 0

    def __iter__(self) -> Iterator[int]:
        size = len(self.dataset)  # type: ignore[arg-type]
        generator = torch.Generator()
        generator.manual_seed(self.seed + 1_000_003 * self.epoch + self.passes)
        self.passes += 1
        indices: list[int] = torch.randperm(size, generator=generator).tolist()
        padding = self.total_size - len(indices)
        if padding > 0:  # every process gets as many cases: a few repeat
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return iter(indices[self.rank:self.total_size:self.num_replicas])


def training_sampler(dataset: Sized, seed: int = 0) -> EpochSampler:
    """:class:`EpochSampler` over the training dataset for the process group's processes.

    Raises
    ------
    ValueError
        Without a process group (``torch.distributed`` not initialised).
    """
    return EpochSampler(dataset, seed=seed)


def validation_sampler(dataset: Sized) -> DistributedSampler[int]:
    """MONAI's ``DistributedSampler`` over the validation cases, in order and without repeats
    (``even_divisible=False``: process r validates cases r, r + N, ...; MONAI's metrics gather them all).

    Raises
    ------
    InputError
        Fewer validation cases than processes (a process would validate nothing).
    """
    from monai.data import DistributedSampler as MonaiDistributedSampler

    count, processes = len(dataset), world_size()
    if count < processes:
        raise InputError(None, f"{count} validation case(s) for {processes} training processes: each process "
                         "validates a share of the cases; use a dataset with more cases or fewer processes")
    return MonaiDistributedSampler(dataset, even_divisible=False, shuffle=False)  # type: ignore[arg-type]


def weights_digest(network: torch.nn.Module) -> str:
    """SHA-256 of the network's state dict (names and tensor bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in unwrap(network).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ReplicaCheck:
    """After every epoch, compare the network's weights on every process (SHA-256 of the state dict,
    gathered with ``all_gather_object``); an Ignite handler (attach it to the trainer). Does nothing
    with one process.

    DDP keeps the copies identical (same start, averaged gradients); copies that differ mean the
    processes no longer train one model (a network not wrapped in DDP, a process that skipped a step),
    and training stops rather than save one process's model as the run's.

    Raises
    ------
    MedsegError
        (at an epoch end) The processes hold different weights.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def attach(self, trainer: Engine) -> None:
        if _active():
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self.check)

    def check(self, engine: Engine) -> None:
        digests: list[Any] = [None] * world_size()
        dist.all_gather_object(digests, weights_digest(self.network))
        if len(set(digests)) != 1:
            raise MedsegError(f"after epoch {engine.state.epoch} the {len(digests)} training processes hold different "
                              f"weights ({', '.join(str(d)[:12] for d in digests)}): they no longer train one model")
        log.info("epoch %d: weights identical on all %d processes (sha256 %s)", engine.state.epoch, len(digests),
                 str(digests[0])[:16])
