"""Tests of image reading and writing with geometry intact (medseg.io.image, medseg.io.atomic)."""

from __future__ import annotations

import gzip
import math
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage

from medseg.errors import InputError, printable
from medseg.io.atomic import atomic_path
from medseg.io.geometry import grid_problem
from medseg.io.image import (
    Geometry,
    case_name,
    check_finite_voxels,
    image_suffix,
    label_map_source,
    list_images,
    read_geometry,
    read_image,
    read_source,
    to_array,
    write_label_map,
)
from medseg.io.nifti import check_nifti_header, read_nifti_bytes
from medseg.io.reader import ImageFileReader, LoadImageFiled

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
    with pytest.raises(RuntimeError, match="writer crashed"), atomic_path(target) as tmp:
        tmp.write_text("partial header")
        tmp.with_suffix(".raw").write_bytes(b"\0" * 10)
        raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_an_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("previous result")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
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


@pytest.mark.parametrize("damage", ["deflate data", "checksum"])
def test_corrupt_nifti_gz_stream_is_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    """Damage that keeps the file's length (a flipped run of bytes inside the deflate data, or a wrong
    CRC-32 in the gzip trailer) is caught by the one decompression (:func:`read_nifti_bytes`, ISA-L), as
    truncation is; the readers built on it refuse the file naming it (ITK may refuse it first)."""
    path = tmp_path / "scan.nii.gz"
    voxels = np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), str(path))
    info = check_nifti_header(path)
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if damage == "deflate data" else len(data) - 8
    data[where : where + 4] = bytes(255 - b for b in data[where : where + 4])
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as excinfo:
        read_nifti_bytes(path, info)
    assert "compressed data is truncated or corrupt" in _assert_path_error(excinfo, path)
    for read in (read_image, read_source):
        with pytest.raises(InputError) as excinfo:
            read(path)
        _assert_path_error(excinfo, path)


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


# --------------------------------------------------------------------------------------------
# Bad files: declared size against the bytes on disk, the grid, file names
# --------------------------------------------------------------------------------------------


def _replace_header_line(path: Path, key: bytes, line: bytes) -> None:
    """Replace the header line of an NRRD / MetaImage file that starts with ``key`` (the data stays)."""
    data = path.read_bytes()
    start = data.index(key)
    end = data.index(b"\n", start)
    path.write_bytes(data[:start] + line + data[end:])


def _written(tmp_path: Path, name: str, compress: bool = False) -> Path:
    path = tmp_path / name
    sitk.WriteImage(_oblique_image((20, 20, 20)), str(path), compress)
    return path


def test_missing_and_short_raw_data_file(tmp_path: Path, reader) -> None:
    missing = _written(tmp_path, "missing.mhd")
    (tmp_path / "missing.raw").unlink()
    with pytest.raises(InputError) as excinfo:
        reader(missing)
    assert "its data file missing.raw is missing" in _assert_path_error(excinfo, missing)
    short = _written(tmp_path, "short.mhd")
    raw = tmp_path / "short.raw"
    raw.write_bytes(raw.read_bytes()[:5000])
    with pytest.raises(InputError) as excinfo:
        reader(short)
    message = _assert_path_error(excinfo, short)
    assert "pixel data is truncated" in message and "20 x 20 x 20 voxels" in message and "4.9 kB" in message


@pytest.mark.parametrize(("name", "key", "line"), [
    ("huge.mha", b"DimSize", b"DimSize = 100000 100000 100000"),
    ("huge.nrrd", b"sizes:", b"sizes: 100000 100000 100000"),
])
def test_header_claiming_an_impossible_size_is_refused_before_allocating(tmp_path: Path, reader, name: str,
                                                                          key: bytes, line: bytes) -> None:
    path = _written(tmp_path, name)
    _replace_header_line(path, key, line)
    with pytest.raises(InputError) as excinfo:
        reader(path)
    message = _assert_path_error(excinfo, path)
    assert "100000 x 100000 x 100000 voxels" in message and "TB" in message, message


@pytest.mark.parametrize("name", ["scan.mha", "scan.nrrd"])
def test_truncated_compressed_nrrd_and_metaimage_say_how_far_they_decompress(tmp_path: Path, name: str) -> None:
    path = _written(tmp_path, name, compress=True)
    _truncate(path)
    with pytest.raises(InputError) as excinfo:
        read_image(path)
    message = _assert_path_error(excinfo, path)
    assert "compressed pixel data is truncated or corrupt: it decompresses to" in message, message
    assert "of the 16000 bytes the header declares" in message


def test_compressed_data_too_small_for_its_header(tmp_path: Path) -> None:
    path = _written(tmp_path, "scan.mha", compress=True)
    _replace_header_line(path, b"DimSize", b"DimSize = 4000 4000 4000")
    with pytest.raises(InputError, match=r"more than the .* of compressed data in the file can hold"):
        read_geometry(path)


