"""The inference composition: the factories that ``configs/inference.json`` names for its ``inferer`` and
``postprocessing`` parts, the label-map writer transform they end in, and the postprocessing of
validation during training (:func:`validation_postprocessing`, for ``configs/train.json``).

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
from monai.transforms import AsDiscreted, Compose, MapTransform

from medseg.errors import InputError
from medseg.inference.cases import channel_case
from medseg.inference.inferer import InvertPredictiond, SlabInferer
from medseg.inference.postprocess import LargestComponentsd, PostprocessingRules
from medseg.io.image import image_suffix, label_map_name, output_name, write_label_map
from medseg.plan import Plan
from medseg.transforms.regions import RegionsToLabelMapd

__all__ = ["IgnoreLabeld", "SaveLabelMapd", "inference_postprocessing", "sliding_window_inferer",
           "validation_postprocessing"]

log = logging.getLogger(__name__)


def sliding_window_inferer(plan: Plan, overlap: float = 0.5, sw_batch_size: int | None = None,
                           progress: bool = False, tta: bool = False, output: str = "auto",
                           precision: str = "float32", grid: str = "monai", members: int = 1) -> SlabInferer:
    """medseg's bounded-memory Gaussian sliding-window inferer over the plan's windows (its patch; thick windows
    without overlap along the slice axis for a network over slices, :attr:`~medseg.plan.Plan.window_size`, except
    on nnU-Net's grid)
    (:class:`medseg.inference.inferer.SlabInferer`) for the plan's outputs (softmax classes, or one sigmoid
    per region); ``sw_batch_size`` None: the plan's; ``tta`` mirrors the windows along
    every axis the network convolves (not a slice axis);
    ``precision="bfloat16"`` runs the network under bfloat16 autocast; ``grid="nnunet"``: nnU-Net v2's windows
    and Gaussian (models imported from nnU-Net); ``members``: an ensemble of that many models of the plan
    (:class:`medseg.networks.ensemble.ModelEnsemble`), their probabilities averaged block by block.

    Raises
    ------
    InputError
        If ``overlap`` is not in [0, 1), ``sw_batch_size`` is below 1, or ``output``, ``precision`` or ``grid``
        is unknown (what :class:`SlabInferer` refuses, said as the user's input).
    """
    try:
        batch = int(plan.sw_batch_size if sw_batch_size is None else sw_batch_size)
        # nnU-Net's grid keeps nnU-Net's windows (one slice each for its 2d configuration)
        native = grid == "nnunet"
        return SlabInferer(plan.patch_size if native else plan.window_size, plan.num_outputs,
                           overlap=float(overlap) if native else plan.window_overlap(float(overlap)),
                           sigma_scale=0.125 if native else plan.window_sigma_scale(), sw_batch_size=batch,
                           mirror_axes=plan.spatial_axes if tta else (), output=output, progress=progress,
                           precision=precision, regions=plan.regions, grid=grid, members=int(members))
    except (TypeError, ValueError) as exc:
        raise InputError(None, str(exc)) from exc


def _output_name(source: Path, channels: int) -> str:
    """``<case>_seg.<ending>`` of an input: of its file (:func:`~medseg.io.image.output_name`), or for an image
    of several channels read from nnU-Net's channel files, of the case (``CASE_0000.nii.gz`` -> ``CASE_seg.nii.gz``)."""
    parsed = channel_case(source) if channels > 1 else None
    return label_map_name(parsed[0], image_suffix(source) or "") if parsed else output_name(source)


class SaveLabelMapd(MapTransform):
    """Write ``pred`` (a one-channel label map already in the input's grid) into ``output_dir`` as
    :func:`~medseg.io.image.output_name` of the input (``<case>_seg.<input ending>``; for an input of several
    channels, the case of its channel files: ``CASE_seg.<ending>``), with exactly the input (first channel)
    file's geometry and header (:func:`~medseg.io.image.write_label_map`).

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
            target = self.output_dir / _output_name(source, int(d[self.source_key].shape[0]))
            if target.exists() and not self.overwrite:
                raise InputError(target, "already exists; set overwrite (--set overwrite=true) to replace it")
            write_label_map(torch.as_tensor(d[key])[0].cpu().numpy(), source, target)
            log.info("wrote %s", target)
        return d


def inference_postprocessing(plan: Plan, preprocessing: Compose, output_dir: str | os.PathLike[str] | None = None,
                             overwrite: bool = False, rules: PostprocessingRules | None = None) -> Compose:
    """Undo the preprocessing on the :class:`~medseg.inference.inferer.SlabInferer` output (probabilities
    resampled linearly then argmax, or for a region-based plan sigmoid probabilities painted region by
    region; one channel at a time when they wait on disk in float16; or a label map resampled with nearest
    neighbour; undoing crop, spacing and orientation) -> with ``output_dir``, write the label map there
    (:class:`SaveLabelMapd`; an existing file is refused unless ``overwrite``).

    ``plan`` is the model's: its regions, if any. ``rules``: largest-component postprocessing applied to the
    label map in the input's grid before it is written (:class:`~medseg.inference.postprocess.LargestComponentsd`).
    """
    steps: list[Any] = [InvertPredictiond(keys="pred", transform=preprocessing, orig_keys="image",
                                          regions=plan.regions)]
    if rules is not None and rules.changes_anything:
        steps.append(LargestComponentsd(keys="pred", rules=rules))
    if output_dir is not None:
        steps.append(SaveLabelMapd(keys="pred", output_dir=output_dir, overwrite=overwrite))
    return Compose(steps)


class IgnoreLabeld(MapTransform):
    """Set ``keys`` (label maps: the prediction and the reference) to background wherever the reference
    ``label_key`` holds ``ignore_label``, so that those voxels count in no foreground class's metric.

    Raises
    ------
    ValueError
        From ``__call__``: a label map of another spatial shape than the reference.
    """

    def __init__(self, keys: str | Sequence[str], ignore_label: int, label_key: str = "label") -> None:
        super().__init__(keys)
        self.ignore_label, self.label_key = int(ignore_label), label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ignored = torch.as_tensor(d[self.label_key]) == self.ignore_label
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != tuple(ignored.shape[1:]):
                raise ValueError(f"{key}: shape {tuple(d[key].shape)} is not the reference's {tuple(ignored.shape)}")
            d[key] = d[key].clone()
            d[key][ignored.expand_as(d[key])] = 0
        return d


def validation_postprocessing(plan: Plan) -> Compose:
    """The evaluator's postprocessing in training (``validate#postprocessing`` of ``configs/train.json``), from
    the network's output ``pred`` and the reference ``label`` to one-hot label maps over the plan's classes
    (what MONAI's ``MeanDice`` scores per label): softmax plans take the argmax (exactly the config's
    ``AsDiscreted`` before regions existed); region-based plans paint the regions where their sigmoid
    exceeds 0.5 (:class:`~medseg.transforms.regions.RegionsToLabelMapd`), so validation scores the label
    map a prediction writes. With an ``ignore_label``, its voxels are background in both (no class counts them).
    """
    steps: list[Any] = []
    if plan.regions:
        steps.append(RegionsToLabelMapd(keys="pred", regions=plan.regions))
    elif plan.ignore_label is None:
        return Compose([AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=plan.num_classes)])
    else:
        steps.append(AsDiscreted(keys="pred", argmax=True))
    if plan.ignore_label is not None:
        steps.append(IgnoreLabeld(keys=["pred", "label"], ignore_label=plan.ignore_label))
    steps.append(AsDiscreted(keys=["pred", "label"], to_onehot=plan.num_classes))
    return Compose(steps)
