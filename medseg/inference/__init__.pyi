"""Public API of :mod:`medseg.inference` (loaded lazily by ``__init__.py``)."""

from .cases import InputCase, Shard, collect_cases, parse_shard, read_manifest, shard_cases
from .cohort import CaseJournal, CohortCase, cohort_cases, predict_case, predict_files
from .fit import fit_problems
from .inferer import SlabInferer
from .postprocess import PostprocessingRules, apply_rules, choose_rules, postprocess_folder, read_rules, write_rules
from .predictor import Predictor, collect_inputs, load_model
from .series import predict_series
from .sliding import slab_sliding_window

__all__ = [
    "CaseJournal",
    "CohortCase",
    "InputCase",
    "PostprocessingRules",
    "Predictor",
    "Shard",
    "SlabInferer",
    "apply_rules",
    "choose_rules",
    "cohort_cases",
    "collect_cases",
    "collect_inputs",
    "fit_problems",
    "load_model",
    "parse_shard",
    "postprocess_folder",
    "predict_case",
    "predict_files",
    "predict_series",
    "read_manifest",
    "read_rules",
    "shard_cases",
    "slab_sliding_window",
    "write_rules",
]
