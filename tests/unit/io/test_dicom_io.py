"""DICOM series input (medseg.io.dicom), the synthetic series writer and `medseg inspect`.

Every series here is a medseg phantom written by medseg.data.synthetic.dicom; the "broken" series
are clean ones edited the way real exports go wrong (a deleted file, a truncated file, a tilted
gantry, a scout image in the series, ...).
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medseg.cli import main
from medseg.data.synthetic import Grid
from medseg.data.synthetic.dicom import (
    PATIENT_ID,
    PATIENT_NAME,
    phantom_series,
    write_dicom_series,
)
from medseg.errors import DicomError, InputError
from medseg.io.dicom import (
    DicomScan,
    is_dicom_input,
    read_series,
    scan_dicom,
    select_series,
    source_datasets,
)
from tests.tools import dciodvfy_errors, needs, needs_dciodvfy


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    x, y, z = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    a = math.radians(degrees)
    return np.eye(3) + math.sin(a) * k + (1.0 - math.cos(a)) * (k @ k)


def _grid(plane: str = "axial", degrees: float = 14.0, left_handed: bool = False,
          size: tuple[int, int, int] = (40, 36, 22), spacing: tuple[float, float, float] = (3.1, 3.4, 5.5)) -> Grid:
    """An oblique, anisotropic grid (non-square matrix, three different spacings)."""
    base = {"axial": np.array([[-1.0, 0, 0], [0, -1, 0], [0, 0, 1]]),          # RAS-like, right-handed
            "sagittal": np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])}[plane]  # P, I, L ... right-handed
    if left_handed:
        base = base @ np.diag([1.0, 1.0, -1.0])
    matrix = _rotation((0.3, 1.0, 0.2), degrees) @ base
    return Grid.centred(size, spacing, (12.0, -20.0, 140.0), matrix.ravel())


def _geometry_equal(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def _values(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float64)


def _read(folder: Path, **rule) -> sitk.Image:
    return read_series(select_series(scan_dicom(folder), **rule))


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def clean_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], sitk.Image]:
    """An oblique anisotropic CT phantom series (IM000001 names): folder, files in z order, image."""
    folder = tmp_path_factory.mktemp("clean") / "ct"
    files, image, _ = phantom_series(folder, "ct", seed=4, grid=_grid(), file_names="im")
    return folder, files, image


@pytest.fixture()
def ct_copy(tmp_path: Path, clean_ct) -> tuple[Path, list[Path], sitk.Image]:
    """A private copy of the clean CT series to break."""
    folder, files, image = clean_ct
    copy = tmp_path / "export" / "ct"
    shutil.copytree(folder, copy)
    return copy, [copy / f.name for f in files], image


# --------------------------------------------------------------------------------------------
# Geometry and values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality,plane", [("ct", "axial"), ("mr", "sagittal")])
def test_round_trip_oblique_anisotropic(tmp_path: Path, modality: str, plane: str) -> None:
    """write_dicom_series -> scan -> select -> read_series gives back the phantom's grid and voxels."""
    files, image, label = phantom_series(tmp_path / "s", modality, seed=1, grid=_grid(plane))
    assert len(files) == image.GetSize()[2] == 22
    series = select_series(scan_dicom(tmp_path))
    assert series.modality == modality.upper() and not series.problems and not series.multiframe
    assert series.size == image.GetSize() and series.files == tuple(files)
    out = read_series(series)
    _geometry_equal(out, image)
    _geometry_equal(out, label)
    assert out.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(_values(out), _values(image))
    if modality == "ct":  # HU (stored as HU + 1024 with RescaleIntercept -1024)
        assert _values(out).min() < -900 and pydicom.dcmread(files[0]).RescaleIntercept == -1024


