"""The memory model of slab-streamed sliding-window inference: what it allocates, what is available.

:func:`estimate_slab_bytes` is what :func:`medseg.inference.sliding.slab_sliding_window` allocates on top
of its input; :func:`require_memory` refuses a run, up front, whose estimate exceeds the memory that the
device can give now.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from medseg.errors import InputError
from medseg.inference.windows import SweepPlan, plan_sweep, window_geometry
from medseg.io.image import label_map_dtype

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_ENSEMBLE_BUFFER_BYTES",
    "available_device_bytes",
    "available_host_bytes",
    "chunk_voxels",
    "estimate_plan_bytes",
    "estimate_slab_bytes",
    "label_dtype",
    "require_memory",
]

_GB = 1024**3
#: Budget of the accumulation buffer on the CPU: above it the volume is swept in x-strips
#: (see :func:`medseg.inference.windows.plan_sweep`). 96 MiB keeps the buffer of an 8-feature network on
#: a 512 x 512 CT (4 strips: 92 MiB) below the uint8 label map of a 400-slice one (100 MiB).
DEFAULT_BUFFER_BYTES = 96 * 1024**2
#: Budget of an ensemble's buffer on the CPU (``members`` > 1), whose blocks hold every member's channels.
#: Measured on the 5-fold, 15-class DynUNet of 512 x 512 x 400 (docs/bench_inference_ensemble_220.json): with
#: 220 MiB the ensemble takes 1.16 x one model's memory above baseline and 5.08 x its time; with 96 MiB,
#: 0.99 x the memory but 7.60 x the time (narrower strips recompute more windows, five times over).
DEFAULT_ENSEMBLE_BUFFER_BYTES = 220 * 1024**2
#: Bytes of the logits of one flush chunk (see :func:`chunk_voxels`).
_CHUNK_BYTES = 16 * 1024 * 1024


def label_dtype(num_classes: int) -> torch.dtype:
    """The torch dtype of a label map of labels ``0 .. num_classes - 1``: medseg's one rule
    (:func:`medseg.io.image.label_map_dtype`, torch-compatible)."""
    dtype: torch.dtype = getattr(torch, label_map_dtype(num_classes - 1, torch_compatible=True).name)
    return dtype


def chunk_voxels(num_classes: int, buffer_channels: int) -> int:
    """Voxels per flush chunk: the logits of a chunk (``num_classes`` float32) stay within 16 MB
    when a head makes them (with no head they are views of the buffer: bounded by the buffer itself)."""
    return max(1, _CHUNK_BYTES // (4 * max(num_classes, buffer_channels)))


def estimate_slab_bytes(
    spatial_shape: Sequence[int],
    roi_size: Sequence[int] | int,
    overlap: Sequence[float] | float,
    num_classes: int,
    *,
    sw_batch_size: int = 4,
    mirrored: bool = False,
    probabilities: bool = False,
    feature_channels: int | None = None,
    probabilities_in_memory: bool = False,
    buffer_bytes: int | None = DEFAULT_BUFFER_BYTES,
) -> int:
    """Bytes that :func:`medseg.inference.sliding.slab_sliding_window` allocates on top of the input (the
    network's own activations excluded: they depend on the network, not on the volume).

    The accumulation blocks alive at the peak, ``K`` float32 channels (``K`` = ``feature_channels`` when
    a pointwise head is applied after blending, else ``num_classes``), the weights of one block, the
    label map, the per-flush temporaries (bounded chunks of logits, max values and indices, float16
    copies), the float32 probabilities with ``probabilities_in_memory``, and one batch of network outputs
    (twice with ``mirrored``). ``buffer_bytes`` is the strip budget (see ``slab_sliding_window``).

    Raises
    ------
    ValueError
        ``roi_size`` with another number of axes than ``spatial_shape``, or an overlap outside ``[0, 1)``.
    """
    geometry = window_geometry(spatial_shape, roi_size, overlap)
    channels = int(feature_channels) if feature_channels else int(num_classes)
    plan = plan_sweep(geometry.padded, geometry.window, geometry.scan, channels, buffer_bytes, geometry.axis_starts)
    return estimate_plan_bytes(plan, spatial_shape, num_classes, sw_batch_size, mirrored, probabilities,
                               feature_channels, probabilities_in_memory)


def estimate_plan_bytes(plan: SweepPlan, spatial_shape: Sequence[int], num_classes: int, sw_batch_size: int,
                        mirrored: bool, probabilities: bool, feature_channels: int | None,
                        probabilities_in_memory: bool = False) -> int:
    """:func:`estimate_slab_bytes` for a sweep already planned (windows of ``plan.window``)."""
    c = int(num_classes)
    k = int(feature_channels) if feature_channels else c
    buffer = k * plan.arena_voxels * 4 + plan.largest_block_voxels * 4  # + the weights of the block being reduced
    voxels = math.prod(int(s) for s in spatial_shape)
    labels = voxels * torch.empty((), dtype=label_dtype(c)).element_size()
    if probabilities_in_memory:
        labels += c * voxels * 4
    chunk = chunk_voxels(c, k)
    flush = chunk * (c * 4 + 4 + 8) + (chunk * c * 2 if probabilities else 0)
    batch = sw_batch_size * k * math.prod(plan.window) * 4 * (2 if mirrored else 1)
    return int(buffer + labels + flush + batch)


def available_host_bytes() -> int | None:
    """Memory the system can give this process now, or None when it cannot be told.

    ``MemAvailable`` (Linux) counts reclaimable page cache; ``SC_AVPHYS_PAGES`` (free pages only) is the
    fall-back, and would be too pessimistic on its own on a machine with a warm page cache.
    """
    avail = None
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    kb = int(line.split()[1]) * 1024
                    avail = kb if avail is None else max(avail, kb)
                    break
    except (OSError, ValueError, IndexError):
        pass
    return avail if avail is None or avail > 0 else None


def available_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or :func:`available_host_bytes` for any other; None when it cannot be told."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no driver, no context: do not refuse on a guess
            return None
    return available_host_bytes()


def require_memory(need: int, device: torch.device, spatial_shape: Sequence[int], num_classes: int,
                   roi: Sequence[int]) -> None:
    """Refuse a sliding window that needs ``need`` bytes on ``device`` (an :func:`estimate_plan_bytes`).

    Raises
    ------
    InputError
        ``need`` exceeds the memory available now (the message names both in GB); nothing is raised when
        the available memory cannot be told.
    """
    avail = available_device_bytes(device)
    if avail is not None and need > avail:
        raise InputError(
            None,
            f"sliding-window inference of a {'x'.join(map(str, spatial_shape))} volume with {num_classes} classes "
            f"needs {need / _GB:.1f} GB for the slab buffer (roi {'x'.join(map(str, roi))}), "
            f"only {avail / _GB:.1f} GB available; use a smaller roi or fewer classes, or free memory",
        )
