"""Reading and writing images with their geometry (spacing, direction, origin) intact.

Arrays are in *voxel index order* ``(x, y, z)`` (``(i, j, k)`` for NIfTI), the order MONAI's
readers use; SimpleITK's ``GetArrayFromImage`` order ``(z, y, x)`` never leaks out of this module.
Affines are RAS (MONAI's and nibabel's convention); SimpleITK's direction/origin are LPS.

Every file is checked before its pixels are read: the grid (:func:`medseg.io.geometry.grid_problem`),
the header as written (:func:`medseg.io.nifti.check_nifti_header` for NIfTI) and the bytes the header
declares against the bytes on disk (:func:`medseg.io.layout.check_pixel_bytes` for NRRD / MetaImage),
so a bad file is one :class:`~medseg.errors.InputError` naming it, never an allocation of what a
lying header claims. The MONAI reader built on these functions is :mod:`medseg.io.reader`; this module
imports neither MONAI nor torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io.atomic import atomic_path
from medseg.io.geometry import Geometry, check_grid, lps_to_ras  # noqa: F401 - Geometry, lps_to_ras: here too
from medseg.io.itkfiles import itk_readable, itk_reason, itk_writable, quiet_native_stderr
from medseg.io.layout import (
    PixelLayout,
    check_geometry_fields,
    check_pixel_bytes,
    compressed_data_length,
    pixel_layout,
)
from medseg.io.nifti import NiftiInfo, check_nifti_data, check_nifti_header, read_nifti_bytes

log = logging.getLogger(__name__)

#: File endings medseg reads and writes, longest first so that ``.nii.gz`` wins over ``.gz``.
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")

#: Bytes per value of SimpleITK's scalar pixel types.
_VALUE_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}


def image_suffix(path: str | os.PathLike[str]) -> str | None:
    """Return the image file ending of ``path`` (``".nii.gz"``, ``".nrrd"``, ...) or None."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def is_nifti(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` ends in ``.nii`` or ``.nii.gz``."""
    return image_suffix(path) in NIFTI_SUFFIXES


def case_name(path: str | os.PathLike[str]) -> str:
    """The case identifier of an image file: its name without the image ending."""
    path = Path(path)
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def label_map_name(case: str, suffix: str, kind: str = "seg") -> str:
    """The one naming rule of medseg's outputs: ``<case>_<kind><suffix>`` (``kind``: ``seg``, ``instances``, ...)."""
    return f"{case}_{kind}{suffix}"


