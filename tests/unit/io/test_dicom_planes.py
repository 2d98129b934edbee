"""Plane geometry (medseg.io.dicom.planes): the series reader and the SEG / RTSTRUCT writers see the same
slices, at the same positions, in the same order -- on oblique, non-axial series, single- and multi-frame."""

from __future__ import annotations

import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.data.synthetic import Grid
from medseg.data.synthetic.dicom import phantom_series, write_dicom_series
from medseg.errors import DicomError
from medseg.io.dicom import read_series, scan_dicom, select_series, source_datasets
from medseg.io.dicom.planes import (
    PlaneTags,
    check_label_map,
    functional_group,
    grid_planes,
    slice_normal,
    source_planes,
)
from medseg.io.dicom_seg import write_dicom_seg
from medseg.labels import segment_code

SEGMENTS = {v: segment_code(n) for v, n in {1: "liver", 2: "spleen", 3: "kidney", 4: "bone", 5: "lesion"}.items()}


def _oblique(plane: str, left_handed: bool = False) -> Grid:
    """An oblique coronal or sagittal grid (20 degrees about a skew axis), anisotropic, non-square."""
    base = {"coronal": np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),    # L, I, P: right-handed
            "sagittal": np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])}[plane]  # P, I, R: right-handed
    if left_handed:
        base = base @ np.diag([1.0, 1.0, -1.0])
    axis = np.array([0.4, 1.0, -0.3]) / np.linalg.norm([0.4, 1.0, -0.3])
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    angle = math.radians(20.0)
    rotation = np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)
    return Grid.centred((36, 30, 14), (3.3, 3.7, 5.2), (-8.0, 15.0, 60.0), (rotation @ base).ravel())


def _direction(plane) -> np.ndarray:
    return np.column_stack([plane.row_direction, plane.column_direction, slice_normal(plane.orientation)])


@pytest.fixture(scope="module", params=[("coronal", False), ("sagittal", True)], ids=["coronal", "sagittal-left"])
def oblique_series(request, tmp_path_factory: pytest.TempPathFactory):
    plane, left_handed = request.param
    folder = tmp_path_factory.mktemp(plane)
    grid = _oblique(plane, left_handed)
    _, image, label = phantom_series(folder, "mr", seed=3, grid=grid, file_names="im")
    return folder, grid, image, label, left_handed


def test_reader_and_writer_planes_agree_on_an_oblique_non_axial_series(oblique_series) -> None:
    folder, grid, _, _, left_handed = oblique_series
    series = select_series(scan_dicom(folder))
    sources = source_datasets(series, pixels=False)
    planes = source_planes(sources)
    # the writers' slice k is the reader's slice k (file order of the series, along the normal)
    assert [p.sop_instance_uid for p in planes] == [pydicom.dcmread(f).SOPInstanceUID for f in series.files]
    assert [p.frame_number for p in planes] == [None] * len(planes)
    origin, spacing = np.asarray(series.origin), np.asarray(series.spacing)
    direction = np.asarray(series.direction).reshape(3, 3)
    for k, plane in enumerate(planes):
        np.testing.assert_allclose(_direction(plane), direction, atol=1e-9)
        np.testing.assert_allclose(plane.pixel_spacing, (spacing[1], spacing[0]), rtol=1e-12)
        np.testing.assert_allclose(plane.position, origin + k * spacing[2] * direction[:, 2], atol=1e-6)
        assert (plane.rows, plane.columns) == (series.size[1], series.size[0])
    # the same planes as the grid the series was written from (z reversed when left-handed)
    written = grid_planes(grid.origin, grid.spacing, grid.direction, grid.size)
    if left_handed:
        written = written[::-1]
    for plane, expected in zip(planes, written, strict=True):
        np.testing.assert_allclose(plane.position, expected.position, atol=1e-6)
        np.testing.assert_allclose(plane.orientation, expected.orientation, atol=1e-12)
    # pixel -> patient of a plane is the read volume's index -> physical point, also between pixel centres
    volume = read_series(series)
    for k, row, column in [(0, 0.0, 0.0), (3, 7.5, 11.25), (len(planes) - 1, 29.0, 35.0)]:
        np.testing.assert_allclose(planes[k].to_patient(np.array([row]), np.array([column]))[0],
                                   volume.TransformContinuousIndexToPhysicalPoint((column, row, float(k))), atol=1e-6)


