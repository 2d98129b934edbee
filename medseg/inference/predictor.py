"""Sliding-window prediction in the input's own space and format.

For each input: check it (header, pixels, and whether the model fits it: :mod:`medseg.inference.fit`)
-> load with MONAI (geometry in the metadata) -> the plan's preprocessing (RAS, target spacing,
body crop, intensity) -> bounded-memory sliding-window inference with Gaussian blending
(:class:`medseg.inference.inferer.SlabInferer`, optionally mirrored) -> ``Invertd`` (undo crop,
spacing and orientation: softmax probabilities resampled linearly then argmax; when classes x
voxels do not fit in 1 GB, the probabilities wait on disk in float16 and are resampled one class at
a time) -> label map written with exactly the input's shape, spacing, origin and direction.

Every input is checked before the model is loaded (this module imports torch and MONAI only in
the functions that predict), so bad input is answered before that; progress lines
(``[1/3] scan.nii.gz -> ...``) are logged only once an input has been read, so an unreadable
input's error stays the one line.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import BundleError, InputError, MedsegError, one_line, root_cause
from medseg.inference.fit import fit_problems
from medseg.io.image import (
    Geometry,
    case_name,
    image_suffix,
    list_images,
    read_geometry,
    read_image,
    write_label_map,
)
from medseg.labels import is_lesion_name
from medseg.layout import META_FILE, WEIGHTS_FILE
from medseg.logs import held_info
from medseg.plan import Plan, load_plan

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def output_name(image: Path, kind: str = "seg") -> str:
    """``<case>_seg.<same ending>`` (or ``_instances``) for an input image file."""
    return f"{case_name(image)}_{kind}{image_suffix(image)}"


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


def _check_options(overlap: float, sw_batch_size: int | None) -> None:
    if not 0.0 <= overlap < 1.0:
        raise InputError(None, f"--overlap must be in [0, 1), got {overlap}")
    if sw_batch_size is not None and sw_batch_size < 1:
        raise InputError(None, f"--sw-batch-size must be >= 1, got {sw_batch_size}")


@dataclass
class LoadedImage:
    """An input read and preprocessed by :meth:`Predictor.load`: the MONAI data dict (``"image"``),
    the chain that made it (inverted after inference) and the input file's grid."""

    path: Path
    data: dict[str, Any]
    preprocessing: Any  # monai.transforms.Compose
    geometry: Geometry