def test_left_handed_grid_reads_sorted_along_the_normal(tmp_path: Path) -> None:
    """A grid whose slice axis points against row x column comes back with z reversed: the same voxels
    at the same physical points, the third direction column being the normal."""
    _, image, _ = phantom_series(tmp_path, "ct", seed=2, grid=_grid(left_handed=True))
    out = _read(tmp_path)
    n = image.GetSize()[2]
    for index in [(0, 0, 0), (5, 7, 3), (39, 35, n - 1)]:
        flipped = (index[0], index[1], n - 1 - index[2])
        np.testing.assert_allclose(out.TransformIndexToPhysicalPoint(index),
                                   image.TransformIndexToPhysicalPoint(flipped), atol=1e-4)
    np.testing.assert_array_equal(_values(out), _values(image)[::-1])
    matrix = np.asarray(out.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(matrix[:, 2], np.cross(matrix[:, 0], matrix[:, 1]), atol=1e-6)


def test_same_as_simpleitk_series_reader(clean_ct) -> None:
    """SimpleITK's own (GDCM) series reader agrees on origin, spacing, direction and values."""
    folder, _, _ = clean_ct
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reference = reader.Execute()
    ours = _read(folder)
    _geometry_equal(ours, reference)
    np.testing.assert_array_equal(_values(ours), _values(reference))


def test_shuffled_names_and_reversed_instance_numbers(ct_copy) -> None:
    """Slices are sorted by position along the normal, not by file name or InstanceNumber."""
    folder, files, image = ct_copy
    shuffled = list(range(len(files)))
    random.Random(7).shuffle(shuffled)
    names = [f"IMG{n:05d}" for n in shuffled]
    for k, path in enumerate(files):
        _edit(path, lambda ds, k=k: setattr(ds, "InstanceNumber", len(files) - k))
        path.rename(folder / names[k])
    assert not any(p.suffix for p in folder.iterdir())
    out = _read(folder)
    _geometry_equal(out, image)
    np.testing.assert_array_equal(_values(out), _values(image))


def test_files_without_preamble_are_recognised(ct_copy) -> None:
    """Old exports: a bare data set (no 128-byte preamble, no file meta), no extension."""
    folder, files, image = ct_copy
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    assert files[0].read_bytes()[128:132] != b"DICM"
    scan = scan_dicom(folder)
    assert scan.series[0].transfer_syntaxes == (ImplicitVRLittleEndian,)
    np.testing.assert_array_equal(_values(read_series(select_series(scan))), _values(image))


def test_source_datasets_follow_read_order(clean_ct) -> None:
    folder, files, _image = clean_ct
    series = select_series(scan_dicom(folder))
    datasets = source_datasets(series)
    assert [ds.SOPInstanceUID for ds in datasets] == [pydicom.dcmread(f).SOPInstanceUID for f in files]
    volume = _values(read_series(series))
    assert np.array_equal(datasets[3].pixel_array.astype(np.float64) - 1024, volume[3])
    # headers only (for the SEG / RTSTRUCT writers): the same instances, without their pixel bytes
    headers = source_datasets(series, pixels=False)
    assert [ds.SOPInstanceUID for ds in headers] == [ds.SOPInstanceUID for ds in datasets]
    assert all("PixelData" not in ds and ds.file_meta.TransferSyntaxUID for ds in headers)


def test_source_headers_still_refuse_a_file_truncated_after_the_scan(ct_copy) -> None:
    folder, _files, _ = ct_copy
    series = select_series(scan_dicom(folder))
    path = series.files[2]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DicomError, match="truncated"):
        source_datasets(series, pixels=False)


# --------------------------------------------------------------------------------------------
# Folder trees, DICOMDIR, stray files, selection
# --------------------------------------------------------------------------------------------


def test_dicomdir(tmp_path: Path) -> None:
    files, image, _ = phantom_series(tmp_path / "cd", "mr", seed=3, size=32, dicomdir=True)
    dicomdir = tmp_path / "cd" / "DICOMDIR"
    assert dicomdir.is_file() and all("SE000000" in str(f) for f in files)
    for source in (tmp_path / "cd", dicomdir):
        out = _read(source)
        _geometry_equal(out, image)
        np.testing.assert_array_equal(_values(out), _values(image))
    assert is_dicom_input(dicomdir) and is_dicom_input(tmp_path / "cd")
    # a file the DICOMDIR names but that is gone: reported, and the series has a hole
    files[5].unlink()
    scan = scan_dicom(dicomdir)
    assert any(path == files[5] and "DICOMDIR" in reason for path, reason in scan.skipped)
    assert any("missing slices" in p for p in scan.series[0].problems)


