"""Compute devices by name (bottom layer: imports torch, nothing of medseg above ``errors``)."""

from __future__ import annotations

import os

import torch

from medseg.errors import InputError

__all__ = ["resolve_device", "worker_count"]


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``.

    Raises
    ------
    InputError
        If CUDA is asked for and not available, a CUDA device this machine does not have, or an unknown name.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {name}: CUDA is not available on this machine; use --device cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputError(None, f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(None, f"--device {name}: this machine has {count} CUDA device(s), cuda:0-cuda:{count - 1}")
        return device
    raise InputError(None, f"--device must be cpu or cuda, got {name!r}")


def worker_count(limit: int = 4) -> int:
    """Data-loading worker processes: one fewer than the CPU cores this process may use, at most
    ``limit`` (0 on a single core: loading in the main process). The training loader and the planner's
    timing of an iteration both follow it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(limit, cores - 1))
