"""Display colours of label values: the same colour for a label in every figure, report and DICOM SEG."""

from __future__ import annotations

__all__ = ["PALETTE", "label_colour", "label_colour_255"]

#: tab10, with its grey (invisible over a grey image) replaced by teal. Label n gets entry (n - 1) % 10.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.1216, 0.4667, 0.7059), (1.0, 0.498, 0.0549), (0.1725, 0.6275, 0.1725), (0.8392, 0.1529, 0.1569),
    (0.5804, 0.4039, 0.7412), (0.549, 0.3373, 0.2941), (0.8902, 0.4667, 0.7608), (0.0, 0.55, 0.55),
    (0.7373, 0.7412, 0.1333), (0.0902, 0.7451, 0.8118),
)


def label_colour(label: int) -> tuple[float, float, float]:
    """The fixed RGB colour (0-1) of a label value: tab10-like, the same in every figure."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def label_colour_255(label: int) -> tuple[int, int, int]:
    """The 0-255 RGB display colour of a label (DICOM SEG's recommended display colour is derived from it)."""
    red, green, blue = (int(round(255 * c)) for c in label_colour(label))
    return red, green, blue
