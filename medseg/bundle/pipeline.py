"""``medseg predict`` from a bundle's ``configs/inference.json``: one pipeline, two doors.

The config is checked by safe mode (:func:`medseg.bundle.safety.check_bundle`, as ``medseg bundle run``
checks it) and parsed by MONAI's ``ConfigParser`` with the command-line options as overrides of its ids
(``device``, ``overlap``, ``sw_batch_size``, ``tta``, ``precision``; the postprocessing's ``output_dir``
null: the command writes the label maps itself, with the function the config's writer uses). Its parts ``plan``,
``network``, ``preprocessing``, ``inferer`` and ``postprocessing`` go to
:class:`medseg.inference.predictor.Predictor`: ``medseg predict`` and ``python -m monai.bundle run``
build the same objects. A run folder of ``medseg train`` is a bundle too; one without
``configs/inference.json`` (written before it existed) gets medseg's template of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.bundle.create import inference_config as template_inference_config
from medseg.bundle.ensembles import ENSEMBLE_FILE, read_ensemble
from medseg.bundle.runner import find_config, read_config_data, weights_only_loads
from medseg.bundle.safety import check_bundle
from medseg.devices import resolve_device
from medseg.errors import BundleError, one_line, unwrapped
from medseg.inference.cases import Shard
from medseg.inference.cohort import predict_files
from medseg.inference.configurations import ConfigurationEnsemble
from medseg.inference.predictor import LabelMapPredictor, Predictor, PreviousMaps, PreviousModel, PreviousStage
from medseg.inference.series import predict_series
from medseg.layout import META_FILE, PLAN_FILE, PREVIOUS_DIR, PREVIOUS_PREDICTIONS
from medseg.plan import Plan

__all__ = ["InferenceOptions", "InferencePipeline", "bundle_predictor", "inference_pipeline", "predict", "predict_dicom",
           "prediction_settings"]

log = logging.getLogger(__name__)

#: Options of the sliding window that the command line overrides: config ids of medseg's inference.json.
#: A config without such a top-level id (one written before it existed) gets the inferer's argument instead.
INFERER_OPTIONS = ("overlap", "sw_batch_size", "tta", "precision", "progress")


class InferencePipeline:
    """A bundle's ``inference.json`` parsed with overrides; its parts built on demand (:meth:`part`)."""

    def __init__(self, bundle: Path, source: Path | None, parser: Any, device: Any,
                 previous: InferencePipeline | None = None) -> None:
        self.bundle, self.source, self.parser, self.device = bundle, source, parser, device
        #: a cascade stage's previous stage, where the bundle holds its model (``previous/``)
        self.previous = previous

    def part(self, name: str) -> Any:
        """The config part ``name``, instantiated once (MONAI's parser keeps what it built).

        Raises
        ------
        BundleError
            The config has no such part, or building it failed (the innermost cause is named);
            a medseg error of building it (a bad plan, bad options) as it is.
        """
        where = self.source or self.bundle / "configs" / "inference.json"
        if name not in self.parser:
            raise BundleError(f"{where}: no {name!r} part; medseg predict needs a medseg bundle "
                              f"(configs/plan.json and an inference.json naming its parts)")
        with unwrapped(lambda cause: BundleError(f"{where}: cannot build {name!r}: {type(cause).__name__}: "
                                                 f"{one_line(cause, 300)}")), weights_only_loads():
            return self.parser.get_parsed_content(name)

    @property
    def plan(self) -> Plan:
        """The ``plan`` part.

        Raises
        ------
        BundleError
            As :meth:`part`, or a ``plan`` that is not a medseg plan.
        """
        plan = self.part("plan")
        if not isinstance(plan, Plan):
            raise BundleError(f"{self.bundle / PLAN_FILE}: the config's 'plan' is not a medseg plan")
        return plan

    def predictor(self) -> Predictor:
        """A :class:`Predictor` of the config's ``network``, ``preprocessing``, ``inferer`` and ``postprocessing``.

        Raises
        ------
        BundleError
            As :meth:`part` (missing or unloadable weights included).
        """
        plan = self.plan
        previous: PreviousStage | None = None
        if plan.previous_stage:  # the bundle's model of the previous stage, else a fold's out-of-fold maps
            previous = (PreviousModel(self.previous.predictor) if self.previous is not None
                        else PreviousMaps(self.bundle / PREVIOUS_PREDICTIONS))
        return Predictor(plan, self.part("network"), self.device, preprocessing=self.part("preprocessing"),
                         inferer=self.part("inferer"), postprocessing=self.part("postprocessing"), previous=previous)


