"""Synthetic DICOM series: any 3D SimpleITK image written as a CT or MR series with exact geometry.

The series is what a scanner export looks like: one file per slice (CT Image / MR Image IODs), or
one enhanced multi-frame file (legacy converted enhanced CT / MR image, made by highdicom from the
single-frame instances), uncompressed or in a lossless compressed transfer syntax, optionally with a
DICOMDIR. The patient is synthetic ("Phantom^Synthetic", id "PHANTOM001").

Geometry (the image's LPS grid)::

    slice k (z index k):  ImagePositionPatient = origin + k * spacing[2] * direction[:, 2]
    ImageOrientationPatient = direction[:, 0] (row direction), direction[:, 1] (column direction)
    PixelSpacing = (spacing[1], spacing[0])   (between rows, between columns)
    SliceThickness = spacing[2]

Typical use in tests::

    files, image, label = phantom_series(tmp_path / "ct", modality="ct", seed=0, size=48)
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from medseg.data.synthetic.grid import Grid, random_grid
from medseg.data.synthetic.phantom import make_phantom
from medseg.errors import InputError
from medseg.io.atomic import atomic_path
from medseg.io.dicom.planes import grid_planes

__all__ = ["PATIENT_ID", "PATIENT_NAME", "TRANSFER_SYNTAXES", "phantom_series", "write_dicom_series"]

log = logging.getLogger(__name__)

PATIENT_NAME = "Phantom^Synthetic"
PATIENT_ID = "PHANTOM001"

#: Transfer syntaxes :func:`write_dicom_series` writes. JPEG Lossless SV1 has no encoder among
#: pydicom's plugins; it is made with dcmtk's ``dcmcjpeg`` (must be on PATH).
TRANSFER_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGLSLossless,
                                      JPEG2000Lossless, JPEGLosslessSV1)
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: CT pixels are stored as HU + 1024 (int16) with RescaleIntercept -1024, like many scanners.
CT_RESCALE_INTERCEPT = -1024.0
_STUDY_DATE = "20260101"
_STUDY_TIME = "120000"


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) as precise as DICOM allows."""
    return format_number_as_ds(float(value))


def _pixels(image: sitk.Image, modality: str, path: Path) -> tuple[np.ndarray, float]:
    """Stored pixel values (z, y, x) and the rescale intercept for ``modality``."""
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise InputError(path, "the image holds NaN or infinite values; DICOM needs integers")
    values = np.rint(values)
    dtype: type[np.integer[Any]]
    if modality == "CT":
        stored = values - CT_RESCALE_INTERCEPT
        low, high, dtype = -32768, 32767, np.int16
    else:
        stored = values
        low, high, dtype = 0, 65535, np.uint16
    if stored.min() < low or stored.max() > high:
        raise InputError(path, f"{modality} values {values.min():g}..{values.max():g} do not fit the stored "
                               f"{np.dtype(dtype).name} range")
    return stored.astype(dtype), (CT_RESCALE_INTERCEPT if modality == "CT" else 0.0)


