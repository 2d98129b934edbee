"""Calling MONAI's bundle functions (``verify_net_in_out``, ``ckpt_export``, ``onnx_export``) quietly, and
describing their failures in one line: the first medseg error or the innermost cause of MONAI's wrappers."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from medseg.errors import MedsegError, root_cause

__all__ = [
    "INFERENCE_FILE",
    "NET_ID",
    "describe",
    "first_line",
    "quiet_monai",
]

log = logging.getLogger(__name__)

INFERENCE_FILE = Path("configs") / "inference.json"
NET_ID = "network_def"

_QUIET_LOGGERS = ("monai.bundle.scripts", "monai.bundle", "torch.onnx", "onnxscript", "onnx_ir")


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    cause = root_cause(exc)
    return str(cause).splitlines()[0] if isinstance(cause, MedsegError) else first_line(cause)


@contextlib.contextmanager
def quiet_monai() -> Iterator[None]:
    """MONAI's input summaries and torch's exporter chatter only with medseg's debug logging; MONAI's
    warning about the deprecated ``optional_packages_version`` name is reported by verify instead."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    if not logging.getLogger("medseg").isEnabledFor(logging.DEBUG):
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated name 'optional_packages_version'")
            warnings.filterwarnings("ignore", message=".*'dynamic_axes' is not recommended when dynamo=True")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
