"""Sliding-window prediction of images held in memory, in the input's own space and format.

:class:`Predictor` holds a model's parts (plan, network, preprocessing, inferer, postprocessing: what
``configs/inference.json`` names, built from it by :mod:`medseg.bundle.pipeline` or, for library use, from
the same factories by :meth:`Predictor.from_run`) and predicts one image at a time: an image in memory
(:class:`~medseg.io.image.SourceImage`, a SimpleITK image such as a DICOM series) -> the plan's
preprocessing (RAS, target spacing, body crop, intensity) -> bounded-memory sliding-window inference
with Gaussian blending (:class:`medseg.inference.inferer.SlabInferer`, optionally mirrored) ->
``Invertd`` (undo crop, spacing and orientation: softmax probabilities resampled linearly then argmax;
when classes x voxels do not fit in 1 GB, the probabilities wait on disk in float16 and are resampled
one class at a time) -> a label map with exactly the input's shape, spacing, origin and direction.
A model of several input channels takes one image per channel (all on one grid); a region-based model's
label map is painted from its sigmoid outputs (:mod:`medseg.inference.inferer`).

Files and folders of them are predicted by :func:`medseg.inference.cohort.predict_files` (each input read
once and checked before the model is loaded; each finished case recorded, so a stopped run resumes). This
module imports torch and MONAI only in the functions that predict, so bad input is answered before that.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError, MedsegError, one_line, unwrapped
from medseg.inference.cases import channel_case
from medseg.inference.fit import fit_problems
from medseg.io.geometry import Geometry
from medseg.io.image import (
    SourceImage,
    case_name,
    image_suffix,
    label_map_dtype,
    label_map_source,
    list_images,
    read_geometry,
    read_source,
    write_label_map,
)
from medseg.labels import is_lesion_name
from medseg.layout import WEIGHTS_FILE
from medseg.plan import Plan, load_plan

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

def load_model(run_dir: str | os.PathLike[str], device: torch.device) -> tuple[Plan, torch.nn.Module]:
    """Load a bundle's (or run folder's) plan and weights, ``configs/plan.json`` and ``models/model.pt``,
    through the same factories its ``inference.json`` names.

    Raises
    ------
    BundleError
        Missing folder, plan or weights, or weights that do not fit the plan's network.
    """
    from medseg.networks import build_network, load_weights

    plan = load_plan(run_dir)
    network = load_weights(build_network(plan), Path(run_dir) / WEIGHTS_FILE, device)
    return plan, network


def check_fit(plan: Plan, path: Path, geometry: Geometry, pixels: np.ndarray | None,
              modality: str | None = None, strict: bool = False, subject: str | None = None) -> list[str]:
    """Check that the model fits an input (:func:`medseg.inference.fit.fit_problems`): log one
    warning per problem naming ``path`` (and ``subject``, e.g. the DICOM series), or with
    ``strict`` refuse. Returns the problems.

    Raises
    ------
    InputError
        With ``strict``, if there is any problem (all of them in the one message).
    """
    problems = fit_problems(plan, geometry, pixels, modality)
    prefix = f"{subject}: " if subject else ""
    if problems and strict:
        raise InputError(path, prefix + "; ".join(problems) + " (refused by --strict)")
    for problem in problems:
        log.warning("%s: %s%s", path, prefix, problem)
    return problems


def lesion_labels(plan: Plan) -> list[int]:
    """Labels written as instances by ``--instances``: lesion-like names (lesion, tumour, ...)."""
    return [k for k, v in plan.labels.items() if k != 0 and is_lesion_name(v)]


def channel_plan(plan: Plan, channel: int) -> Plan:
    """``plan`` as seen by the checks of one input channel (:func:`check_fit`): that channel's name as the
    modality and its intensity preset."""
    if plan.num_channels == 1:
        return plan
    spec = plan.input_channels[channel]
    return dataclasses.replace(plan, modality=spec.name, intensity=spec.intensity, channels=())


@dataclass
class LoadedImage:
    """An input preprocessed by :meth:`Predictor.load`: the image as read (the first channel's, whose grid
    the label map takes), every channel as read, and the MONAI data dict (``"image"``, which remembers the
    transforms to invert)."""

    source: SourceImage
    data: dict[str, Any]
    channels: tuple[SourceImage, ...] = ()

    @property
    def geometry(self) -> Geometry:
        return self.source.geometry


class LabelMapPredictor(Protocol):
    """What the cohort, series and Ray engines use of a predictor: :class:`Predictor`, or an ensemble across
    configurations (:class:`medseg.inference.configurations.ConfigurationEnsemble`)."""

    def load(self, image: Any, name: str = "image") -> LoadedImage: ...

    def infer(self, loaded: LoadedImage) -> np.ndarray: ...

    def write(self, labels: np.ndarray, source: Any, output_path: Path, instances_path: Path | None = None,
              instance_labels: Sequence[int] | None = None, min_lesion_ml: float = 0.0) -> Path: ...


class PreviousStage(Protocol):
    """Where a cascade stage gets the previous stage's label map of an input (its channels as read)."""

    def label_map(self, sources: Sequence[SourceImage]) -> SourceImage | Path: ...


