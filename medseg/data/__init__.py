"""Datasets: MSD ``dataset.json`` datalists and nnU-Net v2 raw datasets (several channels, regions, an
ignore label), and synthetic CT / MR phantoms (NIfTI or DICOM series).

The names are in ``__init__.pyi``; each is imported from its module on first use, so that importing
one module of this package does not load the others (nor torch or MONAI with them).
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
