"""`medseg predict` on a DICOM series: NIfTI, DICOM SEG and RTSTRUCT outputs, and bad DICOM input.

One phantom CT series (96 voxels in-plane, the training data's size) is predicted once per format
with the briefly trained model; the outputs are checked against each other and with dciodvfy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from skimage.draw import polygon

from medseg.cli import main
from medseg.data.synthetic import Grid
from medseg.data.synthetic.dicom import PATIENT_ID, PATIENT_NAME, phantom_series
from medseg.io.dicom import read_series, scan_dicom, select_series
from medseg.io.image import Geometry, to_array
from tests.tools import dciodvfy_errors, needs_dciodvfy

DESCRIPTION = "Abdomen CT 2.5mm"  # the outputs are named Abdomen_CT_2.5mm_*


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A CT phantom series (files without extension, like a CD export); returns (folder, files)."""
    folder = tmp_path_factory.mktemp("dicom") / "series"
    files, _, _ = phantom_series(folder, "ct", seed=11, size=96, series_description=DESCRIPTION, file_names="im")
    return folder, files


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory, series, trained_run: Path) -> dict[str, Path]:
    """The trained model's output for the series in each format (one CLI call each)."""
    folder, _ = series
    out = tmp_path_factory.mktemp("predicted")
    outputs = {}
    for fmt, name in (("nifti", "Abdomen_CT_2.5mm_seg.nii.gz"), ("dicom-seg", "Abdomen_CT_2.5mm_seg.dcm"),
                      ("rtstruct", "Abdomen_CT_2.5mm_rtstruct.dcm")):
        assert main(["predict", "--model", str(trained_run), "--input", str(folder), "--output", str(out / fmt),
                     "--format", fmt]) == 0
        assert sorted(p.name for p in (out / fmt).iterdir()) == [name]
        outputs[fmt] = out / fmt / name
    return outputs


def _sources(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _nifti_slice_of(nifti: sitk.Image, source: pydicom.Dataset) -> int:
    """The z index of the NIfTI voxel row holding the source slice's first pixel (checks it is one)."""
    index = nifti.TransformPhysicalPointToContinuousIndex([float(v) for v in source.ImagePositionPatient])
    assert np.allclose(index, np.round(index), atol=1e-3) and np.allclose(index[:2], 0, atol=1e-3)
    return int(round(index[2]))


def _metadata(run: Path) -> dict:
    return json.loads((run / "configs" / "metadata.json").read_text())


# --------------------------------------------------------------------------------------------
# DICOM SEG
# --------------------------------------------------------------------------------------------

@pytest.mark.slow  # trains the session model (about 1 min) if no test did
def test_dicom_seg_gives_the_nifti_mask_voxel_for_voxel(series, predicted) -> None:
    _, files = series
    sources = _sources(files)
    nifti = sitk.ReadImage(str(predicted["nifti"]))
    labels = to_array(nifti)  # (x, y, z)
    assert {1, 2, 3, 4} <= set(np.unique(labels).tolist())  # a trained model finds the organs
    seg = hd.seg.segread(predicted["dicom-seg"])
    back = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True,
                                             assert_missing_frames_are_empty=True)
    for source, frame in zip(sources, back):
        np.testing.assert_array_equal(frame, labels[:, :, _nifti_slice_of(nifti, source)].T)


@pytest.mark.slow  # trains the session model (about 1 min) if no test did
def test_dicom_seg_references_the_source_study_and_describes_the_model(series, predicted, trained_run: Path) -> None:
    _, files = series
    sources = _sources(files)
    seg = pydicom.dcmread(predicted["dicom-seg"])
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == sorted(
        s.SOPInstanceUID for s in sources)
    meta = _metadata(trained_run)
    described = {str(d.SegmentNumber): d for d in seg.SegmentSequence}
    assert set(described) == set(meta["segments"])
    for number, entry in meta["segments"].items():
        item = described[number]
        assert item.SegmentLabel == entry["name"]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == entry["snomed"]["code"]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == entry["category"]["code"]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == f"medseg {meta['name']}"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == meta["version"]
    assert seg.Manufacturer == "medseg" and seg.PatientID == PATIENT_ID  # patient module copied from the source


@pytest.mark.slow  # trains the session model (about 1 min) if no test did
@pytest.mark.pacs
@needs_dciodvfy
def test_dicom_seg_passes_dciodvfy(predicted) -> None:
    assert dciodvfy_errors(predicted["dicom-seg"]) == []


# --------------------------------------------------------------------------------------------
# RTSTRUCT
# --------------------------------------------------------------------------------------------