def test_stray_files_skipped_with_a_note(ct_copy, caplog: pytest.LogCaptureFixture) -> None:
    folder, _, image = ct_copy
    (folder / "README.TXT").write_text("Exported by a PACS viewer\n")
    (folder / "notes.dcm").write_text("not really DICOM")
    (folder / "empty").write_bytes(b"")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(folder / "thumb.png"))
    (folder / "viewer").mkdir()
    (folder / "viewer" / "setup.exe").write_bytes(b"MZ\x90\x00" + bytes(200))
    with caplog.at_level("INFO", logger="medseg.io.dicom"):
        scan = scan_dicom(folder.parent)
    reasons = {path.name: reason for path, reason in scan.skipped}
    assert set(reasons) == {"README.TXT", "notes.dcm", "empty", "thumb.png", "setup.exe"}
    assert "PNG" in reasons["thumb.png"] and all("not DICOM" in r for r in reasons.values())
    assert "skipped 5 file(s)" in caplog.text
    assert len(scan.series) == 1 and not scan.series[0].problems
    np.testing.assert_array_equal(_values(read_series(select_series(scan))), _values(image))


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """study A: CT portal venous (30 slices) + MR T1 (22 slices); study B: CT thorax (12 slices)."""
    root = tmp_path_factory.mktemp("tree") / "export"
    study_a, study_b = generate_uid(), generate_uid()
    uids = {name: generate_uid() for name in ("venous", "t1", "thorax")}
    _, _ct, _ = phantom_series(root / "a" / "1", "ct", seed=5, grid=_grid(size=(32, 32, 30), degrees=0),
                              study_uid=study_a, series_uid=uids["venous"], series_number=2,
                              series_description="Abdomen PORTAL VENOUS 3mm", file_names="im")
    phantom_series(root / "a" / "2", "mr", seed=6, grid=_grid("sagittal", size=(32, 32, 22)), study_uid=study_a,
                   series_uid=uids["t1"], series_number=3, series_description="t1_vibe_tra", file_names="im")
    phantom_series(root / "b" / "x" / "y", "ct", seed=7, grid=_grid(size=(32, 32, 12)), study_uid=study_b,
                   series_uid=uids["thorax"], series_number=1, series_description="Thorax", file_names="uid")
    return root, uids


def test_tree_of_studies_and_selection_rules(two_studies) -> None:
    root, uids = two_studies
    scan = scan_dicom(root)
    assert {s.series_uid for s in scan.series} == set(uids.values())
    assert len({s.study_uid for s in scan.series}) == 2
    assert select_series(scan, modality="mr").series_uid == uids["t1"]
    assert select_series(scan, description="portal").series_uid == uids["venous"]
    assert select_series(scan, modality="CT", min_slices=20).series_uid == uids["venous"]
    assert select_series(scan, series_uid=uids["thorax"]).slices == 12
    with pytest.raises(InputError, match="regular expression"):
        select_series(scan, description="(unclosed")


def test_ambiguous_selection_lists_the_candidates(two_studies) -> None:
    root, uids = two_studies
    scan = scan_dicom(root)
    with pytest.raises(DicomError) as info:
        select_series(scan, modality="CT")
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{root}: 2 DICOM series match (modality CT)")
    candidates = lines[1:]
    assert len(candidates) == 2
    assert any(uids["venous"] in c and "CT" in c and "30 slice(s)" in c and "PORTAL VENOUS" in c for c in candidates)
    assert any(uids["thorax"] in c and "12 slice(s)" in c and "Thorax" in c for c in candidates)
    with pytest.raises(DicomError) as info:
        select_series(scan)
    assert len(str(info.value).splitlines()) == 4
    with pytest.raises(DicomError, match=r"no DICOM series matches .modality PT.") as info:
        select_series(scan, modality="PT")
    assert all(uid in str(info.value) for uid in uids.values())


