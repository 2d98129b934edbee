"""A plan derived from validated training data: target spacing (median), CT intensity statistics of
the foreground, a patch no larger than the median image (the fixed default before the planner)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from nibabel.orientations import io_orientation

from medseg.architectures import NetworkSpec
from medseg.data.datalist import Case, Datalist
from medseg.io.geometry import Geometry
from medseg.io.image import read_image
from medseg.plan.model import Channel, Intensity, Plan, checked_network

__all__ = ["ct_intensity_statistics", "default_patch_size", "make_plan", "ras_extent", "ras_spacing"]

log = logging.getLogger("medseg.plan")


def _to_ras_order(geometry: Geometry, per_axis: Sequence[float]) -> np.ndarray:
    """Reorder per-index-axis values to the R, A, S axes (the order after ``Orientation("RAS")``)."""
    ornt = io_orientation(geometry.affine_ras())
    out = np.empty(geometry.dims)
    for axis, (ras_axis, _) in enumerate(ornt):
        out[int(ras_axis)] = per_axis[axis]
    return out


def ras_spacing(geometry: Geometry) -> np.ndarray:
    """Voxel spacing along the R, A, S axes (the order after ``Orientation("RAS")``)."""
    return _to_ras_order(geometry, geometry.spacing)


def ras_extent(geometry: Geometry) -> np.ndarray:
    """Field of view in mm along the R, A, S axes."""
    return _to_ras_order(geometry, [sp * n for sp, n in zip(geometry.spacing, geometry.size, strict=True)])


def ct_intensity_statistics(cases: Sequence[Case], window: Sequence[float] | None = None,
                            max_samples: int = 200_000, seed: int = 0, channel: int = 0,
                            ignore_label: int | None = None) -> Intensity:
    """nnU-Net-style CT statistics of the foreground (labelled, not ``ignore_label``) voxels of input
    ``channel``: clip range = the 0.5/99.5 percentiles, or the given HU ``window`` (e.g. ``(-160, 240)``);
    mean and std after clipping.

    Raises
    ------
    ValueError
        If ``window`` is not two increasing values.
    """
    if window is not None and (len(window) != 2 or window[0] >= window[1]):
        raise ValueError(f"a CT window needs two increasing HU values, got {list(window)}")
    rng = np.random.default_rng(seed)
    samples: list[np.ndarray] = []
    per_case = max(1, max_samples // max(1, len(cases)))
    for case in cases:
        image = sitk.GetArrayFromImage(read_image(case.images[channel]))
        label = sitk.GetArrayFromImage(read_image(case.label)) if case.label else None
        foreground = None if label is None else (label > 0) if ignore_label is None else (label > 0) & (label != ignore_label)
        values = image[foreground] if foreground is not None else image.ravel()
        if values.size:
            samples.append(rng.choice(values, size=min(per_case, values.size), replace=False).astype(np.float64))
    if not samples:
        low, high = window if window is not None else (-1000.0, 1000.0)
        return Intensity("ct", float(low), float(high), (low + high) / 2, (high - low) / 4)
    values = np.concatenate(samples)
    a_min, a_max = window if window is not None else np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, a_min, a_max)
    std = float(max(clipped.std(), 1e-3))
    return Intensity("ct", float(a_min), float(a_max), float(clipped.mean()), std)


def default_patch_size(dims: int, median_shape: np.ndarray, cap: Sequence[int]) -> tuple[int, ...]:
    """Patch no larger than the median resampled image, a multiple of 16, at most ``cap``."""
    patch = []
    for axis in range(dims):
        size = int(min(cap[axis], max(16, 16 * round(median_shape[axis] / 16))))
        patch.append(size)
    return tuple(patch)


def _channels(datalist: Datalist, ct_window: Sequence[float] | None) -> tuple[Channel, ...]:
    """One channel per input channel of the dataset: CT channels with their own foreground statistics,
    the others with the MR preset."""
    channels = []
    for number, (name, preset) in enumerate(zip(datalist.channel_names, datalist.channel_presets, strict=True)):
        if preset == "ct":
            intensity = ct_intensity_statistics(datalist.training, ct_window, channel=number,
                                                ignore_label=datalist.ignore_label)
        else:
            intensity = Intensity("mr")
        channels.append(Channel(name, intensity))
    return tuple(channels)


def make_plan(
    datalist: Datalist,
    geometries: Sequence[Geometry],
    target_spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    network: NetworkSpec | None = None,
    ct_window: Sequence[float] | None = None,
) -> Plan:
    """Derive a plan from validated training data.

    ``target_spacing`` defaults to the median RAS spacing of the training images; ``patch_size``
    to the median resampled size rounded to multiples of 16, capped at 64x64x32 (3D) or 256x256 (2D);
    CT intensities clip to ``ct_window`` (HU) if given, else to foreground percentiles. A dataset of
    several channels gets one :class:`Channel` each (CT channels their own statistics, others the MR
    preset); one channel gives ``channels=()``. Regions and the ignore label come from the dataset. The network
    (default: a U-Net) is planned for the patch and checked with it (see :func:`checked_network`).

    Raises
    ------
    ValueError
        A target spacing, patch size or CT window of the wrong length; a network that does not fit
        the patch (naming the field).
    """
    dims = geometries[0].dims
    spacings = np.stack([ras_spacing(g) for g in geometries])
    extents = np.stack([ras_extent(g) for g in geometries])
    spacing = np.asarray(target_spacing if target_spacing is not None else np.median(spacings, axis=0), float)
    if spacing.shape != (dims,):
        raise ValueError(f"target spacing needs {dims} values, got {spacing.tolist()}")
    median_shape = np.median(extents, axis=0) / spacing
    cap = (64, 64, 32) if dims == 3 else (256, 256)
    patch = tuple(int(p) for p in patch_size) if patch_size is not None else default_patch_size(dims, median_shape, cap)
    if len(patch) != dims:
        raise ValueError(f"patch size needs {dims} values, got {list(patch)}")
    spec = checked_network(network or NetworkSpec(), patch, tuple(float(s) for s in spacing))
    channels = _channels(datalist, ct_window) if datalist.num_channels > 1 else ()
    if channels:
        intensity = channels[0].intensity
    elif datalist.preset == "ct":
        intensity = ct_intensity_statistics(datalist.training, ct_window, ignore_label=datalist.ignore_label)
    else:
        intensity = Intensity("mr")
    plan = Plan(dims, datalist.modality, dict(datalist.labels), tuple(float(s) for s in spacing), patch, intensity, spec,
                channels=channels, regions=tuple(datalist.regions), ignore_label=datalist.ignore_label)
    log.info("plan: %dD %s, target spacing %s mm, patch %s, %d classes, %s", dims, plan.modality,
             [round(s, 3) for s in plan.target_spacing], list(patch), plan.num_classes, plan.network.title)
    return plan
