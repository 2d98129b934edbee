"""Regions of a region-based dataset (nnU-Net v2): overlapping targets such as whole tumour, tumour
core and enhancing tumour, each the union of some label values, each predicted by its own sigmoid
output and painted back into one label map in a fixed order."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Region"]


@dataclass(frozen=True)
class Region:
    """One region: ``name``, the label values it unites (``labels``), and the label-map ``value`` it is
    painted with (nnU-Net's ``regions_class_order``); later regions are painted over earlier ones, so
    nested regions go from the largest to the smallest."""

    name: str
    labels: tuple[int, ...]
    value: int