def test_no_dicom_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DicomError, match="no such file or folder"):
        scan_dicom(tmp_path / "missing")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DicomError, match=r"no DICOM images found \(1 file\(s\) looked at; skipped 1"):
        scan_dicom(tmp_path)


def test_is_dicom_input(tmp_path: Path, clean_ct) -> None:
    folder, files, image = clean_ct
    assert is_dicom_input(folder) and is_dicom_input(folder.parent) and is_dicom_input(files[0])
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    (tmp_path / "notes.txt").write_text("x")
    assert not is_dicom_input(tmp_path / "ct.nii.gz")
    assert not is_dicom_input(tmp_path)  # a folder of NIfTI images
    assert not is_dicom_input(tmp_path / "notes.txt") and not is_dicom_input(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# Problems and notes
# --------------------------------------------------------------------------------------------


def _problems(folder: Path) -> tuple[str, ...]:
    return scan_dicom(folder).series[0].problems


def _refused(folder: Path, *fragments: str) -> str:
    """select_series refuses the series; its message names the series and each fragment."""
    scan = scan_dicom(folder)
    with pytest.raises(DicomError) as info:
        select_series(scan)
    message = str(info.value)
    assert scan.series[0].series_uid in message
    for fragment in fragments:
        assert fragment in message, message
    with pytest.raises(DicomError):
        read_series(scan.series[0])
    return message


def test_missing_slice(ct_copy) -> None:
    folder, files, _ = ct_copy
    files[9].unlink()
    message = _refused(folder, "missing slices", files[8].name, files[10].name)
    assert "about 1 slice(s) missing" in message


def test_uneven_spacing(ct_copy) -> None:
    folder, files, image = ct_copy
    step = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2] * image.GetSpacing()[2]

    def shift(ds: pydicom.Dataset) -> None:
        ds.ImagePositionPatient = [float(v) + 0.3 * s for v, s in zip(ds.ImagePositionPatient, step)]

    _edit(files[6], shift)
    _refused(folder, "uneven slice spacing")


def test_gantry_tilt(ct_copy) -> None:
    folder, files, image = ct_copy
    matrix = np.asarray(image.GetDirection()).reshape(3, 3)
    shear = math.tan(math.radians(15.0)) * image.GetSpacing()[2] * matrix[:, 1]  # along the column direction
    for k, path in enumerate(files):
        _edit(path, lambda ds, k=k: setattr(ds, "ImagePositionPatient",
                                            [float(v) + k * s for v, s in zip(ds.ImagePositionPatient, shear)]))
    message = _refused(folder, "gantry tilt")
    assert "15.0 degrees" in message


def test_mixed_orientations(ct_copy) -> None:
    folder, files, _ = ct_copy
    for path in files[:10]:
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]))
    _refused(folder, "mixed orientations", "10 image(s)", "12 image(s)")


def _crop(ds: pydicom.Dataset) -> None:
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:20, :24]).tobytes()
    ds.Rows, ds.Columns = 20, 24


def test_mixed_sizes(ct_copy) -> None:
    folder, files, _ = ct_copy
    for path in files[:8]:
        _edit(path, _crop)
    _refused(folder, "mixed sizes", "8 image(s) of 24x20", "14 image(s) of 40x36")


