"""Fake fingerprints for the planner's tests: no image is read."""

from __future__ import annotations

from collections.abc import Sequence

from medseg.data.fingerprint import CaseFingerprint, Fingerprint, IntensityStats

CT_STATS = IntensityStats(mean=100.0, std=50.0, min=-100.0, max=400.0, percentile_00_5=-50.0, median=90.0,
                          percentile_99_5=300.0)


def fake_fingerprint(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], modality: str = "CT",
                     labels: int = 3) -> Fingerprint:
    """A fingerprint of cases with these spacings and shapes (nothing cropped), ``labels`` label values."""
    cases = [CaseFingerprint(f"case_{i:03d}", tuple(float(s) for s in spacing), tuple(shape), tuple(shape),
                             (CT_STATS,), dict.fromkeys(range(labels), 1000))
             for i, (spacing, shape) in enumerate(zip(spacings, shapes, strict=True))]
    return Fingerprint("fake", len(spacings[0]), (modality,), {v: f"label_{v}" if v else "background"
                                                               for v in range(labels)}, cases, (CT_STATS,))
