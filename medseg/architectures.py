"""The network architectures a plan can name: :class:`NetworkSpec` (the ``network`` of ``plan.json``),
the patch divisibility each architecture needs, and DynUNet's topology planned from the patch size and
the target spacing the way nnU-Net plans its U-Nets.

The networks themselves are built by :func:`medseg.networks.build_network`. This module imports no
numerical library: the command line reads :data:`ARCHITECTURES` without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["ARCHITECTURES", "FIELDS", "NetworkSpec", "default_filters", "dynunet_topology"]

#: The architectures :func:`medseg.networks.build_network` builds (``--network``), the first the default.
ARCHITECTURES = ("unet", "dynunet", "segresnet")
#: The fields of :class:`NetworkSpec` each architecture uses besides ``name``: ``plan.json`` holds only these.
FIELDS: dict[str, tuple[str, ...]] = {
    "unet": ("channels", "strides", "num_res_units", "norm", "dropout"),
    "dynunet": ("filters", "kernel_sizes", "level_strides", "res_block", "deep_supervision", "norm", "dropout"),
    "segresnet": ("init_filters", "blocks_down", "blocks_up", "norm", "dropout"),
}
TITLES = {"unet": "U-Net", "dynunet": "DynUNet", "segresnet": "SegResNet"}
#: Normalisations of DynUNet and SegResNet (the U-Net takes any name MONAI knows, as before).
NORMS = ("instance", "batch")
#: DynUNet topology: at most this many poolings, none that leaves an axis below ``MIN_EDGE`` voxels.
MAX_POOLINGS = 5
MIN_EDGE = 4
#: An axis is pooled (and convolved with 3 voxels) once its spacing is within this factor of the finest.
ANISOTROPY = 2.0
#: DynUNet feature channels: ``BASE_FILTERS`` doubled at every level, at most ``MAX_FILTERS``.
BASE_FILTERS, MAX_FILTERS = 16, 320


@dataclass
class NetworkSpec:
    """Arguments of the network factory (:func:`medseg.networks.build_network`); which fields count
    depends on ``name`` (see :data:`FIELDS`).

    * ``unet`` (MONAI ``UNet``): ``channels`` per level, ``strides`` between levels, ``num_res_units``.
    * ``dynunet`` (MONAI ``DynUNet``, no deep supervision): ``filters``, ``kernel_sizes`` and
      ``level_strides`` per level (the first level's strides are all 1), ``res_block``; empty: planned
      from the patch size and target spacing by :meth:`planned`; ``deep_supervision``: extra outputs of
      the lower decoder levels while training (inference uses the main output only).
    * ``segresnet`` (MONAI ``SegResNet``): ``init_filters``, residual ``blocks_down`` per level and
      ``blocks_up`` (one fewer).

    ``norm`` and ``dropout`` are shared.
    """

    name: str = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    norm: str = "instance"
    dropout: float = 0.0
    filters: tuple[int, ...] = ()
    kernel_sizes: tuple[tuple[int, ...], ...] = ()
    level_strides: tuple[tuple[int, ...], ...] = ()
    res_block: bool = False
    deep_supervision: bool = False
    init_filters: int = 16
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)

    @property
    def title(self) -> str:
        """The architecture's name in prose ("U-Net", "DynUNet", "SegResNet")."""
        return TITLES.get(self.name, self.name)

    def to_json(self) -> dict[str, Any]:
        """``name`` and the fields of this architecture (all fields for an unknown name)."""
        if self.name not in FIELDS:
            return asdict(self)
        return {"name": self.name, **{key: getattr(self, key) for key in FIELDS[self.name]}}

    def planned(self, patch_size: Sequence[int], spacing: Sequence[float]) -> NetworkSpec:
        """This spec with a DynUNet's missing topology planned by :func:`dynunet_topology` (and
        :func:`default_filters`); any other spec as it is.

        Raises
        ------
        ValueError
            A patch too small for a DynUNet (fewer than two poolings).
        """
        if self.name != "dynunet":
            return self
        kernels, strides = self.kernel_sizes, self.level_strides
        if not kernels and not strides:
            kernels, strides = dynunet_topology(patch_size, spacing)
        return replace(self, kernel_sizes=kernels, level_strides=strides,
                       filters=self.filters or default_filters(len(strides)))

    def check(self, dims: int) -> None:
        """Check the fields that only make sense together (each field's own type and range is checked
        by the plan reader).

        Raises
        ------
        ValueError
            Naming the field: an unknown ``name``; a DynUNet whose ``kernel_sizes``, ``level_strides``
            and ``filters`` differ in length, have fewer than 3 levels, entries of another dimension
            than ``dims`` or a first level that is strided; a SegResNet whose ``blocks_up`` is not one
            shorter than ``blocks_down``; a U-Net with one stride per channel count.
        """
        if self.name not in ARCHITECTURES:
            raise ValueError(f"field 'network.name' must be one of {', '.join(ARCHITECTURES)}, got {self.name!r}")
        if self.name == "unet" and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"field 'network.strides' must have one value fewer than 'network.channels' "
                             f"({len(self.channels)})")
        if self.name == "segresnet" and len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError(f"field 'network.blocks_up' must have one value fewer than 'network.blocks_down' "
                             f"({len(self.blocks_down)})")
        if self.name == "dynunet":
            _check_dynunet(self, dims)

    def patch_divisors(self, dims: int) -> tuple[int, ...]:
        """What each patch axis must be a multiple of for this network to map a patch to a map of the
        same size: a U-Net the product of its strides, a DynUNet the product of its strides along that
        axis, a SegResNet ``2 ** (len(blocks_down) - 1)``.

        Raises
        ------
        ValueError
            An unknown ``name``, or a DynUNet whose topology is not planned yet (see :meth:`planned`).
        """
        if self.name == "unet":
            return (math.prod(self.strides),) * dims
        if self.name == "segresnet":
            return (2 ** (len(self.blocks_down) - 1),) * dims
        if self.name == "dynunet":
            if not self.level_strides:
                raise ValueError("the DynUNet's strides are not planned yet (NetworkSpec.planned)")
            return tuple(math.prod(level[axis] for level in self.level_strides) for axis in range(dims))
        raise ValueError(f"field 'network.name' must be one of {', '.join(ARCHITECTURES)}, got {self.name!r}")

    def check_patch(self, patch_size: Sequence[int]) -> None:
        """Refuse a patch this network cannot map to a map of the same size (see :meth:`patch_divisors`).

        Raises
        ------
        ValueError
            Naming the patch, the divisors and the fields they come from.
        """
        divisors = self.patch_divisors(len(patch_size))
        if any(int(p) % d for p, d in zip(patch_size, divisors, strict=True)):
            source = {"unet": "the product of 'network.strides'", "dynunet": "the products of "
                      "'network.level_strides' per axis", "segresnet": "2 ** (levels of 'network.blocks_down' - 1)"}
            raise ValueError(f"field 'patch_size' ({list(patch_size)}) must be a multiple of {list(divisors)} per axis "
                             f"for the {self.name} network ({source[self.name]})")


