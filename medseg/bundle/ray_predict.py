"""``medseg predict --engine ray``: a bundle's prediction of a cohort on Ray Data
(:func:`medseg.inference.ray_engine.predict_files_ray`), each worker building the bundle's predictor through
:func:`medseg.bundle.pipeline.inference_pipeline` (safe mode included), as the serial engine does."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

from medseg.bundle.pipeline import InferenceOptions, bundle_predictor, prediction_settings
from medseg.inference.cases import Shard
from medseg.inference.cohort import _instance_values
from medseg.inference.predictor import LabelMapPredictor
from medseg.inference.ray_engine import RayOptions, predict_files_ray

__all__ = ["pipeline_predictor", "predict_ray"]

_SERIAL_DEFAULTS, _RAY_DEFAULTS = InferenceOptions(), RayOptions()


def pipeline_predictor(bundle_dir: str, options: InferenceOptions) -> LabelMapPredictor:
    """The bundle's predictor, as ``medseg predict`` builds it (run once in each Ray worker).

    Raises
    ------
    BundleError, InputError
        As :func:`~medseg.bundle.pipeline.bundle_predictor` and its factory.
    """
    return bundle_predictor(bundle_dir, options)[1]()


def predict_ray(bundle_dir: str | os.PathLike[str], input_path: str | os.PathLike[str],
                output_dir: str | os.PathLike[str], options: InferenceOptions = _SERIAL_DEFAULTS,
                ray_options: RayOptions = _RAY_DEFAULTS, *, overwrite: bool = False, instances: bool = False,
                instance_labels: Sequence[int] | None = None, strict: bool = False, shard: Shard | None = None
                ) -> list[Path]:
    """``medseg predict --engine ray`` of image files (a file, a folder, a manifest) with a bundle. The bundle is
    checked here first (on the CPU: the driver need not have a GPU); the workers use ``options.device``, ``cuda``
    when they are given GPUs and the device is left at ``cpu``. Completion records carry the same settings as the
    serial engine's, so either engine resumes the other's run.

    Raises
    ------
    InputError, BundleError, MedsegError
        As :func:`~medseg.bundle.pipeline.bundle_predictor` and
        :func:`~medseg.inference.ray_engine.predict_files_ray`.
    """
    ray_options.check()
    plan, _ = bundle_predictor(bundle_dir, dataclasses.replace(options, device="cpu", progress=False))
    values = _instance_values(plan, Path(bundle_dir), instance_labels) if instances else None
    device = "cuda" if ray_options.gpus_per_worker > 0 and options.device == "cpu" else options.device
    worker_options = dataclasses.replace(options, device=device, progress=False)
    factory = functools.partial(pipeline_predictor, os.path.abspath(bundle_dir), worker_options)
    return predict_files_ray(plan, factory, input_path, output_dir, ray_options, overwrite=overwrite,
                             instance_values=values, strict=strict, shard=shard,
                             settings=prediction_settings(bundle_dir, options))
