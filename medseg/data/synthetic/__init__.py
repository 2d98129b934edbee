"""Deterministic synthetic abdominal CT / MR phantoms, written as an MSD-style or nnU-Net v2 raw dataset
(optionally with further MR contrasts as channels and nested regions).

Every phantom is defined in world (physical, LPS) coordinates: a patient is an
:class:`Anatomy` of analytic shapes (elliptic cylinders and rotated ellipsoids) and
:func:`render` tests each voxel centre of a :class:`Grid` against those shapes. The same
anatomy rendered on two different grids is therefore the same patient, whatever the
spacing, origin or direction of the grids.

LPS: world +x points to the patient's Left, +y to Posterior, +z to Superior (ITK, DICOM).
A direction matrix holds, column by column, the world direction of each index axis.

Label map values (:data:`CT_LABELS`, :data:`MR_LABELS`)::

    0 background, 1 liver, 2 spleen, 3 kidney (both), 4 bone (vertebral body), 5 lesion

Modules: :mod:`.grid` (voxel grids, random acquisition grids), :mod:`.anatomy` (synthetic
patients), :mod:`.phantom` (rendering), :mod:`.contrasts` (further MR contrasts of a patient),
:mod:`.dataset` (the MSD and nnU-Net layouts), :mod:`.dicom` (a phantom
or any 3D image as a DICOM series; not imported here, it needs pydicom).

Typical use::

    write_dataset("data/synthetic-ct", modality="ct", cases=16, seed=0)
"""

from medseg.data.synthetic.anatomy import TISSUES, Anatomy, Cylinder, Ellipsoid, sample_anatomy
from medseg.data.synthetic.contrasts import MR_CONTRASTS
from medseg.data.synthetic.dataset import LAYOUTS, REGION_LABELS, REGIONS, write_dataset
from medseg.data.synthetic.grid import Grid, body_fov_mm, random_grid
from medseg.data.synthetic.phantom import CT_LABELS, MR_LABELS, make_phantom, render, sample_patient, tissue_map

__all__ = [
    "CT_LABELS",
    "LAYOUTS",
    "MR_CONTRASTS",
    "MR_LABELS",
    "REGIONS",
    "REGION_LABELS",
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
    "sample_patient",
    "tissue_map",
    "write_dataset",
]
