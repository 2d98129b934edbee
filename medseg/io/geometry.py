"""The one check of an image grid that every reader applies (NIfTI, NRRD / MetaImage, DICOM series).

A grid is usable when its spacing, origin and direction are finite, every spacing is positive and
the direction matrix is orthonormal (within :data:`DIRECTION_TOL`): a rotation, possibly with a flip.
A zero, NaN or infinite value there would make resampling divide by zero or spread NaN over the
image, and a sheared or singular matrix cannot be written back by the ITK-based writers.

:class:`Geometry` is the grid record every reader and writer passes around (ITK's LPS terms, sizes in
index order). Pure numpy: used by the DICOM scan, which must not import SimpleITK's or MONAI's readers' layers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import InputError

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["DIRECTION_TOL", "Geometry", "check_grid", "grid_problem", "lps_to_ras", "split_affine"]

#: Largest deviation of ``D.T @ D`` from the identity accepted for a direction matrix ``D``.
#: float32 headers (NIfTI sform, DICOM decimal strings) round at about 1e-6; a shear of 0.06 degrees is 1e-3.
DIRECTION_TOL = 1e-3


def _fmt(values: Sequence[float] | np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in np.asarray(values, dtype=np.float64).ravel()) + ")"


def grid_problem(spacing: Sequence[float] | np.ndarray, origin: Sequence[float] | np.ndarray,
                 direction: Sequence[float] | np.ndarray) -> str | None:
    """What is wrong with a grid, or None when it is usable.

    Parameters
    ----------
    spacing
        Voxel size (mm) along each index axis; ``d`` values.
    origin
        World position (mm) of the first voxel; ``d`` values.
    direction
        ``d x d`` direction cosines, row-major (ITK / SimpleITK order: column ``i`` is index axis ``i``).
    """
    spacing_a = np.asarray(spacing, dtype=np.float64).ravel()
    origin_a = np.asarray(origin, dtype=np.float64).ravel()
    direction_a = np.asarray(direction, dtype=np.float64).ravel()
    d = spacing_a.size
    if d == 0 or origin_a.size != d or direction_a.size != d * d:
        return (f"inconsistent grid: {spacing_a.size} spacing, {origin_a.size} origin and "
                f"{direction_a.size} direction values")
    if not np.all(np.isfinite(spacing_a)):
        return f"voxel spacing {_fmt(spacing_a)} is not finite"
    if np.any(spacing_a <= 0):
        return f"voxel spacing {_fmt(spacing_a)} is not positive"
    if not np.all(np.isfinite(origin_a)):
        return f"origin {_fmt(origin_a)} is not finite"
    if not np.all(np.isfinite(direction_a)):
        return f"direction matrix {_fmt(direction_a)} is not finite"
    matrix = direction_a.reshape(d, d)
    if abs(float(np.linalg.det(matrix))) < 1e-6:
        return f"direction matrix {_fmt(direction_a)} is degenerate (not invertible)"
    deviation = float(np.max(np.abs(matrix.T @ matrix - np.eye(d))))
    if deviation > DIRECTION_TOL:
        return (f"direction matrix {_fmt(direction_a)} is not orthonormal (sheared or scaled axes, "
                f"deviation {deviation:.2g})")
    return None


def check_grid(path: str | os.PathLike[str] | None, spacing: Sequence[float] | np.ndarray,
               origin: Sequence[float] | np.ndarray, direction: Sequence[float] | np.ndarray) -> None:
    """Raise InputError (naming ``path``) if the grid is not usable (see :func:`grid_problem`).

    Raises
    ------
    InputError
        Non-finite or non-positive spacing, non-finite origin, or a direction matrix that is not
        finite, is singular or is not orthonormal.
    """
    problem = grid_problem(spacing, origin, direction)
    if problem is not None:
        raise InputError(path, problem)


def split_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, origin, direction) of a ``(d+1) x (d+1)`` index-to-world affine: spacing = the norms
    of the matrix columns, direction = the columns divided by them (zero columns stay zero, which
    :func:`grid_problem` then reports as a zero spacing)."""
    affine = np.asarray(affine, dtype=np.float64)
    d = affine.shape[0] - 1
    matrix = affine[:d, :d]
    with np.errstate(invalid="ignore", divide="ignore"):
        spacing = np.linalg.norm(matrix, axis=0)
        direction = np.where(spacing > 0, matrix / np.where(spacing > 0, spacing, 1.0), 0.0)
    return spacing, affine[:d, d].copy(), direction


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Flip the first two world axes of a ``(d+1) x (d+1)`` affine (LPS <-> RAS; its own inverse),
    as :func:`monai.data.utils.orientation_ras_lps` does."""
    d = max(affine.shape[0] - 1, 1)
    flip = [[-1.0, 1.0], [-1.0, -1.0, 1.0], [-1.0, -1.0, 1.0, 1.0]][min(d - 1, 2)] + [1.0] * (d - 3)
    return np.diag(flip) @ affine


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of an image in ITK (LPS) terms, sizes in index order ``(x, y, z)``."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def dims(self) -> int:
        return len(self.size)

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """Geometry of a SimpleITK image (or of a reader after ``ReadImageInformation``)."""
        size = image.GetSize()
        return cls(
            tuple(int(s) for s in size),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    def affine_lps(self) -> np.ndarray:
        """The (d+1)x(d+1) index-to-LPS-world matrix."""
        d = self.dims
        affine = np.eye(d + 1)
        affine[:d, :d] = np.asarray(self.direction).reshape(d, d) @ np.diag(self.spacing)
        affine[:d, d] = self.origin
        return affine

    def affine_ras(self) -> np.ndarray:
        """The (d+1)x(d+1) index-to-RAS-world matrix (MONAI's and nibabel's convention)."""
        return lps_to_ras(self.affine_lps())

    def mismatch(self, other: Geometry, tol_mm: float = 1e-3, tol_dir: float = 1e-4) -> str | None:
        """Describe how ``other`` differs from this grid, or return None if they match."""
        if self.size != other.size:
            return f"size {other.size} differs from {self.size}"
        if not np.allclose(self.spacing, other.spacing, atol=tol_mm, rtol=0):
            return f"spacing {_fmt(other.spacing)} differs from {_fmt(self.spacing)}"
        if not np.allclose(self.origin, other.origin, atol=max(tol_mm, 1e-3 * max(self.spacing)), rtol=0):
            return f"origin {_fmt(other.origin)} differs from {_fmt(self.origin)}"
        if not np.allclose(self.direction, other.direction, atol=tol_dir, rtol=0):
            return "direction (orientation) differs"
        return None