def _extra_instance(folder: Path, source: Path, name: str, change: Callable[[pydicom.Dataset], None]) -> Path:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    change(ds)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def test_localizers_dropped_with_a_note(ct_copy) -> None:
    """A scout (ImageType LOCALIZER) and a stray image of another orientation and size in the series."""
    folder, files, image = ct_copy

    def scout(ds: pydicom.Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    def sagittal(ds: pydicom.Dataset) -> None:
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        _crop(ds)

    _extra_instance(folder, files[0], "SCOUT1", scout)
    _extra_instance(folder, files[0], "ZZ_SAG", sagittal)
    series = scan_dicom(folder).series[0]
    assert not series.problems
    assert any("1 localizer image" in n and "SCOUT1" in n for n in series.notes)
    assert any("different orientation" in n and "ZZ_SAG" in n for n in series.notes)
    out = read_series(select_series(scan_dicom(folder)))
    _geometry_equal(out, image)
    np.testing.assert_array_equal(_values(out), _values(image))


def test_localizer_series_is_never_picked(ct_copy) -> None:
    folder, files, _ = ct_copy

    def scout_series(ds: pydicom.Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesInstanceUID = "1.2.3.4.5.6"
        ds.SeriesDescription = "Topogram"

    _extra_instance(folder, files[0], "TOPO", scout_series)
    scan = scan_dicom(folder)
    assert len(scan.series) == 2
    assert select_series(scan).series_uid != "1.2.3.4.5.6"


def test_duplicate_instances(ct_copy) -> None:
    folder, files, image = ct_copy
    shutil.copy(files[4], folder / "ZZ_COPY_OF_IM5")  # the same instance twice: harmless
    series = scan_dicom(folder).series[0]
    assert not series.problems and any("duplicate" in n and "ZZ_COPY_OF_IM5" in n for n in series.notes)
    np.testing.assert_array_equal(_values(read_series(series)), _values(image))
    # another instance at the same position: a real problem
    _extra_instance(folder, files[4], "OTHER", lambda ds: None)
    _refused(folder, "same slice position", "OTHER")


def test_conflicting_duplicate_instances_are_refused(ct_copy) -> None:
    """Two files with one SOPInstanceUID but different pixels: which one is the slice cannot be told."""
    folder, files, _ = ct_copy

    def brighter(ds: pydicom.Dataset) -> None:
        ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()

    altered = folder / "ZZ_ALTERED"
    shutil.copy(files[4], altered)
    _edit(altered, brighter)
    message = _refused(folder, "share SOPInstanceUID", "pixel data", files[4].name, "ZZ_ALTERED")
    assert "ignored" not in message
    # the same instance moved elsewhere: a different geometry under one UID is a conflict as well
    altered.unlink()
    moved = folder / "ZZ_MOVED"
    shutil.copy(files[4], moved)
    _edit(moved, lambda ds: setattr(ds, "ImagePositionPatient", [float(v) + 1.0 for v in ds.ImagePositionPatient]))
    _refused(folder, "share SOPInstanceUID", "ImagePositionPatient")


def test_re_encoded_duplicate_is_an_identical_copy(ct_copy) -> None:
    """The same instance stored twice in different encodings (not byte-identical): one copy kept, with a note."""
    folder, files, image = ct_copy
    ds = pydicom.dcmread(files[4])
    ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    ds.save_as(folder / "ZZ_RLE_COPY", enforce_file_format=True)
    series = scan_dicom(folder).series[0]
    assert not series.problems, series.problems
    assert any("identical duplicate" in n and "ZZ_RLE_COPY" in n for n in series.notes)
    np.testing.assert_array_equal(_values(read_series(series)), _values(image))


@pytest.mark.parametrize(("keyword", "value", "fragment"), [
    ("PixelSpacing", [0, 0], "PixelSpacing (0, 0) is not positive"),
    ("PixelSpacing", [-0.7, 0.7], "is not positive"),
    ("PixelSpacing", ["nan", "nan"], "PixelSpacing (nan, nan) is not finite"),
    ("ImagePositionPatient", ["nan", 0, 0], "ImagePositionPatient (nan, 0, 0) is not finite"),
    ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0], "is not two orthogonal unit vectors"),
    ("ImageOrientationPatient", [0, 0, 0, 0, 0, 0], "is not two orthogonal unit vectors"),
])
def test_unusable_geometry_tags_are_refused_naming_file_and_tag(ct_copy, keyword: str, value: list,
                                                                 fragment: str) -> None:
    """Present but unusable geometry (PixelSpacing 0 made SimpleITK raise "internal error" before)."""
    folder, files, _ = ct_copy
    for path in files:
        _edit(path, lambda ds: setattr(ds, keyword, value))
    _refused(folder, fragment, files[0].name)


