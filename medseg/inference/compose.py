"""The inference composition: the factories that ``configs/inference.json`` names for its ``inferer`` and
``postprocessing`` parts, and the label-map writer transform they end in.

One definition serves both doors: ``python -m monai.bundle run`` instantiates these from the config,
and ``medseg predict`` gets the same parts from the same config (:mod:`medseg.bundle.pipeline`) and
hands them to :class:`medseg.inference.predictor.Predictor`. The options of the sliding window
(overlap, window batch, precision, output) are checked in one place, :class:`SlabInferer`; a label
map is written by one function (:func:`medseg.io.image.write_label_map`) under one name
(:func:`medseg.io.image.output_name`), stored as one rule says (:func:`medseg.io.image.label_map_dtype`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose, MapTransform

from medseg.errors import InputError
from medseg.inference.inferer import InvertPredictiond, SlabInferer
from medseg.io.image import output_name, write_label_map
from medseg.plan import Plan

__all__ = ["SaveLabelMapd", "inference_postprocessing", "sliding_window_inferer"]

log = logging.getLogger(__name__)


def sliding_window_inferer(plan: Plan, overlap: float = 0.5, sw_batch_size: int | None = None,
                           progress: bool = False, tta: bool = False, output: str = "auto",
                           precision: str = "float32") -> SlabInferer:
    """medseg's bounded-memory Gaussian sliding-window inferer over the plan's patch size
    (:class:`medseg.inference.inferer.SlabInferer`); ``sw_batch_size`` None: the plan's; ``tta`` mirrors
    the windows along every spatial axis; ``precision="bfloat16"`` runs the network under bfloat16 autocast.

    Raises
    ------
    InputError
        If ``overlap`` is not in [0, 1), ``sw_batch_size`` is below 1, or ``output`` or ``precision``
        is unknown (what :class:`SlabInferer` refuses, said as the user's input).
    """
    try:
        batch = int(plan.sw_batch_size if sw_batch_size is None else sw_batch_size)
        return SlabInferer(plan.patch_size, plan.num_classes, overlap=float(overlap), sw_batch_size=batch,
                           mirror_axes=tuple(range(plan.dims)) if tta else (), output=output, progress=progress,
                           precision=precision)
    except (TypeError, ValueError) as exc:
        raise InputError(None, str(exc)) from exc


class SaveLabelMapd(MapTransform):
    """Write ``pred`` (a one-channel label map already in the input's grid) into ``output_dir`` as
    :func:`~medseg.io.image.output_name` of the input (``<case>_seg.<input ending>``), with exactly the
    input file's geometry and header (:func:`~medseg.io.image.write_label_map`).

    Raises
    ------
    InputError
        From ``__call__``: the output exists and ``overwrite`` is false (nothing is written), or the
        label map does not fit the input.
    """

    def __init__(self, keys: str | Sequence[str], output_dir: str | os.PathLike[str], source_key: str = "image",
                 overwrite: bool = False) -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.source_key = source_key
        self.overwrite = bool(overwrite)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = Path(str(d[self.source_key].meta["filename_or_obj"]))
        for key in self.key_iterator(d):
            target = self.output_dir / output_name(source)
            if target.exists() and not self.overwrite:
                raise InputError(target, "already exists; set overwrite (--set overwrite=true) to replace it")
            write_label_map(torch.as_tensor(d[key])[0].cpu().numpy(), source, target)
            log.info("wrote %s", target)
        return d


def inference_postprocessing(plan: Plan, preprocessing: Compose, output_dir: str | os.PathLike[str] | None = None,
                             overwrite: bool = False) -> Compose:
    """Undo the preprocessing on the :class:`~medseg.inference.inferer.SlabInferer` output (probabilities
    resampled linearly then argmax, one class at a time when they wait on disk in float16, or a label map
    resampled with nearest neighbour; undoing crop, spacing and orientation) -> with ``output_dir``, write
    the label map there (:class:`SaveLabelMapd`; an existing file is refused unless ``overwrite``).

    ``plan`` is the model's (the inversion needs nothing more from it; named for the configs' symmetry).
    """
    steps: list[Any] = [InvertPredictiond(keys="pred", transform=preprocessing, orig_keys="image")]
    if output_dir is not None:
        steps.append(SaveLabelMapd(keys="pred", output_dir=output_dir, overwrite=overwrite))
    return Compose(steps)
