"""medseg's MONAI image reader: one reader per file ending, its errors passed on as they are.

MONAI's ``LoadImage`` given a list of readers tries each in turn, logs every failure and finally
raises one ``RuntimeError`` holding all their tracebacks (about 110 lines for a truncated ``.nrrd``).
:class:`ImageFileReader` picks the reader by file ending instead (nibabel, exactly as MONAI's
``NibabelReader``, for NIfTI; SimpleITK for NRRD and MetaImage), after the checks of
:mod:`medseg.io.image`, and :class:`LoadImageFiled` hands it to ``LoadImage`` as the run-time reader,
which MONAI calls directly: an :class:`~medseg.errors.InputError` reaches the caller unchanged.
Both also take an image already in memory (a :class:`~medseg.io.image.SourceImage`, or a SimpleITK image
such as a DICOM series), so that one preprocessing chain serves files and in-memory images alike.

Voxel values are checked here too: a NaN or infinite voxel is refused when the file is read, before
preprocessing could clip or crop it away. Several files given for one key (the channels of a case) are
stacked into the first axis, as MONAI's readers do, once every one is found on the first one's grid.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader, NibabelReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from medseg.errors import InputError
from medseg.io.geometry import Geometry
from medseg.io.image import IMAGE_SUFFIXES, SourceImage, check_finite_voxels, image_suffix, read_source, to_array

__all__ = ["ImageFileReader", "LoadImageFiled"]


class _Read:
    """One image as read: its source (path or name, for messages), the nibabel or SimpleITK image, and
    whether its voxels are known to be finite."""

    def __init__(self, source: SourceImage) -> None:
        if source.pixels is None:
            raise ValueError(f"{source}: its pixels were dropped; read it again")
        self.path = source.path if source.path is not None else source.name
        self.geometry = source.geometry
        self.finite = source.finite_checked
        # as MONAI's NibabelReader.read (the source keeps its header as read: label maps copy that one)
        self.image = correct_nifti_header_if_necessary(source.pixels) if source.is_nifti else source.pixels


class ImageFileReader(ImageReader):
    """A MONAI :class:`~monai.data.ImageReader` for every medseg image file, chosen by its ending.

    NIfTI is read by MONAI's :class:`~monai.data.NibabelReader` (so arrays and affines are exactly
    MONAI's), NRRD and MetaImage by SimpleITK; both return arrays in index order ``(x, y, z)`` with a
    RAS ``affine`` in the metadata, so MONAI's spatial transforms and ``Invertd`` see the true geometry.
    Every file is read once by :func:`medseg.io.image.read_source` (header, grid and size on disk checked
    first; a ``.nii.gz`` decompressed once); its voxels must be finite. An image already in memory (a
    :class:`~medseg.io.image.SourceImage` or SimpleITK image) is taken as it is.

    Parameters
    ----------
    dims
        The number of spatial dimensions every file must have (None: 2 or 3).

    Raises
    ------
    InputError
        From :meth:`read` for a missing, unreadable, truncated or geometrically broken file, or (several
        files for one key: the channels of a case) a file on another grid than the first; from
        :meth:`get_data` for NaN or infinite voxels.
    """

    suffixes: tuple[str, ...] = IMAGE_SUFFIXES

    def __init__(self, dims: int | None = None) -> None:
        super().__init__()
        self.dims = dims
        self._nibabel = NibabelReader()

    def verify_suffix(self, filename: Sequence[os.PathLike[str] | str] | os.PathLike[str] | str) -> bool:
        return all(image_suffix(f) is not None for f in ensure_tuple(filename))

    def read(self, data: Any, **kwargs: Any) -> Any:
        reads = []
        for item in ensure_tuple(data):
            if isinstance(item, sitk.Image):
                item = SourceImage.from_image(item, "image")
            if isinstance(item, SourceImage):
                if self.dims is not None and item.geometry.dims != self.dims:
                    raise InputError(item.path or item.name,
                                     f"is a {item.geometry.dims}D image, expected {self.dims}D")
            else:
                item = read_source(Path(item).expanduser(), self.dims, finite=False)  # checked in get_data
            reads.append(_Read(item))
        for read in reads[1:]:
            problem = reads[0].geometry.mismatch(read.geometry)
            if problem is not None:
                raise InputError(read.path, f"is not on the grid of the case's first channel {reads[0].path}: "
                                            f"{problem}; the channels of a case must share one grid")
        return reads if len(reads) > 1 else reads[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        arrays: list[np.ndarray] = []
        meta: dict = {}
        for item in img if isinstance(img, (list, tuple)) else [img]:
            if isinstance(item.image, sitk.Image):
                array, header = _sitk_data(item.image)
            else:
                self._nibabel.filenames = (str(item.path),)  # what NibabelReader.read would have recorded
                array, header = self._nibabel.get_data(item.image)
            if not item.finite:
                check_finite_voxels(item.path, array)
            arrays.append(array)
            if not meta:  # the channels' grids were checked by read (MONAI's check has no tolerance)
                _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta


def _sitk_data(image: sitk.Image) -> tuple[np.ndarray, dict]:
    geometry = Geometry.of(image)
    header: dict = {
        "spacing": np.asarray(geometry.spacing),
        MetaKeys.ORIGINAL_AFFINE: geometry.affine_ras(),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.SPATIAL_SHAPE: np.asarray(geometry.size),
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
    }
    header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
    return to_array(image), header


class LoadImageFiled(LoadImaged):
    """``LoadImaged`` reading every key with one :class:`ImageFileReader`, called directly.

    MONAI's ``LoadImaged(reader=...)`` wraps whatever its reader raises into a ``RuntimeError`` with
    the reader's traceback as text; given at run time, the reader is called without that wrapper, so
    the :class:`~medseg.errors.InputError` of a bad file is what the caller sees (inside ``Compose``,
    as the ``__cause__`` of its "applying transform" error). A key may hold a file name or an image in
    memory (:class:`~medseg.io.image.SourceImage`, SimpleITK image); ``filename_or_obj`` in the metadata
    is then its file name, or its name.
    """

    def __init__(self, keys: Any, dims: int | None = None, **kwargs: Any) -> None:
        self.file_reader = ImageFileReader(dims)
        kwargs.setdefault("expanduser", False)  # done here: MONAI would turn an image in memory into a string
        with warnings.catch_warnings():  # LoadImage also builds MONAI's default readers: the CUDA-only
            warnings.filterwarnings("ignore", message=".*nvImageCodec", category=UserWarning)  # DICOM plugin warns
            super().__init__(keys, reader=self.file_reader, **kwargs)

    def __call__(self, data: Any, reader: ImageReader | None = None) -> Any:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, sitk.Image):  # iterable: MONAI would read it pixel by pixel as file names
                d[key] = SourceImage.from_image(value, "image")
            elif isinstance(value, (str, os.PathLike)):
                d[key] = str(Path(value).expanduser())
        return super().__call__(d, reader or self.file_reader)
