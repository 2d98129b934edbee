"""Public API of :mod:`medseg.inference` (loaded lazily by ``__init__.py``)."""

from .cases import InputCase, collect_cases
from .fit import fit_problems
from .inferer import SlabInferer
from .predictor import Predictor, collect_inputs, load_model, predict_files
from .series import predict_series
from .sliding import slab_sliding_window

__all__ = [
    "InputCase",
    "Predictor",
    "SlabInferer",
    "collect_cases",
    "collect_inputs",
    "fit_problems",
    "load_model",
    "predict_files",
    "predict_series",
    "slab_sliding_window",
]
