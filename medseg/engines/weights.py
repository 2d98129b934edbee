"""Weights a training run starts from: ``--init-weights`` (transfer learning) and ``--resume`` checkpoints.

Both are read with ``torch.load(weights_only=True)`` (pickled code and TorchScript archives are
refused) and checked against the network *before* the run folder is touched, so that a bad file
leaves nothing behind. :class:`InitialWeights`, :func:`initial_network` and :func:`resume_point` are
the factories ``configs/train.json`` names for them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg.errors import BundleError, InputError
from medseg.layout import LAST_CHECKPOINT, SUMMARY_FILE, WEIGHTS_FILE
from medseg.networks import read_state_dict, torch_load_weights_only

log = logging.getLogger(__name__)


def read_init_weights(source: str | os.PathLike[str]) -> tuple[Path, Mapping[str, Any]]:
    """The file ``--init-weights`` names and its state dict: a state-dict file, a training checkpoint,
    or a bundle / run folder (its ``models/model.pt``), read with ``torch.load(weights_only=True)``.

    Raises
    ------
    InputError
        Missing source, or a file that is not a plain state dict (pickled code, TorchScript,
        corrupt or truncated).
    """
    path = Path(source)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise InputError(path, "no such weights file for --init-weights")
    try:
        state = read_state_dict(path)
    except Exception as exc:  # pickled code, TorchScript or a corrupt file: refuse either way
        raise InputError(path, f"not a loadable state dict ({type(exc).__name__})") from exc
    if not isinstance(state, Mapping):
        raise InputError(path, f"not a state dict (holds a {type(state).__name__})")
    return path, state


def apply_matching_weights(network: torch.nn.Module, path: Path, state: Mapping[str, Any]) -> dict[str, list[str]]:
    """Copy every tensor of ``state`` (read from ``path``) whose name and shape match ``network``.
    Returns ``{"loaded": [...], "skipped": [...]}`` (skipped: network tensors absent from the source
    or of another shape).

    Raises
    ------
    InputError
        If no tensor fits.
    """
    own = network.state_dict()
    loaded = [k for k, v in own.items() if isinstance(state.get(k), torch.Tensor) and state[k].shape == v.shape]
    skipped = [k for k in own if k not in loaded]
    if not loaded:
        raise InputError(path, "no tensor matches this network (different architecture?)")
    network.load_state_dict({**own, **{k: state[k] for k in loaded}})
    log.info("--init-weights %s: loaded %d tensors, skipped %d%s", path, len(loaded), len(skipped),
             f" ({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})" if skipped else "")
    return {"loaded": loaded, "skipped": skipped}


def load_matching_weights(network: torch.nn.Module, source: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Transfer learning: :func:`read_init_weights` then :func:`apply_matching_weights`.

    Raises
    ------
    InputError
        As those two.
    """
    return apply_matching_weights(network, *read_init_weights(source))


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: the trainer counters and the best validation so far."""

    epoch: int
    iteration: int
    epoch_length: int | None
    best_metric: float
    best_epoch: int
    best_iteration: int = 0
    best_per_label: dict[str, float | None] = field(default_factory=dict)


def load_resume_checkpoint(path: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler) -> ResumePoint:
    """Restore network, optimiser and LR schedule from a ``checkpoints/last.pt`` written by training.

    Raises
    ------
    BundleError
        If the checkpoint is missing, not loadable with ``weights_only=True``, lacks an entry or
        does not fit the network / optimiser.
    """
    if not path.is_file():
        raise BundleError(f"{path}: no checkpoint to resume from")
    try:
        state: Any = torch_load_weights_only(path)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        trainer, best = state["trainer"], state["best"]
        per_label = {str(k): None if math.isnan(float(v)) else float(v) for k, v in best.get("per_label", {}).items()}
        point = ResumePoint(int(trainer["epoch"]), int(trainer["iteration"]),
                            int(trainer["epoch_length"]) if trainer.get("epoch_length") else None,
                            float(best["metric"]), int(best["epoch"]), int(best.get("iteration", 0)), per_label)
    except Exception as exc:  # any failure means the checkpoint is unusable
        raise BundleError(f"{path}: cannot resume from this checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    if point.epoch < 0 or point.iteration < 0:
        raise BundleError(f"{path}: cannot resume from this checkpoint (negative epoch or iteration)")
    return point


class InitialWeights:
    """The ``--init-weights`` state dict (read when made, see :func:`read_init_weights`; ``path=None``:
    random initialisation) and, once applied, what was loaded (:attr:`report`).

    Raises
    ------
    InputError
        As :func:`read_init_weights`.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.source = None if path is None else str(path)
        self._read = None if path is None else read_init_weights(path)
        #: ``{"loaded": [...], "skipped": [...]}`` once applied
        self.report: dict[str, list[str]] | None = None

    def apply(self, network: torch.nn.Module) -> dict[str, list[str]] | None:
        """Copy the matching tensors into ``network`` (:func:`apply_matching_weights`); None without weights.

        Raises
        ------
        InputError
            If no tensor fits.
        """
        if self._read is not None:
            self.report = apply_matching_weights(network, *self._read)
        return self.report

    def summary(self) -> dict[str, Any] | None:
        """``{"source", "loaded", "skipped"}`` for the training summary (None without weights)."""
        if self.report is None:
            return None
        return {"source": self.source, "loaded": len(self.report["loaded"]), "skipped": self.report["skipped"]}


def initial_network(network: torch.nn.Module, device: str | torch.device = "cpu",
                    weights: InitialWeights | None = None) -> torch.nn.Module:
    """``network`` on ``device`` with the ``--init-weights`` applied (the network the trainer trains).

    Raises
    ------
    InputError
        If ``weights`` hold no tensor that fits the network.
    """
    network = network.to(device)
    if weights is not None:
        weights.apply(network)
    return network


def resume_point(bundle_root: str | os.PathLike[str], network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler, resume: bool = False, epochs: int = 100,
                 max_iterations: int | None = None) -> ResumePoint | None:
    """With ``resume``: ``bundle_root/checkpoints/last.pt`` loaded into network, optimiser and LR
    schedule (:func:`load_resume_checkpoint`), and where the run continues; None otherwise.

    A checkpoint already at ``epochs`` or ``max_iterations`` in a run without ``train_summary.json`` (stopped
    after its last checkpoint, before it finished) is returned too: the run then only finishes (final
    validation and summary, :func:`medseg.engines.training.run_training`).

    Raises
    ------
    BundleError
        A missing or unusable checkpoint.
    InputError
        A finished run (its summary written) already at ``epochs`` or ``max_iterations``.
    """
    if not resume:
        return None
    last = Path(bundle_root) / LAST_CHECKPOINT
    point = load_resume_checkpoint(last, network, optimizer, lr_scheduler)
    finished = (Path(bundle_root) / SUMMARY_FILE).exists()
    if point.epoch >= epochs and finished:
        raise InputError(last, f"already trained {point.epoch} epochs; pass a larger --epochs to continue")
    if max_iterations is not None and point.iteration >= max_iterations and finished:
        raise InputError(last, f"already trained {point.iteration} iterations; pass a larger --max-iterations")
    return point