@pytest.mark.slow  # trains the session model (about 1 min) if no test did
def test_rtstruct_contours_lie_on_the_slices_and_cover_the_nifti_mask(series, predicted, trained_run: Path) -> None:
    _, files = series
    sources = {s.SOPInstanceUID: s for s in _sources(files)}
    nifti = sitk.ReadImage(str(predicted["nifti"]))
    labels = to_array(nifti)
    rt = pydicom.dcmread(predicted["rtstruct"])
    assert rt.Modality == "RTSTRUCT" and rt.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    meta = _metadata(trained_run)
    names = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
    assert names == {int(k): v["name"] for k, v in meta["segments"].items()}
    normal = np.cross(*np.asarray(next(iter(sources.values())).ImageOrientationPatient, dtype=float).reshape(2, 3))
    checked = 0
    for item in rt.ROIContourSequence:
        value = item.ReferencedROINumber
        drawn = np.zeros_like(labels, dtype=bool)
        for contour in item.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            source = sources[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            # every point lies in its slice's plane
            offset = (points - np.asarray(source.ImagePositionPatient, dtype=float)) @ normal
            assert np.abs(offset).max() < 1e-3
            index = np.array([nifti.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
            k = _nifti_slice_of(nifti, source)
            rr, cc = polygon(index[:, 0], index[:, 1], labels.shape[:2])  # (x, y) plane of the NIfTI
            filled = np.zeros(labels.shape[:2], dtype=bool)
            filled[rr, cc] = True
            drawn[:, :, k] ^= filled  # holes: even-odd rule
        truth = labels == value
        if not truth.any():  # a structure the model did not find: listed, without contours
            assert not drawn.any()
            continue
        checked += 1
        dice = 2 * (drawn & truth).sum() / (drawn.sum() + truth.sum())
        # the contours run half-way between inside and outside pixel centres: filling them gives the mask back
        assert dice > 0.98, f"ROI {names[value]}: Dice {dice:.3f} against the NIfTI mask"
    assert checked >= 4  # liver, spleen, kidney and bone at least


@pytest.mark.slow  # trains the session model (about 1 min) if no test did
@pytest.mark.pacs
@needs_dciodvfy
def test_rtstruct_passes_dciodvfy(predicted) -> None:
    assert dciodvfy_errors(predicted["rtstruct"]) == []


# --------------------------------------------------------------------------------------------
# NIfTI from DICOM
# --------------------------------------------------------------------------------------------

@pytest.mark.slow  # trains the session model (about 1 min) if no test did
def test_nifti_from_dicom_has_the_series_geometry_and_the_volumes_prediction(tmp_path: Path, series, predicted,
                                                                            trained_run: Path) -> None:
    folder, files = series
    chosen = select_series(scan_dicom(folder))
    written = sitk.ReadImage(str(predicted["nifti"]))
    assert Geometry.of(written).mismatch(Geometry(chosen.size, chosen.spacing, chosen.origin, chosen.direction)) is None
    # every source slice is a voxel plane of the output
    assert sorted(_nifti_slice_of(written, s) for s in _sources(files)) == list(range(len(files)))
    volume = tmp_path / "volume.nii.gz"
    sitk.WriteImage(read_series(chosen), str(volume))
    assert main(["predict", "--model", str(trained_run), "--input", str(volume), "--output", str(tmp_path / "out")]) == 0
    direct = to_array(sitk.ReadImage(str(tmp_path / "out" / "volume_seg.nii.gz")))
    np.testing.assert_array_equal(to_array(written), direct)


def test_multiframe_oblique_left_handed_series_seg_matches_the_nifti(tmp_path: Path, untrained_run: Path) -> None:
    """An enhanced CT whose frames run against row x column, rotated in-plane: SEG frames still pair
    with the right source frames."""
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    grid = Grid.centred((32, 32, 10), (4.0, 4.0, 5.0), (0.0, 0.0, 0.0), (c, -s, 0, s, c, 0, 0, 0, -1))
    (file,), _, _ = phantom_series(tmp_path / "mf", "ct", seed=6, grid=grid, multiframe=True)
    for fmt in ("nifti", "dicom-seg"):
        assert _predict(untrained_run, tmp_path / "mf", tmp_path / "out", "--format", fmt) == 0
    nifti = sitk.ReadImage(str(tmp_path / "out" / "medseg_phantom_seg.nii.gz"))
    labels = to_array(nifti)
    assert len(np.unique(labels)) > 1  # random weights: some foreground to compare
    source = pydicom.dcmread(file, stop_before_pixels=True)
    seg = hd.seg.segread(tmp_path / "out" / "medseg_phantom_seg.dcm")
    frames = seg.get_pixels_by_source_frame(source.SOPInstanceUID, list(range(1, 11)), combine_segments=True,
                                            assert_missing_frames_are_empty=True)
    for number, frame in enumerate(frames, 1):
        item = source.PerFrameFunctionalGroupsSequence[number - 1]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        index = nifti.TransformPhysicalPointToContinuousIndex(position)
        assert np.allclose(index[:2], 0, atol=1e-3)
        np.testing.assert_array_equal(frame, labels[:, :, int(round(index[2]))].T)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("small") / "series"
    files, _, _ = phantom_series(folder, "ct", seed=2, size=32, series_description="small")
    return folder, files


def _predict(run: Path, source: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--model", str(run), "--input", str(source), "--output", str(out), *extra])


def test_two_series_without_a_selection_list_the_candidates(tmp_path: Path, small_series, untrained_run: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder, files = small_series
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed / "a")
    other, _, _ = phantom_series(mixed / "b", "mr", seed=4, size=32, series_description="other")
    out = tmp_path / "out"
    capsys.readouterr()
    assert _predict(untrained_run, mixed, out, "--format", "dicom-seg") == 2
    err = capsys.readouterr().err
    assert pydicom.dcmread(files[0]).SeriesInstanceUID in err
    assert pydicom.dcmread(other[0]).SeriesInstanceUID in err
    assert not out.exists()
    # a selection rule picks one; the output is named after it
    assert _predict(untrained_run, mixed, out, "--format", "dicom-seg", "--modality", "MR") == 0
    (seg,) = out.iterdir()
    assert seg.name == "other_seg.dcm"
    assert pydicom.dcmread(seg).ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(other[0]).SeriesInstanceUID
    # no patient data on the terminal
    err = capsys.readouterr().err
    assert PATIENT_ID not in err and PATIENT_NAME.split("^")[0] not in err


@pytest.mark.parametrize("damage", ["truncated", "no pixel data"])
def test_a_damaged_file_is_named_and_nothing_is_written(tmp_path: Path, small_series, untrained_run: Path,
                                                        capsys: pytest.CaptureFixture[str], damage: str) -> None:
    folder, files = small_series
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    victim = broken / files[len(files) // 2].name
    if damage == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) - 700])
    else:
        ds = pydicom.dcmread(victim)
        del ds.PixelData
        ds.save_as(victim)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _predict(untrained_run, broken, out, "--format", "dicom-seg") == 2
    err = capsys.readouterr().err
    assert victim.name in err, err
    assert not out.exists() or not any(out.iterdir())


def test_an_existing_output_is_kept_without_overwrite(tmp_path: Path, small_series, untrained_run: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = small_series
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "small_seg.dcm"
    existing.write_bytes(b"earlier result")
    capsys.readouterr()
    assert _predict(untrained_run, folder, out, "--format", "dicom-seg") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"earlier result"
    assert _predict(untrained_run, folder, out, "--format", "dicom-seg", "--overwrite") == 0
    assert pydicom.dcmread(existing).Modality == "SEG"


def test_a_failure_while_writing_leaves_no_partial_seg(tmp_path: Path, small_series, untrained_run: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = small_series

    def half_written(self, path, *args, **kwargs) -> None:
        Path(path).write_bytes(b"DICM" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", half_written)
    out = tmp_path / "out"
    assert _predict(untrained_run, folder, out, "--format", "dicom-seg") == 1
    assert not out.exists()


def test_a_series_is_predicted_from_memory_without_a_temporary_file(tmp_path: Path, small_series, untrained_run: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The series goes from its DICOM files to the model in memory: no temporary folder or file is made and
    SimpleITK writes nothing but the NIfTI output (each output appears atomically beside itself)."""
    import tempfile

    folder, _ = small_series
    out = tmp_path / "out"
    made: list[Path] = []

    def recording(function, where):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            made.append(Path(where(result)))
            return result
        return wrapper

    monkeypatch.setattr(tempfile, "mkdtemp", recording(tempfile.mkdtemp, lambda r: r))
    monkeypatch.setattr(tempfile, "mkstemp", recording(tempfile.mkstemp, lambda r: r[1]))
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", recording(tempfile.NamedTemporaryFile, lambda r: r.name))
    written: list[Path] = []
    write_image = sitk.WriteImage

    def write(image: sitk.Image, name: str, *args, **kwargs) -> None:
        written.append(Path(name))
        write_image(image, name, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", write)
    for fmt in ("nifti", "dicom-seg"):
        assert _predict(untrained_run, folder, out / fmt, "--format", fmt) == 0
    assert sorted(p.name for p in (out / "nifti").iterdir()) == ["small_seg.nii.gz"]
    assert sorted(p.name for p in (out / "dicom-seg").iterdir()) == ["small_seg.dcm"]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in made), made  # atomic writes beside the output
    assert [p.name for p in written] == ["small_seg.nii.gz"], written


def test_seg_needs_snomed_codes_and_other_options_need_dicom(tmp_path: Path, small_series, untrained_run: Path,
                                                             ct_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = small_series
    run = tmp_path / "run"
    shutil.copytree(untrained_run, run)
    meta = _metadata(run)
    meta["segments"]["2"]["snomed"] = None
    (run / "configs" / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    capsys.readouterr()
    assert _predict(run, folder, out, "--format", "dicom-seg") == 2
    assert "segment 2 ('spleen') has no SNOMED CT property type code" in capsys.readouterr().err
    assert not out.exists()
    image = sorted((ct_dataset.parent / "imagesTs").iterdir())[0]
    assert _predict(untrained_run, image, out, "--format", "rtstruct") == 2
    assert "--format rtstruct needs a DICOM folder" in capsys.readouterr().err
    assert _predict(untrained_run, image, out, "--series-uid", "1.2.3") == 2
    assert "--series-uid needs a DICOM folder" in capsys.readouterr().err
    assert not out.exists()
