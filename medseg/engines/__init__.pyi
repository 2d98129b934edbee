"""Public API of :mod:`medseg.engines` (loaded lazily by ``__init__.py``)."""

from .budget import RunBudget
from .data import training_datalist, training_split
from .options import TrainOptions, check_options
from .progress import ProgressLogger
from .records import RunRecorder
from .tensorboard import TensorBoardLog
from .training import run_training
from .weights import load_matching_weights

__all__ = [
    "ProgressLogger",
    "RunBudget",
    "RunRecorder",
    "TensorBoardLog",
    "TrainOptions",
    "check_options",
    "load_matching_weights",
    "run_training",
    "training_datalist",
    "training_split",
]
