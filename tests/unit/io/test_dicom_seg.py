"""DICOM SEG and RTSTRUCT writers on small synthetic series: what a viewer or dciodvfy would see."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from skimage.draw import polygon

from medseg.data.synthetic.dicom import write_dicom_series
from medseg.errors import BundleError
from medseg.io.dicom.planes import source_planes
from medseg.io.dicom_seg import segment_descriptions, write_dicom_seg
from medseg.io.rtstruct import mask_contours, write_rtstruct
from medseg.labels import segment_code
from tests.tools import dciodvfy_errors, needs_dciodvfy

LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "lesion"}
SEGMENTS = {v: segment_code(n) for v, n in LABELS.items() if v}


def _image(direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1), size=(20, 16, 6)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.full(size[::-1], 40, dtype=np.int16))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, 20.0, 35.0))
    image.SetDirection(direction)
    return image


def _label_map(shape: tuple[int, int, int]) -> np.ndarray:
    """(slices, rows, columns): liver with a hole, spleen touching the border, no lesion."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:5, 3:12, 2:10] = 1
    labels[2:4, 6:8, 5:7] = 0  # a hole in the liver
    labels[2:6, 0:5, 14:20] = 2  # touches the first row and the last column
    return labels


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    # oblique in-plane rotation, slices in z-index order
    c, s = np.cos(0.3), np.sin(0.3)
    files = write_dicom_series(_image((c, -s, 0, s, c, 0, 0, 0, 1)), tmp_path_factory.mktemp("series"))
    return [pydicom.dcmread(f) for f in files]


def test_seg_reads_back_voxel_for_voxel_with_empty_segments_described(tmp_path: Path, sources) -> None:
    labels = _label_map((len(sources), sources[0].Rows, sources[0].Columns))
    out = write_dicom_seg(labels, sources, SEGMENTS, tmp_path / "seg.dcm", algorithm_name="medseg test",
                          algorithm_version="1.2.3")
    seg = hd.seg.segread(out)
    uids = [ds.SOPInstanceUID for ds in sources]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(back, labels)
    # all three segments described, the absent lesion too, with the codes and the algorithm
    assert [(d.segment_number, d.segment_label) for d in seg.SegmentSequence] == [(1, "liver"), (2, "spleen"), (3, "lesion")]
    lesion = seg.SegmentSequence[2]
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert lesion.SegmentAlgorithmType == "AUTOMATIC"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "medseg test"
    assert {f.SegmentIdentificationSequence[0].ReferencedSegmentNumber
            for f in seg.PerFrameFunctionalGroupsSequence} == {1, 2}
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert not list(tmp_path.glob(".*"))  # no temporary left beside it


@pytest.mark.pacs
@needs_dciodvfy
@pytest.mark.parametrize("empty", [False, True], ids=["partial", "empty"])
def test_seg_passes_dciodvfy(tmp_path: Path, sources, empty: bool) -> None:
    labels = _label_map((len(sources), sources[0].Rows, sources[0].Columns)) * (not empty)
    out = write_dicom_seg(labels.astype(np.uint8), sources, SEGMENTS, tmp_path / "seg.dcm", algorithm_name="medseg test",
                          algorithm_version="1.2.3")
    assert dciodvfy_errors(out) == []
    back = hd.seg.segread(out).get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources],
                                                             combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(back, labels)