class PreviousMaps:
    """The previous stage's label maps of a cascade stage, one file per case (``<case>_seg.<ending>`` in ``folder``:
    the out-of-fold predictions a fold of the stage was trained and cross-validated on), found by the case name of
    an input."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def label_map(self, sources: Sequence[SourceImage]) -> Path:
        """The label map of the case of ``sources`` (its first channel's file).

        Raises
        ------
        InputError
            No label map of that case here (naming the image and the folder).
        """
        source = sources[0]
        where = source.path or source.name
        name = source.name if source.path is None else case_name(source.path)
        parsed = channel_case(Path(str(source.path))) if source.path is not None else None
        wanted = {f"{c}_seg" for c in {name} | ({parsed[0]} if parsed else set())}
        if self.folder.is_dir():
            for path in list_images(self.folder):
                if case_name(path) in wanted:
                    return path
        raise InputError(where, f"a cascade stage takes the previous stage's label map of this image, and "
                                f"{self.folder} has none of case {name}: a fold of a cascade predicts the cases of "
                                "its cross-validation; predict others with the cross-validation run (medseg select "
                                "makes it a bundle with the previous stage's model)")


class PreviousModel:
    """The previous stage's label map of an input predicted by its model (a predictor made once, on first use, by
    ``factory``), on the input's grid."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.predictor: LabelMapPredictor | None = None

    def label_map(self, sources: Sequence[SourceImage]) -> SourceImage:
        """The previous stage's label map of the image ``sources`` (its channels), in memory on its grid.

        Raises
        ------
        InputError
            As the previous stage's predictor (``load`` and ``infer``).
        """
        if self.predictor is None:
            self.predictor = self.factory()
        assert self.predictor is not None
        image: Any = list(sources) if len(sources) > 1 else sources[0]
        labels = self.predictor.infer(self.predictor.load(image))
        return label_map_source(labels, sources[0])


