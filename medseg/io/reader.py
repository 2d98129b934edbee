"""medseg's MONAI image reader: one reader per file ending, its errors passed on as they are.

MONAI's ``LoadImage`` given a list of readers tries each in turn, logs every failure and finally
raises one ``RuntimeError`` holding all their tracebacks (about 110 lines for a truncated ``.nrrd``).
:class:`ImageFileReader` picks the reader by file ending instead (nibabel, exactly as MONAI's
``NibabelReader``, for NIfTI; SimpleITK for NRRD and MetaImage), after the checks of
:mod:`medseg.io.image`, and :class:`LoadImageFiled` hands it to ``LoadImage`` as the run-time reader,
which MONAI calls directly: an :class:`~medseg.errors.InputError` reaches the caller unchanged.

Voxel values are checked here too: a NaN or infinite voxel is refused when the file is read, before
preprocessing could clip or crop it away.
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
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from medseg.io.image import (
    IMAGE_SUFFIXES,
    Geometry,
    check_finite_voxels,
    check_image_file,
    image_suffix,
    is_nifti,
    read_image,
    to_array,
)

__all__ = ["ImageFileReader", "LoadImageFiled"]


class _Read:
    """One file as read: its path and the nibabel or SimpleITK image."""

    def __init__(self, path: Path, image: Any) -> None:
        self.path = path
        self.image = image


class ImageFileReader(ImageReader):
    """A MONAI :class:`~monai.data.ImageReader` for every medseg image file, chosen by its ending.

    NIfTI is read by MONAI's :class:`~monai.data.NibabelReader` (so arrays and affines are exactly
    MONAI's), NRRD and MetaImage by SimpleITK; both return arrays in index order ``(x, y, z)`` with a
    RAS ``affine`` in the metadata, so MONAI's spatial transforms and ``Invertd`` see the true geometry.
    Every file is first checked as :func:`medseg.io.image.read_image` checks it (header, grid, size on
    disk); its voxels must be finite.

    Parameters
    ----------
    dims
        The number of spatial dimensions every file must have (None: 2 or 3).

    Raises
    ------
    InputError
        From :meth:`read` for a missing, unreadable, truncated or geometrically broken file, from
        :meth:`get_data` for NaN or infinite voxels.
    """

    suffixes: tuple[str, ...] = IMAGE_SUFFIXES

    def __init__(self, dims: int | None = None) -> None:
        super().__init__()
        self.dims = dims
        self._nibabel = NibabelReader()

    def verify_suffix(self, filename: Sequence[os.PathLike[str] | str] | os.PathLike[str] | str) -> bool:
        return all(image_suffix(f) is not None for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike[str] | str] | os.PathLike[str] | str, **kwargs: Any) -> Any:
        reads = []
        for name in ensure_tuple(data):
            path = Path(name)
            if is_nifti(path):
                check_image_file(path, self.dims)
                reads.append(_Read(path, self._nibabel.read(path)))
            else:
                reads.append(_Read(path, read_image(path, self.dims, finite=False)))  # checked in get_data
        return reads if len(reads) > 1 else reads[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        arrays: list[np.ndarray] = []
        meta: dict = {}
        for item in img if isinstance(img, (list, tuple)) else [img]:
            if isinstance(item.image, sitk.Image):
                array, header = _sitk_data(item.image)
            else:
                array, header = self._nibabel.get_data(item.image)
            check_finite_voxels(item.path, array)
            arrays.append(array)
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
    as the ``__cause__`` of its "applying transform" error).
    """

    def __init__(self, keys: Any, dims: int | None = None, **kwargs: Any) -> None:
        self.file_reader = ImageFileReader(dims)
        with warnings.catch_warnings():  # LoadImage also builds MONAI's default readers: the CUDA-only
            warnings.filterwarnings("ignore", message=".*nvImageCodec", category=UserWarning)  # DICOM plugin warns
            super().__init__(keys, reader=self.file_reader, **kwargs)

    def __call__(self, data: Any, reader: ImageReader | None = None) -> Any:
        return super().__call__(data, reader or self.file_reader)