def output_name(source: str | os.PathLike[str] | SourceImage, kind: str = "seg") -> str:
    """The file name of the ``kind`` output of an input image: :func:`label_map_name` of its case name and
    its own file ending (``scan.nrrd`` -> ``scan_seg.nrrd``); an image made in memory gets its
    :attr:`SourceImage.name` and :attr:`SourceImage.suffix`."""
    if isinstance(source, SourceImage):
        return label_map_name(source.name, source.suffix, kind)
    return label_map_name(case_name(source), image_suffix(source) or "", kind)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """List the image files directly inside ``folder`` (sorted; hidden files skipped).

    Raises
    ------
    InputError
        If the folder does not exist or holds no image file of a supported type.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(folder, "no such file or folder")
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    images = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and image_suffix(p))
    if not images:
        raise InputError(folder, f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return images


def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        raise InputError(path, "is a folder, expected an image file")
    if image_suffix(path) is None:
        raise InputError(path, f"not a supported image file (expected one of {', '.join(IMAGE_SUFFIXES)})")


@dataclass(frozen=True)
class _Header:
    """What the header of an image file declares, checked against the file."""

    geometry: Geometry
    data_bytes: int
    layout: PixelLayout | None  # NRRD / MetaImage
    nifti: NiftiInfo | None  # NIfTI: the header as written


def _read_header(path: Path, dims: int | None) -> _Header:
    _check_path(path)
    reader = sitk.ImageFileReader()
    with itk_readable(path) as name:
        reader.SetFileName(name)
        try:
            with quiet_native_stderr():
                reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(path, f"not a readable image ({itk_reason(exc)})") from None
    geometry = Geometry.of(reader)
    if reader.GetNumberOfComponents() != 1:
        raise InputError(path, f"has {reader.GetNumberOfComponents()} components per voxel; expected a scalar image")
    if dims is not None and geometry.dims != dims:
        raise InputError(path, f"is a {geometry.dims}D image, expected {dims}D")
    if geometry.dims not in (2, 3):
        raise InputError(path, f"is a {geometry.dims}D image; only 2D and 3D images are supported")
    if min(geometry.size) < 1:
        raise InputError(path, f"has an empty grid (size {' x '.join(map(str, geometry.size))})")
    # the header as written first (ITK repairs or misreads some broken fields), then the grid ITK reports
    layout = nifti = None
    if is_nifti(path):
        nifti = check_nifti_header(path)
    else:
        layout = pixel_layout(path)
        if layout is not None:
            check_geometry_fields(path, layout)
    check_grid(path, geometry.spacing, geometry.origin, geometry.direction)
    value_bytes = _VALUE_BYTES.get(reader.GetPixelID(), 8)
    voxels = int(np.prod(geometry.size, dtype=object))
    if layout is not None:
        pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        check_pixel_bytes(path, layout, voxels, value_bytes, f"{' x '.join(map(str, geometry.size))} voxels of {pixel}")
    return _Header(geometry, voxels * value_bytes, layout, nifti)


def _checked_file(path: Path, dims: int | None) -> _Header:
    """:func:`_read_header`, and for a ``.nii.gz`` its compressed stream read to the end (ITK's and
    nibabel's NIfTI readers return truncated gzip data without complaint)."""
    header = _read_header(path, dims)
    if header.nifti is not None:
        check_nifti_data(path, header.nifti)
    return header


def check_image_file(path: str | os.PathLike[str], dims: int | None = None) -> Geometry:
    """Everything :func:`read_image` checks before it reads the pixels (header, grid, bytes on disk,
    a ``.nii.gz`` stream intact), for a reader of its own; returns the grid.

    Raises
    ------
    InputError
        As :func:`read_geometry`, plus a truncated or corrupt ``.nii.gz`` stream.
    """
    return _checked_file(Path(path), dims).geometry


def read_geometry(path: str | os.PathLike[str], dims: int | None = None) -> Geometry:
    """Read only the header of an image file, check it, and return its grid.

    Raises
    ------
    InputError
        Missing file, unsupported ending, unreadable header, multi-component pixels, a
        dimensionality other than ``dims`` (e.g. a 4D image where 3D is expected), a grid whose
        spacing, origin or direction is not finite and non-degenerate, a NIfTI header that needs
        repairs, or fewer bytes of pixel data on disk than the header declares (a truncated file, a
        missing ``.raw``, a header claiming an impossible size).
    """
    return _read_header(Path(path), dims).geometry


def read_image(path: str | os.PathLike[str], dims: int | None = None, *, finite: bool = True) -> sitk.Image:
    """Read a whole image with SimpleITK, pixel data included.

    Raises
    ------
    InputError
        As :func:`read_geometry`, plus truncated or corrupt pixel data, and (unless ``finite=False``, for
        a caller that checks the array itself) NaN or infinite voxels, in a NIfTI file checked on the
        stored values: SimpleITK would read them as 0.
    """
    path = Path(path)
    header = _checked_file(path, dims)
    image = _itk_read(path, header)
    if not finite:
        return image
    if header.nifti is not None and np.dtype(header.nifti.dtype).kind in "fc":  # ITK reads a NIfTI's NaN/Inf as 0
        try:
            stored = np.asanyarray(nib.load(str(path)).dataobj)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file
            raise InputError(path, f"cannot read the pixel data ({type(exc).__name__}: {exc})") from None
        check_finite_voxels(path, stored)
    else:
        check_finite_voxels(path, sitk.GetArrayViewFromImage(image).T)  # index order (x, y, z)
    return image


def _itk_read(path: Path, header: _Header) -> sitk.Image:
    try:
        with itk_readable(path) as name, quiet_native_stderr():
            return sitk.ReadImage(name)
    except RuntimeError as exc:
        raise InputError(path, _read_failure(header, exc)) from None


@dataclass(eq=False)
class SourceImage:
    """An input image read once and held in memory: what a prediction starts from (the first step of
    the preprocessing takes it instead of a file name) and what its label maps copy their grid from.

    Attributes
    ----------
    path
        The file it was read from; None for an image made in memory (a DICOM series).
    geometry
        Its grid, as SimpleITK reads it (LPS).
    pixels
        For a NIfTI file a nibabel image of the decoded voxels, built as ``nibabel.load`` builds it (so
        MONAI's ``NibabelReader`` takes it exactly as from the file); else a SimpleITK image. None once
        :meth:`drop_pixels` freed them.
    name, suffix
        Its case name (:func:`case_name` of the file, or given) and the file ending of its outputs (the
        file's own, ``.nii.gz`` for an image made in memory): see :func:`output_name`.
    nbytes, finite_checked
        Bytes of pixel data held; whether its voxels were found finite when it was read.
    header
        A NIfTI file's header as read (label maps copy it); None otherwise.
    """

    path: Path | None
    geometry: Geometry
    pixels: sitk.Image | nib.Nifti1Image | None
    name: str
    suffix: str
    nbytes: int
    finite_checked: bool = False
    header: nib.Nifti1Header | None = None

    @classmethod
    def from_image(cls, image: sitk.Image, name: str, suffix: str = ".nii.gz") -> SourceImage:
        """An image made in memory (e.g. a DICOM series read by :func:`medseg.io.dicom.read_series`)."""
        nbytes = int(np.prod(image.GetSize(), dtype=np.int64)) * image.GetSizeOfPixelComponent()
        return cls(None, Geometry.of(image), image, name, suffix, nbytes * image.GetNumberOfComponentsPerPixel())

    @property
    def is_nifti(self) -> bool:
        return self.header is not None

    def voxels(self) -> np.ndarray:
        """Voxel values in modality units, index order ``(x, y, z)``: a view, valid while this object holds
        its pixels (a NIfTI file's scaled as nibabel scales them).

        Raises
        ------
        ValueError
            After :meth:`drop_pixels`.
        """
        if self.pixels is None:
            raise ValueError(f"{self}: the pixels were dropped")
        if isinstance(self.pixels, sitk.Image):
            return sitk.GetArrayViewFromImage(self.pixels).T
        return np.asanyarray(self.pixels.dataobj)

    def drop_pixels(self) -> None:
        """Free the pixel data once it has been taken (by the preprocessing); the grid and a NIfTI file's
        header stay, for its label maps."""
        self.pixels = None

    def __str__(self) -> str:
        return os.fspath(self.path) if self.path is not None else self.name


def _nifti_image(path: Path, raw: bytes) -> nib.Nifti1Image:
    """The image ``nibabel.load`` makes of a NIfTI file's bytes, its voxels decoded (scaled) once."""
    two = 540 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big"))
    klass = nib.Nifti2Image if two else nib.Nifti1Image
    try:
        loaded = klass.from_bytes(raw)
        voxels = np.asanyarray(loaded.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise InputError(path, f"cannot read the pixel data ({type(exc).__name__}: {exc})") from None
    image = klass(voxels, None, loaded.header)  # as nibabel's from_file_map: the header passes unmodified
    image._affine = loaded.affine  # noqa: SLF001 - the affine is the header's best one, as nibabel sets it
    return image


def read_source(path: str | os.PathLike[str], dims: int | None = None, *, finite: bool = True) -> SourceImage:
    """Read an image file once into memory: the header checked as :func:`read_geometry` checks it, the
    pixel data read (a ``.nii.gz`` decompressed) exactly once, and (unless ``finite=False``) its voxels
    checked to be finite (a NIfTI file's on the stored values).

    Raises
    ------
    InputError
        As :func:`read_image`.
    """
    path = Path(path)
    header = _read_header(path, dims)
    nifti_header = None
    if header.nifti is not None:
        raw = read_nifti_bytes(path, header.nifti)  # one decompression, the stream checked to its end
        if finite:
            info = header.nifti
            check_finite_voxels(path, np.ndarray(info.shape, info.dtype, raw, info.offset, order="F"))
        pixels: sitk.Image | nib.Nifti1Image = _nifti_image(path, raw)
        nifti_header, nbytes = pixels.header.copy(), int(pixels.dataobj.nbytes)
        del raw
    else:
        pixels, nbytes = _itk_read(path, header), header.data_bytes
        if finite:
            check_finite_voxels(path, sitk.GetArrayViewFromImage(pixels).T)
    return SourceImage(path, header.geometry, pixels, case_name(path), image_suffix(path) or "", nbytes,
                       finite_checked=finite, header=nifti_header)


def read_voxels(path: str | os.PathLike[str], dims: int | None = None) -> tuple[Geometry, np.ndarray]:
    """The grid and voxels (index order, shaped as the grid) of an image file read once by
    :func:`read_source`: a ``.nii.gz`` decompressed once, the stream checked to its end, NaN and infinite
    voxels refused.

    Raises
    ------
    InputError
        As :func:`read_source`.
    """
    source = read_source(path, dims)
    array = source.voxels()
    if isinstance(source.pixels, sitk.Image):  # a view, valid only while the ITK image lives
        array = array.copy()
    size = tuple(int(n) for n in source.geometry.size)
    return source.geometry, (array.reshape(size) if array.shape != size else array)


def _read_failure(header: _Header, exc: RuntimeError) -> str:
    """Why ITK could not read the pixel data the header declares, as precisely as can be told."""
    reason = itk_reason(exc)
    if header.layout is not None:
        decompressed = compressed_data_length(header.layout, header.data_bytes)
        if decompressed is not None and decompressed < header.data_bytes:
            return (f"compressed pixel data is truncated or corrupt: it decompresses to {decompressed} of the "
                    f"{header.data_bytes} bytes the header declares")
    if "allocate" in reason.lower():
        return f"not enough memory to read the {header.data_bytes} bytes of pixel data the header declares"
    detail = "" if "No such file" in reason or not reason.strip("() 0") else f" ({reason})"
    return f"cannot read pixel data, the file may be truncated or corrupt{detail}"


def to_array(image: sitk.Image) -> np.ndarray:
    """Pixel array in index order ``(x, y, z)``."""
    return sitk.GetArrayFromImage(image).T


def check_finite_voxels(path: str | os.PathLike[str] | None, array: np.ndarray) -> None:
    """Raise InputError (naming ``path``) if ``array`` holds a NaN or infinite value.

    Checked a few planes at a time along the last axis: no mask the size of the image.

    Raises
    ------
    InputError
        With the number of NaN and infinite voxels and the index of the first one.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    step = max(1, (1 << 24) // max(1, array.size // max(1, array.shape[-1])))
    bad_nan = bad_inf = 0
    first = None
    for start in range(0, array.shape[-1], step):
        block = array[..., start : start + step]
        finite = np.isfinite(block)
        if finite.all():
            continue
        nan = np.isnan(block)
        bad_nan += int(nan.sum())
        bad_inf += int((~finite & ~nan).sum())
        if first is None:
            index = np.argwhere(~finite)[0]
            index[-1] += start
            first = tuple(int(i) for i in index)
    if first is not None:
        kinds = ", ".join(f"{n} {what}" for n, what in ((bad_nan, "NaN"), (bad_inf, "infinite")) if n)
        raise InputError(path, f"the image has NaN or infinite voxel values ({kinds}, the first at voxel "
                               f"{first}); medseg needs finite intensities")


def label_map_dtype(max_label: int, *, torch_compatible: bool = False) -> np.dtype:
    """The one dtype rule of label maps: uint8 when the largest label is at most 255, uint16 up to 65535,
    uint32 beyond (instance maps). ``torch_compatible``: torch computes little on unsigned integers wider
    than a byte, so signed types take their place past 255: int16 up to 32767, int32, then int64.

    Raises
    ------
    ValueError
        For a negative ``max_label``.
    """
    if max_label < 0:
        raise ValueError("label maps cannot hold negative labels")
    if max_label <= 255:
        return np.dtype(np.uint8)
    if torch_compatible:
        for signed in (np.int16, np.int32):
            if max_label <= np.iinfo(signed).max:
                return np.dtype(signed)
        return np.dtype(np.int64)
    return np.dtype(np.uint16) if max_label <= 65535 else np.dtype(np.uint32)


def label_dtype(labels: np.ndarray) -> np.dtype:
    """:func:`label_map_dtype` of the largest value in ``labels``.

    Raises
    ------
    ValueError
        For negative labels.
    """
    if labels.size and int(labels.min()) < 0:
        raise ValueError("label maps cannot hold negative labels")
    return label_map_dtype(int(labels.max()) if labels.size else 0)


def label_map_source(labels: np.ndarray, source: SourceImage) -> SourceImage:
    """A label map in memory on exactly ``source``'s grid, read back as ``source`` would be (a NIfTI source's header,
    else its SimpleITK geometry): e.g. a cascade's first-stage prediction, the input of its second stage.

    Raises
    ------
    InputError
        ``labels`` of another shape than the source, or a source whose pixels were dropped (naming it).
    """
    labels = np.asarray(labels)
    labels = labels.astype(label_dtype(labels), copy=False)
    where = source.path or source.name
    if tuple(labels.shape) != source.geometry.size:
        raise InputError(where, f"label map shape {labels.shape} differs from the image's {source.geometry.size}")
    pixels: sitk.Image | nib.Nifti1Image
    header: nib.Nifti1Header | None = None
    if source.is_nifti and source.header is not None:
        header = source.header.copy()
        header.set_data_dtype(labels.dtype)
        header.set_slope_inter(1.0, 0.0)
        kind = type(source.pixels) if isinstance(source.pixels, nib.Nifti1Image) else nib.Nifti1Image
        affine = source.pixels.affine if isinstance(source.pixels, nib.Nifti1Image) else header.get_best_affine()
        pixels = kind(labels, affine, header=header)
    elif isinstance(source.pixels, sitk.Image):
        pixels = sitk.GetImageFromArray(np.ascontiguousarray(labels.T))
        pixels.CopyInformation(source.pixels)
    else:
        raise InputError(where, "its pixels were dropped before the label map was made on its grid")
    return SourceImage(None, source.geometry, pixels, source.name, source.suffix, int(labels.nbytes),
                       finite_checked=True, header=header)


def write_label_map(labels: np.ndarray, reference: str | os.PathLike[str] | SourceImage | sitk.Image,
                    output: str | os.PathLike[str]) -> Path:
    """Write a label map in exactly the grid of ``reference`` (its shape, spacing, origin, direction):
    an image file, a :class:`SourceImage` (nothing is read again) or a SimpleITK image.

    ``labels`` is in index order ``(x, y, z)`` of the reference, stored as :func:`label_dtype` says.
    NIfTI outputs of a NIfTI reference copy its header (qform and sform included); other outputs copy
    the reference's SimpleITK geometry. The file appears atomically.

    Raises
    ------
    InputError
        If ``labels`` does not have the reference's shape; a reference file as :func:`read_geometry`.
    """
    output = Path(output)
    nifti: nib.Nifti1Header | None = None
    if isinstance(reference, SourceImage):
        geometry, nifti = reference.geometry, reference.header
    elif isinstance(reference, sitk.Image):
        geometry = Geometry.of(reference)
    else:
        geometry = read_geometry(reference)
        nifti = nib.load(str(reference)).header if is_nifti(reference) else None  # the header only
    labels = np.asarray(labels)
    if tuple(labels.shape) != geometry.size:
        raise InputError(output, f"label map shape {labels.shape} differs from the input's {geometry.size}")
    labels = labels.astype(label_dtype(labels), copy=False)
    with atomic_path(output) as tmp:
        if image_suffix(output) in NIFTI_SUFFIXES and nifti is not None:
            header = nifti.copy()
            header.set_data_dtype(labels.dtype)
            header.set_slope_inter(1.0, 0.0)
            image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
            out = image_class(labels.reshape(nifti.get_data_shape()[: labels.ndim]), None, header=header)
            nib.save(out, str(tmp))
        else:
            image = sitk.GetImageFromArray(np.ascontiguousarray(labels.T))
            image.SetSpacing(geometry.spacing)
            image.SetOrigin(geometry.origin)
            image.SetDirection(geometry.direction)
            with itk_writable(tmp) as name:
                sitk.WriteImage(image, name, useCompression=True)
    return output