def test_seg_frames_sit_on_the_planes_the_reader_computes(oblique_series, tmp_path: Path) -> None:
    folder, _, _, label, left_handed = oblique_series
    series = select_series(scan_dicom(folder))
    sources = source_datasets(series, pixels=False)
    planes = source_planes(sources)
    labels = sitk.GetArrayFromImage(label)[::-1] if left_handed else sitk.GetArrayFromImage(label)
    out = write_dicom_seg(labels, sources, SEGMENTS, tmp_path / "seg.dcm", algorithm_name="medseg test",
                          algorithm_version="1")
    seg = pydicom.dcmread(out)
    by_uid = {p.sop_instance_uid: p for p in planes}
    assert len(seg.PerFrameFunctionalGroupsSequence) > 0
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        np.testing.assert_allclose(position, by_uid[uid].position, atol=1e-4)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose(np.asarray(orientation, dtype=np.float64), planes[0].orientation, atol=1e-6)
    back = hd.seg.segread(out).get_pixels_by_source_instance([p.sop_instance_uid for p in planes],
                                                             combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(back, labels)


def test_multiframe_planes_follow_the_readers_frame_order(tmp_path: Path) -> None:
    grid = _oblique("sagittal", left_handed=True)
    phantom_series(tmp_path, "mr", seed=5, grid=grid, multiframe=True)
    series = select_series(scan_dicom(tmp_path))
    planes = source_planes(source_datasets(series, pixels=False))
    assert series.multiframe and [p.frame_number - 1 for p in planes] == list(series.frame_order)
    assert list(series.frame_order) == list(range(grid.size[2]))[::-1]  # against row x column: reversed
    np.testing.assert_allclose(planes[0].position, series.origin, atol=1e-6)
    distances = [p.distance for p in planes]
    assert distances == sorted(distances)
    np.testing.assert_allclose(np.diff(distances), series.spacing[2], atol=1e-6)


def _single_slice(tmp_path: Path) -> pydicom.Dataset:
    image = sitk.GetImageFromArray(np.zeros((2, 4, 5), dtype=np.int16))
    image.SetSpacing((0.7, 0.8, 2.0))
    files = write_dicom_series(image, tmp_path)
    return pydicom.dcmread(files[0])


def test_unusable_geometry_is_named_by_tag(tmp_path: Path) -> None:
    ds = _single_slice(tmp_path)
    ds.PixelSpacing = [0, 0.7]
    tags = PlaneTags("IM1")
    position, orientation, spacing = tags.plane(ds, None)
    assert spacing is None and position is not None and orientation is not None
    assert tags.problems == ["IM1: PixelSpacing (0, 0.7) is not positive"]
    with pytest.raises(DicomError, match=r"PixelSpacing .* is not positive"):
        source_planes([ds])
    del ds.ImagePositionPatient
    ds.PixelSpacing = [0.8, 0.7]
    with pytest.raises(DicomError, match="no ImagePositionPatient"):
        source_planes([ds])


def test_functional_groups_per_frame_first_then_shared() -> None:
    def item(**values) -> pydicom.Dataset:
        ds = pydicom.Dataset()
        for key, value in values.items():
            setattr(ds, key, value)
        return ds

    ds = pydicom.Dataset()
    ds.SharedFunctionalGroupsSequence = [item(PixelMeasuresSequence=[item(PixelSpacing=[1, 1])])]
    ds.PerFrameFunctionalGroupsSequence = [item(PixelMeasuresSequence=[item(PixelSpacing=[2, 2])]), item()]
    assert functional_group(ds, 0, "PixelMeasuresSequence").PixelSpacing == [2, 2]
    assert functional_group(ds, 1, "PixelMeasuresSequence").PixelSpacing == [1, 1]
    assert functional_group(ds, 1, "PlanePositionSequence") is None


def test_label_map_must_fit_the_planes(tmp_path: Path) -> None:
    planes = source_planes([_single_slice(tmp_path)])
    with pytest.raises(ValueError, match=r"the source slices need \(1, 4, 5\)"):
        check_label_map(np.zeros((1, 5, 4), dtype=np.uint8), planes, SEGMENTS)
    with pytest.raises(ValueError, match=r"values \[9\]"):
        check_label_map(np.full((1, 4, 5), 9, dtype=np.uint8), planes, SEGMENTS)


def test_one_list_of_non_image_modalities() -> None:
    from medseg.io.dicom import NON_IMAGE_MODALITIES
    from medseg.pacs import dicomweb

    assert dicomweb.NON_IMAGE_MODALITIES is NON_IMAGE_MODALITIES
    assert {"SEG", "RTSTRUCT", "SR", "KO", "PR", "RTDOSE", "ECG", "DOC"} <= NON_IMAGE_MODALITIES
    assert not {"CT", "MR", "PT", "US", "CR", "DX", "MG", "NM", "XA", "OT"} & NON_IMAGE_MODALITIES
