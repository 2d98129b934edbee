"""Voxel grids of the synthetic phantoms and the world-space fields evaluated on them.

A :class:`Grid` is a voxel grid in ITK/DICOM (LPS) convention; :func:`random_grid` samples the
acquisition grids of the synthetic datasets (anisotropic spacing, axis flips, oblique tilts, for MR
also coronal and sagittal planes). :func:`quadric` and :func:`world_coordinate` evaluate the analytic
shapes and smooth fields of :mod:`.anatomy` and :mod:`.phantom` at every voxel centre.

LPS: world +x points to the patient's Left, +y to Posterior, +z to Superior (ITK, DICOM).
A direction matrix holds, column by column, the world direction of each index axis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError

__all__ = [
    "MODALITIES",
    "Grid",
    "body_fov_mm",
    "check_dims",
    "check_modality",
    "quadric",
    "random_grid",
    "random_rotation",
    "rotation",
    "world_coordinate",
]

log = logging.getLogger(__name__)

#: Modalities the phantoms are rendered in.
MODALITIES = ("ct", "mr")

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
        points: np.ndarray = np.asarray(self.origin) + (index * np.asarray(self.spacing)) @ self.matrix.T
        return points

    @classmethod
    def centred(cls, size: Sequence[int], spacing: Sequence[float], centre: Sequence[float] | np.ndarray,
                direction: Sequence[float] | np.ndarray | None = None) -> Grid:
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


def check_modality(modality: str) -> str:
    """``modality`` in lower case.

    Raises
    ------
    InputError
        Not ``"ct"`` or ``"mr"`` (any case).
    """
    value = str(modality).lower()
    if value not in MODALITIES:
        raise InputError(None, f"modality {modality!r} is not supported; use 'ct' or 'mr'")
    return value


def check_dims(dims: int) -> int:
    """``dims`` as an int.

    Raises
    ------
    InputError
        Not 2 or 3.
    """
    if dims not in (2, 3):
        raise InputError(None, f"dims={dims!r} is not supported; use 2 (axial slices) or 3 (volumes)")
    return int(dims)


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix (Rodrigues) about unit ``axis`` by ``angle`` radians."""
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    matrix: np.ndarray = np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)
    return matrix


def random_rotation(rng: np.random.Generator, min_deg: float, max_deg: float) -> np.ndarray:
    """Rotation by a random angle in [min_deg, max_deg] (random sign) about a random axis."""
    axis = rng.normal(size=3)
    angle = math.radians(rng.uniform(min_deg, max_deg)) * rng.choice((-1.0, 1.0))
    return rotation(axis, angle)


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
    modality = check_modality(modality)
    dims = check_dims(dims)
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
        matrix = random_rotation(rng, 10.0, 20.0) @ matrix
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


def quadric(grid: Grid, weights: np.ndarray, centre: Sequence[float] | np.ndarray, level_z: float = 0.0) -> np.ndarray:
    """``|W (p - centre)|^2`` at every voxel centre p of ``grid`` (numpy (z, y, x) order)."""
    linear, translation = _world_affine(grid, level_z)
    rows = weights @ linear
    offsets = weights @ (translation - np.asarray(centre, dtype=np.float64))
    result = np.zeros(grid.size[::-1], dtype=np.float64)
    for row, offset in zip(rows, offsets):
        q = _affine_field(grid, row, offset)
        result += q * q
    return result


def world_coordinate(grid: Grid, axis: int, level_z: float) -> np.ndarray:
    """World coordinate ``axis`` (0 x, 1 y, 2 z; mm, LPS) at every voxel centre, broadcastable to numpy
    (z, y, x) order; a 2D grid lies in the plane z = ``level_z``."""
    linear, translation = _world_affine(grid, level_z)
    return _affine_field(grid, linear[axis], translation[axis])

