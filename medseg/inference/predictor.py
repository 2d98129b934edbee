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

:func:`predict_files` predicts image files: every input is read once (:func:`medseg.io.image.read_source`)
and checked (header, pixels, whether the model fits it: :mod:`medseg.inference.fit`) before the model is
loaded, and kept in memory for the prediction up to :data:`HELD_BYTES` together. This module imports torch
and MONAI only in the functions that predict, so bad input is answered before that; progress lines
(``[1/3] scan.nii.gz -> ...``) are logged only once every input has been read. For a model of several
input channels the inputs are cases of channel files in nnU-Net's layout (:mod:`medseg.inference.cases`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError, MedsegError, one_line, unwrapped
from medseg.inference.cases import InputCase, collect_cases
from medseg.inference.fit import fit_problems
from medseg.io.geometry import Geometry
from medseg.io.image import (
    SourceImage,
    image_suffix,
    label_map_dtype,
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

#: Inputs read for the checks before the model is loaded stay in memory up to this many bytes together;
#: the rest are read again when their turn comes.
HELD_BYTES = 1 << 30


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


class Predictor:
    """Predicts label maps with a model's plan, network and inference parts.

    ``preprocessing``, ``inferer`` and ``postprocessing`` are the parts of ``configs/inference.json``
    (:mod:`medseg.bundle.pipeline` builds them from it); each one left out is made by the factory the
    config names: :func:`medseg.transforms.preprocessing`,
    :func:`medseg.inference.compose.sliding_window_inferer` (with ``overlap``, ``sw_batch_size``,
    ``progress`` (None: when stderr is a terminal), ``tta``, ``output``, ``precision``) and
    :func:`medseg.inference.compose.inference_postprocessing` (inversion only, no writer).

    Raises
    ------
    InputError
        A bad overlap, window batch size, output or precision (see the inferer factory).
    """

    def __init__(self, plan: Plan, network: torch.nn.Module, device: torch.device, overlap: float = 0.5,
                 sw_batch_size: int | None = None, progress: bool | None = None, tta: bool = False,
                 output: str = "auto", precision: str = "float32", *, preprocessing: Any = None,
                 inferer: Any = None, postprocessing: Any = None) -> None:
        from medseg.inference.compose import inference_postprocessing, sliding_window_inferer
        from medseg.transforms import preprocessing as preprocessing_chain

        self.plan, self.network, self.device = plan, network, device
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
            input channels; channels on different grids (naming the file).
        """
        images: list[Any] = list(image) if isinstance(image, (list, tuple)) else [image]
        sources = [self._source(item, name) for item in images]
        source = sources[0]
        if len(sources) != self.plan.num_channels:
            names = ", ".join(c.name for c in self.plan.input_channels)
            raise InputError(source.path or source.name, f"{len(sources)} image(s) given, the model takes "
                                                         f"{self.plan.num_channels} input channel(s) ({names})")
        with unwrapped(lambda cause: InputError(source.path or source.name, "cannot read or preprocess this image "
                                                f"({type(cause).__name__}: {one_line(cause)})")):
            data = self.preprocessing({"image": sources if len(sources) > 1 else source})
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


def _instance_values(plan: Plan, model: Path | None, instance_labels: Sequence[int] | None) -> list[int]:
    values = list(instance_labels) if instance_labels is not None else lesion_labels(plan)
    unknown = sorted(set(values) - set(plan.labels) | ({0} & set(values)))
    if not values or unknown:
        raise InputError(model, "--instances: " + (f"labels {unknown} are not foreground labels of this model"
                         if unknown else "the model has no lesion label; name them with --instance-labels"))
    return values


def _targets(cases: list[InputCase], output_dir: Path, overwrite: bool, instances: bool,
             input_path: str | os.PathLike[str]) -> list[tuple[Path, Path | None]]:
    """``(label map, instance map or None)`` of every case, checked: no input overwritten, no existing file
    (unless ``overwrite``), no two cases onto one output."""
    planned: list[tuple[Path, Path | None]] = []
    input_set = {p.resolve() for case in cases for p in case.files}
    for case in cases:
        targets = [output_dir / case.output_name()] + ([output_dir / case.output_name("instances")] if instances else [])
        for target in targets:
            if target.resolve() in input_set:
                raise InputError(target, "would overwrite an input image; choose another --output folder")
            if target.exists() and not overwrite:
                raise InputError(target, "already exists; pass --overwrite to replace it")
        planned.append((targets[0], targets[1] if instances else None))
    names = [t.name for t, _ in planned]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise InputError(Path(input_path), f"several inputs would be written to the same output: {', '.join(clashes)}")
    return planned


def _read_case(plan: Plan, case: InputCase, strict: bool) -> list[SourceImage]:
    """Every channel of ``case`` read once and checked: on the first channel's grid, and (:func:`check_fit`)
    fitting the model's channel.

    Raises
    ------
    InputError
        As :func:`medseg.io.image.read_source`; a channel on another grid; with ``strict``, a misfit.
    """
    sources: list[SourceImage] = []
    for channel, path in enumerate(case.files):
        source = read_source(path, plan.dims)
        if sources:
            problem = sources[0].geometry.mismatch(source.geometry)
            if problem is not None:
                raise InputError(path, f"is not on the grid of the case's first channel {case.first.name}: "
                                       f"{problem}; the channels of a case must share one grid")
        check_fit(channel_plan(plan, channel), path, source.geometry, source.voxels().T, strict=strict)
        sources.append(source)
    return sources


def predict_files(plan: Plan, load_predictor: Callable[[], Predictor], input_path: str | os.PathLike[str],
                  output_dir: str | os.PathLike[str], *, overwrite: bool = False, instances: bool = False,
                  instance_labels: Sequence[int] | None = None, strict: bool = False,
                  model: str | os.PathLike[str] | None = None) -> list[Path]:
    """Predict every input image into ``output_dir`` as ``<case>_seg.<ending>``
    (:func:`medseg.io.image.output_name`) with the :class:`Predictor` that ``load_predictor`` makes for
    ``plan`` (called once every input has been checked). For a model of several input channels the inputs
    are cases of channel files in nnU-Net's layout, ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...
    (:func:`medseg.inference.cases.collect_cases`), written as ``CASE_seg.<ending>`` on the first
    channel's grid.

    Every input is read once and checked before the model is loaded: header, pixel data, and whether
    the model fits it (:func:`check_fit`: modality-like intensities and voxel spacing against the plan; a
    warning per problem, or with ``strict`` an error). If any case fails later, the outputs this call
    already wrote are removed again, so a failed call leaves nothing behind.

    With ``instances``, an instance map ``<case>_instances.<ending>`` (one id per connected
    component of the lesion labels, or of ``instance_labels``) is written beside each label map.

    Raises
    ------
    InputError
        Bad inputs (see :func:`medseg.inference.cases.collect_cases`, :func:`medseg.io.image.read_source`:
        a case with a missing channel file, channels on different grids), an output that
        would overwrite an input or an existing file (unless ``overwrite``), ``instances`` for a
        model (``model``, named in the message) without lesion labels, unknown ``instance_labels``;
        with ``strict``, an input the model does not fit; from the predictor, bad options.
    BundleError
        From ``load_predictor``: a bad bundle.
    """
    cases = collect_cases(input_path, plan)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(output_dir, "exists and is not a folder")
    values = _instance_values(plan, None if model is None else Path(model), instance_labels) if instances else None
    planned = _targets(cases, output_dir, overwrite, instances, input_path)
    held_cases: list[list[SourceImage] | None] = []
    held = 0
    for case in cases:  # each read once: header, pixels (truncation, NaN), grids, and does the model fit?
        sources = _read_case(plan, case, strict)
        held += sum(s.nbytes for s in sources)
        held_cases.append(sources if held <= HELD_BYTES else None)  # beyond: read again when its turn comes
        del sources

    predictor = load_predictor()
    created_dir = not output_dir.exists()
    written: list[Path] = []
    try:
        for index, (case, (target, instance_target)) in enumerate(zip(cases, planned), 1):
            sources = held_cases[index - 1] or [read_source(p, plan.dims) for p in case.files]
            held_cases[index - 1] = None
            loaded = predictor.load(sources)
            for source in sources:
                source.drop_pixels()  # preprocessed: the label maps need only the first one's grid and header
            log.info("[%d/%d] %s -> %s", index, len(planned), case.first.name if len(case.files) == 1
                     else f"{case.name} ({len(case.files)} channels)", target)
            labels = predictor.infer(loaded)
            del loaded
            fresh = [p for p in (target, instance_target) if p is not None and not p.exists()]
            written.extend(fresh)  # removed again if this case fails half-way
            predictor.write(labels, sources[0], target, instance_target, values)
            del sources
    except BaseException:
        for path in written:
            _remove_image(path)
        if created_dir and output_dir.exists() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    return [t for t, _ in planned]


def _remove_image(path: Path) -> None:
    """Remove an output image (and the data file of a two-file format)."""
    path.unlink(missing_ok=True)
    if image_suffix(path) in (".mhd", ".nhdr"):
        stem = path.name[: -len(image_suffix(path) or "")]
        for sibling in path.parent.glob(stem + ".*raw*"):
            sibling.unlink(missing_ok=True)
