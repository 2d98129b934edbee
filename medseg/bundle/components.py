"""Factories that bundle configs name with ``_target_`` (and that the ``medseg`` CLI calls directly).

medseg's own bundle configs contain no ``$`` expressions: every computed value comes from one of
these functions, so the configs pass safe mode and the CLI and ``python -m monai.bundle run``
build exactly the same pipeline ("one pipeline, two doors").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from monai.transforms import Compose, MapTransform

from medseg.errors import InputError
from medseg.inference.inferer import InvertPredictiond, SlabInferer
from medseg.io.image import case_name, image_suffix, list_images, write_label_map
from medseg.layout import META_FILE, PLAN_FILE, WEIGHTS_FILE  # noqa: F401 - re-exported for the bundle layer
from medseg.networks import load_weights, read_state_dict, torch_load_weights_only  # noqa: F401 - config factories
from medseg.plan import Plan, load_plan

log = logging.getLogger(__name__)



def bundle_path(bundle_root: str | os.PathLike[str], parts: Sequence[str]) -> str:
    """``bundle_root/parts[0]/parts[1]/...`` as a string (configs cannot concatenate without ``$``)."""
    return str(Path(bundle_root).joinpath(*parts))


def image_list(dataset_dir: str | os.PathLike[str], subdir: str = "imagesTs") -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for the images in ``dataset_dir/subdir`` (or ``dataset_dir`` itself
    when it has no such sub-folder, or a single image file).

    Raises
    ------
    InputError
        Missing folder or no images.
    """
    root = Path(dataset_dir)
    if root.is_file():
        if image_suffix(root) is None:
            raise InputError(root, "not a supported image file")
        return [{"image": str(root)}]
    folder = root / subdir if (root / subdir).is_dir() else root
    return [{"image": str(p)} for p in list_images(folder)]


def sliding_window_inferer(plan: Plan, overlap: float = 0.5, sw_batch_size: int | None = None,
                           progress: bool = False, tta: bool = False, output: str = "auto",
                           precision: str = "float32") -> SlabInferer:
    """medseg's bounded-memory Gaussian sliding-window inferer over the plan's patch size
    (:class:`medseg.inference.inferer.SlabInferer`); ``tta`` mirrors the windows along every spatial axis,
    ``precision="bfloat16"`` runs the network under bfloat16 autocast.

    Raises
    ------
    InputError
        If ``overlap`` is not in [0, 1), ``sw_batch_size`` is below 1, or ``output`` or ``precision``
        is unknown.
    """
    overlap, batch = float(overlap), int(sw_batch_size or plan.sw_batch_size)
    try:  # SlabInferer checks overlap, window batch, output and precision; here they are the user's input
        return SlabInferer(plan.patch_size, plan.num_classes, overlap=overlap, sw_batch_size=batch,
                           mirror_axes=tuple(range(plan.dims)) if tta else (), output=output, progress=progress,
                           precision=precision)
    except ValueError as exc:
        raise InputError(None, str(exc)) from exc


class SaveLabelMapd(MapTransform):
    """Write ``pred`` (a 1-channel label map already in the input grid) as ``<case>_seg.<input ending>``
    with exactly the input file's geometry and header (see :func:`medseg.io.image.write_label_map`)."""

    def __init__(self, keys: str | Sequence[str], output_dir: str | os.PathLike[str], source_key: str = "image") -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = Path(str(d[self.source_key].meta["filename_or_obj"]))
        for key in self.key_iterator(d):
            labels = torch.as_tensor(d[key])[0].cpu().numpy()
            target = self.output_dir / f"{case_name(source)}_seg{image_suffix(source)}"
            write_label_map(labels.astype("uint8" if labels.max() <= 255 else "uint16"), source, target)
            log.info("wrote %s", target)
        return d


def inference_postprocessing(plan: Plan, preprocessing: Compose, output_dir: str | os.PathLike[str] | None = None) -> Compose:
    """Undo the preprocessing on the :class:`~medseg.inference.inferer.SlabInferer` output (``Invertd``:
    probabilities resampled linearly then argmax, one class at a time when they wait on disk in float16,
    or a label map resampled with nearest neighbour; undoing crop, spacing and orientation) -> optionally
    write the label map into ``output_dir``."""
    steps: list[Any] = [InvertPredictiond(keys="pred", transform=preprocessing, orig_keys="image")]
    if output_dir is not None:
        steps.append(SaveLabelMapd(keys="pred", output_dir=output_dir))
    return Compose(steps)


def run_engine(engine: Engine) -> None:
    """Run an Ignite engine (what model-zoo configs do with ``"$@evaluator.run()"``)."""
    engine.run()


def evaluate_bundle(bundle_root: str | os.PathLike[str], dataset_dir: str | os.PathLike[str],
                    output_dir: str | os.PathLike[str], device: str = "cpu", overlap: float = 0.5,
                    nsd_tolerance_mm: float = 1.0) -> dict[str, Any]:
    """Predict ``dataset_dir/imagesTs`` into ``output_dir/predictions`` and score them against
    ``dataset_dir/labelsTs`` (``metrics.csv`` and ``summary.json`` in ``output_dir``); the entry
    point of ``configs/evaluate.json``.

    Raises
    ------
    InputError
        Missing images or references, bad predictions (see :func:`medseg.metrics.evaluate.evaluate_folders`).
    BundleError
        A bundle without plan or weights.
    """
    from medseg.inference.predictor import predict
    from medseg.metrics.evaluate import evaluate_folders

    root, out = Path(dataset_dir), Path(output_dir)
    images = root / "imagesTs" if (root / "imagesTs").is_dir() else root
    references = root / "labelsTs"
    if not references.is_dir():
        raise InputError(references, "no reference label maps (labelsTs/) to evaluate against")
    predict(bundle_root, images, out / "predictions", device=device, overlap=overlap, overwrite=True)
    summary = evaluate_folders(out / "predictions", references, out, labels=load_plan(bundle_root).labels,
                               nsd_tolerance_mm=nsd_tolerance_mm)
    log.info("mean Dice over foreground labels: %.4f", summary["mean_dice_foreground"])
    return summary
