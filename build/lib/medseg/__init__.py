"""medseg: medical-image segmentation with MONAI, Ignite and geometry kept from input to output."""

__version__ = "0.1.0"
