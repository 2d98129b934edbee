"""Reading and writing images with their geometry (spacing, direction, origin) intact.

Arrays are in *voxel index order* ``(x, y, z)`` (``(i, j, k)`` for NIfTI), the order MONAI's
readers use; SimpleITK's ``GetArrayFromImage`` order ``(z, y, x)`` never leaks out of this module.
Affines given to MONAI are RAS (MONAI's convention); SimpleITK's direction/origin are LPS.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from medseg.errors import InputError
from medseg.io.atomic import atomic_path

log = logging.getLogger(__name__)

#: File endings medseg reads and writes, longest first so that ``.nii.gz`` wins over ``.gz``.
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


def image_suffix(path: str | os.PathLike[str]) -> str | None:
    """Return the image file ending of ``path`` (``".nii.gz"``, ``".nrrd"``, ...) or None."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def case_name(path: str | os.PathLike[str]) -> str:
    """The case identifier of an image file: its name without the image ending."""
    path = Path(path)
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


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


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of an image in ITK (LPS) terms, sizes in index order ``(x, y, z)``."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def dims(self) -> int:
        return len(self.size)

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """Geometry of a SimpleITK image (or of a reader after ``ReadImageInformation``)."""
        size = image.GetSize()
        return cls(
            tuple(int(s) for s in size),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    def affine_lps(self) -> np.ndarray:
        """The (d+1)x(d+1) index-to-LPS-world matrix."""
        d = self.dims
        affine = np.eye(d + 1)
        affine[:d, :d] = np.asarray(self.direction).reshape(d, d) @ np.diag(self.spacing)
        affine[:d, d] = self.origin
        return affine

    def affine_ras(self) -> np.ndarray:
        """The (d+1)x(d+1) index-to-RAS-world matrix (MONAI's and nibabel's convention)."""
        return orientation_ras_lps(self.affine_lps())

    def mismatch(self, other: Geometry, tol_mm: float = 1e-3, tol_dir: float = 1e-4) -> str | None:
        """Describe how ``other`` differs from this grid, or return None if they match."""
        if self.size != other.size:
            return f"size {other.size} differs from {self.size}"
        if not np.allclose(self.spacing, other.spacing, atol=tol_mm, rtol=0):
            return f"spacing {_fmt(other.spacing)} differs from {_fmt(self.spacing)}"
        if not np.allclose(self.origin, other.origin, atol=max(tol_mm, 1e-3 * max(self.spacing)), rtol=0):
            return f"origin {_fmt(other.origin)} differs from {_fmt(self.origin)}"
        if not np.allclose(self.direction, other.direction, atol=tol_dir, rtol=0):
            return "direction (orientation) differs"
        return None


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        raise InputError(path, "is a folder, expected an image file")
    if image_suffix(path) is None:
        raise InputError(path, f"not a supported image file (expected one of {', '.join(IMAGE_SUFFIXES)})")


def read_geometry(path: str | os.PathLike[str], dims: int | None = None) -> Geometry:
    """Read only the header of an image file and return its grid.

    Raises
    ------
    InputError
        Missing file, unsupported ending, unreadable header, multi-component pixels, or a
        dimensionality other than ``dims`` (e.g. a 4D image where 3D is expected).
    """
    path = Path(path)
    _check_path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_native_stderr():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, f"not a readable image ({_itk_reason(exc)})") from exc
    geometry = Geometry.of(reader)
    if reader.GetNumberOfComponents() != 1:
        raise InputError(path, f"has {reader.GetNumberOfComponents()} components per voxel; expected a scalar image")
    if dims is not None and geometry.dims != dims:
        raise InputError(path, f"is a {geometry.dims}D image, expected {dims}D")
    if geometry.dims not in (2, 3):
        raise InputError(path, f"is a {geometry.dims}D image; only 2D and 3D images are supported")
    if min(geometry.size) < 1 or min(geometry.spacing) <= 0:
        raise InputError(path, "has an empty grid or non-positive spacing")
    return geometry


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what ITK's C++ readers print straight to file descriptor 2 (MetaIO, NIfTI warnings):
    medseg reports read failures itself, as one line."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _itk_reason(exc: BaseException) -> str:
    """The useful last line of an ITK exception (they carry file/line noise)."""
    text = str(exc).strip().splitlines()
    for line in reversed(text):
        line = line.strip()
        if line and not line.startswith(("Exception thrown in", "File ", "Line ")):
            return line.split("ERROR:")[-1].strip()[:200]
    return type(exc).__name__


