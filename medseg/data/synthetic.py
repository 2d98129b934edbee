"""Deterministic synthetic abdominal CT / MR phantoms, written as an MSD-style dataset.

Every phantom is defined in world (physical, LPS) coordinates: a patient is an
:class:`Anatomy` of analytic shapes (elliptic cylinders and rotated ellipsoids) and
:func:`render` tests each voxel centre of a :class:`Grid` against those shapes. The same
anatomy rendered on two different grids is therefore the same patient, whatever the
spacing, origin or direction of the grids.

LPS: world +x points to the patient's Left, +y to Posterior, +z to Superior (ITK, DICOM).
A direction matrix holds, column by column, the world direction of each index axis.

Label map values (:data:`CT_LABELS`, :data:`MR_LABELS`)::

    0 background, 1 liver, 2 spleen, 3 kidney (both), 4 bone (vertebral body), 5 lesion

Typical use::

    write_dataset("data/synthetic-ct", modality="ct", cases=16, seed=0)
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medseg.errors import InputError
from medseg.io.itkfiles import itk_writable

__all__ = [
    "CT_LABELS",
    "MR_LABELS",
    "TISSUES",
    "Anatomy",
    "Cylinder",
    "Ellipsoid",
    "Grid",
    "body_fov_mm",
    "make_phantom",
    "random_grid",
    "render",
    "sample_anatomy",
    "tissue_map",
    "write_dataset",
]

log = logging.getLogger(__name__)

CT_LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "bone", 5: "lesion"}
MR_LABELS: dict[int, str] = dict(CT_LABELS)

#: Tissue classes of the phantom, in painting order; the index is the tissue id.
TISSUES: tuple[str, ...] = ("air", "fat", "soft_tissue", "liver", "spleen", "kidney", "bone", "lesion")
_AIR, _FAT, _SOFT, _LIVER, _SPLEEN, _KIDNEY, _BONE, _LESION = range(len(TISSUES))
#: Label value of each tissue class (fat, soft tissue and air are background).
_TISSUE_LABEL = np.array([0, 0, 0, 1, 2, 3, 4, 5], dtype=np.uint8)

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

_CT_RANGE = (-1024, 3071)
_BLUR_SIGMA_VOXELS = 0.6
_MODALITIES = ("ct", "mr")

# Layout in units of the body field of view F, relative to the body centre (LPS, mm / F):
# (centre x, y, z), (semi-axes x, y, z). Liver on the patient's right (-x), spleen left (+x).
_BODY_SEMI = (0.42, 0.31)
_LAYOUT_LIVER = ((-0.13, -0.07, 0.05), (0.17, 0.13, 0.23))
_LAYOUT_SPLEEN = ((0.25, -0.01, 0.04), (0.065, 0.11, 0.13))
_LAYOUT_KIDNEYS = (((-0.15, 0.155, 0.00), (0.058, 0.068, 0.11)), ((0.15, 0.155, 0.02), (0.058, 0.068, 0.11)))
_LAYOUT_VERTEBRA = ((0.0, 0.185), (0.062, 0.052))
_POSITION_JITTER = 0.025  # of F
_SIZE_JITTER = 0.15  # relative
_ROTATION_JITTER_DEG = 12.0
_ORGAN_GAP_MM = 1.0
_LESION_RADIUS_MM = ((7.0, 10.0), (6.0, 8.0))  # first lesion, optional second lesion

# Orientation codes: the patient direction each index axis points to -> sign of that axis.
_FLIPS_3D: dict[str, tuple[int, int, int]] = {
    "LPS": (1, 1, 1),
    "RAS": (-1, -1, 1),
    "LAS": (1, -1, 1),
    "RPI": (-1, 1, -1),
    "LPI": (1, 1, -1),
    "RAI": (-1, -1, -1),
}
_FLIPS_2D: tuple[tuple[int, int], ...] = ((1, 1), (-1, -1), (1, -1), (-1, 1))
# Index axis -> world axis for MR acquisitions (CT is always axial).
_PLANES: dict[str, tuple[int, int, int]] = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A voxel grid in ITK/DICOM (LPS) convention.

    Attributes
    ----------
    size
        Number of voxels per index axis, in (x, y, z) order as SimpleITK.
    spacing
        Voxel spacing (mm) per index axis.
    origin
        Physical position (mm, LPS) of the centre of voxel (0, 0, 0).
    direction
        Direction cosines, row-major flattened like SimpleITK; column j is the world
        direction of index axis j.

    Raises
    ------
    ValueError
        Inconsistent lengths, non-positive size or spacing.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        d = len(self.size)
        if d not in (2, 3) or len(self.spacing) != d or len(self.origin) != d or len(self.direction) != d * d:
            raise ValueError(f"inconsistent grid: size {self.size}, spacing {self.spacing}, "
                             f"origin {self.origin}, direction {self.direction}")
        if min(self.size) < 1 or min(self.spacing) <= 0:
            raise ValueError(f"grid size {self.size} and spacing {self.spacing} must be positive")

    @property
    def dims(self) -> int:
        """Number of dimensions (2 or 3)."""
        return len(self.size)

    @property
    def matrix(self) -> np.ndarray:
        """Direction cosines as a (dims, dims) array."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.dims, self.dims)

    @property
    def centre(self) -> np.ndarray:
        """Physical position (mm, LPS) of the grid's centre."""
        return self.index_to_physical((np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0)

    def index_to_physical(self, index: Sequence[float] | np.ndarray) -> np.ndarray:
        """Physical point(s) of continuous index(es) ``(..., dims)``: origin + direction @ (spacing * index)."""
        index = np.asarray(index, dtype=np.float64)
        return np.asarray(self.origin) + (index * np.asarray(self.spacing)) @ self.matrix.T

    @classmethod
    def centred(cls, size: Sequence[int], spacing: Sequence[float], centre: Sequence[float],
                direction: Sequence[float] | None = None) -> Grid:
        """Grid of the given size, spacing and direction (identity if omitted) whose centre is ``centre``.

        Raises
        ------
        ValueError
            Inconsistent lengths, non-positive size or spacing.
        """
        d = len(size)
        matrix = np.eye(d) if direction is None else np.asarray(direction, dtype=np.float64).reshape(d, d)
        half = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0 * np.asarray(spacing, dtype=np.float64)
        origin = np.asarray(centre, dtype=np.float64) - matrix @ half
        return cls(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                   tuple(float(o) for o in origin), tuple(float(v) for v in matrix.ravel()))

    @classmethod
    def from_image(cls, image: sitk.Image) -> Grid:
        """The grid of a SimpleITK image."""
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Set spacing, origin and direction of ``image`` (same size) to this grid's; returns ``image``."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def _check_modality(modality: str) -> str:
    value = str(modality).lower()
    if value not in _MODALITIES:
        raise InputError(None, f"modality {modality!r} is not supported; use 'ct' or 'mr'")
    return value


def _check_dims(dims: int) -> int:
    if dims not in (2, 3):
        raise InputError(None, f"dims={dims!r} is not supported; use 2 (axial slices) or 3 (volumes)")
    return int(dims)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix (Rodrigues) about unit ``axis`` by ``angle`` radians."""
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator, min_deg: float, max_deg: float) -> np.ndarray:
    """Rotation by a random angle in [min_deg, max_deg] (random sign) about a random axis."""
    axis = rng.normal(size=3)
    angle = math.radians(rng.uniform(min_deg, max_deg)) * rng.choice((-1.0, 1.0))
    return _rotation(axis, angle)


def random_grid(rng: np.random.Generator, size: int = 96, dims: int = 3, modality: str = "ct") -> Grid:
    """Sample an acquisition grid: anisotropic spacing, varied orientation and origin.

    In-plane: ``size`` x ``size`` voxels over a field of view of 110-140 mm. 3D: slice
    spacing 2.0-3.0 mm over 110-130 mm. Orientation: one of LPS, RAS, LAS, RPI, LPI, RAI
    axis flips, and for about a third of the grids an oblique rotation of 10-20 degrees
    about a random axis. CT grids are axial (thick-slice axis along S-I, up to the oblique
    tilt); MR grids may also be coronal or sagittal. ``dims=2`` gives an axial 2D grid.
    The grid centre lies within tens of mm of the world origin.

    Raises
    ------
    InputError
        Unknown ``modality``, ``dims`` not 2 or 3, or ``size`` < 2.
    """
    modality = _check_modality(modality)
    dims = _check_dims(dims)
    if size < 2:
        raise InputError(None, f"grid size {size} is too small")
    fov = rng.uniform(110.0, 140.0)
    in_plane = fov / size
    oblique = rng.random() < 1.0 / 3.0
    if dims == 2:
        signs = np.asarray(_FLIPS_2D[rng.integers(len(_FLIPS_2D))], dtype=np.float64)
        matrix = np.diag(signs)
        if oblique:
            angle = math.radians(rng.uniform(10.0, 20.0)) * rng.choice((-1.0, 1.0))
            c, s = math.cos(angle), math.sin(angle)
            matrix = np.array([[c, -s], [s, c]]) @ matrix
        centre = rng.uniform(-40.0, 40.0, size=2)
        return Grid.centred((size, size), (in_plane, in_plane), centre, matrix.ravel())

    slice_spacing = rng.uniform(2.0, 3.0)
    slices = max(2, int(round(rng.uniform(110.0, 130.0) / slice_spacing)))
    code = list(_FLIPS_3D)[rng.integers(len(_FLIPS_3D))]
    plane = "axial"
    if modality == "mr":
        plane = ("axial", "axial", "coronal", "sagittal")[rng.integers(4)]
    matrix = np.zeros((3, 3))
    for index_axis, (world_axis, sign) in enumerate(zip(_PLANES[plane], _FLIPS_3D[code])):
        matrix[world_axis, index_axis] = sign
    if oblique:
        matrix = _random_rotation(rng, 10.0, 20.0) @ matrix
    centre = np.array([rng.uniform(-40.0, 40.0), rng.uniform(-40.0, 40.0), rng.uniform(-150.0, 150.0)])
    log.debug("grid: %s %s%s, fov %.1f mm, slice spacing %.2f mm", plane, code, " oblique" if oblique else "",
              fov, slice_spacing)
    return Grid.centred((size, size, slices), (in_plane, in_plane, slice_spacing), centre, matrix.ravel())


def body_fov_mm(grid: Grid) -> float:
    """Field of view (mm) available to the body cross-section of a grid.

    The smaller of the extents of the index axes closest to world x (left-right) and
    world y (anterior-posterior).
    """
    matrix = np.abs(grid.matrix)
    extents = np.asarray(grid.spacing) * np.asarray(grid.size)
    return float(min(extents[int(np.argmax(matrix[w]))] for w in range(2)))


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


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
        return (rotation / (np.asarray(self.semi_axes) + margin)).T

    def contains(self, points: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Whether world points ``(..., 3)`` lie inside (the ellipsoid scaled by ``scale``)."""
        q = (np.asarray(points) - np.asarray(self.centre)) @ self.weights().T
        return np.sum(q * q, axis=-1) <= scale * scale


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


def _jitter_organ(rng: np.random.Generator, centre: np.ndarray, layout: tuple, fov: float) -> Ellipsoid:
    (offset, semi) = layout
    position = centre + fov * (np.asarray(offset) + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, 3))
    semi_axes = fov * np.asarray(semi) * rng.uniform(1.0 - _SIZE_JITTER, 1.0 + _SIZE_JITTER, 3)
    rotation = _random_rotation(rng, 0.0, _ROTATION_JITTER_DEG)
    return Ellipsoid(tuple(map(float, position)), tuple(map(float, semi_axes)), tuple(map(float, rotation.ravel())))


