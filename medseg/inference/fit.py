"""Does a model fit an input? Modality, intensities and voxel spacing against the model's plan.

A model trained on CT (intensities in Hounsfield units, normalised with the plan's HU statistics)
segments an MR image into confident nonsense, and a model planned at 1.4 mm spends minutes on a
3 mm CT resampled to a grid it has never seen. Neither fails, so :func:`fit_problems` says so
before the prediction: one sentence per problem, which the predictor logs as a warning naming
the file (or, with ``--strict``, raises as the one error line).

The checks, each against the model's :class:`medseg.plan.Plan`:

* **modality** (DICOM input): the series' ``Modality`` tag against the plan's modality (CT / MR);
* **intensities**: a CT in HU holds air (about -1000 HU: outside the body, lungs, bowel gas, or
  padding at -1024 and below); an MR image or a CT stored without its rescale does not. A CT
  model warns when fewer than :data:`AIR_FRACTION_CT` of the voxels are below :data:`AIR_HU`; a
  model of another modality warns when at least :data:`AIR_FRACTION_OTHER` are (the input looks
  like CT);
* **spacing**: along each RAS axis, the input's voxel spacing against the plan's target spacing;
  more than :data:`MAX_SPACING_RATIO` times finer or coarser is reported (coarser only for a ``3d_lowres`` model,
  which works at a coarser spacing than its data by design).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.io.geometry import Geometry
from medseg.plan import Plan, ras_spacing

__all__ = ["AIR_FRACTION_CT", "AIR_FRACTION_OTHER", "AIR_HU", "MAX_SPACING_RATIO", "fit_problems",
           "intensity_problem", "modality_problem", "spacing_problem"]

#: Intensities below this are air-like in HU (air -1000, lung -900..-500; soft tissue and MR signal above).
AIR_HU = -500.0
#: A CT model expects at least this fraction of air-like voxels (0.1 %; a body CT has far more).
AIR_FRACTION_CT = 0.001
#: A non-CT model warns from this fraction of air-like voxels on (1 %: a CT in HU, not ringing in an MR).
AIR_FRACTION_OTHER = 0.01
#: Spacing more than this many times finer or coarser than the plan's, along any axis, is reported.
MAX_SPACING_RATIO = 2.0
#: Intensity statistics use at most this many voxels (an even stride through the volume).
_SAMPLES = 1_000_000
_MODALITY_NAMES = {"CT": "CT", "MR": "MR", "MRI": "MR"}


def _mm(values: Sequence[float] | np.ndarray) -> str:
    return " x ".join(f"{v:.3g}" for v in values) + " mm"


def modality_problem(plan: Plan, modality: str | None) -> str | None:
    """A sentence when a DICOM ``Modality`` (e.g. ``"MR"``) is not the modality the model was
    trained on; None when they agree or either is unknown (only CT and MR are compared)."""
    trained = _MODALITY_NAMES.get(str(plan.modality).upper())
    given = _MODALITY_NAMES.get(str(modality or "").strip().upper())
    if trained is None or given is None or trained == given:
        return None
    return f"the series is {given} (DICOM Modality) but the model was trained on {trained}"


def intensity_problem(plan: Plan, image: np.ndarray) -> str | None:
    """A sentence when the voxel values do not look like the model's modality (see the module doc);
    None when they do or the image is empty."""
    values = np.asarray(image).reshape(-1)
    if values.size == 0:
        return None
    values = values[:: max(1, values.size // _SAMPLES)]
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return None
    air = float(np.count_nonzero(values < AIR_HU)) / values.size
    low, high = (float(v) for v in np.percentile(values, [1, 99]))
    spread = f"1st-99th percentile {low:.4g} to {high:.4g}"
    if plan.intensity.preset == "ct":
        if air < AIR_FRACTION_CT:
            return (f"intensities do not look like CT in Hounsfield units ({spread}, no air below {AIR_HU:g}); "
                    f"the model was trained on CT (an MR image, or a CT stored without its rescale?)")
        return None
    if air >= AIR_FRACTION_OTHER:
        return (f"intensities look like CT in Hounsfield units ({air:.0%} of voxels below {AIR_HU:g}, {spread}); "
                f"the model was trained on {plan.modality}")
    return None


def spacing_problem(plan: Plan, geometry: Geometry, max_ratio: float = MAX_SPACING_RATIO) -> str | None:
    """A sentence when the input's spacing differs from the plan's target spacing by more than
    ``max_ratio`` along any RAS axis (a ``3d_lowres`` plan: coarser only); None otherwise (and for a grid of another
    dimensionality)."""
    if geometry.dims != plan.dims:
        return None
    spacing = ras_spacing(geometry)
    target = np.asarray(plan.target_spacing, dtype=np.float64)
    ratio = spacing / target
    # a 3d_lowres model works at a coarser spacing than its data by design: only a coarser input is off
    finest = 0.0 if plan.configuration == "3d_lowres" else 1.0 / max_ratio
    off = [axis for axis in range(plan.dims) if not finest <= ratio[axis] <= max_ratio]
    if not off:
        return None
    worst = max(off, key=lambda axis: max(ratio[axis], 1.0 / ratio[axis]))
    factor = ratio[worst] if ratio[worst] >= 1 else 1.0 / ratio[worst]
    how = "coarser" if ratio[worst] > 1 else "finer"
    return (f"voxel spacing {_mm(spacing)} (R, A, S) is {factor:.2g}x {how} along {'RAS'[worst]} than the model's "
            f"target spacing {_mm(target)} (more than {max_ratio:g}x off)")


def fit_problems(plan: Plan, geometry: Geometry, image: np.ndarray | None = None,
                 modality: str | None = None) -> list[str]:
    """Every way the input (its grid, voxel values and, for DICOM, ``Modality``) does not fit the
    model: a list of one-sentence problems, empty when it fits.

    When the DICOM modality already disagrees, the intensity check is skipped (the same problem).
    """
    problems: list[str] = []
    wrong_modality = modality_problem(plan, modality)
    if wrong_modality is not None:
        problems.append(wrong_modality)
    elif image is not None:
        problem = intensity_problem(plan, image)
        if problem is not None:
            problems.append(problem)
    problem = spacing_problem(plan, geometry)
    if problem is not None:
        problems.append(problem)
    return problems