def test_orthogonal_localizers_are_mixed_orientations_not_a_tilt(ct_copy) -> None:
    """Two scouts at right angles: their positions are not steps along one normal, so no tilt is measured."""
    folder, files, _ = ct_copy

    def scout(orientation: list[int]) -> Callable[[pydicom.Dataset], None]:
        def change(ds: pydicom.Dataset) -> None:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.SeriesInstanceUID = "1.2.3.4.5.7"
            ds.ImageOrientationPatient = orientation
            ds.ImagePositionPatient = [-200, -200, 100] if orientation[0] else [0, -200, 300]
        return change

    _extra_instance(folder, files[0], "SCOUT_AX", scout([1, 0, 0, 0, 1, 0]))
    _extra_instance(folder, files[0], "SCOUT_SAG", scout([0, 1, 0, 0, 0, -1]))
    series = next(s for s in scan_dicom(folder).series if s.series_uid == "1.2.3.4.5.7")
    assert series.localizer and series.orientations == 2
    assert any("mixed orientations" in p for p in series.problems)
    assert not any("tilt" in p for p in series.problems), series.problems


def test_truncated_file(ct_copy) -> None:
    folder, files, _ = ct_copy
    data = files[7].read_bytes()
    files[7].write_bytes(data[: len(data) - 1000])
    message = _refused(folder, files[7].name, "truncated")
    assert "pixel data has" in message


def test_truncated_compressed_file(tmp_path: Path) -> None:
    files, _, _ = phantom_series(tmp_path, "ct", seed=1, size=32, transfer_syntax=JPEGLSLossless)
    data = files[3].read_bytes()
    files[3].write_bytes(data[:-100])
    _refused(tmp_path, files[3].name, "truncated")


def test_missing_pixel_data(ct_copy) -> None:
    folder, files, _ = ct_copy
    _edit(files[2], lambda ds: ds.__delattr__("PixelData"))
    _refused(folder, files[2].name, "no pixel data")


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    files, _, _ = phantom_series(tmp_path, "ct", seed=1, size=32, transfer_syntax=RLELossless)
    _edit(files[0], lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", MPEG2MPML))
    _refused(tmp_path, files[0].name, "MPEG2", "cannot be decoded")


def test_corrupt_compressed_data_names_the_file(tmp_path: Path) -> None:
    """Data no decoder accepts is only found when decoding: read_series and inspect --decode name the file."""
    files, _, _ = phantom_series(tmp_path / "s", "ct", seed=1, size=32, transfer_syntax=JPEG2000Lossless)

    def garble(ds: pydicom.Dataset) -> None:
        frames = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
        frame = next(frames)
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * len(frame)])

    _edit(files[5], garble)
    series = select_series(scan_dicom(tmp_path))  # headers are fine
    with pytest.raises(DicomError) as info:
        read_series(series)
    message = str(info.value)
    assert message.startswith(f"{files[5]}: series {series.series_uid}: cannot decode")
    # pydicom's reason lists each plugin's failure on the lines after "plugins:"; all of it, on one line
    assert "\n" not in message and not message.rstrip().endswith("plugins:"), message


# --------------------------------------------------------------------------------------------
# Transfer syntaxes and multi-frame
# --------------------------------------------------------------------------------------------

SYNTAXES = [ImplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless,
            pytest.param(JPEGLosslessSV1, marks=needs(shutil.which("dcmcjpeg"), "dcmtk (dcmcjpeg)"))]


