"""The options of a training run (the ``medseg train`` flags, the scalar keys of ``configs/train.json``)
and their checks, made before anything is read or written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from medseg.architectures import NetworkSpec
from medseg.devices import resolve_device
from medseg.engines.tracking import check_tracking
from medseg.errors import InputError

__all__ = ["TrainOptions", "check_options"]


@dataclass
class TrainOptions:
    """Options of a training run (the ``medseg train`` flags).

    The training fields are the scalar keys of ``configs/train.json`` (``medseg train`` passes them
    as overrides; ``None`` for ``learning_rate``, ``batch_size``, ``samples_per_case``, ``num_workers``,
    ``iterations_per_epoch`` and ``mlflow_uri`` keeps the config's value); ``target_spacing``,
    ``patch_size``, ``ct_window`` and ``network`` shape the plan of a new bundle only.
    """

    epochs: int = 100
    #: time budget in minutes for the whole run (data loading, training and the final validation)
    max_minutes: float | None = None
    #: stop after this many iterations in total (counted across --resume); the epochs still bound it
    max_iterations: int | None = None
    #: log a progress line every this many iterations (and at every epoch end)
    log_every: int = 10
    device: str = "cpu"
    fold: int = 0
    resume: bool = False
    val_interval: int = 5
    #: the config's when None (custom plans 2e-3 with AdamW, planned plans 1e-2 with SGD)
    learning_rate: float | None = None
    #: patches per iteration: the config's when None (custom plans 2 cases x 2 patches, planned plans the plan's)
    batch_size: int | None = None
    #: patches cut from each loaded case: the config's when None (custom plans 2, planned plans 1)
    samples_per_case: int | None = None
    #: an epoch is at least this many iterations (small datasets would otherwise give tiny epochs)
    min_iterations_per_epoch: int = 20
    #: a fixed epoch length (the planned recipe: 250); None: the loader's batches, at least min_iterations_per_epoch
    iterations_per_epoch: int | None = None
    #: data-loading worker processes: the config's when None (custom plans 0, planned plans one per spare core)
    num_workers: int | None = None
    #: MLflow tracking server URI or local folder (medseg.engines.tracking); None: no tracking
    mlflow_uri: str | None = None
    seed: int = 0
    target_spacing: tuple[float, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    ct_window: tuple[float, float] | None = None
    init_weights: str | None = None
    network: NetworkSpec = field(default_factory=NetworkSpec)
    #: a cascade stage's previous stage: its cross-validation run (its out-of-fold label maps are copied in)
    previous_stage: str | None = None


def check_options(options: TrainOptions) -> torch.device:
    """Check every option before anything is read or written; returns the device.

    Raises
    ------
    InputError
        A count below its minimum, a non-positive or non-finite learning rate or time budget,
        ``--fold`` outside 0-4, ``--init-weights`` with ``--resume``, an unavailable device, an
        ``--mlflow`` location that is neither a folder nor a tracking server, or MLflow not installed.
    """
    opts = options
    for flag, value, least in (("--epochs", opts.epochs, 1), ("--val-interval", opts.val_interval, 1),
                               ("--batch-size", opts.batch_size, 1), ("--log-every", opts.log_every, 1),
                               ("samples_per_case", opts.samples_per_case, 1), ("num_workers", opts.num_workers, 0),
                               ("min_iterations_per_epoch", opts.min_iterations_per_epoch, 1),
                               ("--iterations-per-epoch", opts.iterations_per_epoch, 1),
                               ("--max-iterations", opts.max_iterations, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise InputError(None, f"{flag} must be an integer of at least {least}, got {value!r}")
    for flag, number in (("--max-minutes", opts.max_minutes), ("learning_rate", opts.learning_rate)):
        if number is not None and not (isinstance(number, (int, float)) and not isinstance(number, bool)
                                       and math.isfinite(number) and number > 0):
            raise InputError(None, f"{flag} must be a positive number, got {number!r}")
    if isinstance(opts.fold, bool) or not isinstance(opts.fold, int) or not 0 <= opts.fold < 5:
        raise InputError(None, f"--fold must be between 0 and 4, got {opts.fold}")
    if isinstance(opts.seed, bool) or not isinstance(opts.seed, int) or opts.seed < 0:
        raise InputError(None, f"--seed must be an integer of at least 0, got {opts.seed!r}")
    if not isinstance(opts.resume, bool):
        raise InputError(None, f"--resume must be true or false, got {opts.resume!r}")
    if opts.init_weights is not None and opts.resume:
        raise InputError(opts.init_weights, "--init-weights starts a new run; --resume continues one from its "
                         "checkpoint: use one of the two")
    if not isinstance(opts.device, str):
        raise InputError(None, f"--device must be cpu or cuda, got {opts.device!r}")
    check_tracking(opts.mlflow_uri)
    return resolve_device(opts.device)