def test_seg_of_a_left_handed_multiframe_source_pairs_frames_by_position(tmp_path: Path) -> None:
    # the slice axis points against row x column: file frames run downwards along the normal
    image = _image((1, 0, 0, 0, 1, 0, 0, 0, -1))
    (file,) = write_dicom_series(image, tmp_path / "mf", multiframe=True)
    source = pydicom.dcmread(file)
    planes = source_planes([source])
    assert [p.frame_number for p in planes] == list(range(6, 0, -1))  # ascending along the normal
    labels_z = _label_map((6, 16, 20))  # in the image's z-index order = the file's frame order
    out = write_dicom_seg(labels_z[::-1], [source], SEGMENTS, tmp_path / "seg.dcm", algorithm_name="medseg test",
                          algorithm_version="1")
    back = hd.seg.segread(out).get_pixels_by_source_frame(source.SOPInstanceUID, list(range(1, 7)),
                                                          combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(back, labels_z)


def _rasterise(ds: pydicom.Dataset, sources: list[pydicom.Dataset]) -> dict[str, np.ndarray]:
    """ROI name -> (slices, rows, columns) mask, contours filled with the even-odd rule."""
    planes = source_planes(sources)
    index = {p.sop_instance_uid: k for k, p in enumerate(planes)}
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    shape = (len(planes), planes[0].rows, planes[0].columns)
    masks = {}
    for item in ds.ROIContourSequence:
        mask = np.zeros(shape, dtype=bool)
        for contour in item.get("ContourSequence", []):
            k = index[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            plane = planes[k]
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3) - plane.position
            assert np.allclose(points @ plane.normal, 0.0, atol=1e-3)  # on the referenced slice
            cols = points @ plane.row_direction / plane.pixel_spacing[1]
            rows = points @ plane.column_direction / plane.pixel_spacing[0]
            rr, cc = polygon(rows, cols, shape[1:])
            filled = np.zeros(shape[1:], dtype=bool)
            filled[rr, cc] = True
            mask[k] ^= filled
        masks[names[item.ReferencedROINumber]] = mask
    return masks


def test_rtstruct_contours_rasterise_back_to_the_mask(tmp_path: Path, sources) -> None:
    labels = _label_map((len(sources), sources[0].Rows, sources[0].Columns))
    out = write_rtstruct(labels, sources, SEGMENTS, tmp_path / "rt.dcm", algorithm_name="medseg test",
                         algorithm_version="1.2.3")
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
    referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert [i.ReferencedSOPInstanceUID for i in referenced.ContourImageSequence] == [s.SOPInstanceUID for s in sources]
    masks = _rasterise(ds, sources)
    assert list(masks) == ["liver", "spleen", "lesion"]
    np.testing.assert_array_equal(masks["liver"], labels == 1)  # the hole stays a hole
    np.testing.assert_array_equal(masks["spleen"], labels == 2)
    assert not masks["lesion"].any()
    assert next(tuple(i.ROIDisplayColor) for i in ds.ROIContourSequence) != (0, 0, 0)


@pytest.mark.pacs
@needs_dciodvfy
def test_rtstruct_passes_dciodvfy(tmp_path: Path, sources) -> None:
    labels = _label_map((len(sources), sources[0].Rows, sources[0].Columns))
    out = write_rtstruct(labels, sources, SEGMENTS, tmp_path / "rt.dcm", algorithm_name="medseg test",
                         algorithm_version="1.2.3")
    assert dciodvfy_errors(out) == []


def test_mask_contours_closes_objects_on_the_border_and_traces_holes() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:5, 0:5] = True
    mask[2, 2] = False
    contours = mask_contours(mask)
    assert len(contours) == 2  # outer boundary and the hole
    outer = max(contours, key=len)
    assert outer[:, 0].min() == pytest.approx(-0.5) and outer[:, 1].min() == pytest.approx(-0.5)


def test_segment_descriptions_come_from_the_metadata_and_refuse_missing_codes() -> None:
    meta = {"segments": {"1": {"name": "liver", "snomed": {"code": "10200004", "scheme": "SCT", "meaning": "Liver"},
                               "category": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}},
                         "2": {"name": "blob", "snomed": None,
                               "category": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}}}}
    labels = {0: "background", 1: "liver", 2: "blob"}
    with pytest.raises(BundleError, match=r"segment 2 \('blob'\) has no SNOMED CT property type code"):
        segment_descriptions(meta, labels)
    loose = segment_descriptions(meta, labels, require_codes=False)
    assert loose[1]["snomed"]["code"] == "10200004" and loose[2]["snomed"] is None
    with pytest.raises(BundleError, match="the model calls label 1 'spleen'"):
        segment_descriptions(meta, {0: "background", 1: "spleen"})
    # a bundle from before segment metadata: medseg's code for the name
    assert segment_descriptions({}, {0: "background", 1: "kidney"})[1]["snomed"]["code"] == "64033007"
