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

__all__ = ["ARCHITECTURES", "FIELDS", "IMPORTED", "PLAN_ARCHITECTURES", "NetworkSpec", "Topology",
           "default_filters", "dynunet_topology", "plan_topology", "planned_filters", "slice_axis"]

#: The architectures :func:`medseg.networks.build_network` builds (``--network``), the first the default.
ARCHITECTURES = ("unet", "dynunet", "segresnet", "unet_head")
#: The network of a model imported from nnU-Net v2 (``medseg bundle import-nnunet``): defined by the bundle's
#: ``configs/nnunet.json``, built by its ``inference.json``; a plan names it, training cannot choose it.
IMPORTED = "nnunet"
#: The names a ``plan.json`` may give its network.
PLAN_ARCHITECTURES = (*ARCHITECTURES, IMPORTED)
#: The fields of :class:`NetworkSpec` each architecture uses besides ``name``: ``plan.json`` holds only these.
FIELDS: dict[str, tuple[str, ...]] = {
    "unet": ("channels", "strides", "num_res_units", "norm", "dropout"),
    "dynunet": ("filters", "kernel_sizes", "level_strides", "res_block", "deep_supervision", "norm", "dropout"),
    "segresnet": ("init_filters", "blocks_down", "blocks_up", "norm", "dropout"),
    "unet_head": ("channels", "level_strides", "num_res_units", "norm", "dropout"),
    IMPORTED: (),
}
TITLES = {"unet": "U-Net", "dynunet": "DynUNet", "segresnet": "SegResNet", "unet_head": "U-Net (pointwise head)",
          IMPORTED: "nnU-Net v2 (imported)"}