@dataclass
class Predictor:
    """Predicts label maps for images with a trained run folder's plan and weights."""

    plan: Plan
    network: torch.nn.Module
    device: torch.device
    overlap: float = 0.5
    sw_batch_size: int | None = None
    progress: bool | None = None
    tta: bool = False
    output: str = "auto"  # what the inferer hands to the inversion (SlabInferer's output)
    precision: str = "float32"  # or "bfloat16": the network under autocast

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str], device: str = "cpu", overlap: float = 0.5,
                 sw_batch_size: int | None = None, tta: bool = False, precision: str = "float32") -> Predictor:
        """Raises InputError for a bad device, overlap, window batch size or precision, BundleError for a bad
        run folder."""
        from medseg.devices import resolve_device
        from medseg.inference.inferer import PRECISIONS

        _check_options(overlap, sw_batch_size)
        if precision not in PRECISIONS:
            raise InputError(None, f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        torch_device = resolve_device(device)
        plan, network = load_model(run_dir, torch_device)
        return cls(plan, network, torch_device, overlap, sw_batch_size, tta=tta, precision=precision)

    def load(self, image_path: Path) -> LoadedImage:
        """Read one image and apply the plan's preprocessing.

        Raises
        ------
        InputError
            Unreadable, truncated or wrong-dimensional image.
        """
        from medseg.transforms import preprocessing

        geometry = read_geometry(image_path, self.plan.dims)
        pre = preprocessing(self.plan, ("image",))
        try:
            data = pre({"image": str(image_path)})
        except MedsegError:
            raise
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
            cause = root_cause(exc)
            if isinstance(cause, MedsegError):
                raise cause from exc
            raise InputError(image_path, f"cannot read or preprocess this image ({type(cause).__name__}: "
                                         f"{one_line(cause)})") from exc
        return LoadedImage(Path(image_path), data, pre, geometry)

    def infer(self, loaded: LoadedImage) -> np.ndarray:
        """Label map (index order of the input file) of an input :meth:`load` returned.

        Raises
        ------
        InputError
            NaN/Inf voxels (found by the inferer), or not enough memory.
        """
        import torch

        from medseg.bundle.components import (
            inference_postprocessing,
            sliding_window_inferer,
        )

        data, image_path = loaded.data, loaded.path
        image = data["image"]
        progress = self.progress if self.progress is not None else sys.stderr.isatty()
        inferer = sliding_window_inferer(self.plan, self.overlap, self.sw_batch_size, progress, tta=self.tta,
                                         output=self.output, precision=self.precision)
        try:
            with torch.inference_mode():
                data["pred"] = inferer(image[None].to(self.device), self.network)[0].cpu()
        except InputError as exc:  # NaN/Inf voxels (checked by the inferer, a few planes at a time), memory
            if exc.path is not None:
                raise
            raise InputError(image_path, exc.problem) from exc
        labels = inference_postprocessing(self.plan, loaded.preprocessing)(data)["pred"][0].numpy()
        if tuple(labels.shape) != loaded.geometry.size:
            raise MedsegError(f"{image_path}: internal error, inverted prediction has shape {labels.shape}, "
                              f"input has {loaded.geometry.size}")
        return labels.astype(np.uint8 if self.plan.num_classes <= 256 else np.uint16)

    def predict_array(self, image_path: Path) -> np.ndarray:
        """Label map (index order of the input file) for one image: :meth:`infer` of :meth:`load`.

        Raises
        ------
        InputError
            As :meth:`load` and :meth:`infer`.
        """
        return self.infer(self.load(image_path))

    def lesion_labels(self) -> list[int]:
        """Labels written as instances by ``--instances``: lesion-like names (lesion, tumour, ...)."""
        return lesion_labels(self.plan)

    def write(self, labels: np.ndarray, image_path: Path, output_path: Path, instances_path: Path | None = None,
              instance_labels: Sequence[int] | None = None, min_lesion_ml: float = 0.0) -> Path:
        """Write a label map atomically in the input's geometry and format; with ``instances_path``
        also an instance map (one id per connected lesion of ``instance_labels``)."""
        written = write_label_map(labels, image_path, output_path)
        if instances_path is not None:
            from medseg.metrics.lesions import instance_map

            values = list(instance_labels) if instance_labels is not None else self.lesion_labels()
            spacing = read_geometry(image_path).spacing
            instances = instance_map(labels, values, spacing, min_volume_ml=min_lesion_ml)
            write_label_map(instances, image_path, instances_path)
            log.info("%s: %d lesion instance(s) of label(s) %s", image_path.name, int(instances.max()), values)
        return written

    def predict_file(self, image_path: Path, output_path: Path, instances_path: Path | None = None,
                     instance_labels: Sequence[int] | None = None, min_lesion_ml: float = 0.0) -> Path:
        """Predict one image and write its label map (and instance map) with :meth:`write`."""
        return self.write(self.predict_array(image_path), image_path, output_path, instances_path,
                          instance_labels, min_lesion_ml)


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


def predict(run_dir: str | os.PathLike[str], input_path: str | os.PathLike[str], output_dir: str | os.PathLike[str],
            device: str = "cpu", overlap: float = 0.5, overwrite: bool = False,
            sw_batch_size: int | None = None, instances: bool = False,
            instance_labels: Sequence[int] | None = None, tta: bool = False,
            precision: str = "float32", strict: bool = False) -> list[Path]:
    """Predict every input image into ``output_dir`` as ``<case>_seg.<ending>``.

    Every input is read and checked before the model is loaded: header, pixel data, and whether
    the model fits it (:func:`check_fit`: modality-like intensities and voxel spacing against the
    plan; a warning per problem, or with ``strict`` an error). If any case fails later, the outputs
    this call already wrote are removed again, so a failed call leaves nothing behind.

    With ``instances``, an instance map ``<case>_instances.<ending>`` (one id per connected
    component of the lesion labels, or of ``instance_labels``) is written beside each label map.
    ``tta`` averages the windows' predictions with their mirror images along every spatial axis;
    ``precision="bfloat16"`` runs the network under bfloat16 autocast.

    Raises
    ------
    InputError
        Bad inputs (see :func:`collect_inputs`, :meth:`Predictor.predict_array`), an output that
        would overwrite an input or an existing file (unless ``overwrite``), ``instances`` for a
        model without lesion labels, unknown ``instance_labels``, bad options; with ``strict``, an
        input the model does not fit.
    BundleError
        Bad run folder.
    """
    _check_options(overlap, sw_batch_size)
    inputs = collect_inputs(input_path)
    plan = load_plan(run_dir)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(output_dir, "exists and is not a folder")
    if instances:
        values = list(instance_labels) if instance_labels is not None else lesion_labels(plan)
        unknown = sorted(set(values) - set(plan.labels) | ({0} & set(values)))
        if not values or unknown:
            raise InputError(Path(run_dir), "--instances: " + (f"labels {unknown} are not foreground labels of this model"
                             if unknown else "the model has no lesion label; name them with --instance-labels"))
        instance_labels = values
    planned: list[tuple[Path, Path, Path | None]] = []
    geometries: list[Geometry] = []
    input_set = {p.resolve() for p in inputs}
    for image in inputs:
        geometries.append(read_geometry(image, plan.dims))
        targets = [output_dir / output_name(image)] + ([output_dir / output_name(image, "instances")] if instances else [])
        for target in targets:
            if target.resolve() in input_set:
                raise InputError(target, "would overwrite an input image; choose another --output folder")
            if target.exists() and not overwrite:
                raise InputError(target, "already exists; pass --overwrite to replace it")
        planned.append((image, targets[0], targets[1] if instances else None))
    names = [t.name for _, t, _ in planned]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise InputError(Path(input_path), f"several inputs would be written to the same output: {', '.join(clashes)}")
    for image, geometry in zip(inputs, geometries):  # pixels: truncated data, and does the model fit?
        pixels = read_image(image, plan.dims)  # the view below must not outlive it
        check_fit(plan, image, geometry, sitk.GetArrayViewFromImage(pixels), strict=strict)
        del pixels

    predictor = Predictor.from_run(run_dir, device, overlap, sw_batch_size, tta, precision)
    created_dir = not output_dir.exists()
    written: list[Path] = []
    try:
        for index, (image, target, instance_target) in enumerate(planned, 1):
            loaded = predictor.load(image)
            log.info("[%d/%d] %s -> %s", index, len(planned), image.name, target)
            labels = predictor.infer(loaded)
            del loaded
            fresh = [p for p in (target, instance_target) if p is not None and not p.exists()]
            written.extend(fresh)  # removed again if this case fails half-way
            predictor.write(labels, image, target, instance_target, instance_labels)
    except BaseException:
        for path in written:
            _remove_image(path)
        if created_dir and output_dir.exists() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    return [t for _, t, _ in planned]


def _remove_image(path: Path) -> None:
    """Remove an output image (and the data file of a two-file format)."""
    path.unlink(missing_ok=True)
    if image_suffix(path) in (".mhd", ".nhdr"):
        stem = path.name[: -len(image_suffix(path) or "")]
        for sibling in path.parent.glob(stem + ".*raw*"):
            sibling.unlink(missing_ok=True)



# --------------------------------------------------------------------------------------------
# DICOM series input (NIfTI, DICOM SEG or RTSTRUCT output)
# --------------------------------------------------------------------------------------------

#: Output formats of :func:`predict_dicom` and the file ending each gets after ``<name>``.
DICOM_OUTPUT_FORMATS: dict[str, str] = {"nifti": "_seg.nii.gz", "dicom-seg": "_seg.dcm", "rtstruct": "_rtstruct.dcm"}


def dicom_case_name(description: str, series_uid: str) -> str:
    """File-name stem for the outputs of a DICOM series: its SeriesDescription made file-safe
    (letters, digits, ``.``, ``_``, ``-``; at most 64 characters), else its SeriesInstanceUID.
    Never patient data."""
    import re

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", description or "").strip("._-")[:64].rstrip("._-")
    return name or series_uid


def bundle_metadata(run_dir: str | os.PathLike[str]) -> dict:
    """The bundle's ``configs/metadata.json`` (an empty dict if the run folder has none).

    Raises
    ------
    BundleError
        If the file exists but is not a JSON object.
    """
    import json

    path = Path(run_dir) / META_FILE
    if not path.is_file():
        log.warning("%s: no metadata.json; segment names come from the plan", path.parent)
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return meta


def predict_dicom(run_dir: str | os.PathLike[str], input_path: str | os.PathLike[str],
                  output_dir: str | os.PathLike[str], *, fmt: str = "nifti", series_uid: str | None = None,
                  modality: str | None = None, min_slices: int = 1, description: str | None = None,
                  device: str = "cpu", overlap: float = 0.5, overwrite: bool = False, tta: bool = False,
                  precision: str = "float32", sw_batch_size: int | None = None, strict: bool = False) -> list[Path]:
    """Segment one DICOM series (chosen by :func:`medseg.io.dicom.select_series`) of a folder.

    The series is read in modality units with its exact geometry, predicted like any image, and
    written into ``output_dir`` as ``<name><ending>`` (``name``: the series' description made
    file-safe, else its SeriesInstanceUID):

    * ``fmt="nifti"``: ``<name>_seg.nii.gz``, a label map in the series' geometry;
    * ``fmt="dicom-seg"``: ``<name>_seg.dcm``, one DICOM SEG (:func:`medseg.io.dicom_seg.write_dicom_seg`);
    * ``fmt="rtstruct"``: ``<name>_rtstruct.dcm``, one RT structure set (:func:`medseg.io.rtstruct.write_rtstruct`).

    Segment names and codes come from the bundle's ``configs/metadata.json`` ``"segments"``; the
    algorithm is identified as ``medseg <bundle name>`` with the bundle's version. Everything is
    checked before the prediction, including whether the model fits the series (:func:`check_fit`:
    its Modality and spacing against the plan; a warning per problem, an error with ``strict``);
    a failure leaves no output (and no new empty ``output_dir``).

    Returns
    -------
    list of Path
        The written file.

    Raises
    ------
    DicomError
        No DICOM image, no or an ambiguous series choice (the candidates are listed), a series with
        blocking problems, unreadable or truncated files, missing pixel data, NaN voxels.
    InputError
        Unknown ``fmt``, an output that exists (unless ``overwrite``), a 2D model, bad options; with
        ``strict``, a series the model does not fit.
    BundleError
        Bad run folder, or segments without SNOMED CT codes for ``fmt="dicom-seg"``.
    """
    import tempfile

    from medseg.errors import DicomError
    from medseg.io import dicom

    if fmt not in DICOM_OUTPUT_FORMATS:
        raise InputError(None, f"--format must be one of {', '.join(DICOM_OUTPUT_FORMATS)}, got {fmt!r}")
    with held_info():  # the scan's and reader's notes are printed only once the series has been read
        scan = dicom.scan_dicom(input_path)
        series = dicom.select_series(scan, series_uid=series_uid, modality=modality, min_slices=min_slices,
                                     description=description)
        _check_options(overlap, sw_batch_size)
        plan = load_plan(run_dir)
        if plan.dims != 3:
            raise InputError(Path(run_dir), f"is a {plan.dims}D model; DICOM series need a 3D model")
        meta = bundle_metadata(run_dir)
        segments = None
        if fmt != "nifti":
            from medseg.io.dicom_seg import segment_descriptions

            segments = segment_descriptions(meta, plan.labels, require_codes=fmt == "dicom-seg",
                                            source=Path(run_dir) / META_FILE)
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise InputError(output_dir, "exists and is not a folder")
        target = output_dir / (dicom_case_name(series.description, series.series_uid) + DICOM_OUTPUT_FORMATS[fmt])
        if target.exists() and not overwrite:
            raise InputError(target, "already exists; pass --overwrite to replace it")
        what = f"series {series.series_uid} ({series.modality}, {series.size[2]} slices)"
        image = dicom.read_series(series)
        check_fit(plan, Path(input_path), Geometry.of(image), sitk.GetArrayViewFromImage(image), series.modality,
                  strict, subject=what)
        sources = dicom.source_datasets(series, pixels=False) if fmt != "nifti" else []
    log.info("%s: %s -> %s", Path(input_path), what, target)
    predictor = Predictor.from_run(run_dir, device, overlap, sw_batch_size, tta, precision)
    created_dir = not output_dir.exists()
    try:
        with tempfile.TemporaryDirectory(prefix="medseg-dicom-") as tmp:
            volume = Path(tmp) / "series.mha"
            sitk.WriteImage(image, str(volume))
            try:
                labels = predictor.predict_array(volume)
            except InputError as exc:  # names the temporary file; the user knows the series
                raise DicomError(Path(input_path), f"{what}: {exc.problem}") from exc
            if fmt == "nifti":
                write_label_map(labels, volume, target)
            else:
                from medseg.io.dicom_seg import write_dicom_seg
                from medseg.io.rtstruct import write_rtstruct

                writer = write_dicom_seg if fmt == "dicom-seg" else write_rtstruct
                bundle_name = str(meta.get("name") or Path(run_dir).resolve().name)
                # (x, y, z) index order -> (slices, rows, columns) of the source instances
                writer(np.ascontiguousarray(labels.transpose(2, 1, 0)), sources, segments or {}, target,
                       algorithm_name=f"medseg {bundle_name}", algorithm_version=str(meta.get("version") or "unknown"))
    except BaseException:
        if created_dir and output_dir.exists() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    return [target]