def read_image(path: str | os.PathLike[str], dims: int | None = None) -> sitk.Image:
    """Read a whole image with SimpleITK, pixel data included.

    Raises
    ------
    InputError
        As :func:`read_geometry`, plus truncated or corrupt pixel data.
    """
    path = Path(path)
    read_geometry(path, dims)
    # ITK's NIfTI reader returns truncated .nii and .nii.gz files without complaint
    if path.name.lower().endswith(".gz"):
        _check_gzip(path)
    if path.name.lower().endswith(".nii"):
        _check_nifti_size(path)
    try:
        with _quiet_native_stderr():
            return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        detail = "" if "No such file" in reason else f" ({reason})"
        raise InputError(path, f"cannot read pixel data, the file may be truncated or corrupt{detail}") from exc


def _check_nifti_size(path: Path) -> None:
    """Raise InputError if an uncompressed NIfTI file is shorter than its header says."""
    try:
        header = nib.load(str(path)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken headers
        raise InputError(path, f"not a readable NIfTI file ({exc})") from exc
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(path, f"file is truncated: {actual} bytes, the header needs {expected}")


def _check_gzip(path: Path) -> None:
    """Decompress a gzip file to its end (discarding the data) to catch truncation and corruption.

    Raises
    ------
    InputError
        If the stream ends early or fails its checksum.
    """
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(path, f"compressed data is truncated or corrupt ({exc})") from exc


def to_array(image: sitk.Image) -> np.ndarray:
    """Pixel array in index order ``(x, y, z)``."""
    return sitk.GetArrayFromImage(image).T


class SimpleITKReader(ImageReader):
    """A MONAI :class:`~monai.data.ImageReader` backed by SimpleITK (NRRD, MetaImage, NIfTI, ...).

    Returns arrays in index order ``(x, y, z)`` with a RAS ``affine`` in the metadata, exactly
    as MONAI's ``ITKReader`` and ``NibabelReader`` do, so MONAI's spatial transforms and
    ``Invertd`` see the true geometry. Used through ``LoadImage(reader=SimpleITKReader())``.

    Raises
    ------
    InputError
        From :meth:`read` for a missing, unreadable or truncated file.
    """

    suffixes: tuple[str, ...] = IMAGE_SUFFIXES

    def __init__(self, dims: int | None = None) -> None:
        super().__init__()
        self.dims = dims

    def verify_suffix(self, filename: Sequence[os.PathLike[str] | str] | os.PathLike[str] | str) -> bool:
        return all(image_suffix(f) is not None for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike[str] | str] | os.PathLike[str] | str, **kwargs: Any) -> Any:
        images = [read_image(name, self.dims) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        arrays: list[np.ndarray] = []
        meta: dict = {}
        for image in img if isinstance(img, (list, tuple)) else [img]:
            geometry = Geometry.of(image)
            header: dict = {
                "spacing": np.asarray(geometry.spacing),
                MetaKeys.ORIGINAL_AFFINE: geometry.affine_ras(),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.SPATIAL_SHAPE: np.asarray(geometry.size),
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            }
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            arrays.append(to_array(image))
            _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta


def label_dtype(labels: np.ndarray) -> np.dtype:
    """uint8 for label maps up to 255, uint16 up to 65535, uint32 beyond (instance maps).

    Raises
    ------
    ValueError
        For negative labels.
    """
    top = int(labels.max()) if labels.size else 0
    if labels.size and int(labels.min()) < 0:
        raise ValueError("label maps cannot hold negative labels")
    if top <= 255:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if top <= 65535 else np.dtype(np.uint32)


def write_label_map(labels: np.ndarray, reference: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """Write a label map in exactly the grid of ``reference`` (its shape, spacing, origin, direction).

    ``labels`` is in index order ``(x, y, z)`` of the reference. NIfTI outputs copy the reference
    header (qform and sform included); other formats copy the reference's SimpleITK geometry.
    The file appears atomically.

    Raises
    ------
    InputError
        If ``labels`` does not have the reference's shape.
    """
    reference, output = Path(reference), Path(output)
    geometry = read_geometry(reference)
    labels = np.asarray(labels)
    if tuple(labels.shape) != geometry.size:
        raise InputError(output, f"label map shape {labels.shape} differs from the input's {geometry.size}")
    labels = labels.astype(label_dtype(labels), copy=False)
    suffix = image_suffix(output)
    with atomic_path(output) as tmp:
        if suffix in NIFTI_SUFFIXES and image_suffix(reference) in NIFTI_SUFFIXES:
            ref = nib.load(str(reference))
            header = ref.header.copy()
            header.set_data_dtype(labels.dtype)
            header.set_slope_inter(1.0, 0.0)
            out = type(ref)(labels.reshape(ref.shape[: labels.ndim]), None, header=header)
            nib.save(out, str(tmp))
        else:
            image = sitk.GetImageFromArray(np.ascontiguousarray(labels.T))
            image.SetSpacing(geometry.spacing)
            image.SetOrigin(geometry.origin)
            image.SetDirection(geometry.direction)
            sitk.WriteImage(image, str(tmp), useCompression=True)
    return output
