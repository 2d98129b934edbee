"""RT Structure Set (RTSTRUCT) output written with pydicom.

Each foreground label of the model becomes one ROI (name and display colour from the bundle's
segments, the SNOMED CT code as the ROI's identification code when there is one). On every source
slice the label's mask is traced with :func:`skimage.measure.find_contours` at the 0.5 level (the
line half-way between inside and outside pixel centres) and stored as CLOSED_PLANAR contours in
patient coordinates (the slice's ImagePositionPatient, ImageOrientationPatient, PixelSpacing), each
referencing its slice's SOP instance. Holes are separate contours inside the outer one (the
even-odd rule most planning systems apply). Labels absent from the prediction are still listed,
without contours, like the segments of the DICOM SEG output.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from medseg import __version__
from medseg.errors import DicomError
from medseg.io.atomic import atomic_path
from medseg.io.dicom.planes import SourcePlane, check_label_map, source_planes
from medseg.io.dicom_seg import complete_code
from medseg.labels import label_colour_255

__all__ = ["RTSTRUCT_SERIES_DESCRIPTION", "mask_contours", "write_rtstruct"]

log = logging.getLogger(__name__)

#: SeriesDescription of an RT structure set unless the caller gives one.
RTSTRUCT_SERIES_DESCRIPTION = "medseg structures"

#: Detached Study Management SOP Class: what RTReferencedStudySequence conventionally references.
_STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"
_ANATOMICAL_STRUCTURE = "91723000"
#: Patient and General Study attributes copied from the source (type 2 ones written empty if absent).
_PATIENT_STUDY = (("PatientName", True), ("PatientID", True), ("IssuerOfPatientID", False),
                  ("PatientBirthDate", True), ("PatientSex", True), ("PatientAge", False),
                  ("StudyInstanceUID", True), ("StudyDate", True), ("StudyTime", True),
                  ("ReferringPhysicianName", True), ("StudyID", True), ("AccessionNumber", True),
                  ("StudyDescription", False))


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours (row, column), without the repeated end point, of a 2D binary mask.

    Outer boundaries and hole boundaries alike, traced at the 0.5 level on the zero-padded mask
    (so objects touching the border are closed too), collinear points removed.
    """
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(np.asarray(mask, dtype=np.float32), 1)
    contours = []
    for contour in find_contours(padded, 0.5, fully_connected="high"):
        contour = approximate_polygon(contour, tolerance=0.01) - 1.0
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        if len(contour) >= 3:
            contours.append(contour)
    return contours


def _ds_list(points: np.ndarray) -> list[str]:
    return [format_number_as_ds(round(float(v), 4)) for v in points.ravel()]


def _image_ref(plane: SourcePlane) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = plane.sop_class_uid
    item.ReferencedSOPInstanceUID = plane.sop_instance_uid
    if plane.frame_number is not None:
        item.ReferencedFrameNumber = plane.frame_number
    return item


