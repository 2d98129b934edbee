"""Synthetic patients: analytic organ shapes in world space (mm, LPS) and their tissue intensities.

An :class:`Anatomy` is one patient: an elliptic-cylinder body with subcutaneous fat, liver, spleen,
kidneys (rotated ellipsoids), a vertebral body and focal liver lesions, each tissue with a CT
attenuation (HU) or MR signal. :func:`sample_anatomy` draws one from a random generator; the same
generator state gives the same patient, on whatever grid it is rendered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medseg.data.synthetic.grid import Grid, check_dims, check_modality, quadric, random_rotation
from medseg.errors import InputError

__all__ = ["TISSUES", "Anatomy", "Cylinder", "Ellipsoid", "sample_anatomy"]

log = logging.getLogger(__name__)

#: Tissue classes of the phantom, in painting order; the index is the tissue id.
TISSUES: tuple[str, ...] = ("air", "fat", "soft_tissue", "liver", "spleen", "kidney", "bone", "lesion")

#: Nominal CT attenuation (HU) and per-case uniform jitter (HU) of each tissue, roughly a
#: contrast-enhanced portal-venous phase. Jitters are small enough that neighbouring tissues never
#: swap or meet (liver stays >= 40 HU above soft tissue, spleen >= 14 HU above liver).
_CT_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "fat": (-100.0, 10.0),
    "soft_tissue": (45.0, 5.0),
    "liver": (100.0, 8.0),
    "spleen": (130.0, 8.0),
    "kidney": (180.0, 10.0),
    "bone": (500.0, 60.0),
}
_CT_LESION_CONTRAST = (-55.0, 8.0)  # lesion = liver + contrast (hypodense metastasis)
#: Nominal T1-like MR signal relative to fat, and per-case jitter.
_MR_SIGNAL: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "fat": (1.0, 0.03),
    "soft_tissue": (0.32, 0.03),
    "liver": (0.64, 0.03),
    "spleen": (0.47, 0.03),
    "kidney": (0.15, 0.03),
    "bone": (0.80, 0.04),
}
_MR_LESION_CONTRAST = (-0.32, 0.04)  # lesion = liver + contrast (T1-hypointense)

# Layout in units of the body field of view F, relative to the body centre (LPS, mm / F):
# (centre x, y, z), (semi-axes x, y, z). Liver on the patient's right (-x), spleen left (+x).
_BODY_SEMI = (0.42, 0.31)
_LAYOUT_LIVER = ((-0.13, -0.07, 0.05), (0.17, 0.13, 0.23))
_LAYOUT_SPLEEN = ((0.25, -0.01, 0.04), (0.065, 0.11, 0.13))
_LAYOUT_KIDNEYS = (((-0.15, 0.155, 0.00), (0.058, 0.068, 0.11)), ((0.15, 0.155, 0.02), (0.058, 0.068, 0.11)))
_LAYOUT_VERTEBRA = ((0.0, 0.185), (0.062, 0.052))
_Layout = tuple[tuple[float, float, float], tuple[float, float, float]]  # (centre, semi-axes) in units of F
_POSITION_JITTER = 0.025  # of F
_SIZE_JITTER = 0.15  # relative
_ROTATION_JITTER_DEG = 12.0
_ORGAN_GAP_MM = 1.0
_LESION_RADIUS_MM = ((7.0, 10.0), (6.0, 8.0))  # first lesion, optional second lesion


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in world space (mm, LPS).

    ``rotation`` is a row-major 3x3 matrix whose columns are the ellipsoid's axes in world space.
    """

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def weights(self, margin: float = 0.0) -> np.ndarray:
        """(3, 3) matrix W such that the shape is ``|W (p - centre)| <= 1``, semi-axes grown by ``margin``."""
        rotation = np.asarray(self.rotation).reshape(3, 3)
        weights: np.ndarray = (rotation / (np.asarray(self.semi_axes) + margin)).T
        return weights

    def contains(self, points: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Whether world points ``(..., 3)`` lie inside (the ellipsoid scaled by ``scale``)."""
        q = (np.asarray(points) - np.asarray(self.centre)) @ self.weights().T
        inside: np.ndarray = np.sum(q * q, axis=-1) <= scale * scale
        return inside


@dataclass(frozen=True)
class Cylinder:
    """An elliptic cylinder along world z (S-I): centre and semi-axes in the x-y plane (mm, LPS)."""

    centre: tuple[float, float]
    semi_axes: tuple[float, float]

    def weights(self, margin: float = 0.0) -> np.ndarray:
        """(2, 3) matrix W such that the shape is ``|W (p - centre)| <= 1``."""
        a, b = (s + margin for s in self.semi_axes)
        return np.array([[1.0 / a, 0.0, 0.0], [0.0, 1.0 / b, 0.0]])

    @property
    def centre3(self) -> tuple[float, float, float]:
        return (self.centre[0], self.centre[1], 0.0)


@dataclass(frozen=True)
class Anatomy:
    """One synthetic patient, in world coordinates (mm, LPS).

    Attributes
    ----------
    modality
        ``"ct"`` or ``"mr"``.
    fov_mm
        Body field of view the layout was scaled to.
    body
        Body outline (elliptic cylinder along S-I); the outer ``fat_fraction`` of its
        radius is subcutaneous fat, the inside soft tissue.
    liver, spleen, kidneys, lesions
        Organs; the lesions lie fully inside the liver.
    vertebra
        Vertebral body (elliptic cylinder along S-I), label "bone".
    intensities
        Tissue name (:data:`TISSUES`) -> CT attenuation (HU) or MR signal relative to fat.
    axial_level_mm
        World z of the axial plane rendered on 2D grids (kidney level, through the first lesion).
    """

    modality: str
    fov_mm: float
    body: Cylinder
    fat_fraction: float
    liver: Ellipsoid
    spleen: Ellipsoid
    kidneys: tuple[Ellipsoid, ...]
    vertebra: Cylinder
    lesions: tuple[Ellipsoid, ...]
    intensities: Mapping[str, float]
    axial_level_mm: float


def _xy(values: Iterable[float]) -> tuple[float, float]:
    """Two numbers (an x-y point or a pair of semi-axes) as floats."""
    x, y = (float(v) for v in values)
    return x, y


def _xyz(values: Iterable[float]) -> tuple[float, float, float]:
    """Three numbers (a world point or three semi-axes) as floats."""
    x, y, z = (float(v) for v in values)
    return x, y, z


def _jitter_organ(rng: np.random.Generator, centre: np.ndarray, layout: _Layout, fov: float) -> Ellipsoid:
    (offset, semi) = layout
    position = centre + fov * (np.asarray(offset) + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, 3))
    semi_axes = fov * np.asarray(semi) * rng.uniform(1.0 - _SIZE_JITTER, 1.0 + _SIZE_JITTER, 3)
    rotation = random_rotation(rng, 0.0, _ROTATION_JITTER_DEG)
    return Ellipsoid(_xyz(position), _xyz(semi_axes), tuple(map(float, rotation.ravel())))


def _nominal_organ(centre: np.ndarray, layout: _Layout, fov: float) -> Ellipsoid:
    offset, semi = layout
    return Ellipsoid(_xyz(centre + fov * np.asarray(offset)), _xyz(fov * s for s in semi))


def _layout_ok(body: Cylinder, fat: float, organs: Sequence[Ellipsoid], vertebra: Cylinder, fov: float) -> bool:
    """Organs inside the body's soft tissue and apart from each other (checked on a coarse world grid)."""
    step = fov / 48.0
    half = np.array([body.semi_axes[0], body.semi_axes[1], 0.4 * fov])
    centre = np.array([body.centre[0], body.centre[1], np.mean([o.centre[2] for o in organs])])
    size = tuple(int(n) for n in np.ceil(2.0 * half / step) + 1)
    check = Grid.centred(size, (step, step, step), centre)
    inner = quadric(check, body.weights(), body.centre3) <= (1.0 - fat) ** 2
    count = np.zeros(size[::-1], dtype=np.uint8)
    shapes: list[tuple[np.ndarray, Sequence[float]]] = [(o.weights(_ORGAN_GAP_MM / 2), o.centre) for o in organs]
    shapes.append((vertebra.weights(_ORGAN_GAP_MM / 2), vertebra.centre3))
    for index, (weights, shape_centre) in enumerate(shapes):
        mask = quadric(check, weights, shape_centre) <= 1.0
        if index < len(organs) and not mask.any():
            return False
        if np.any(mask & ~inner):
            return False
        count += mask
    return bool(count.max() <= 1)


def _fibonacci_sphere(n: int = 96) -> np.ndarray:
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = math.pi * (1.0 + 5.0 ** 0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=-1)


_SPHERE = _fibonacci_sphere()


def _place_lesions(rng: np.random.Generator, liver: Ellipsoid, level: float | None, count: int) -> tuple[Ellipsoid, ...]:
    """Spheres fully inside ``liver`` (centres at z = ``level`` when given), not touching each other."""
    rotation = np.asarray(liver.rotation).reshape(3, 3)
    extent = np.sqrt(((rotation * np.asarray(liver.semi_axes)) ** 2).sum(axis=1))  # world AABB half-size
    centre = np.asarray(liver.centre)
    lesions: list[Ellipsoid] = []
    for number in range(count):
        low, high = _LESION_RADIUS_MM[min(number, 1)]
        radius = rng.uniform(low, high)
        for attempt in range(400):
            if attempt and attempt % 100 == 0:  # hard to fit: shrink, but not below 6 mm
                radius = max(6.0, radius - 1.0)
            point = centre + rng.uniform(-extent, extent)
            if level is not None:
                point[2] = level
            if not liver.contains(point + radius * _SPHERE, scale=0.95).all():
                continue
            if any(np.linalg.norm(point - np.asarray(o.centre)) < radius + o.semi_axes[0] + 3.0 for o in lesions):
                continue
            lesions.append(Ellipsoid(_xyz(point), (float(radius),) * 3))
            break
        else:
            if number == 0:  # always one lesion: at the centre of the liver (in the plane for 2D)
                point = centre.copy()
                if level is not None:
                    point[2] = level
                lesions.append(Ellipsoid(_xyz(point), (6.0,) * 3))
            # a second lesion that does not fit is left out
    return tuple(lesions)


def _sample_intensities(rng: np.random.Generator, modality: str) -> dict[str, float]:
    table, lesion = (_CT_HU, _CT_LESION_CONTRAST) if modality == "ct" else (_MR_SIGNAL, _MR_LESION_CONTRAST)
    values = {name: float(nominal + rng.uniform(-jitter, jitter)) for name, (nominal, jitter) in table.items()}
    values["lesion"] = float(values["liver"] + lesion[0] + rng.uniform(-lesion[1], lesion[1]))
    return values


def sample_anatomy(rng: np.random.Generator, fov_mm: float, centre_lps: Sequence[float] | np.ndarray, modality: str = "ct",
                   dims: int = 3) -> Anatomy:
    """Sample one patient: organ positions, sizes, rotations and tissue intensities.

    Parameters
    ----------
    rng
        Source of randomness; the same generator state gives the same patient.
    fov_mm
        Body field of view (mm); the body is about 0.84 x 0.62 of it (left-right x
        anterior-posterior) and the organs scale with it.
    centre_lps
        World position (mm, LPS) of the body centre, which is also the kidney level; a 2D
        point (x, y) puts the kidney level at z = 0.
    modality
        ``"ct"`` (intensities in HU) or ``"mr"`` (T1-like signal relative to fat).
    dims
        2 puts the (first) lesion's centre in the axial plane at the kidney level, so that
        an axial slice there shows every label.

    Raises
    ------
    InputError
        Unknown ``modality``, ``dims`` not 2 or 3, or a non-positive ``fov_mm``.
    """
    modality = check_modality(modality)
    dims = check_dims(dims)
    if not fov_mm > 0:
        raise InputError(None, f"field of view {fov_mm!r} mm must be positive")
    fov = float(fov_mm)
    centre = np.zeros(3)
    centre[: len(centre_lps)] = np.asarray(centre_lps, dtype=np.float64)[:3]
    scale = rng.uniform(0.97, 1.03, 2)
    body = Cylinder((float(centre[0]), float(centre[1])),
                    (float(_BODY_SEMI[0] * fov * scale[0]), float(_BODY_SEMI[1] * fov * scale[1])))
    fat = float(rng.uniform(0.10, 0.14))
    vertebra_offset = np.asarray(_LAYOUT_VERTEBRA[0]) + rng.uniform(-0.01, 0.01, 2)
    vertebra = Cylinder(_xy(centre[:2] + fov * vertebra_offset),
                        _xy(fov * s * rng.uniform(0.9, 1.1) for s in _LAYOUT_VERTEBRA[1]))
    for _attempt in range(100):
        liver = _jitter_organ(rng, centre, _LAYOUT_LIVER, fov)
        spleen = _jitter_organ(rng, centre, _LAYOUT_SPLEEN, fov)
        kidneys = tuple(_jitter_organ(rng, centre, layout, fov) for layout in _LAYOUT_KIDNEYS)
        if _layout_ok(body, fat, (liver, spleen, *kidneys), vertebra, fov):
            break
    else:  # the nominal layout always fits
        log.debug("organ layout: no jittered layout fitted, using the nominal one")
        liver = _nominal_organ(centre, _LAYOUT_LIVER, fov)
        spleen = _nominal_organ(centre, _LAYOUT_SPLEEN, fov)
        kidneys = tuple(_nominal_organ(centre, layout, fov) for layout in _LAYOUT_KIDNEYS)
    level = float(centre[2])
    lesions = _place_lesions(rng, liver, level if dims == 2 else None, 1 + int(rng.random() < 0.4))
    return Anatomy(modality, fov, body, fat, liver, spleen, kidneys, vertebra, lesions,
                   _sample_intensities(rng, modality), level)

