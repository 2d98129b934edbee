"""nnU-Net's configurations for a dataset: ``3d_fullres``, ``3d_lowres`` (and the cascade after it) when
the full-resolution patch covers less than a quarter of the median image, and ``2d``, each with a
topology, a patch and a batch fitted to a memory target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.architectures import Topology, plan_topology, planned_filters, slice_axis
from medseg.planning.memory import GB, MemoryModel, multiply_accumulates, training_bytes
from medseg.planning.rules import (
    LOWRES_COVERAGE,
    MIN_BATCH,
    batch_limit,
    initial_patch,
    needs_lowres,
    shrink_patch,
)

__all__ = ["Configuration", "Network", "fit_configuration", "plan_configurations"]

#: 3d_lowres: the spacing grows by this factor per step until the patch covers a quarter of the image.
LOWRES_STEP = 1.03
#: 3d_lowres is dropped unless its median image has at least this many times fewer voxels than 3d_fullres'.
LOWRES_MIN_REDUCTION = 2.0
#: A 3d_lowres asked for where nnU-Net plans none: coarsened until the median image has this many times fewer
#: voxels (half the resolution along each axis).
FORCED_LOWRES_REDUCTION = 8.0
#: A DynUNet needs at least this many stages (two poolings).
MIN_STAGES = 3


class MemoryTargetError(ValueError):
    """Not even the smallest patch of a network with :data:`MIN_STAGES` stages fits the memory target."""


@dataclass(frozen=True)
class Network:
    """What the planned network is made of besides its topology: its ``architecture`` (``"dynunet"``,
    nnU-Net's U-Net; ``"unet_head"``, MONAI's U-Net with a pointwise head, the lean network of short
    CPU budgets), input channels, outputs, the width of its first stage, residual blocks, deep supervision.

    Memory and multiply-accumulates are the DynUNet's of the same topology and widths; for a
    ``unet_head``, whose convolutions after the first are all at half resolution or below, they are an
    upper bound.
    """

    in_channels: int
    out_channels: int
    base_features: int = 32
    res_block: bool = False
    deep_supervision: bool = True
    architecture: str = "dynunet"

    def filters(self, topology: Topology) -> tuple[int, ...]:
        dims = len(topology.patch_size) - (slice_axis(topology.patch_size) is not None)
        return planned_filters(topology.stages, dims, self.base_features)

    def memory(self, topology: Topology, batch: int, model: MemoryModel) -> int:
        return training_bytes(topology, self.filters(topology), self.in_channels, self.out_channels, batch, model,
                              self.res_block, self.deep_supervision)

    def macs(self, topology: Topology, batch: int) -> int:
        return multiply_accumulates(topology, self.filters(topology), self.in_channels, self.out_channels, batch,
                                    self.res_block)


@dataclass
class Configuration:
    """One configuration: spacing, median image at that spacing, topology (the patch included), batch
    and the memory estimate of one training iteration."""

    name: str
    spacing: tuple[float, ...]
    median_shape: tuple[float, ...]
    topology: Topology
    network: Network
    batch_size: int
    memory_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.topology.patch_size

    @property
    def filters(self) -> tuple[int, ...]:
        return self.network.filters(self.topology)

    def to_json(self) -> dict[str, Any]:
        return {"spacing": [round(s, 6) for s in self.spacing], "median_shape": [round(m, 1) for m in self.median_shape],
                "patch_size": list(self.patch_size), "batch_size": self.batch_size, "n_stages": self.topology.stages,
                "kernel_sizes": [list(k) for k in self.topology.kernel_sizes],
                "strides": [list(s) for s in self.topology.strides], "filters": list(self.filters),
                "res_block": self.network.res_block, "deep_supervision": self.network.deep_supervision,
                "memory_estimate_gb": round(self.memory_bytes / GB, 3), **self.extra}


def fit_configuration(name: str, spacing: Sequence[float], median_shape: Sequence[float], network: Network,
                      dataset_voxels: float, target_bytes: float, model: MemoryModel,
                      patch: Sequence[int] | None = None, batch: int = MIN_BATCH) -> Configuration:
    """A configuration whose iteration fits ``target_bytes``: from the first patch (or ``patch``)
    shrink the axis largest relative to the median image until the estimate at ``batch`` (nnU-Net's
    minimum, 2) fits; then grow the batch while it fits and covers at most 5 % of the dataset's voxels.

    Raises
    ------
    MemoryTargetError
        Not even a patch just large enough for three stages fits the target.
    """
    spacing = tuple(float(s) for s in spacing)
    topology = plan_topology(spacing, patch if patch is not None else initial_patch(spacing, median_shape))
    while network.memory(topology, batch, model) > target_bytes:
        smaller = shrink_patch(spacing, topology.patch_size, median_shape)
        if smaller == topology.patch_size or plan_topology(spacing, smaller).stages < MIN_STAGES:
            raise MemoryTargetError(f"{target_bytes / GB:.3g} GB is too little memory for the {name} configuration: "
                                    f"a patch of {list(topology.patch_size)} voxels at batch {batch} needs about "
                                    f"{network.memory(topology, batch, model) / GB:.2f} GB")
        topology = plan_topology(spacing, smaller)
    if topology.stages < MIN_STAGES:
        topology = _at_least_three_stages(spacing, topology)
    limit = batch_limit(topology.patch_size, dataset_voxels)
    while batch < limit and network.memory(topology, batch + 1, model) <= target_bytes:
        batch += 1
    return Configuration(name, spacing, tuple(float(m) for m in median_shape), topology, network, batch,
                         network.memory(topology, batch, model))


def _at_least_three_stages(spacing: tuple[float, ...], topology: Topology) -> Topology:
    """A patch grown along its finest axes until the network has three stages (images smaller than
    16 voxels along them: the patch is larger than the image, which training pads)."""
    patch = list(topology.patch_size)
    flat = slice_axis(patch)
    while plan_topology(spacing, patch).stages < MIN_STAGES:
        finest = min(s for a, s in enumerate(spacing) if a != flat)
        patch = [p * 2 if s / finest < 2 and a != flat else p for a, (p, s) in enumerate(zip(patch, spacing, strict=True))]
    return plan_topology(spacing, patch)


def plan_configurations(spacing: Sequence[float], median_shape: Sequence[float], cases: int, network: Network,
                        target_bytes: float, model: MemoryModel, lowres: bool = False) -> dict[str, Configuration]:
    """The configurations nnU-Net plans (see module docstring). 3D data: ``3d_fullres``, ``2d`` on the
    two finer axes (in-plane spacing), ``3d_lowres`` when needed (with ``lowres``, also where nnU-Net plans none:
    the spacing coarsened until the median image has :data:`FORCED_LOWRES_REDUCTION` times fewer voxels); 2D data:
    ``2d``.

    The ``2d`` configuration of 3D data is planned as a 3D patch one voxel thick along the coarsest axis
    (the last of equally coarse ones: the axial slices of an isotropic RAS volume), whose U-Net is the 2D
    U-Net of nnU-Net's rules on the other two axes (:func:`~medseg.architectures.plan_topology`): its
    first patch is the in-plane one, its batch is bounded by the same 5 % of the dataset. The images keep
    the full-resolution target spacing along the slice axis (nnU-Net keeps each image's own there).

    Raises
    ------
    MemoryTargetError
        As :func:`fit_configuration`.
    """
    dims = len(spacing)
    voxels = float(np.prod(median_shape)) * cases
    if dims == 2:
        return {"2d": fit_configuration("2d", spacing, median_shape, network, voxels, target_bytes, model)}
    fullres = fit_configuration("3d_fullres", spacing, median_shape, network, voxels, target_bytes, model)
    coarse = dims - 1 - int(np.argmax(list(spacing)[::-1]))
    plane = [a for a in range(dims) if a != coarse]
    patch = list(initial_patch([spacing[a] for a in plane], [median_shape[a] for a in plane]))
    patch.insert(coarse, 1)
    in_plane = fit_configuration("2d", spacing, median_shape, network, voxels, target_bytes, model, patch=patch)
    in_plane.extra.update({"axes": plane, "slice_axis": coarse})
    found = {"3d_fullres": fullres, "2d": in_plane}
    coarser = _lowres(fullres, cases, network, target_bytes, model, forced=lowres)
    if coarser is not None:
        coarser.extra["next_stage"] = "3d_cascade_fullres"
        found["3d_lowres"] = coarser
    return found


def _lowres(fullres: Configuration, cases: int, network: Network, target_bytes: float,
            model: MemoryModel, forced: bool = False) -> Configuration | None:
    """nnU-Net's 3d_lowres: the spacing coarsened by 3 % per step (the finer axes first while they are
    more than twice finer than the coarsest) until the patch covers :data:`LOWRES_COVERAGE` of the median
    image; None when not needed, or when the median image shrinks less than :data:`LOWRES_MIN_REDUCTION`.
    ``forced``: where nnU-Net plans none (either reason), coarsened until the median image has
    :data:`FORCED_LOWRES_REDUCTION` times fewer voxels (and the patch covers a quarter of it), with a note."""
    needed = needs_lowres(fullres.patch_size, fullres.median_shape)
    if needed:
        lowres, reduction = _coarsened(fullres, cases, network, target_bytes, model, 1.0)
        if reduction >= LOWRES_MIN_REDUCTION:
            return lowres
    if not forced:
        return None
    lowres, _ = _coarsened(fullres, cases, network, target_bytes, model, FORCED_LOWRES_REDUCTION)
    why = ("coarsened until its patch covers a quarter, the median image shrinks less than 2x" if needed
           else "the 3d_fullres patch covers a quarter")
    lowres.extra["note"] = f"asked for; nnU-Net plans no 3d_lowres here ({why}): half the resolution"
    return lowres


def _coarsened(fullres: Configuration, cases: int, network: Network, target_bytes: float, model: MemoryModel,
               reduction: float) -> tuple[Configuration, float]:
    """The spacing of ``fullres`` coarsened (see :func:`_lowres`) until the patch covers :data:`LOWRES_COVERAGE`
    of the median image and that has ``reduction`` times fewer voxels; the configuration and its reduction."""
    base = np.asarray(fullres.spacing)
    spacing = base.copy()
    shape = np.asarray(fullres.median_shape, dtype=float)
    full_voxels = float(np.prod(shape))
    lowres: Configuration | None = None
    coverage = 0.0
    while lowres is None or coverage < LOWRES_COVERAGE or full_voxels / float(np.prod(shape)) < reduction:
        finer = spacing.max() / spacing > 2
        spacing = np.where(finer, spacing * LOWRES_STEP, spacing) if finer.any() else spacing * LOWRES_STEP
        shape = base / spacing * np.asarray(fullres.median_shape)
        voxels = float(np.prod(shape)) * cases
        lowres = fit_configuration("3d_lowres", tuple(float(s) for s in spacing), [round(float(s)) for s in shape],
                                   network, voxels, target_bytes, model)
        coverage = math.prod(lowres.patch_size) / float(np.prod(shape))
    return lowres, full_voxels / float(np.prod(shape))
