"""Rendering a synthetic patient on a grid: tissue map, partial volume, noise, MR bias field.

:func:`render` tests each voxel centre of a :class:`~.grid.Grid` against the analytic shapes of an
:class:`~.anatomy.Anatomy`, so the same anatomy rendered on two different grids is the same patient,
whatever the spacing, origin or direction of the grids. :func:`make_phantom` samples a patient for a
grid and renders it.

Label map values (:data:`CT_LABELS`, :data:`MR_LABELS`)::

    0 background, 1 liver, 2 spleen, 3 kidney (both), 4 bone (vertebral body), 5 lesion
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medseg.data.synthetic.anatomy import TISSUES, Anatomy, sample_anatomy
from medseg.data.synthetic.grid import Grid, body_fov_mm, check_modality, quadric, world_coordinate
from medseg.errors import InputError

__all__ = ["CT_LABELS", "MR_LABELS", "make_phantom", "render", "sample_patient", "tissue_map"]

CT_LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "bone", 5: "lesion"}
MR_LABELS: dict[int, str] = dict(CT_LABELS)

_AIR, _FAT, _SOFT, _LIVER, _SPLEEN, _KIDNEY, _BONE, _LESION = range(len(TISSUES))
#: Label value of each tissue class (fat, soft tissue and air are background).
_TISSUE_LABEL = np.array([0, 0, 0, 1, 2, 3, 4, 5], dtype=np.uint8)

_CT_RANGE = (-1024, 3071)
_BLUR_SIGMA_VOXELS = 0.6


def tissue_map(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Tissue id (index into :data:`TISSUES`) at every voxel centre, numpy (z, y, x) order, uint8."""
    level = anatomy.axial_level_mm
    tissue = np.full(grid.size[::-1], _AIR, dtype=np.uint8)
    radius2 = quadric(grid, anatomy.body.weights(), anatomy.body.centre3, level)
    tissue[radius2 <= 1.0] = _FAT
    tissue[radius2 <= (1.0 - anatomy.fat_fraction) ** 2] = _SOFT
    organs: list[tuple[int, np.ndarray, Sequence[float]]] = [
        (_LIVER, anatomy.liver.weights(), anatomy.liver.centre),
        (_SPLEEN, anatomy.spleen.weights(), anatomy.spleen.centre),
        *((_KIDNEY, k.weights(), k.centre) for k in anatomy.kidneys),
        (_BONE, anatomy.vertebra.weights(), anatomy.vertebra.centre3),
    ]
    for tissue_id, weights, centre in organs:
        tissue[quadric(grid, weights, centre, level) <= 1.0] = tissue_id
    for lesion in anatomy.lesions:
        tissue[(quadric(grid, lesion.weights(), lesion.centre, level) <= 1.0) & (tissue == _LIVER)] = _LESION
    return tissue


