"""Network weights: state dicts only, read with ``torch.load(weights_only=True)`` (pickled code is refused)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medseg.errors import BundleError

__all__ = ["load_weights", "read_state_dict", "torch_load_weights_only"]


def torch_load_weights_only(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` without torch's warning about TorchScript
    archives (which it then refuses with a RuntimeError: they carry code).

    Raises
    ------
    Exception
        Whatever ``torch.load`` raises for a missing, corrupt, pickled or TorchScript file.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript archive", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike[str]) -> Any:
    """A network state dict from a weights file or a training checkpoint (its ``"network"`` entry),
    read with ``torch.load(weights_only=True)``: pickled code is refused. A file holding something other
    than a mapping (a list, a tensor) is returned as it is: callers refuse it when they load it.

    Raises
    ------
    Exception
        Whatever ``torch.load`` raises for a missing, corrupt or pickled file; callers name the file.
    """
    state = torch_load_weights_only(path)
    if isinstance(state, Mapping) and isinstance(state.get("network"), Mapping):
        state = state["network"]  # checkpoints/last.pt
    return state


def load_weights(network: torch.nn.Module, path: str | os.PathLike[str], device: str | torch.device = "cpu",
                 strict: bool = True) -> torch.nn.Module:
    """Load a state dict with ``torch.load(weights_only=True)`` into ``network``, move it to ``device``
    and put it in eval mode.

    Raises
    ------
    BundleError
        Missing file, a file that is not a plain state dict (pickled code is refused), or tensors
        that do not fit the network.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such weights file; has the model been trained?")
    try:
        network.load_state_dict(read_state_dict(path), strict=strict)
    except Exception as exc:  # any failure means unusable weights
        raise BundleError(f"{path}: cannot load these weights ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    return network.to(device).eval()