@pytest.mark.parametrize("modality", ["ct", "mr"])
@pytest.mark.parametrize("syntax", SYNTAXES)
def test_compressed_syntaxes_decode_to_the_same_voxels(tmp_path: Path, syntax: str, modality: str) -> None:
    grid = _grid(size=(34, 32, 10))
    files, image, _ = phantom_series(tmp_path, modality, seed=8, grid=grid, transfer_syntax=syntax)
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    series = select_series(scan_dicom(tmp_path))
    assert series.transfer_syntaxes == (syntax,)
    out = read_series(series)
    _geometry_equal(out, image)
    np.testing.assert_array_equal(_values(out), _values(image))


@pytest.mark.parametrize("modality,syntax", [("ct", ExplicitVRLittleEndian), ("ct", JPEGLSLossless),
                                             ("mr", JPEG2000Lossless), ("mr", RLELossless)])
def test_enhanced_multiframe_reads_to_the_same_image(tmp_path: Path, modality: str, syntax: str) -> None:
    grid = _grid("sagittal" if modality == "mr" else "axial")
    files, image, _ = phantom_series(tmp_path, modality, seed=9, grid=grid, multiframe=True, transfer_syntax=syntax)
    assert len(files) == 1
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.SOPClassUID.name.startswith("Legacy Converted Enhanced") and int(ds.NumberOfFrames) == 22
    series = select_series(scan_dicom(tmp_path))
    assert series.multiframe and series.files == tuple(files) and sorted(series.frame_order) == list(range(22))
    out = read_series(series)
    _geometry_equal(out, image)
    np.testing.assert_array_equal(_values(out), _values(image))
    assert len(source_datasets(series)) == 1


def test_enhanced_multiframe_frames_out_of_order(tmp_path: Path) -> None:
    """Frames stored in reverse (per-frame groups and pixels) are still sorted along the normal."""
    files, image, _ = phantom_series(tmp_path, "ct", seed=9, grid=_grid(size=(24, 20, 8)), multiframe=True)
    before = select_series(scan_dicom(tmp_path)).frame_order

    def reverse(ds: pydicom.Dataset) -> None:
        ds.PerFrameFunctionalGroupsSequence = list(ds.PerFrameFunctionalGroupsSequence)[::-1]
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()

    _edit(files[0], reverse)
    series = select_series(scan_dicom(tmp_path))
    assert series.frame_order == tuple(7 - i for i in before)
    np.testing.assert_array_equal(_values(read_series(series)), _values(image))


@pytest.mark.pacs
@needs_dciodvfy
@pytest.mark.parametrize("modality,multiframe", [("ct", False), ("mr", False), ("ct", True), ("mr", True)])
def test_synthetic_instances_pass_dciodvfy(tmp_path: Path, modality: str, multiframe: bool) -> None:
    files, _, _ = phantom_series(tmp_path, modality, seed=1, size=32, multiframe=multiframe,
                                 transfer_syntax=JPEGLSLossless if multiframe else ExplicitVRLittleEndian)
    assert dciodvfy_errors(files[0]) == []


def test_writer_refuses_values_that_do_not_fit(tmp_path: Path) -> None:
    image = sitk.Image(4, 4, 3, sitk.sitkFloat32) + 70000.0
    with pytest.raises(InputError, match="do not fit"):
        write_dicom_series(image, tmp_path, modality="MR")
    with pytest.raises(InputError, match="transfer syntax"):
        write_dicom_series(image, tmp_path, transfer_syntax="1.2.3")


# --------------------------------------------------------------------------------------------
# medseg inspect
# --------------------------------------------------------------------------------------------


def test_inspect_lists_series_without_patient_data(two_studies, capsys: pytest.CaptureFixture[str]) -> None:
    root, _uids = two_studies
    (root / "b" / "DS_STORE").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    assert main(["inspect", str(root), "--decode"]) == 0
    out = capsys.readouterr().out
    scan: DicomScan = scan_dicom(root)
    for series in scan.series:
        assert series.series_uid in out and series.study_uid in out
    assert "32 x 32 x 30 (columns x rows x slices), 30 file(s)" in out
    assert "Explicit VR Little Endian (1.2.840.10008.1.2.1)" in out
    assert "oblique sagittal" in out and "problems       none" in out
    assert "decoded        30 frame(s), 0 file(s) failed" in out
    assert "b/DS_STORE: not DICOM" in out
    assert PATIENT_NAME not in out and "Synthetic" not in out and PATIENT_ID not in out


