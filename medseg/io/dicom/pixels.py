"""Reading a series' pixel data: the volume in modality units, the source data sets, decode checks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medseg.errors import DicomError
from medseg.io.dicom.headers import PIXEL_TAGS, decodable, one_line, quiet_pydicom, read_header, short
from medseg.io.dicom.planes import first_item, number_of_frames
from medseg.io.dicom.series import DicomSeries, refuse_problems

log = logging.getLogger("medseg.io.dicom")


def _load(path: Path, series: DicomSeries) -> Dataset:
    """Read a whole instance (pixel data included); DicomError naming the series and the file."""
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001
        raise DicomError(path, f"series {series.series_uid}: unreadable ({short(exc)})") from None
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise DicomError(path, f"series {series.series_uid}: no pixel data")
    return _with_transfer_syntax(ds)


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """``ds`` with a file meta TransferSyntaxUID (files without meta: the encoding they were read in)."""
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        implicit, _ = ds.original_encoding
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _decode(ds: Dataset, path: Path, series: DicomSeries) -> np.ndarray:
    """ds.pixel_array, with DicomError naming the series and the file and giving the decoders' whole
    reason on one line when it cannot be decoded."""
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if not decodable(ts):
        raise DicomError(path, f"series {series.series_uid}: transfer syntax {ts.name} ({ts}) cannot be decoded "
                               "(no installed pydicom pixel-data plugin supports it)")
    try:
        with quiet_pydicom():
            return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, ...
        raise DicomError(path, f"series {series.series_uid}: cannot decode the pixel data ({ts.name}): "
                               f"{one_line(exc)}") from None


def _pixels(ds: Dataset, path: Path, series: DicomSeries) -> np.ndarray:
    """Decoded stored values of every frame: (frames, rows, columns)."""
    array = _decode(ds, path, series)
    frames = number_of_frames(ds)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3 or array.shape[0] != frames:
        raise DicomError(path, f"series {series.series_uid}: decoded pixel data of shape {array.shape} does not "
                               f"match {frames} greyscale frame(s)")
    return array


def _rescale(ds: Dataset, frame: int, path: Path, series: DicomSeries) -> tuple[float, float]:
    """(slope, intercept) of a frame: per-frame, shared or top-level Pixel Value Transformation.

    Raises
    ------
    DicomError
        A slope or intercept that is not a finite number, or a slope of 0.
    """
    items = []
    if ds.get("PerFrameFunctionalGroupsSequence"):
        items.append(first_item(ds.PerFrameFunctionalGroupsSequence[frame], "PixelValueTransformationSequence"))
    if ds.get("SharedFunctionalGroupsSequence"):
        items.append(first_item(ds.SharedFunctionalGroupsSequence[0], "PixelValueTransformationSequence"))
    items.append(ds)
    for item in items:
        if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
            try:
                slope, intercept = float(item.RescaleSlope), float(item.RescaleIntercept)
            except (TypeError, ValueError):
                slope = intercept = float("nan")
            if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
                raise DicomError(path, f"series {series.series_uid}: RescaleSlope {item.RescaleSlope!s} / "
                                       f"RescaleIntercept {item.RescaleIntercept!s} is not a usable rescale")
            return slope, intercept
    return 1.0, 0.0


def source_datasets(series: DicomSeries, pixels: bool = True) -> list[Dataset]:
    """The source instances in the slice order of :func:`read_series` (one data set for a multi-frame
    series: its frames in :attr:`DicomSeries.frame_order`); with ``pixels=False`` their headers only, read
    up to the pixel data (what the DICOM SEG and RTSTRUCT writers need, without holding the series' pixel
    bytes a second time), the pixel data still checked for presence and truncation.

    Raises
    ------
    DicomError
        The series has blocking problems, or a file is unreadable, has no pixel data or (headers only)
        is truncated.
    """
    refuse_problems(series)
    with quiet_pydicom():
        return _source_datasets(series, pixels)


def _source_datasets(series: DicomSeries, pixels: bool) -> list[Dataset]:
    if pixels:
        return [_load(path, series) for path in series.files]
    datasets = []
    for path in series.files:
        header, reason = read_header(path, raw=True)
        if header is None:
            raise DicomError(path, f"series {series.series_uid}: {reason}")
        if header.pixel_problem:
            raise DicomError(path, f"series {series.series_uid}: {header.pixel_problem}")
        datasets.append(_with_transfer_syntax(header.ds))
    return datasets


def read_series(series: DicomSeries) -> sitk.Image:
    """Read a series as a 3D float32 image in modality units (rescale applied) with its geometry.

    z index k is ``series.files[k]`` (single-frame) or frame ``series.frame_order[k]`` (multi-frame).

    Raises
    ------
    DicomError
        The series has blocking problems (its geometry then is known and usable), or a file is
        truncated, has no pixel data, cannot be decoded, has an unusable rescale or does not match the
        series size (the message names the series and the file).
    """
    refuse_problems(series)
    if series.origin is None or series.direction is None or None in series.spacing:
        raise DicomError(series.files[0], f"series {series.series_uid}: its geometry is unknown")
    with quiet_pydicom():
        image = _volume(series)
    log.info("read series %s: %s %dx%dx%d, spacing %s mm", series.series_uid, series.modality, *series.size,
             "(" + ", ".join(f"{v:.4g}" for v in series.spacing) + ")")
    return image


def _volume(series: DicomSeries) -> sitk.Image:
    columns, rows, slices = series.size
    volume = np.empty((slices, rows, columns), dtype=np.float32)
    if series.multiframe:
        path = series.files[0]
        ds = _load(path, series)
        stored = _pixels(ds, path, series)
        for k, frame in enumerate(series.frame_order):
            slope, intercept = _rescale(ds, frame, path, series)
            volume[k] = _checked(stored[frame], rows, columns, path, series).astype(np.float64) * slope + intercept
    else:
        for k, path in enumerate(series.files):
            ds = _load(path, series)
            stored = _checked(_pixels(ds, path, series)[0], rows, columns, path, series)
            slope, intercept = _rescale(ds, 0, path, series)
            volume[k] = stored.astype(np.float64) * slope + intercept
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(series.spacing)
    image.SetOrigin(series.origin)
    image.SetDirection(series.direction)
    return image


def _checked(frame: np.ndarray, rows: int, columns: int, path: Path, series: DicomSeries) -> np.ndarray:
    if frame.shape != (rows, columns):
        raise DicomError(path, f"series {series.series_uid}: a {frame.shape[1]}x{frame.shape[0]} image in a "
                               f"{columns}x{rows} series")
    return frame


def decode_series(series: DicomSeries) -> tuple[int, list[tuple[Path, str]]]:
    """Decode every frame of every file of a series (problems or not), for ``medseg inspect --decode``.

    Returns
    -------
    frames, failures
        The number of frames decoded, and (file, reason) for each file that failed; the reason is
        the decoders' whole message, on one line.
    """
    decoded, failures = 0, []
    for path in series.files:
        try:
            with quiet_pydicom():
                ds = _load(path, series)
                _decode(ds, path, series)
                decoded += number_of_frames(ds)
        except DicomError as exc:
            failures.append((path, exc.problem.removeprefix(f"series {series.series_uid}: ")))
    return decoded, failures
