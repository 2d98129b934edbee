"""Compute devices by name (bottom layer: imports torch, nothing of medseg above ``errors``)."""

from __future__ import annotations

import torch

from medseg.errors import InputError

__all__ = ["resolve_device"]


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
