"""Public API of :mod:`medseg.metrics` (loaded lazily by ``__init__.py``)."""

from .evaluate import evaluate_folders, pair_cases
from .labelmaps import map_labels, read_label_map
from .lesions import LesionSummary, connected_lesions, lesion_wise
from .overlap import LabelMetrics, label_metrics

__all__ = [
    "LabelMetrics",
    "LesionSummary",
    "connected_lesions",
    "evaluate_folders",
    "label_metrics",
    "lesion_wise",
    "map_labels",
    "pair_cases",
    "read_label_map",
]