def test_inspect_reports_problems_and_decode_failures(ct_copy, capsys: pytest.CaptureFixture[str]) -> None:
    folder, files, _ = ct_copy
    files[9].unlink()
    assert main(["inspect", str(folder)]) == 0  # problems are reported, not an error
    out = capsys.readouterr().out
    assert "problems       1" in out and "missing slices" in out
    data = files[3].read_bytes()
    files[3].write_bytes(data[:-500])
    assert main(["inspect", str(folder), "--decode"]) == 2
    captured = capsys.readouterr()
    assert f"- {files[3].name}: " in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last == f"medseg: error: {folder}: 1 file(s) could not be decoded (listed above)"


def test_inspect_errors_and_images(tmp_path: Path, clean_ct, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"medseg: error: {tmp_path / 'missing'}: no such file or folder"
    (tmp_path / "notes.txt").write_text("nothing here")
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"medseg: error: {tmp_path}: no DICOM images found")
    _, _, image = clean_ct
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    assert main(["inspect", str(tmp_path / "ct.nii.gz")]) == 0
    assert "3D image, size 40 x 36 x 22, spacing 3.1 x 3.4 x 5.5 mm" in capsys.readouterr().out


def test_inspect_reports_unknown_geometry_instead_of_inventing_it(ct_copy, capsys: pytest.CaptureFixture[str]) -> None:
    folder, files, _ = ct_copy
    for path in files:
        _edit(path, lambda ds: [ds.__delattr__(k) for k in ("ImagePositionPatient", "ImageOrientationPatient",
                                                             "PixelSpacing")])
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "spacing        unknown x unknown x unknown mm" in out
    assert "origin         unknown" in out and "orientation    unknown" in out
    assert "axial" not in out and "(0, 0, 0) mm" not in out and " 1 x 1 " not in out


def test_inspect_reports_enhanced_multiframe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    phantom_series(tmp_path, "ct", seed=9, grid=_grid(size=(24, 20, 8)), multiframe=True)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "24 x 20 x 8 (columns x rows x slices), 1 multi-frame file of 8 frames" in out
    assert "multi-frame    yes, enhanced: 8 frames" in out and "problems       none" in out


def _testdata_files() -> list[Path]:
    from pydicom.data import get_testdata_files

    return sorted(Path(f) for f in get_testdata_files() if Path(f).is_file())


def test_inspect_never_crashes_on_pydicom_test_files(capsys: pytest.CaptureFixture[str]) -> None:
    """Every file pydicom ships for its tests (odd VRs, broken encapsulation, colour, RT, multi-frame):
    ``inspect --decode`` exits 0, or 2 with one clean line; multi-frame images report every frame."""
    files = _testdata_files()
    assert len(files) > 100
    multiframe_seen = 0
    for path in files:
        try:
            frames = int(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("NumberOfFrames", 1) or 1)
        except Exception:  # noqa: BLE001 - the files pydicom itself cannot read
            frames = None
        capsys.readouterr()  # (pydicom's own warnings about the file, above)
        code = main(["--quiet", "inspect", "--decode", str(path)])
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert code in (0, 2), (path.name, code, captured.err)
        assert "Traceback" not in captured.err and "internal error" not in captured.err, (path.name, captured.err)
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("medseg: error: "), (path.name, captured.err)
        else:
            assert not lines, (path.name, captured.err)
        if frames and frames > 1 and "series 1:" in captured.out and "skipped 1 file" not in captured.out:
            multiframe_seen += 1
            assert f"x {frames} (columns x rows x slices), 1 multi-frame file of {frames} frames" in captured.out, path
            assert "multi-frame    yes" in captured.out, path
    assert multiframe_seen >= 3
