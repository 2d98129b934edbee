"""Public API of :mod:`medseg.bundle` (loaded lazily by ``__init__.py``)."""

from .create import init_bundle
from .export import export_bundle
from .runner import run_bundle
from .safety import check_bundle, scan_bundle
from .training import train
from .verify import verify_bundle

__all__ = [
    "check_bundle",
    "export_bundle",
    "init_bundle",
    "run_bundle",
    "scan_bundle",
    "train",
    "verify_bundle",
]
