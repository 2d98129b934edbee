"""Public API of :mod:`medseg.pacs` (loaded lazily by ``__init__.py``)."""

from .dicomweb import run_study
from .forward import Destination
from .job import segment_series_folder
from .journal import Journal
from .listener import Listener, ListenerConfig

__all__ = [
    "Destination",
    "Journal",
    "Listener",
    "ListenerConfig",
    "run_study",
    "segment_series_folder",
]