def _nominal_organ(centre: np.ndarray, layout: tuple, fov: float) -> Ellipsoid:
    offset, semi = layout
    return Ellipsoid(tuple(map(float, centre + fov * np.asarray(offset))), tuple(float(fov * s) for s in semi))


def _layout_ok(body: Cylinder, fat: float, organs: Sequence[Ellipsoid], vertebra: Cylinder, fov: float) -> bool:
    """Organs inside the body's soft tissue and apart from each other (checked on a coarse world grid)."""
    step = fov / 48.0
    half = np.array([body.semi_axes[0], body.semi_axes[1], 0.4 * fov])
    centre = np.array([body.centre[0], body.centre[1], np.mean([o.centre[2] for o in organs])])
    size = tuple(int(n) for n in np.ceil(2.0 * half / step) + 1)
    check = Grid.centred(size, (step, step, step), centre)
    inner = _quadric(check, body.weights(), body.centre3) <= (1.0 - fat) ** 2
    count = np.zeros(size[::-1], dtype=np.uint8)
    shapes: list[tuple[np.ndarray, Sequence[float]]] = [(o.weights(_ORGAN_GAP_MM / 2), o.centre) for o in organs]
    shapes.append((vertebra.weights(_ORGAN_GAP_MM / 2), vertebra.centre3))
    for index, (weights, shape_centre) in enumerate(shapes):
        mask = _quadric(check, weights, shape_centre) <= 1.0
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
            lesions.append(Ellipsoid(tuple(map(float, point)), (float(radius),) * 3))
            break
        else:
            if number == 0:  # always one lesion: at the centre of the liver (in the plane for 2D)
                point = centre.copy()
                if level is not None:
                    point[2] = level
                lesions.append(Ellipsoid(tuple(map(float, point)), (6.0,) * 3))
            # a second lesion that does not fit is left out
    return tuple(lesions)


