"""Public API of :mod:`medseg.data` (loaded lazily by ``__init__.py``)."""

from .datalist import Case, Datalist, load_datalist, split_cases, validate_datalist
from .synthetic import Grid, make_phantom, write_dataset
from .synthetic.dicom import phantom_series, write_dicom_series

__all__ = [
    "Case",
    "Datalist",
    "Grid",
    "load_datalist",
    "make_phantom",
    "phantom_series",
    "split_cases",
    "validate_datalist",
    "write_dataset",
    "write_dicom_series",
]