#: Normalisations of DynUNet and SegResNet (the U-Net takes any name MONAI knows, as before).
NORMS = ("instance", "batch")
#: DynUNet topology: at most this many poolings, none that leaves an axis below ``MIN_EDGE`` voxels.
MAX_POOLINGS = 5
MIN_EDGE = 4
#: An axis is pooled (and convolved with 3 voxels) once its spacing is within this factor of the finest.
ANISOTROPY = 2.0
#: DynUNet feature channels: ``BASE_FILTERS`` doubled at every level, at most ``MAX_FILTERS``.
BASE_FILTERS, MAX_FILTERS = 16, 320
#: The planner's networks (nnU-Net's): 32 features at full resolution, at most 320 (3D) or 512 (2D) per stage.
PLANNED_BASE_FILTERS = 32
PLANNED_MAX_FILTERS = {2: 512, 3: 320}
#: The planner's stage limit (nnU-Net's plain U-Net is configured for at most this many stages).
MAX_STAGES = 14


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
    * ``unet_head`` (:class:`medseg.networks.unet_head.PointwiseHeadUNet`: MONAI ``UNet`` and a 1 x 1 x 1
      head): ``channels`` per level and ``level_strides`` per level as a DynUNet's (per axis, the first
      level's all 1), ``num_res_units``; the planner's network for short CPU budgets.

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

    def without_axis(self, axis: int) -> NetworkSpec:
        """This spec with the per-axis ``kernel_sizes`` and ``level_strides`` of ``axis`` left out (the 2D
        network of a plan over slices)."""
        def drop(levels: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
            return tuple(tuple(v for a, v in enumerate(level) if a != axis) for level in levels)
        return replace(self, kernel_sizes=drop(self.kernel_sizes), level_strides=drop(self.level_strides))

    def planned(self, patch_size: Sequence[int], spacing: Sequence[float]) -> NetworkSpec:
        """This spec with a DynUNet's missing topology planned by :func:`dynunet_topology` (and
        :func:`default_filters`), a ``unet_head``'s missing ``level_strides`` likewise (its ``channels``
        too unless they have one entry per level); any other spec as it is.

        Raises
        ------
        ValueError
            A patch too small for a DynUNet (fewer than two poolings).
        """
        if self.name == "unet_head" and not self.level_strides:
            strides = dynunet_topology(patch_size, spacing)[1]
            channels = self.channels if len(self.channels) == len(strides) else default_filters(len(strides))
            return replace(self, level_strides=strides, channels=channels)
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
            than ``dims`` or a first level that is strided (likewise a ``unet_head``'s ``level_strides``
            and ``channels``); a SegResNet whose ``blocks_up`` is not one
            shorter than ``blocks_down``; a U-Net with one stride per channel count.
        """
        if self.name not in PLAN_ARCHITECTURES:
            raise ValueError(f"field 'network.name' must be one of {', '.join(PLAN_ARCHITECTURES)}, got {self.name!r}")
        if self.name == "unet_head":
            _check_levels(self, dims, "channels")
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
        if self.name == IMPORTED:  # nnU-Net pads a window to its patch (a multiple of its strides) itself
            return (1,) * dims
        if self.name in ("dynunet", "unet_head"):
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
            per_axis = "the products of 'network.level_strides' per axis"
            source = {"unet": "the product of 'network.strides'", "dynunet": per_axis, "unet_head": per_axis,
                      "segresnet": "2 ** (levels of 'network.blocks_down' - 1)"}
            raise ValueError(f"field 'patch_size' ({list(patch_size)}) must be a multiple of {list(divisors)} per axis "
                             f"for the {self.name} network ({source[self.name]})")


def _check_dynunet(spec: NetworkSpec, dims: int) -> None:
    if not spec.kernel_sizes or not spec.level_strides:
        missing = "kernel_sizes" if not spec.kernel_sizes else "level_strides"
        raise ValueError(f"field 'network.{missing}' is missing: give both 'network.kernel_sizes' and "
                         f"'network.level_strides', or neither (then they are planned from the patch and spacing)")
    _check_levels(spec, dims, "kernel_sizes", "filters")


def _check_levels(spec: NetworkSpec, dims: int, *per_level: str) -> None:
    """``level_strides`` (at least 3 levels of ``dims`` values, the first all 1) and the fields
    ``per_level`` with one entry per level."""
    levels = len(spec.level_strides)
    for key in per_level:
        if len(getattr(spec, key)) != levels:
            raise ValueError(f"field 'network.{key}' must have one entry per level, like 'network.level_strides' "
                             f"({levels}), got {len(getattr(spec, key))}")
    if levels < 3:
        raise ValueError(f"field 'network.level_strides' must have at least 3 levels, got {levels}")
    for key in (*per_level, "level_strides"):  # the per-axis ones (kernel sizes): one value per axis
        if any(isinstance(level, Sequence) and len(level) != dims for level in getattr(spec, key)):
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


@dataclass(frozen=True)
class Topology:
    """A U-Net topology planned by :func:`plan_topology`: per stage the convolution kernel and the stride
    that leads into it (the first stride is all 1), the patch padded to what the strides need along each
    axis (``divisors``)."""

    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    divisors: tuple[int, ...]

    @property
    def stages(self) -> int:
        return len(self.strides)

    def sizes(self) -> list[tuple[int, ...]]:
        """The feature-map size of each stage for one patch (the bottleneck last)."""
        sizes, current = [], list(self.patch_size)
        for stride in self.strides:
            current = [n // s for n, s in zip(current, stride, strict=True)]
            sizes.append(tuple(current))
        return sizes


def plan_topology(spacing: Sequence[float], patch_size: Sequence[int], min_edge: int = MIN_EDGE,
                  max_stages: int = MAX_STAGES) -> Topology:
    """The U-Net topology for a patch at a voxel spacing, by nnU-Net's published rules (the planner's;
    :func:`dynunet_topology` stays as it was for plans saved without a topology).

    Each pooling halves every axis that still has at least ``2 * min_edge`` voxels and whose spacing is
    less than twice the finest spacing among those axes (thick slices wait until the in-plane spacing
    has caught up); a pooling of a single axis needs ``3 * min_edge`` voxels along it. Pooling stops
    when no axis qualifies or at ``max_stages`` stages, so each bottleneck axis keeps at least
    ``min_edge`` voxels. A stage convolves with 3 voxels along an axis once that axis' spacing is less
    than twice the finest spacing (1 before; once 3, always 3); the bottleneck with 3 along every
    axis. The patch is padded up to a multiple of ``2 ** poolings`` per axis.

    An axis of a 3D patch one voxel long is a slice axis (nnU-Net's 2d configuration of a 3D image, a
    3D network that sees one slice): never pooled, convolved with 1 voxel at every stage, and left out
    of the finest spacing, so the network is the 2D U-Net of the other two axes applied slice by slice.

    Raises
    ------
    ValueError
        Spacing and patch of different lengths, a spacing that is not positive, a patch size below 1.
    """
    dims = len(spacing)
    if dims not in (2, 3) or len(patch_size) != dims:
        raise ValueError(f"a spacing {list(spacing)} and a patch size {list(patch_size)} of the same length (2 or 3) needed")
    if min(spacing) <= 0 or min(patch_size) < 1:
        raise ValueError(f"spacing {list(spacing)} must be positive and patch size {list(patch_size)} at least 1")
    current = [float(s) for s in spacing]
    sizes = [float(n) for n in patch_size]
    planar = [dims == 3 and int(n) == 1 for n in patch_size]
    poolings = [0] * dims
    wide = [False] * dims
    kernels: list[tuple[int, ...]] = []
    strides: list[tuple[int, ...]] = [(1,) * dims]
    while len(strides) < max_stages:
        valid = [a for a in range(dims) if sizes[a] >= 2 * min_edge]
        if not valid:
            break
        finest = min(current[a] for a in valid)
        valid = [a for a in valid if current[a] / finest < 2]
        if len(valid) == 1 and sizes[valid[0]] < 3 * min_edge:
            break
        finest_all = min(sp for sp, flat in zip(current, planar, strict=True) if not flat)
        wide = [w or (not flat and sp / finest_all < 2) for w, sp, flat in zip(wide, current, planar, strict=True)]
        kernels.append(tuple(3 if w else 1 for w in wide))
        strides.append(tuple(2 if a in valid else 1 for a in range(dims)))
        for a in valid:
            poolings[a] += 1
            current[a] *= 2
            sizes[a] = math.ceil(sizes[a] / 2)
    kernels.append(tuple(1 if flat else 3 for flat in planar))
    divisors = tuple(2**p for p in poolings)
    padded = tuple(int(math.ceil(int(n) / d) * d) for n, d in zip(patch_size, divisors, strict=True))
    return Topology(tuple(kernels), tuple(strides), padded, divisors)


def slice_axis(patch_size: Sequence[int]) -> int | None:
    """The slice axis of a 3D patch (the axis one voxel long: a network over slices, nnU-Net's 2d
    configuration of a 3D image), None for any other patch."""
    if len(patch_size) != 3:
        return None
    return next((axis for axis, n in enumerate(patch_size) if int(n) == 1), None)


def planned_filters(stages: int, dims: int, base: int = PLANNED_BASE_FILTERS) -> tuple[int, ...]:
    """Feature channels per stage of a planned network of ``dims`` convolved axes (2 for a network over
    slices): ``base`` doubled at each stage, at most :data:`PLANNED_MAX_FILTERS` scaled by ``base / 32``
    (a narrower network is nnU-Net's, thinned evenly)."""
    cap = max(base, PLANNED_MAX_FILTERS[dims] * base // PLANNED_BASE_FILTERS)
    return tuple(min(base * 2**stage, cap) for stage in range(stages))
