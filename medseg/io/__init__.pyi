"""Public API of :mod:`medseg.io` (loaded lazily by ``__init__.py``)."""

from .atomic import atomic_path, atomic_write_text
from .dicom_seg import write_dicom_seg
from .geometry import Geometry, check_grid, grid_problem
from .image import case_name, list_images, read_geometry, read_image, to_array, write_label_map
from .reader import ImageFileReader, LoadImageFiled
from .rtstruct import write_rtstruct

__all__ = [
    "Geometry",
    "ImageFileReader",
    "LoadImageFiled",
    "atomic_path",
    "atomic_write_text",
    "case_name",
    "check_grid",
    "grid_problem",
    "list_images",
    "read_geometry",
    "read_image",
    "to_array",
    "write_dicom_seg",
    "write_label_map",
    "write_rtstruct",
]