def _bias_field(rng: np.random.Generator, anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Smooth multiplicative field exp(p(x, y, z)) with p a random quadratic in world coordinates, |p| <= 0.3."""
    level = anatomy.axial_level_mm
    centre = (*anatomy.body.centre, level)
    half = anatomy.fov_mm / 2.0
    u = [(world_coordinate(grid, axis, level) - centre[axis]) / half for axis in range(3)]
    terms = [u[0], u[1], u[2], u[0] * u[0], u[1] * u[1], u[2] * u[2], u[0] * u[1], u[0] * u[2], u[1] * u[2]]
    coefficients = rng.uniform(-0.12, 0.12, len(terms))
    poly = sum(c * t for c, t in zip(coefficients, terms))
    return np.broadcast_to(np.exp(np.clip(poly, -0.3, 0.3)), grid.size[::-1])


def render(anatomy: Anatomy, grid: Grid, rng: np.random.Generator,
           modality: str | None = None) -> tuple[sitk.Image, sitk.Image]:
    """Render ``anatomy`` on ``grid``: image and label map with geometry ``grid``.

    Partial volume: Gaussian blur of 0.6 voxel. CT: noise sigma 8-15 HU, int16 clipped to
    [-1024, 3071]. MR: random scale 100-3000, smooth bias field (within +-30 %), Rician
    noise (2-4 % of fat), float32. A 2D grid is the axial plane z = ``anatomy.axial_level_mm``.

    Parameters
    ----------
    rng
        Randomness of the acquisition (noise, MR scale and bias), not of the anatomy.
    modality
        Defaults to ``anatomy.modality``; must match it when given.

    Raises
    ------
    InputError
        ``modality`` unknown or different from the anatomy's.
    """
    modality = anatomy.modality if modality is None else check_modality(modality)
    if modality != anatomy.modality:
        raise InputError(None, f"cannot render a {anatomy.modality} anatomy as {modality}")
    tissue = tissue_map(anatomy, grid)
    lut = np.array([anatomy.intensities[name] for name in TISSUES], dtype=np.float32)
    values = ndimage.gaussian_filter(lut[tissue], _BLUR_SIGMA_VOXELS, mode="nearest", truncate=3.0)
    sigma: float | np.float32
    if modality == "ct":
        sigma = rng.uniform(8.0, 15.0)
        values = values + sigma * rng.standard_normal(values.shape, dtype=np.float32)
        pixels = np.clip(np.rint(values), *_CT_RANGE).astype(np.int16)
    else:
        scale = math.exp(rng.uniform(math.log(100.0), math.log(3000.0)))
        signal = values * _bias_field(rng, anatomy, grid).astype(np.float32) * np.float32(scale)
        sigma = np.float32(rng.uniform(0.02, 0.04) * scale)
        real = signal + sigma * rng.standard_normal(values.shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(values.shape, dtype=np.float32)
        pixels = np.sqrt(real * real + imaginary * imaginary).astype(np.float32)
    image = grid.apply(sitk.GetImageFromArray(pixels))
    label = grid.apply(sitk.GetImageFromArray(_TISSUE_LABEL[tissue]))
    return image, label


def sample_patient(rng: np.random.Generator, grid: Grid, modality: str = "ct",
                   center_lps: Sequence[float] | None = None) -> Anatomy:
    """Sample a patient for ``grid`` (the patient :func:`make_phantom` renders).

    ``center_lps``: body centre (mm, LPS); default: the grid centre plus a random offset of up to
    3 % of the field of view in x and y.

    Raises
    ------
    InputError
        Unknown ``modality``.
    """
    modality = check_modality(modality)
    fov = body_fov_mm(grid)
    if center_lps is None:
        centre = np.zeros(3)
        centre[: grid.dims] = grid.centre
        centre[:2] += rng.uniform(-0.03, 0.03, 2) * fov
    else:
        centre = np.asarray(center_lps, dtype=np.float64)
    return sample_anatomy(rng, fov, centre, modality, grid.dims)


def make_phantom(rng: np.random.Generator, grid: Grid, modality: str = "ct",
                 center_lps: Sequence[float] | None = None, *,
                 anatomy: Anatomy | None = None) -> tuple[sitk.Image, sitk.Image]:
    """Sample a patient for ``grid`` (:func:`sample_patient`) and render it: (image, label map), both
    with geometry ``grid``.

    Image: CT int16 HU, MR float32. Label map: uint8 with the values of :data:`CT_LABELS`.

    Parameters
    ----------
    center_lps
        Body centre (mm, LPS); default: the grid centre plus a random offset of up to
        3 % of the field of view in x and y.
    anatomy
        Render this patient instead of sampling one (``center_lps`` is then ignored).

    Raises
    ------
    InputError
        Unknown ``modality``, or one that differs from ``anatomy.modality``.
    """
    modality = check_modality(modality)
    if anatomy is None:
        anatomy = sample_patient(rng, grid, modality, center_lps)
    return render(anatomy, grid, rng, modality)