def _base_dataset(modality: str, study_uid: str, series_uid: str, frame_uid: str, series_number: int,
                  description: str) -> Dataset:
    """Patient, study, series, frame-of-reference, equipment and modality attributes shared by all slices."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    # Patient
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "medseg synthetic study"
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = _STUDY_DATE
    ds.SeriesTime = _STUDY_TIME
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "ABDOMEN"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.SoftwareVersions = "medseg"
    # General Image / Acquisition
    ds.ContentDate = _STUDY_DATE
    ds.ContentTime = _STUDY_TIME
    ds.AcquisitionDate = _STUDY_DATE
    ds.AcquisitionTime = _STUDY_TIME
    ds.AcquisitionNumber = 1
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.BurnedInAnnotation = "NO"
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(CT_RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.PixelRepresentation = 0
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = "5"
        ds.EchoTime = "2"
        ds.EchoTrainLength = "1"
        ds.FlipAngle = "12"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
    return ds


def _slice_datasets(image: sitk.Image, modality: str, study_uid: str, series_uid: str, series_number: int,
                    description: str, out_dir: Path) -> list[Dataset]:
    """One uncompressed (explicit VR little endian) CT / MR Image dataset per z slice, in z-index order."""
    pixels, _ = _pixels(image, modality, out_dir)
    planes = grid_planes(image.GetOrigin(), image.GetSpacing(), image.GetDirection(), image.GetSize())
    slice_spacing = image.GetSpacing()[2]
    base = _base_dataset(modality, study_uid, series_uid, generate_uid(), series_number, description)
    base.ImageOrientationPatient = [_ds(v) for v in planes[0].orientation]
    base.PixelSpacing = [_ds(v) for v in planes[0].pixel_spacing]
    base.SliceThickness = _ds(slice_spacing)
    if modality == "MR":
        base.SpacingBetweenSlices = _ds(slice_spacing)
    base.Rows, base.Columns = planes[0].rows, planes[0].columns
    if modality == "MR":  # a display window for viewers (CT has a soft-tissue window)
        low, high = float(pixels.min()), float(pixels.max())
        base.WindowCenter = _ds((low + high) / 2.0)
        base.WindowWidth = _ds(max(1.0, high - low))
    datasets = []
    for k, plane in enumerate(planes):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in plane.position]
        ds.SliceLocation = _ds(plane.distance)
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds["PixelData"].VR = "OW"
        datasets.append(ds)
    return datasets


def _encode(ds: Dataset, transfer_syntax: str) -> None:
    """Re-encode ``ds`` in place in ``transfer_syntax`` (pydicom's encoders; dcmtk for JPEG lossless SV1)."""
    if transfer_syntax == ExplicitVRLittleEndian:
        return
    if transfer_syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        return
    if transfer_syntax == JPEGLosslessSV1:
        _dcmcjpeg(ds)
        return
    ds.compress(transfer_syntax, generate_instance_uid=False)


def _dcmcjpeg(ds: Dataset) -> None:
    """Encode ``ds`` as JPEG Lossless, first-order prediction (SV1) with dcmtk's ``dcmcjpeg``.

    Raises
    ------
    InputError
        ``dcmcjpeg`` (dcmtk) is not installed, or it failed.
    """
    tool = shutil.which("dcmcjpeg")
    if tool is None:
        raise InputError(None, "JPEG Lossless SV1 needs dcmtk's dcmcjpeg (no pydicom plugin encodes it); "
                               "install dcmtk (scripts/install_system_deps.sh)")
    with tempfile.TemporaryDirectory(prefix="medseg-jpeg-") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(src, enforce_file_format=True)
        result = subprocess.run([tool, "+e1", "+un", str(src), str(dst)], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise InputError(None, f"dcmcjpeg failed: {result.stderr.strip()[-300:]}")
        encoded = pydicom.dcmread(dst)
    ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
    ds.PixelData = encoded.PixelData
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def _file_name(ds: Dataset, index: int, file_names: str) -> str:
    if file_names == "uid":
        return f"{ds.SOPInstanceUID}.dcm"
    return f"IM{index + 1:06d}"


def _enhanced(datasets: list[Dataset], modality: str, series_uid: str, series_number: int,
              description: str, transfer_syntax: str) -> Dataset:
    """One legacy converted enhanced CT / MR image (highdicom) from the single-frame ``datasets``,
    encoded in ``transfer_syntax`` (highdicom's own encoders refuse signed CT pixels, pydicom's do not)."""
    from highdicom.legacy import (
        LegacyConvertedEnhancedCTImage,
        LegacyConvertedEnhancedMRImage,
    )

    cls = LegacyConvertedEnhancedCTImage if modality == "CT" else LegacyConvertedEnhancedMRImage
    enhanced = cls(datasets, series_instance_uid=series_uid, series_number=series_number,
                   sop_instance_uid=generate_uid(), instance_number=1, transfer_syntax_uid=ExplicitVRLittleEndian)
    enhanced.SeriesDescription = description
    # the single-frame sources are not written: no references to instances that do not exist
    if "ReferencedSeriesSequence" in enhanced:
        del enhanced.ReferencedSeriesSequence
    _encode(enhanced, transfer_syntax)
    return enhanced


def write_dicom_series(image: sitk.Image, out_dir: str | os.PathLike[str], *, modality: str = "CT",
                       series_description: str = "medseg phantom", study_uid: str | None = None,
                       series_uid: str | None = None, series_number: int = 1, file_names: str = "uid",
                       transfer_syntax: str = ExplicitVRLittleEndian, multiframe: bool = False,
                       dicomdir: bool = False) -> list[Path]:
    """Write a 3D image as a DICOM series with exact geometry; return the image files in z-index order.

    Parameters
    ----------
    image
        3D scalar image in modality units (CT: HU, MR: non-negative signal), any direction
        (oblique, left-handed) and anisotropic spacing. Values are rounded to integers.
    out_dir
        Folder for the files (created; other files in it are left alone).
    modality
        ``"CT"`` (CT Image Storage, int16 stored as HU + 1024 with RescaleIntercept -1024) or
        ``"MR"`` (MR Image Storage, uint16).
    study_uid, series_uid
        Default: new UIDs. Give the same ``study_uid`` to put several series in one study.
    file_names
        ``"uid"``: ``<SOPInstanceUID>.dcm``; ``"im"``: ``IM000001``, ``IM000002``, ... (no extension).
        With ``dicomdir=True`` the file-set layout decides (``PT000000/ST000000/SE000000/IM000000``).
    transfer_syntax
        One of :data:`TRANSFER_SYNTAXES`; compression through pydicom's encoders (RLE, JPEG-LS via
        pyjpegls, JPEG 2000 via pylibjpeg-openjpeg); JPEG Lossless SV1 through dcmtk's ``dcmcjpeg``.
    multiframe
        Write one legacy converted enhanced CT / MR image (highdicom) instead of one file per slice.
    dicomdir
        Write a DICOM file set: ``out_dir/DICOMDIR`` plus the instances in pydicom's file-set layout.

    Returns
    -------
    list of Path
        The image files (one if ``multiframe``), slice files in z-index order of ``image``.

    Raises
    ------
    InputError
        Not a 3D scalar image, unknown modality / transfer syntax / ``file_names``, values that do
        not fit the stored type, no encoder for the transfer syntax, or slices under 32 x 32 pixels
        for JPEG 2000.
    """
    out = Path(out_dir)
    modality = str(modality).upper()
    if modality not in ("CT", "MR"):
        raise InputError(None, f"modality {modality!r} is not supported; use 'CT' or 'MR'")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(None, "write_dicom_series needs a 3D scalar image")
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise InputError(None, f"transfer syntax {transfer_syntax} ({transfer_syntax.name}) is not supported; "
                               f"use one of {', '.join(UID(t).name for t in TRANSFER_SYNTAXES)}")
    if file_names not in ("uid", "im"):
        raise InputError(None, f"file_names={file_names!r}; use 'uid' or 'im'")
    if transfer_syntax == JPEG2000Lossless and min(image.GetSize()[:2]) < 32:
        raise InputError(None, "JPEG 2000 (openjpeg, 6 resolution levels) needs at least 32 x 32 pixels per "
                               f"slice, the image has {image.GetSize()[0]} x {image.GetSize()[1]}")
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    datasets = _slice_datasets(image, modality, study_uid, series_uid, series_number, series_description, out)
    if multiframe:
        datasets = [_enhanced(datasets, modality, series_uid, series_number, series_description, transfer_syntax)]
    else:
        for ds in datasets:
            _encode(ds, transfer_syntax)
    out.mkdir(parents=True, exist_ok=True)
    if dicomdir:
        return _write_fileset(datasets, out)
    paths = []
    for index, ds in enumerate(datasets):
        path = out / _file_name(ds, index, file_names)
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    log.debug("wrote %s series %s: %d file(s), %s", modality, series_uid, len(paths), transfer_syntax.name)
    return paths


def _write_fileset(datasets: list[Dataset], out: Path) -> list[Path]:
    """Write ``datasets`` as a DICOM file set (DICOMDIR) into ``out``; return the instance files in order."""
    from pydicom.fileset import FileSet

    fileset = FileSet()
    fileset.ID = "MEDSEG"
    uids = []
    for ds in datasets:
        fileset.add(ds)
        uids.append(ds.SOPInstanceUID)
    fileset.write(out)
    by_uid = {instance.SOPInstanceUID: Path(instance.path) for instance in fileset}
    return [by_uid[uid] for uid in uids]


def phantom_series(out_dir: str | os.PathLike[str], modality: str = "ct", seed: int = 0, size: int = 48, *,
                   grid: Grid | None = None, **kwargs: Any) -> tuple[list[Path], sitk.Image, sitk.Image]:
    """A medseg synthetic phantom written with :func:`write_dicom_series`.

    Parameters
    ----------
    modality
        ``"ct"`` or ``"mr"`` (case-insensitive).
    seed
        Seeds the grid (unless ``grid`` is given) and the patient.
    size
        In-plane matrix size (voxels) of the random grid.
    grid
        A :class:`medseg.data.synthetic.Grid` to render on instead of a random one (e.g. oblique).
    **kwargs
        Passed to :func:`write_dicom_series` (transfer_syntax, multiframe, file_names, ...).

    Returns
    -------
    files, image, label
        The written files, the image as stored (CT: int16 HU; MR: uint16, the phantom's signal
        rounded) and the label map (uint8), both with the series geometry.

    Raises
    ------
    InputError
        As :func:`write_dicom_series` and :func:`medseg.data.synthetic.random_grid`.
    """
    modality = str(modality).lower()
    rng = np.random.default_rng(seed)
    if grid is None:
        grid = random_grid(rng, size=size, dims=3, modality=modality)
    image, label = make_phantom(rng, grid, modality)
    if modality == "mr":
        values = np.clip(np.rint(sitk.GetArrayFromImage(image)), 0, 65535).astype(np.uint16)
        stored = sitk.GetImageFromArray(values)
        stored.CopyInformation(image)
        image = stored
    files = write_dicom_series(image, out_dir, modality=modality.upper(), **kwargs)
    return files, image, label
