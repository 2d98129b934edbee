"""Where a bundle (or run folder) keeps its parts, relative to its root (MONAI model-zoo layout).

A bottom-layer module with no imports, so that code which only reads a bundle's JSON files (the
label-name reader, the model-fits-input checks of ``medseg predict``) need not import
:mod:`medseg.bundle.components`, which imports torch and MONAI.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "LAST_CHECKPOINT",
    "META_FILE",
    "PLAN_FILE",
    "POSTPROCESSING_FILE",
    "PREVIOUS_DIR",
    "PREVIOUS_PREDICTIONS",
    "SUMMARY_FILE",
    "WEIGHTS_FILE",
]

PLAN_FILE = Path("configs") / "plan.json"
WEIGHTS_FILE = Path("models") / "model.pt"
#: The state of a training run for --resume (network, optimiser, LR schedule, trainer).
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
META_FILE = Path("configs") / "metadata.json"
#: What a finished training run did (written last, after the final validation): its absence beside a checkpoint
#: means the run stopped before it finished.
SUMMARY_FILE = "train_summary.json"
#: Largest-component postprocessing rules (written by ``medseg select``, read by ``medseg postprocess``).
POSTPROCESSING_FILE = Path("configs") / "postprocessing.json"
#: A cascade stage's previous stage: its model (a bundle of its folds) ...
PREVIOUS_DIR = Path("previous")
#: ... and its out-of-fold label maps of the training cases (``<case>_seg.<ending>``), what the stage trains on.
PREVIOUS_PREDICTIONS = PREVIOUS_DIR / "predictions"