@pytest.mark.parametrize(("name", "key", "line", "fragment"), [
    ("zero_direction.mha", b"TransformMatrix", b"TransformMatrix = 0 0 0 0 0 0 0 0 0", "is degenerate"),
    ("sheared.mha", b"TransformMatrix", b"TransformMatrix = 1 0 0 0.5 1 0 0 0 1", "is not orthonormal"),
    ("nan_spacing.mha", b"ElementSpacing", b"ElementSpacing = nan 1 1", "'ElementSpacing' = 'nan 1 1' is not finite"),
    ("nan_origin.mha", b"Offset", b"Offset = nan 6 7", "'Offset' = 'nan 6 7' is not finite"),  # ITK: origin 0
    ("zero_spacing.nrrd", b"space directions", b"space directions: (0,0,0) (0,1,0) (0,0,1)", "not positive"),
    ("nan_origin.nrrd", b"space origin", b"space origin: (nan,0,0)", "not a readable image"),  # teem refuses
])
def test_unusable_grid_in_nrrd_and_metaimage(tmp_path: Path, reader, name: str, key: bytes, line: bytes,
                                             fragment: str) -> None:
    path = _written(tmp_path, name)
    _replace_header_line(path, key, line)
    with pytest.raises(InputError) as excinfo:
        reader(path)
    assert fragment in _assert_path_error(excinfo, path)


def _nifti_with(path: Path, change) -> Path:
    """A valid NIfTI whose raw header is then edited by ``change(header)`` (no nibabel repair)."""
    image = nib.Nifti1Image(np.zeros((6, 7, 8), np.int16), np.diag([0.8, 0.9, 2.5, 1.0]))
    image.set_qform(image.affine, code=1)
    nib.save(image, str(path))
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as fp:
        data = bytearray(fp.read())
    header = nib.Nifti1Header(bytes(data[:348]), check=False)
    change(header)
    data[:348] = header.binaryblock
    with gzip.open(path, "wb") if path.name.endswith(".gz") else open(path, "wb") as fp:
        fp.write(bytes(data))
    return path


def _set(field: str, index, value):
    def change(header: nib.Nifti1Header) -> None:
        array = header[field]
        if index is None:
            header[field] = value
        else:
            array[index] = value
            header[field] = array
    return change


@pytest.mark.parametrize(("change", "fragment"), [
    (_set("pixdim", slice(1, 4), 0.0), "NIfTI pixdim (voxel spacing) (0, 0, 0) is not positive"),
    (_set("pixdim", slice(1, 4), np.nan), "NIfTI pixdim (voxel spacing) (nan, nan, nan) is not finite"),
    (_set("pixdim", 2, -1.0), "is not positive"),
    (_set("qoffset_x", None, np.inf), "NIfTI qform"),
    (_set("quatern_b", None, 2.0), "is not a rotation"),
    (lambda h: (h.__setitem__("sform_code", 1), h.__setitem__("srow_x", [np.nan, 0, 0, 0])), "NIfTI sform"),
    (lambda h: (h.__setitem__("sform_code", 1), h.__setitem__("srow_x", [0, 0, 0, 0]),
                h.__setitem__("srow_y", [0, 1, 0, 0]), h.__setitem__("srow_z", [0, 0, 1, 0])), "not positive"),
], ids=["pixdim-0", "pixdim-nan", "pixdim-negative", "qoffset-inf", "quaternion", "sform-nan", "sform-zero"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_header_that_needs_repair_is_refused(tmp_path: Path, reader, change, fragment: str,
                                                   suffix: str) -> None:
    """nibabel and ITK silently make pixdim 0 or NaN 1 mm; medseg refuses the header as written."""
    path = _nifti_with(tmp_path / f"scan{suffix}", change)
    with pytest.raises(InputError) as excinfo:
        reader(path)
    assert fragment in _assert_path_error(excinfo, path)
    with pytest.raises(InputError, match="NIfTI"):
        LoadImageFiled(keys="image")({"image": str(path)})


@pytest.mark.parametrize("suffix", FORMATS)
def test_reader_refuses_nan_and_infinite_voxels(tmp_path: Path, suffix: str) -> None:
    """Preprocessing clips +Inf and crops -Inf in the background away: the file itself must be refused."""
    values = np.zeros((10, 12, 7), np.float32)
    values[0, 0, 0], values[9, 11, 6], values[3, 3, 3] = -np.inf, np.inf, np.nan
    image = sitk.GetImageFromArray(np.ascontiguousarray(values.T))
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path), True)
    with pytest.raises(InputError) as excinfo:
        _load(path)
    message = _assert_path_error(excinfo, path)
    assert "1 NaN, 2 infinite, the first at voxel (0, 0, 0)" in message, message
    check_finite_voxels(path, np.zeros(5, np.float32))  # finite: no error
    check_finite_voxels(path, np.zeros(5, np.int16))