def _code_item(entry: Mapping[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue = entry["code"]
    item.CodingSchemeDesignator = entry["scheme"]
    item.CodeMeaning = entry["meaning"][:64]
    return item


def write_rtstruct(label_map: np.ndarray, sources: Sequence[pydicom.Dataset], segments: Mapping[int, Mapping[str, Any]],
                   out_path: str | os.PathLike[str], *, algorithm_name: str, algorithm_version: str,
                   series_number: int = 901, series_description: str = RTSTRUCT_SERIES_DESCRIPTION) -> Path:
    """Write ``label_map`` as one RT Structure Set of the source series' study (new series).

    Parameters
    ----------
    label_map
        Integer array ``(slices, rows, columns)``, slice k = ``sources[k]`` (for one multi-frame
        source, its k-th frame along the slice normal; see :func:`medseg.io.dicom.planes.source_planes`).
    sources
        The source instances (``medseg.io.dicom.source_datasets``).
    segments
        ``{label value: {"name", "snomed", "category"}}``
        (:func:`medseg.io.dicom_seg.segment_descriptions`); one ROI each, ROI number = label value.
    out_path
        The RTSTRUCT file; written atomically.
    algorithm_name, algorithm_version
        Recorded as the ROIs' generation description and the equipment's model name.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    DicomError
        Sources without plane geometry or frame of reference.
    ValueError
        A label map that does not fit the sources or holds values no segment describes.
    """
    out_path = Path(out_path)
    planes = source_planes(sources)
    label_map = check_label_map(label_map, planes, segments)
    first = sources[0]
    frame_of_reference = first.get("FrameOfReferenceUID")
    if not frame_of_reference:
        raise DicomError(None, f"series {first.get('SeriesInstanceUID', '?')}: no FrameOfReferenceUID; "
                               "contours need a patient coordinate system")
    ds = _structure_set(first, frame_of_reference, algorithm_name, algorithm_version, series_number,
                        series_description)
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame_of_reference(first, frame_of_reference,
                                                                                          planes)])
    rois, roi_contours, observations = [], [], []
    total = 0
    for value in sorted(int(v) for v in segments):
        entry = segments[value]
        rois.append(_structure_set_roi(value, entry, frame_of_reference, algorithm_name, algorithm_version))
        contour_item = _roi_contour(value, label_map, planes)
        roi_contours.append(contour_item)
        total += len(contour_item.get("ContourSequence", []))
        observations.append(_roi_observation(value, entry))
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    if total == 0:
        log.warning("series %s: the prediction is empty; the RT structure set lists %d ROI(s) without contours",
                    first.SeriesInstanceUID, len(rois))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    with atomic_path(out_path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    log.info("RTSTRUCT %s: series %s, %d ROI(s), %d contour(s), source series %s",
             out_path.name, ds.SeriesInstanceUID, len(rois), total, first.SeriesInstanceUID)
    return out_path


def _structure_set(first: pydicom.Dataset, frame_of_reference: str, algorithm_name: str, algorithm_version: str,
                   series_number: int, series_description: str) -> Dataset:
    """The data set's header: SOP common, patient and study (copied from the source), frame of reference,
    RT series, equipment and structure set modules, dated now."""
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    if "SpecificCharacterSet" in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for keyword, type2 in _PATIENT_STUDY:
        if keyword in first:
            ds.add(first[keyword])
        elif type2:
            setattr(ds, keyword, "")
    # Frame of Reference (the source's: contours are in its patient coordinates)
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName = algorithm_name[:64]
    ds.SoftwareVersions = __version__
    # Structure Set
    ds.StructureSetLabel = "MEDSEG"
    ds.StructureSetName = algorithm_name[:64]
    ds.StructureSetDescription = f"{algorithm_name} {algorithm_version}: automatic segmentation"
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = date, time
    return ds


def _referenced_frame_of_reference(first: pydicom.Dataset, frame_of_reference: str,
                                   planes: Sequence[SourcePlane]) -> Dataset:
    """The ReferencedFrameOfReferenceSequence item: frame of reference -> study -> series -> every slice."""
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence([_image_ref(p) for p in planes])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_COMPONENT_CLASS
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_of_reference
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    return frame_ref


def _structure_set_roi(value: int, entry: Mapping[str, Any], frame_of_reference: str, algorithm_name: str,
                       algorithm_version: str) -> Dataset:
    """The StructureSetROISequence item of label ``value``."""
    roi = Dataset()
    roi.ROINumber = value
    roi.ReferencedFrameOfReferenceUID = frame_of_reference
    roi.ROIName = str(entry["name"])[:64]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version}"[:64]
    return roi


def _roi_contour(value: int, label_map: np.ndarray, planes: Sequence[SourcePlane]) -> Dataset:
    """The ROIContourSequence item of label ``value``: its colour and a CLOSED_PLANAR contour for every
    outline of its mask on every slice (none when the label map does not hold ``value``)."""
    contour_item = Dataset()
    contour_item.ROIDisplayColor = list(label_colour_255(value))
    contours: list[Dataset] = []
    for k, plane in enumerate(planes):
        mask = label_map[k] == value
        if not mask.any():
            continue
        for outline in mask_contours(mask):
            points = plane.to_patient(outline[:, 0], outline[:, 1])
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([_image_ref(plane)])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = len(contours) + 1
            contour.ContourData = _ds_list(points)
            contours.append(contour)
    if contours:
        contour_item.ContourSequence = DicomSequence(contours)
    contour_item.ReferencedROINumber = value
    return contour_item


def _roi_observation(value: int, entry: Mapping[str, Any]) -> Dataset:
    """The RTROIObservationsSequence item of label ``value``: its SNOMED CT code, ORGAN for anatomy."""
    observation = Dataset()
    observation.ObservationNumber = value
    observation.ReferencedROINumber = value
    snomed, category = complete_code(entry.get("snomed")), complete_code(entry.get("category"))
    if snomed is not None:
        observation.RTROIIdentificationCodeSequence = DicomSequence([_code_item(snomed)])
    anatomical = category is not None and category["code"] == _ANATOMICAL_STRUCTURE
    observation.RTROIInterpretedType = "ORGAN" if anatomical else ""
    observation.ROIInterpreter = ""
    return observation