def _top_level(path: Path | None) -> Mapping[str, Any]:
    """The top-level items of a config, read as plain JSON / YAML data (safe mode checks it before MONAI parses it)."""
    if path is None:
        return template_inference_config()
    content = read_config_data(path)
    return content if isinstance(content, Mapping) else {}


@dataclass(frozen=True)
class InferenceOptions:
    """The command line's options of a prediction: overrides of the config ids of the same names
    (``progress`` None: when stderr is a terminal; ``tta`` None: the config's own, off in medseg's bundles and on in
    those imported from nnU-Net; ``trust``: skip safe mode)."""

    device: str = "cpu"
    overlap: float = 0.5
    sw_batch_size: int | None = None
    tta: bool | None = None
    precision: str = "float32"
    progress: bool | None = None
    trust: bool = False


def _inference_file(bundle: Path) -> Path | None:
    """The bundle's ``configs/inference.json|yaml|yml`` (:func:`~medseg.bundle.runner.find_config`), None if it has none."""
    try:
        return find_config(bundle, "inference")
    except BundleError:
        return None


def inference_pipeline(bundle_dir: str | os.PathLike[str], options: InferenceOptions = InferenceOptions()
                       ) -> InferencePipeline:
    """Check a bundle's ``configs/inference.json`` in safe mode (unless ``options.trust``) and parse it with
    ``options`` as overrides; the plan and the inferer are built at once, so a bad plan or option fails
    here, before any input is read.

    Raises
    ------
    BundleError
        No such bundle, a config refused by safe mode or failing to parse, a bad plan.
    InputError
        A bad device, overlap, window batch size or precision.
    """
    from monai.bundle import ConfigParser

    bundle = Path(os.path.abspath(bundle_dir))
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle or run folder (expected the --out folder of medseg train)")
    source = _inference_file(bundle)
    torch_device = resolve_device(options.device)
    top = _top_level(source)
    values = {key: getattr(options, key) for key in INFERER_OPTIONS}
    values["progress"] = sys.stderr.isatty() if options.progress is None else options.progress
    overrides: dict[str, Any] = {"bundle_root": str(bundle), "device": str(torch_device)}
    overrides.update({(key if key in top else f"inferer#{key}"): value for key, value in values.items()
                      if value is not None or key != "tta"})
    if isinstance(top.get("postprocessing"), Mapping):
        overrides["postprocessing#output_dir"] = None  # the command writes the label maps (write_label_map)
    if source is None:
        log.debug("%s: no configs/inference.json; using medseg's template of it", bundle)
    elif not options.trust:
        check_bundle(bundle, overrides, config=source)
    parser = ConfigParser()
    with contextlib.chdir(bundle):  # relative macros resolve against the bundle, as safe mode checked them
        parser.read_config(str(source) if source is not None else template_inference_config())
        if (bundle / META_FILE).is_file():
            parser.read_meta(str(bundle / META_FILE))
        parser.update(overrides)
        parser.resolve_macro_and_relative_ids()
    pipeline = InferencePipeline(bundle, source, parser, torch_device)
    plan = pipeline.plan  # built now: a bad plan fails before any input is read
    pipeline.part("inferer")  # the options are checked where the inferer is made
    if plan.previous_stage and (bundle / PREVIOUS_DIR / PLAN_FILE).is_file():
        # a cascade stage's bundle with its previous stage's model: checked and parsed as a bundle of its own
        pipeline.previous = inference_pipeline(bundle / PREVIOUS_DIR, options)
        if pipeline.previous.plan.configuration != plan.previous_stage or \
                dict(pipeline.previous.plan.labels) != dict(plan.labels):
            raise BundleError(f"{bundle / PREVIOUS_DIR / PLAN_FILE}: not the previous stage of this cascade stage "
                              f"({plan.previous_stage} of labels {plan.labels})")
    return pipeline