def test_load_image_filed_raises_the_input_error_itself(tmp_path: Path) -> None:
    """MONAI's LoadImaged(reader=...) folds reader errors into one RuntimeError with their tracebacks."""
    path = _written(tmp_path, "scan.nrrd")
    _truncate(path)
    with pytest.raises(InputError) as excinfo:
        LoadImageFiled(keys="image")({"image": str(path)})
    message = _assert_path_error(excinfo, path)
    assert "Traceback" not in message and "\n" not in message


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_file_names_that_are_not_utf8_are_read_and_written(tmp_path: Path, suffix: str) -> None:
    """SimpleITK's SetFileName aborts the process (SIGABRT) on such a name; medseg reads and writes it."""
    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xe9j\xe0"))  # Latin-1 folder name
    os.mkdir(folder)
    source = Path(folder) / os.fsdecode(b"scan_\xff\xfe" + suffix.encode())
    sitk.WriteImage(_oblique_image(), str(tmp_path / f"plain{suffix}"), True)
    for produced in tmp_path.glob("plain.*"):
        shutil.move(produced, Path(folder) / produced.name.replace("plain", os.fsdecode(b"scan_\xff\xfe")))
    if suffix == ".mhd":  # the header still names plain.zraw
        shutil.move(Path(folder) / os.fsdecode(b"scan_\xff\xfe.zraw"), Path(folder) / "plain.zraw")
    assert read_geometry(source).mismatch(Geometry.of(_oblique_image())) is None
    np.testing.assert_array_equal(to_array(read_image(source)), sitk.GetArrayFromImage(_oblique_image()).T)
    output = Path(folder) / os.fsdecode(b"seg_\xfd" + suffix.encode())
    labels = np.ones((10, 12, 7), np.uint8)
    write_label_map(labels, source, output)
    np.testing.assert_array_equal(to_array(read_image(output)), labels)
    assert read_geometry(output).mismatch(read_geometry(source)) is None


def test_printable_escapes_control_characters_and_undecodable_bytes() -> None:
    assert printable("/data/scan 1.nii.gz") == "/data/scan 1.nii.gz"
    assert printable("/data/ünï.nii") == "/data/ünï.nii"
    assert printable(os.fsdecode(b"scan_\xff\xfe.nii.gz")) == "'scan_\\xff\\xfe.nii.gz'"
    assert printable("a\nmedseg: error: b.nii") == "'a\\nmedseg: error: b.nii'"
    assert printable("x\u202e.nii") == "'x\\u202e.nii'"
    error = InputError(os.fsdecode(b"bad\n\xff.nii"), "truncated")
    assert str(error) == "'bad\\n\\xff.nii': truncated" and error.path == os.fsdecode(b"bad\n\xff.nii")


def test_grid_problem() -> None:
    eye = np.eye(3).ravel()
    assert grid_problem((1, 1, 1), (0, 0, 0), eye) is None
    assert grid_problem((1, 1, 1), (0, 0, 0), np.diag([-1.0, 1.0, -1.0]).ravel()) is None  # flips are fine
    assert "not positive" in grid_problem((1, 0, 1), (0, 0, 0), eye)
    assert "not finite" in grid_problem((1, 1, 1), (0, np.inf, 0), eye)
    assert "degenerate" in grid_problem((1, 1, 1), (0, 0, 0), np.zeros(9))
    assert "not orthonormal" in grid_problem((1, 1, 1), (0, 0, 0), np.diag([2.0, 1.0, 1.0]).ravel())
    assert "inconsistent" in grid_problem((1, 1), (0, 0, 0), eye)


def test_reading_in_threads_leaves_stderr_working(tmp_path: Path) -> None:
    """ITK's native messages are silenced by pointing file descriptor 2 at /dev/null while a file is read;
    readers in several threads (a caching dataset's pool) must not leave it pointing there afterwards
    (seen: a resumed training printed no log line and no error)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from medseg.io.image import read_image

    paths = [_written(tmp_path, f"scan{i}.nrrd") for i in range(8)]
    before = os.fstat(2)
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            list(pool.map(read_image, paths * 4))
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


@pytest.mark.parametrize("suffix", FORMATS)
def test_a_label_map_made_in_memory_reads_back_on_its_image_s_grid(tmp_path: Path, suffix: str) -> None:
    """A cascade's first-stage label map, made in memory on the input's grid: read as the written file would be."""
    path = tmp_path / f"image{suffix}"
    sitk.WriteImage(_oblique_image(), str(path), True)
    source = read_source(path, 3)
    labels = (np.arange(10 * 12 * 7).reshape(10, 12, 7) % 4).astype(np.uint8)
    in_memory = LoadImageFiled(keys="previous", image_only=True)({"previous": label_map_source(labels, source)})["previous"]
    written = _load(write_label_map(labels, source, tmp_path / f"labels{suffix}"))
    np.testing.assert_array_equal(in_memory.numpy(), labels)
    np.testing.assert_allclose(in_memory.affine.numpy(), written.affine.numpy(), atol=1e-5)
    with pytest.raises(InputError, match="differs from the image's"):
        label_map_source(labels[:5], source)