def _check_dynunet(spec: NetworkSpec, dims: int) -> None:
    if not spec.kernel_sizes or not spec.level_strides:
        missing = "kernel_sizes" if not spec.kernel_sizes else "level_strides"
        raise ValueError(f"field 'network.{missing}' is missing: give both 'network.kernel_sizes' and "
                         f"'network.level_strides', or neither (then they are planned from the patch and spacing)")
    levels = len(spec.level_strides)
    for key in ("kernel_sizes", "filters"):
        if len(getattr(spec, key)) != levels:
            raise ValueError(f"field 'network.{key}' must have one entry per level, like 'network.level_strides' "
                             f"({levels}), got {len(getattr(spec, key))}")
    if levels < 3:
        raise ValueError(f"field 'network.level_strides' must have at least 3 levels (MONAI's DynUNet), got {levels}")
    for key in ("kernel_sizes", "level_strides"):
        if any(len(level) != dims for level in getattr(spec, key)):
            raise ValueError(f"field 'network.{key}' must hold {dims} values per level (the plan is {dims}D)")
    if any(s != 1 for s in spec.level_strides[0]):
        raise ValueError(f"field 'network.level_strides' must start with a level of strides 1 (full resolution), "
                         f"got {list(spec.level_strides[0])}")


def dynunet_topology(patch_size: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[tuple[int, ...], ...],
                                                                                   tuple[tuple[int, ...], ...]]:
    """DynUNet ``(kernel_sizes, level_strides)`` for a patch at a voxel spacing, by nnU-Net's rules: an
    axis is pooled (stride 2) while its spacing is within a factor :data:`ANISOTROPY` of the finest
    spacing among the axes that can still be pooled, so thick slices are kept until the in-plane
    resolution has caught up (in-plane-only pooling first); an axis stops when pooling would leave it
    below :data:`MIN_EDGE` voxels or odd; at most :data:`MAX_POOLINGS` poolings. Convolutions span 3
    voxels along an axis once its spacing is within :data:`ANISOTROPY` of the finest, 1 before.
    The first level has strides 1; the patch is a multiple of the strides' product along each axis.

    Raises
    ------
    ValueError
        Patch size and spacing of different lengths, or a patch too small for two poolings (MONAI's
        DynUNet needs at least 3 levels).
    """
    if len(patch_size) != len(spacing) or not patch_size:
        raise ValueError(f"a patch size {list(patch_size)} and a spacing {list(spacing)} of the same length needed")
    sizes, current = [int(p) for p in patch_size], [float(s) for s in spacing]
    dims = len(sizes)
    wide = [False] * dims  # axes convolved with 3 voxels: once wide, always wide
    kernels: list[tuple[int, ...]] = []
    strides: list[tuple[int, ...]] = [(1,) * dims]
    for _ in range(MAX_POOLINGS + 1):
        finest = min(current)
        wide = [w or sp <= ANISOTROPY * finest for w, sp in zip(wide, current, strict=True)]
        kernels.append(tuple(3 if w else 1 for w in wide))
        poolable = [a for a in range(dims) if sizes[a] % 2 == 0 and sizes[a] // 2 >= MIN_EDGE]
        if len(strides) > MAX_POOLINGS or not poolable:
            break
        reference = min(current[a] for a in poolable)
        stride = tuple(2 if a in poolable and current[a] <= ANISOTROPY * reference else 1 for a in range(dims))
        strides.append(stride)
        sizes = [n // s for n, s in zip(sizes, stride, strict=True)]
        current = [sp * s for sp, s in zip(current, stride, strict=True)]
    if len(strides) < 3:
        raise ValueError(f"field 'patch_size' ({list(patch_size)}) is too small for a DynUNet: it needs two poolings, "
                         f"each halving an even axis to at least {MIN_EDGE} voxels (e.g. 16 voxels)")
    return tuple(kernels), tuple(strides)


def default_filters(levels: int) -> tuple[int, ...]:
    """DynUNet feature channels per level: :data:`BASE_FILTERS` doubled at each level, at most :data:`MAX_FILTERS`."""
    return tuple(min(BASE_FILTERS * 2**level, MAX_FILTERS) for level in range(levels))