class Predictor:
    """Predicts label maps with a model's plan, network and inference parts.

    ``preprocessing``, ``inferer`` and ``postprocessing`` are the parts of ``configs/inference.json``
    (:mod:`medseg.bundle.pipeline` builds them from it); each one left out is made by the factory the
    config names: :func:`medseg.transforms.preprocessing`,
    :func:`medseg.inference.compose.sliding_window_inferer` (with ``overlap``, ``sw_batch_size``,
    ``progress`` (None: when stderr is a terminal), ``tta``, ``output``, ``precision``) and
    :func:`medseg.inference.compose.inference_postprocessing` (inversion only, no writer). A cascade stage's plan
    (:attr:`~medseg.plan.Plan.previous_stage`) takes the previous stage's label map of each image from ``previous``.

    Raises
    ------
    InputError
        A bad overlap, window batch size, output or precision (see the inferer factory).
    """

    def __init__(self, plan: Plan, network: torch.nn.Module, device: torch.device, overlap: float = 0.5,
                 sw_batch_size: int | None = None, progress: bool | None = None, tta: bool = False,
                 output: str = "auto", precision: str = "float32", *, preprocessing: Any = None,
                 inferer: Any = None, postprocessing: Any = None, previous: PreviousStage | None = None) -> None:
        from medseg.inference.compose import inference_postprocessing, sliding_window_inferer
        from medseg.transforms import preprocessing as preprocessing_chain

        self.plan, self.network, self.device = plan, network, device
        self.previous = previous
        if inferer is None:
            progress = sys.stderr.isatty() if progress is None else progress
            inferer = sliding_window_inferer(plan, overlap, sw_batch_size, progress, tta, output, precision)
        self.inferer = inferer
        self.preprocessing = preprocessing if preprocessing is not None else preprocessing_chain(plan, ("image",))
        self.postprocessing = (postprocessing if postprocessing is not None
                               else inference_postprocessing(plan, self.preprocessing))

    @property
    def output(self) -> str:
        """What the inferer hands to the inversion (:class:`~medseg.inference.inferer.SlabInferer`'s ``output``)."""
        return self.inferer.output

    @output.setter
    def output(self, value: str) -> None:
        from medseg.inference.inferer import OUTPUTS

        if value not in OUTPUTS:
            raise InputError(None, f"output must be one of {', '.join(OUTPUTS)}, got {value!r}")
        self.inferer.output = value

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str], device: str = "cpu", overlap: float = 0.5,
                 sw_batch_size: int | None = None, tta: bool = False, precision: str = "float32") -> Predictor:
        """A predictor of a bundle or run folder from the factories its ``inference.json`` names, without
        reading the config (the library door; ``medseg predict`` reads it: :mod:`medseg.bundle.pipeline`).

        Raises
        ------
        InputError
            A bad device, overlap, window batch size or precision.
        BundleError
            A bad run folder.
        """
        from medseg.devices import resolve_device
        from medseg.inference.compose import sliding_window_inferer
        from medseg.networks import build_network, load_weights

        plan = load_plan(run_dir)
        inferer = sliding_window_inferer(plan, overlap, sw_batch_size, sys.stderr.isatty(), tta, "auto", precision)
        torch_device = resolve_device(device)
        network = load_weights(build_network(plan), Path(run_dir) / WEIGHTS_FILE, torch_device)
        return cls(plan, network, torch_device, inferer=inferer)

    def _source(self, image: SourceImage | sitk.Image | str | os.PathLike[str], name: str) -> SourceImage:
        if isinstance(image, sitk.Image):
            return SourceImage.from_image(image, name)
        if isinstance(image, SourceImage):
            return image
        return read_source(image, self.plan.dims)

    def load(self, image: SourceImage | sitk.Image | str | os.PathLike[str]
             | Sequence[SourceImage | sitk.Image | str | os.PathLike[str]], name: str = "image") -> LoadedImage:
        """Preprocess one image: in memory (a SimpleITK image is called ``name``), or a file, read here; for a
        model of several input channels, a sequence of them, one per channel in the plan's order.

        Raises
        ------
        InputError
            Unreadable, truncated or wrong-dimensional image; another number of images than the model's
            input channels; channels on different grids (naming the file); for a cascade stage, no label map of the
            previous stage for the image.
        """
        images: list[Any] = list(image) if isinstance(image, (list, tuple)) else [image]
        sources = [self._source(item, name) for item in images]
        source = sources[0]
        if len(sources) != self.plan.num_channels:
            names = ", ".join(c.name for c in self.plan.input_channels)
            raise InputError(source.path or source.name, f"{len(sources)} image(s) given, the model takes "
                                                         f"{self.plan.num_channels} input channel(s) ({names})")
        item: dict[str, Any] = {"image": sources if len(sources) > 1 else source}
        if self.plan.previous_stage:
            if self.previous is None:
                raise InputError(source.path or source.name, "a cascade stage needs the previous stage's label map "
                                                             "of the image; this predictor has none")
            item["previous"] = self.previous.label_map(sources)
        with unwrapped(lambda cause: InputError(source.path or source.name, "cannot read or preprocess this image "
                                                f"({type(cause).__name__}: {one_line(cause)})")):
            data = self.preprocessing(item)
        return LoadedImage(source, data, tuple(sources))

    def infer(self, loaded: LoadedImage) -> np.ndarray:
        """Label map (index order of the input) of an input :meth:`load` returned, stored as
        :func:`medseg.io.image.label_map_dtype` says for the plan's labels.

        Raises
        ------
        InputError
            NaN/Inf voxels (found by the inferer), or not enough memory.
        """
        import torch

        data, where = loaded.data, loaded.source.path or loaded.source.name
        try:
            with torch.inference_mode():
                data["pred"] = self.inferer(data["image"][None].to(self.device), self.network)[0].cpu()
        except InputError as exc:  # NaN/Inf voxels (checked by the inferer, a few planes at a time), memory
            if exc.path is not None:
                raise
            raise InputError(where, exc.problem) from exc
        labels = self.postprocessing(data)["pred"][0].numpy()
        if tuple(labels.shape) != loaded.geometry.size:
            raise MedsegError(f"{where}: internal error, inverted prediction has shape {labels.shape}, "
                              f"input has {loaded.geometry.size}")
        return labels.astype(label_map_dtype(self.plan.num_classes - 1))

    def predict_image(self, image: SourceImage | sitk.Image | Sequence[SourceImage | sitk.Image],
                      name: str = "image") -> np.ndarray:
        """Label map (index order ``(x, y, z)``) of an image in memory (one per input channel for a model of
        several): :meth:`infer` of :meth:`load`.

        Raises
        ------
        InputError
            As :meth:`load` and :meth:`infer`.
        """
        return self.infer(self.load(image, name))

    def predict_array(self, image_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> np.ndarray:
        """Label map (index order of the file) of an image file, read once (one file per input channel for a
        model of several).

        Raises
        ------
        InputError
            As :meth:`load` and :meth:`infer`.
        """
        given: list[Any] = list(image_path) if isinstance(image_path, (list, tuple)) else [image_path]
        paths = [Path(p) for p in given]
        return self.infer(self.load(paths))

    def lesion_labels(self) -> list[int]:
        """Labels written as instances by ``--instances``: lesion-like names (lesion, tumour, ...)."""
        return lesion_labels(self.plan)

    def write(self, labels: np.ndarray, source: SourceImage | str | os.PathLike[str], output_path: Path,
              instances_path: Path | None = None, instance_labels: Sequence[int] | None = None,
              min_lesion_ml: float = 0.0) -> Path:
        """Write a label map atomically in the input's geometry and format (a :class:`SourceImage` is not
        read again); with ``instances_path`` also an instance map (one id per connected lesion of
        ``instance_labels``)."""
        written = write_label_map(labels, source, output_path)
        if instances_path is not None:
            from medseg.metrics.lesions import instance_map

            values = list(instance_labels) if instance_labels is not None else self.lesion_labels()
            geometry = source.geometry if isinstance(source, SourceImage) else read_geometry(source)
            instances = instance_map(labels, values, geometry.spacing, min_volume_ml=min_lesion_ml)
            write_label_map(instances, source, instances_path)
            log.info("%s: %d lesion instance(s) of label(s) %s", Path(str(source)).name, int(instances.max()), values)
        return written

    def predict_file(self, image_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], output_path: Path,
                     instances_path: Path | None = None, instance_labels: Sequence[int] | None = None,
                     min_lesion_ml: float = 0.0) -> Path:
        """Predict one image file (read once; one file per input channel for a model of several) and write its
        label map (and instance map) with :meth:`write`, on the (first) file's grid."""
        paths: list[Any] = list(image_path) if isinstance(image_path, (list, tuple)) else [image_path]
        sources = [read_source(p, self.plan.dims) for p in paths]
        return self.write(self.predict_image(sources if len(sources) > 1 else sources[0]), sources[0], output_path,
                          instances_path, instance_labels, min_lesion_ml)


def collect_inputs(input_path: str | os.PathLike[str]) -> list[Path]:
    """One image file, or every image file in a folder.

    Raises
    ------
    InputError
        Missing path, non-image file, empty folder.
    """
    path = Path(input_path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        return list_images(path)
    if image_suffix(path) is None:
        raise InputError(path, "not a supported image file (expected .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd)")
    return [path]
