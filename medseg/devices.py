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
        If CUDA is asked for and not available, or the name is unknown.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {name}: CUDA is not available on this machine; use --device cpu")
        return torch.device(name)
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
