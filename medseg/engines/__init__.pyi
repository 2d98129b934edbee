"""Public API of :mod:`medseg.engines` (loaded lazily by ``__init__.py``)."""

from .training import TrainOptions, train, train_bundle, training_datalist

__all__ = [
    "TrainOptions",
    "train",
    "train_bundle",
    "training_datalist",
]