def bundle_predictor(bundle_dir: str | os.PathLike[str], options: InferenceOptions = InferenceOptions()
                     ) -> tuple[Plan, Callable[[], LabelMapPredictor]]:
    """``(plan, the factory of its predictor)`` of a bundle: its :class:`InferencePipeline`'s, or when the bundle is an
    ensemble across configurations (``configs/ensemble.json``, :mod:`medseg.bundle.ensembles`) a
    :class:`~medseg.inference.configurations.ConfigurationEnsemble` of it and its members (each checked and parsed
    as a bundle of its own) with the ensemble's postprocessing rules. Everything is checked here, before any input.

    Raises
    ------
    BundleError, InputError
        As :func:`inference_pipeline` (for every member), a bad ensemble file, or members of another task.
    """
    pipeline = inference_pipeline(bundle_dir, options)
    ensemble = read_ensemble(bundle_dir)
    if ensemble is None:
        return pipeline.plan, pipeline.predictor
    folders, rules = ensemble
    members = [inference_pipeline(folder, options) for folder in folders]

    def load_ensemble() -> ConfigurationEnsemble:
        try:
            return ConfigurationEnsemble([pipeline.predictor(), *(member.predictor() for member in members)], rules)
        except ValueError as exc:
            raise BundleError(f"{Path(bundle_dir) / ENSEMBLE_FILE}: {exc}") from None

    return pipeline.plan, load_ensemble


def predict(bundle_dir: str | os.PathLike[str], input_path: str | os.PathLike[str], output_dir: str | os.PathLike[str],
            options: InferenceOptions = InferenceOptions(), *, overwrite: bool = False, instances: bool = False,
            instance_labels: Sequence[int] | None = None, strict: bool = False, shard: Shard | None = None
            ) -> list[Path]:
    """``medseg predict`` of image files (a file, a folder, a manifest) with a bundle:
    :func:`medseg.inference.cohort.predict_files` with the predictor of :func:`inference_pipeline`, in ``shard``
    (None: all cases). Finished cases are recorded with the bundle and the options that change the label maps
    (overlap, mirroring, precision), so the same command resumes a stopped run.

    Raises
    ------
    InputError, BundleError
        As :func:`inference_pipeline` and :func:`~medseg.inference.cohort.predict_files`.
    """
    plan, load_predictor = bundle_predictor(bundle_dir, options)
    return predict_files(plan, load_predictor, input_path, output_dir, overwrite=overwrite,
                         instances=instances, instance_labels=instance_labels, strict=strict, model=bundle_dir,
                         shard=shard, settings=prediction_settings(bundle_dir, options))


def prediction_settings(bundle_dir: str | os.PathLike[str], options: InferenceOptions) -> dict[str, Any]:
    """What a completion record keeps of a prediction's settings: the bundle (absolute path) and the options that
    change its label maps; the device and the window batch size do not, so a run may resume on other hardware."""
    return {"model": os.path.abspath(bundle_dir), "overlap": options.overlap, "tta": options.tta,
            "precision": options.precision}


def predict_dicom(bundle_dir: str | os.PathLike[str], input_path: str | os.PathLike[str],
                  output_dir: str | os.PathLike[str], options: InferenceOptions = InferenceOptions(), *,
                  fmt: str = "nifti", series_uid: str | None = None, modality: str | None = None, min_slices: int = 1,
                  description: str | None = None, overwrite: bool = False, strict: bool = False,
                  seg_description: Callable[[str, int], str] | None = None) -> list[Path]:
    """``medseg predict`` of a DICOM series with a bundle: :func:`medseg.inference.series.predict_series`
    with the predictor of :func:`inference_pipeline`.

    Raises
    ------
    DicomError, InputError, BundleError
        As :func:`inference_pipeline` and :func:`~medseg.inference.series.predict_series`.
    """
    plan, load_predictor = bundle_predictor(bundle_dir, options)
    return predict_series(plan, load_predictor, bundle_dir, input_path, output_dir, fmt=fmt,
                          series_uid=series_uid, modality=modality, min_slices=min_slices, description=description,
                          overwrite=overwrite, strict=strict, seg_description=seg_description)
