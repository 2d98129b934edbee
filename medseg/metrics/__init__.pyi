"""Public API of :mod:`medseg.metrics` (loaded lazily by ``__init__.py``)."""

from .evaluate import FolderEvaluation, pair_cases, score_folders
from .labelmaps import map_labels, read_label_map
from .lesions import LesionSummary, connected_lesions, lesion_wise
from .overlap import LabelMetrics, label_metrics

__all__ = [
    "FolderEvaluation",
    "LabelMetrics",
    "LesionSummary",
    "connected_lesions",
    "label_metrics",
    "lesion_wise",
    "map_labels",
    "pair_cases",
    "read_label_map",
    "score_folders",
]
