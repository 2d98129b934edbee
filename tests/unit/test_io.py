"""Tests of image reading and writing with geometry intact (medseg.io.image, medseg.io.atomic)."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage

from medseg.errors import InputError
from medseg.io.atomic import atomic_path
from medseg.io.image import (
    Geometry,
    case_name,
    image_suffix,
    list_images,
    read_geometry,
    read_image,
    to_array,
    write_label_map,
)
from medseg.io.reader import ImageFileReader

FORMATS = (".nii.gz", ".nrrd", ".mha", ".mhd")
#: Files a format writes beside the named one (MetaImage keeps its pixels in a second file).
COMPANION = {".mhd": ".zraw"}

SPACING = (0.7, 0.9, 2.5)
ORIGIN = (12.5, -30.0, 100.0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _oblique_direction() -> np.ndarray:
    """A proper rotation (about z then x, 0.3 rad each) of an R-flipped frame: oblique, not axis-aligned."""
    c, s = math.cos(0.3), math.sin(0.3)
    about_z = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return about_z @ about_x @ np.diag([-1.0, -1.0, 1.0])


def _oblique_image(shape_xyz: tuple[int, int, int] = (10, 12, 7), dtype=np.int16, seed: int = 0) -> sitk.Image:
    values = np.random.default_rng(seed).integers(-1000, 1000, shape_xyz).astype(dtype)
    image = sitk.GetImageFromArray(np.ascontiguousarray(values.T))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(_oblique_direction().ravel().tolist())
    return image


def _expected_ras_affine() -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = _oblique_direction() @ np.diag(SPACING)
    lps[:3, 3] = ORIGIN
    return LPS_TO_RAS @ lps


def _load(path: Path) -> MetaTensor:
    return LoadImage(reader=ImageFileReader(), image_only=True)(str(path))


def _assert_path_error(excinfo: pytest.ExceptionInfo, path: Path) -> str:
    message = str(excinfo.value)
    assert message.startswith(str(path)), message
    return message


# --------------------------------------------------------------------------------------------
# ImageFileReader through MONAI's LoadImage
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", FORMATS)
def test_reader_gives_xyz_array_and_ras_affine(tmp_path: Path, suffix: str) -> None:
    image = _oblique_image()
    path = tmp_path / f"image{suffix}"
    sitk.WriteImage(image, str(path), True)

    loaded = _load(path)
    assert isinstance(loaded, MetaTensor)
    assert tuple(loaded.shape) == (10, 12, 7)  # index order (x, y, z), no channel added
    np.testing.assert_array_equal(loaded.numpy(), sitk.GetArrayFromImage(image).T)
    np.testing.assert_allclose(loaded.affine.numpy(), _expected_ras_affine(), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(loaded.meta["spatial_shape"]), (10, 12, 7))


def test_reader_affine_matches_monai_nibabel_reader_for_nifti(tmp_path: Path) -> None:
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(_oblique_image(), str(path), True)
    ours = _load(path)
    theirs = LoadImage(reader=NibabelReader(), image_only=True)(str(path))
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy(), atol=1e-4)


def test_reader_handles_2d_images(tmp_path: Path) -> None:
    c, s = math.cos(0.2), math.sin(0.2)
    values = np.arange(6 * 9, dtype=np.uint8).reshape(9, 6)  # (y, x)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.5, 0.8))
    image.SetOrigin((3.0, -4.0))
    image.SetDirection((c, -s, s, c))
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(image, str(path))

    loaded = _load(path)
    assert tuple(loaded.shape) == (6, 9)
    np.testing.assert_array_equal(loaded.numpy(), values.T)
    lps = np.eye(3)
    lps[:2, :2] = np.array([[c, -s], [s, c]]) @ np.diag([0.5, 0.8])
    lps[:2, 2] = (3.0, -4.0)
    assert loaded.affine.shape == (3, 3)
    np.testing.assert_allclose(loaded.affine.numpy(), np.diag([-1.0, -1.0, 1.0]) @ lps, atol=1e-6)


def test_reader_refuses_a_missing_file_with_input_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(InputError) as excinfo:
        ImageFileReader().read(path)
    _assert_path_error(excinfo, path)


# --------------------------------------------------------------------------------------------
# write_label_map
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize(("top", "dtype", "pixel_id"), [(5, np.uint8, sitk.sitkUInt8), (300, np.uint16, sitk.sitkUInt16)])
def test_write_label_map_keeps_reference_grid_and_values(tmp_path: Path, suffix: str, top: int, dtype, pixel_id) -> None:
    reference = tmp_path / "ref" / f"image{suffix}"
    reference.parent.mkdir()
    sitk.WriteImage(_oblique_image(), str(reference), True)
    labels = np.random.default_rng(1).integers(0, top + 1, (10, 12, 7)).astype(np.int64)
    labels[0, 0, 0] = top
    out_dir = tmp_path / "out"
    output = out_dir / f"labels{suffix}"

    assert write_label_map(labels, reference, output) == output
    assert read_geometry(reference).mismatch(read_geometry(output)) is None
    written = read_image(output)
    assert written.GetPixelID() == pixel_id
    assert to_array(written).dtype == dtype
    np.testing.assert_array_equal(to_array(written), labels)
    # nothing but the output (and its data file) in the folder: no temporary leftovers
    expected = {output.name} | ({f"labels{COMPANION[suffix]}"} if suffix in COMPANION else set())
    assert {p.name for p in out_dir.iterdir()} == expected


def test_write_label_map_into_another_format_keeps_the_grid(tmp_path: Path) -> None:
    reference = tmp_path / "image.nii.gz"
    sitk.WriteImage(_oblique_image(), str(reference), True)
    labels = np.random.default_rng(2).integers(0, 4, (10, 12, 7))
    output = write_label_map(labels, reference, tmp_path / "labels.nrrd")
    assert read_geometry(reference).mismatch(read_geometry(output)) is None
    np.testing.assert_array_equal(to_array(read_image(output)), labels)


def _nifti_reference(path: Path, qform_code: int, sform_code: int) -> None:
    affine = np.eye(4)
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    if np.linalg.det(rotation) < 0:
        rotation[:, 0] *= -1
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = (-20.0, 30.0, 40.0)
    data = np.random.default_rng(3).normal(size=(10, 12, 7)).astype(np.float32)
    image = nib.Nifti1Image(data, None)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    nib.save(image, str(path))


@pytest.mark.parametrize(("qform_code", "sform_code"), [(1, 1), (1, 2), (2, 0)])
def test_write_label_map_copies_nifti_qform_and_sform(tmp_path: Path, qform_code: int, sform_code: int) -> None:
    reference = tmp_path / "image.nii.gz"
    _nifti_reference(reference, qform_code, sform_code)
    labels = np.random.default_rng(4).integers(0, 3, (10, 12, 7))
    output = write_label_map(labels, reference, tmp_path / "labels.nii.gz")

    ref, out = nib.load(str(reference)), nib.load(str(output))
    assert int(out.header["qform_code"]) == qform_code and int(out.header["sform_code"]) == sform_code
    np.testing.assert_array_equal(out.header.get_qform(), ref.header.get_qform())
    np.testing.assert_array_equal(out.header.get_sform(), ref.header.get_sform())
    np.testing.assert_array_equal(out.affine, ref.affine)
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)
    assert read_geometry(reference).mismatch(read_geometry(output)) is None


@pytest.mark.parametrize("suffix", (".nii.gz", ".nrrd"))
def test_write_label_map_of_wrong_shape_raises_and_writes_nothing(tmp_path: Path, suffix: str) -> None:
    reference = tmp_path / "ref" / f"image{suffix}"
    reference.parent.mkdir()
    sitk.WriteImage(_oblique_image(), str(reference), True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / f"labels{suffix}"
    with pytest.raises(InputError, match="shape"):
        write_label_map(np.zeros((10, 12, 8), np.uint8), reference, output)
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------------------------
# atomic_path
# --------------------------------------------------------------------------------------------


def test_atomic_path_moves_the_file_into_place(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    with atomic_path(target) as tmp:
        assert tmp.name == "result.txt" and tmp.parent != tmp_path
        tmp.write_text("done")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_atomic_path_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "result.mhd"
    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial header")
            tmp.with_suffix(".raw").write_bytes(b"\0" * 10)
            raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_an_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("previous result")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written new res")
            raise KeyboardInterrupt
    assert target.read_text() == "previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


# --------------------------------------------------------------------------------------------
# read_geometry / read_image errors
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["read_geometry", "read_image"])
def reader(request: pytest.FixtureRequest):
    return {"read_geometry": read_geometry, "read_image": read_image}[request.param]


def test_read_missing_file(tmp_path: Path, reader) -> None:
    path = tmp_path / "missing.nii.gz"
    with pytest.raises(InputError) as excinfo:
        reader(path)
    assert "no such file" in _assert_path_error(excinfo, path)


def test_read_a_folder(tmp_path: Path, reader) -> None:
    path = tmp_path / "scan.nii.gz"
    path.mkdir()
    with pytest.raises(InputError) as excinfo:
        reader(path)
    assert "folder" in _assert_path_error(excinfo, path)


def test_read_unsupported_ending(tmp_path: Path, reader) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError) as excinfo:
        reader(path)
    assert "not a supported image file" in _assert_path_error(excinfo, path)


def test_read_text_file_named_nifti(tmp_path: Path, reader) -> None:
    path = tmp_path / "scan.nii.gz"
    path.write_text("this is not an image\n")
    with pytest.raises(InputError) as excinfo:
        reader(path)
    assert "not a readable image" in _assert_path_error(excinfo, path)


def test_unreadable_file_message_gives_the_reason_not_itk_source_lines(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii.gz"
    path.write_text("this is not an image\n")
    with pytest.raises(InputError) as excinfo:
        read_geometry(path)
    message = _assert_path_error(excinfo, path)
    assert ".cxx" not in message and "Exception thrown in SimpleITK" not in message, message


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_read_image_refuses_truncated_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(_oblique_image((20, 20, 20)), str(path), suffix != ".nii")
    _truncate(path)
    with pytest.raises(InputError) as excinfo:
        read_image(path)
    assert "truncated" in _assert_path_error(excinfo, path)


def test_read_4d_image_where_3d_is_expected(tmp_path: Path, reader) -> None:
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(path))
    with pytest.raises(InputError) as excinfo:
        reader(path, 3)
    assert "4D" in _assert_path_error(excinfo, path)


def test_read_4d_image_without_dims_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(path))
    with pytest.raises(InputError) as excinfo:
        read_geometry(path)
    assert "4D" in _assert_path_error(excinfo, path)


def test_read_3d_image_where_2d_is_expected(tmp_path: Path, reader) -> None:
    path = tmp_path / "volume.nrrd"
    sitk.WriteImage(_oblique_image(), str(path))
    with pytest.raises(InputError) as excinfo:
        reader(path, 2)
    assert "3D" in _assert_path_error(excinfo, path)


def test_read_geometry_returns_the_header_grid(tmp_path: Path) -> None:
    path = tmp_path / "volume.mha"
    sitk.WriteImage(_oblique_image(), str(path))
    geometry = read_geometry(path, 3)
    assert geometry.size == (10, 12, 7) and geometry.dims == 3
    np.testing.assert_allclose(geometry.spacing, SPACING)
    np.testing.assert_allclose(geometry.origin, ORIGIN)
    np.testing.assert_allclose(geometry.affine_ras(), _expected_ras_affine(), atol=1e-6)


def test_geometry_mismatch_names_the_difference() -> None:
    base = Geometry((4, 4, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    assert base.mismatch(base) is None
    assert "size" in base.mismatch(Geometry((4, 4, 5), base.spacing, base.origin, base.direction))
    assert "spacing" in base.mismatch(Geometry(base.size, (1.0, 1.0, 2.5), base.origin, base.direction))
    assert "origin" in base.mismatch(Geometry(base.size, base.spacing, (0.0, 0.0, 3.0), base.direction))
    flipped = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    assert "direction" in base.mismatch(Geometry(base.size, base.spacing, base.origin, flipped))


# --------------------------------------------------------------------------------------------
# list_images, case_name, image_suffix
# --------------------------------------------------------------------------------------------


def test_list_images_of_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        list_images(tmp_path)
    assert "no image files" in _assert_path_error(excinfo, tmp_path)


def test_list_images_of_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        list_images(tmp_path / "nope")
    _assert_path_error(excinfo, tmp_path / "nope")


def test_list_images_skips_hidden_and_non_image_files(tmp_path: Path) -> None:
    for name in ("b.nrrd", "a.nii.gz", "c.mhd", "c.raw", ".hidden.nii.gz", "notes.txt", "archive.gz", ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.nii.gz").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.nii.gz", "b.nrrd", "c.mhd"]


def test_list_images_refuses_only_non_images(tmp_path: Path) -> None:
    (tmp_path / ".hidden.nii.gz").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError):
        list_images(tmp_path)


@pytest.mark.parametrize(
    ("name", "case", "suffix"),
    [
        ("a.nii.gz", "a", ".nii.gz"),
        ("b.nrrd", "b", ".nrrd"),
        ("c.mhd", "c", ".mhd"),
        ("weird.name.nii", "weird.name", ".nii"),
        ("Upper.NII.GZ", "Upper", ".nii.gz"),
        ("notes.txt", "notes", None),
    ],
)
def test_case_name_and_image_suffix(name: str, case: str, suffix: str | None) -> None:
    assert image_suffix(name) == suffix
    assert image_suffix(Path("/some/folder") / name) == suffix
    assert case_name(Path("/some/folder") / name) == case