def _sample_intensities(rng: np.random.Generator, modality: str) -> dict[str, float]:
    table, lesion = (_CT_HU, _CT_LESION_CONTRAST) if modality == "ct" else (_MR_SIGNAL, _MR_LESION_CONTRAST)
    values = {name: float(nominal + rng.uniform(-jitter, jitter)) for name, (nominal, jitter) in table.items()}
    values["lesion"] = float(values["liver"] + lesion[0] + rng.uniform(-lesion[1], lesion[1]))
    return values


def sample_anatomy(rng: np.random.Generator, fov_mm: float, centre_lps: Sequence[float], modality: str = "ct",
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
    modality = _check_modality(modality)
    dims = _check_dims(dims)
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
    vertebra = Cylinder(tuple(map(float, centre[:2] + fov * vertebra_offset)),
                        tuple(float(fov * s * rng.uniform(0.9, 1.1)) for s in _LAYOUT_VERTEBRA[1]))
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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _world_affine(grid: Grid, level_z: float) -> tuple[np.ndarray, np.ndarray]:
    """(M, t) with world point = M @ index + t, M of shape (3, dims); 2D grids lie in the plane z = level_z."""
    linear = grid.matrix * np.asarray(grid.spacing)[None, :]
    if grid.dims == 3:
        return linear, np.asarray(grid.origin, dtype=np.float64)
    embedded = np.zeros((3, 2))
    embedded[:2] = linear
    return embedded, np.array([grid.origin[0], grid.origin[1], level_z])


def _affine_field(grid: Grid, coefficients: np.ndarray, offset: float) -> np.ndarray:
    """``coefficients @ index + offset`` at every voxel, as an array broadcastable to numpy (z, y, x) order."""
    total = np.full((1,) * grid.dims, offset, dtype=np.float64)
    for axis, (n, a) in enumerate(zip(grid.size, coefficients)):
        shape = [1] * grid.dims
        shape[grid.dims - 1 - axis] = n
        total = total + (a * np.arange(n, dtype=np.float64)).reshape(shape)
    return total


def _quadric(grid: Grid, weights: np.ndarray, centre: Sequence[float], level_z: float = 0.0) -> np.ndarray:
    """``|W (p - centre)|^2`` at every voxel centre p of ``grid`` (numpy (z, y, x) order)."""
    linear, translation = _world_affine(grid, level_z)
    rows = weights @ linear
    offsets = weights @ (translation - np.asarray(centre, dtype=np.float64))
    result = np.zeros(grid.size[::-1], dtype=np.float64)
    for row, offset in zip(rows, offsets):
        q = _affine_field(grid, row, offset)
        result += q * q
    return result


def _world_coordinate(grid: Grid, axis: int, level_z: float) -> np.ndarray:
    linear, translation = _world_affine(grid, level_z)
    return _affine_field(grid, linear[axis], translation[axis])


def tissue_map(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Tissue id (index into :data:`TISSUES`) at every voxel centre, numpy (z, y, x) order, uint8."""
    level = anatomy.axial_level_mm
    tissue = np.full(grid.size[::-1], _AIR, dtype=np.uint8)
    radius2 = _quadric(grid, anatomy.body.weights(), anatomy.body.centre3, level)
    tissue[radius2 <= 1.0] = _FAT
    tissue[radius2 <= (1.0 - anatomy.fat_fraction) ** 2] = _SOFT
    organs: list[tuple[int, np.ndarray, Sequence[float]]] = [
        (_LIVER, anatomy.liver.weights(), anatomy.liver.centre),
        (_SPLEEN, anatomy.spleen.weights(), anatomy.spleen.centre),
        *((_KIDNEY, k.weights(), k.centre) for k in anatomy.kidneys),
        (_BONE, anatomy.vertebra.weights(), anatomy.vertebra.centre3),
    ]
    for tissue_id, weights, centre in organs:
        tissue[_quadric(grid, weights, centre, level) <= 1.0] = tissue_id
    for lesion in anatomy.lesions:
        tissue[(_quadric(grid, lesion.weights(), lesion.centre, level) <= 1.0) & (tissue == _LIVER)] = _LESION
    return tissue


def _bias_field(rng: np.random.Generator, anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Smooth multiplicative field exp(p(x, y, z)) with p a random quadratic in world coordinates, |p| <= 0.3."""
    level = anatomy.axial_level_mm
    centre = (*anatomy.body.centre, level)
    half = anatomy.fov_mm / 2.0
    u = [(_world_coordinate(grid, axis, level) - centre[axis]) / half for axis in range(3)]
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
    modality = anatomy.modality if modality is None else _check_modality(modality)
    if modality != anatomy.modality:
        raise InputError(None, f"cannot render a {anatomy.modality} anatomy as {modality}")
    tissue = tissue_map(anatomy, grid)
    lut = np.array([anatomy.intensities[name] for name in TISSUES], dtype=np.float32)
    values = ndimage.gaussian_filter(lut[tissue], _BLUR_SIGMA_VOXELS, mode="nearest", truncate=3.0)
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


def make_phantom(rng: np.random.Generator, grid: Grid, modality: str = "ct",
                 center_lps: Sequence[float] | None = None, *,
                 anatomy: Anatomy | None = None) -> tuple[sitk.Image, sitk.Image]:
    """Sample a patient for ``grid`` and render it: (image, label map), both with geometry ``grid``.

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
    modality = _check_modality(modality)
    if anatomy is None:
        fov = body_fov_mm(grid)
        if center_lps is None:
            centre = np.zeros(3)
            centre[: grid.dims] = grid.centre
            centre[:2] += rng.uniform(-0.03, 0.03, 2) * fov
        else:
            centre = np.asarray(center_lps, dtype=np.float64)
        anatomy = sample_anatomy(rng, fov, centre, modality, grid.dims)
    return render(anatomy, grid, rng, modality)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _dataset_json(modality: str, dims: int, seed: int, training: list[str], test: list[str]) -> dict:
    channel = "CT" if modality == "ct" else "MRI"
    labels = CT_LABELS if modality == "ct" else MR_LABELS
    return {
        "name": f"medseg-synthetic-{modality}",
        "description": (f"Synthetic abdominal {channel} phantoms ({dims}D, seed {seed}): liver, spleen, kidneys, "
                        "vertebral body and focal liver lesions on anisotropic, variously oriented grids"),
        "reference": "medseg synthetic phantom",
        "licence": "CC0",
        "tensorImageSize": f"{dims}D",
        "modality": {"0": channel},
        "channel_names": {"0": channel},
        "labels": {str(k): v for k, v in labels.items()},
        "numTraining": len(training),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in training],
        "test": [f"./imagesTs/{n}" for n in test],
        "file_ending": ".nii.gz",
        "seed": seed,
        "generator": "medseg.data.synthetic",
    }


def write_dataset(out_dir: str | os.PathLike[str], modality: str = "ct", cases: int = 10, seed: int = 0,
                  size: int = 96, dims: int = 3) -> pathlib.Path:
    """Write an MSD-style synthetic dataset and return the path of its ``dataset.json``.

    Layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/`` with
    files ``<ct|mr>_<NNN>.nii.gz``; the last ``max(1, round(0.25 * cases))`` cases are the
    test cases. Case i is generated from ``SeedSequence(seed).spawn(cases)[i]``, so a seed
    always gives the same files. Everything is written into a temporary folder beside
    ``out_dir`` that is renamed into place at the end; on failure it is removed.

    Raises
    ------
    InputError
        Unknown ``modality``, ``dims`` not 2 or 3, ``size`` < 32, ``cases`` < 2, or
        ``out_dir`` exists and is not an empty folder.
    """
    modality = _check_modality(modality)
    dims = _check_dims(dims)
    if int(size) != size or size < 32:
        raise InputError(None, f"size={size!r} is too small; use at least 32 voxels per in-plane axis")
    if int(cases) != cases or cases < 2:
        raise InputError(out_dir, f"need at least 2 cases (one training, one test), got {cases!r}")
    size, cases, seed = int(size), int(cases), int(seed)
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)

    n_test = max(1, round(cases * 0.25))
    names = [f"{modality}_{i:03d}.nii.gz" for i in range(cases)]
    training, test = names[: cases - n_test], names[cases - n_test:]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / folder).mkdir()
        for i, child in enumerate(np.random.SeedSequence(seed).spawn(cases)):
            rng = np.random.default_rng(child)
            grid = random_grid(rng, size, dims, modality)
            image, label = make_phantom(rng, grid, modality)
            split = "Tr" if i < len(training) else "Ts"
            for picture, folder in ((image, f"images{split}"), (label, f"labels{split}")):
                with itk_writable(tmp / folder / names[i]) as name:  # SimpleITK aborts on non-UTF-8 paths
                    sitk.WriteImage(picture, name, True)
            log.debug("case %s: size %s, spacing %s", names[i], grid.size, grid.spacing)
        description = _dataset_json(modality, dims, seed, training, test)
        (tmp / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise InputError(out, f"could not move the dataset into place ({exc.strerror or exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d synthetic %s cases (%d training, %d test) to %s", cases, modality.upper(),
             len(training), len(test), out)
    return out / "dataset.json"
