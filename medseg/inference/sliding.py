"""Sliding-window inference in bounded memory: blocks of the volume allocated and reduced as windows pass.

:func:`monai.inferers.sliding_window_inference` stitches the windows into a float32 buffer of
``C x D x H x W`` (all classes, the whole volume) plus a count map of the whole volume: 44 GB for
105 classes on a 512 x 512 x 400 CT, before the argmax allocates more. :func:`slab_sliding_window`
visits exactly the same windows (MONAI's own ``_get_scan_interval`` and ``dense_patch_slices``), blends
them with exactly the same Gaussian importance map (``compute_importance_map``) and normalises in the
same way, but in the order of their start along the last spatial axis (z), then y. Its accumulation
buffer is cut into blocks along z and y at every window start and end (x whole): a block is allocated
when the first window reaches it and, right after the last window touching it, normalised, reduced to
labels (argmax) and, when asked, softmax probabilities (float16, into a ``.npy`` memory map on disk),
and freed. At most about ``roi_z - step_z`` planes plus two rows of blocks are alive at a time (32 of
400 planes, plus two 96-row strips of 64, for a 96 x 96 x 64 roi at overlap 0.5). With a pointwise
head (``head=``) the blocks hold the network's feature channels instead of its class logits. When that
buffer would still exceed its budget (``buffer_bytes``, 96 MiB on the CPU), a 3D volume is swept in
strips along x, cut at window starts, one after the other: the buffer shrinks with the strip's width,
and the windows that straddle a cut go through the network once for each strip (at overlap 0.5 one
column of windows per cut; never more than 30 % more windows in all). Peak memory is therefore the
input + that buffer + the label map + one batch of windows through the network, independent of the
volume's depth and, with a head, of the number of classes.

The blended logits equal MONAI's with the same settings up to float rounding (the per-voxel sums add
the same terms in a different order), so the label maps agree voxel for voxel except at exact ties.

Deviations from MONAI, all deliberate:

* the accumulation is float32 whatever the input's dtype (MONAI accumulates in the input's dtype,
  float16 inputs are blended in float16 there); windows reach the network in the input's dtype
  (non-floating inputs are converted to float32);
* windows of a volume smaller than the roi are padded one at a time (``padding_mode``, ``cval``) instead
  of padding a copy of the whole input; the result is identical because a window covers the whole
  padded extent of every padded axis;
* the network must return one tensor ``(B, C, *roi)`` (no tuples/dicts, no different output sizes);
* ``mirror_axes`` (test-time mirroring) is not in MONAI; see :func:`slab_sliding_window`.
"""

from __future__ import annotations

import bisect
import itertools
import math
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import (
    compute_importance_map,
    dense_patch_slices,
    get_valid_patch_size,
)
from monai.inferers.utils import _get_scan_interval
from monai.utils import (
    PytorchPadMode,
    ensure_tuple_rep,
    fall_back_tuple,
    look_up_option,
)

from medseg.errors import InputError

__all__ = ["DEFAULT_BUFFER_BYTES", "SlabResult", "estimate_slab_bytes", "label_dtype", "slab_sliding_window"]

_GB = 1024**3
#: Budget of the accumulation buffer on the CPU: above it the volume is swept in x-strips (see :func:`_plan`).
#: 96 MiB keeps the buffer of an 8-feature network on a 512 x 512 CT (4 strips: 92 MiB) below the uint8
#: label map of a 400-slice one (100 MiB).
DEFAULT_BUFFER_BYTES = 96 * 1024**2
#: At most this fraction of MONAI's windows is computed a second time at the borders of x-strips.
MAX_EXTRA_WINDOWS = 0.3


@dataclass
class SlabResult:
    """What :func:`slab_sliding_window` returns.

    Attributes
    ----------
    labels
        ``(*spatial)`` label map on the CPU: the argmax over classes of the blended logits;
        uint8 for up to 256 classes, int16 up to 32768, int32 beyond.
    probabilities
        ``(C, *spatial)`` float16 softmax of the blended logits in a ``.npy`` file opened as a memory map
        (``numpy.load(path, mmap_mode="r")`` reopens it); with ``probabilities_in_memory`` a float32 array
        in memory; else ``None``.
    buffer_channels
        Channels of the accumulation buffer: the feature (or class) channels blended (the weights, MONAI's
        count map, are summed for one block at a time when it is reduced).
    peak_buffer_voxels
        Voxels of the accumulation buffer allocated: one arena in which each block takes a piece when the
        first window reaches it and gives it back when the last has passed (about as many voxels as
        blocks are alive at one time); times ``buffer_channels`` float32, instead of ``(C, *spatial)``.
    num_windows
        How many windows went through the network (times ``1 + len(mirror_axes)`` passes): MONAI's
        windows, plus those computed again at the borders of x-strips.
    strips
        Strips along x the volume was swept in (1: the whole cross-section at once).
    """

    labels: torch.Tensor
    probabilities: np.ndarray | None = None
    buffer_channels: int = 0
    peak_buffer_voxels: int = 0
    num_windows: int = 0
    strips: int = 1


def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds labels ``0 .. num_classes - 1``."""
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 2**15:
        return torch.int16
    return torch.int32


def _geometry(spatial_shape: Sequence[int], roi_size: Sequence[int] | int, overlap: Sequence[float] | float):
    """MONAI's geometry: roi (after fall-back), padding, padded size, scan interval, window size."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    nd = len(spatial_shape)
    if isinstance(roi_size, Sequence) and len(roi_size) != nd:
        raise ValueError(f"roi_size {tuple(roi_size)} has {len(roi_size)} axes, the input has {nd} spatial axes")
    roi = tuple(int(r) for r in fall_back_tuple(roi_size, spatial_shape))
    overlaps = tuple(float(o) for o in ensure_tuple_rep(overlap, nd))
    for o in overlaps:
        if not 0 <= o < 1:
            raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    # MONAI pads (symmetrically, the extra voxel after) every axis smaller than the roi
    pad_lo = tuple(max(r - s, 0) // 2 for r, s in zip(roi, spatial_shape))
    padded = tuple(max(s, r) for s, r in zip(spatial_shape, roi))
    scan = _get_scan_interval(padded, roi, nd, overlaps)
    window = tuple(int(w) for w in get_valid_patch_size(padded, roi))
    return roi, pad_lo, padded, tuple(int(s) for s in scan), window


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
    """Bytes that :func:`slab_sliding_window` allocates on top of the input (the network's own
    activations excluded: they depend on the network, not on the volume).

    The accumulation blocks alive at the peak, ``K`` float32 channels (``K`` = ``feature_channels`` when
    a pointwise head is applied after blending, else ``num_classes``), the weights of one block, the
    label map, the per-flush temporaries (bounded chunks of logits, max values and indices, float16
    copies), the float32 probabilities with ``probabilities_in_memory``, and one batch of network outputs
    (twice with ``mirrored``). ``buffer_bytes`` is the strip budget (see :func:`slab_sliding_window`).
    """
    _, _, padded, scan, window = _geometry(spatial_shape, roi_size, overlap)
    channels = int(feature_channels) if feature_channels else int(num_classes)
    plan = _plan(padded, window, scan, channels, buffer_bytes)
    return _estimate_bytes(plan, spatial_shape, window, num_classes, sw_batch_size, mirrored, probabilities,
                           feature_channels, probabilities_in_memory)


def _estimate_bytes(plan: _Plan, spatial_shape: Sequence[int], window: Sequence[int], num_classes: int,
                    sw_batch_size: int, mirrored: bool, probabilities: bool, feature_channels: int | None,
                    probabilities_in_memory: bool = False) -> int:
    """:func:`estimate_slab_bytes` for a block plan already made."""
    c = int(num_classes)
    k = int(feature_channels) if feature_channels else c
    buffer = k * plan.arena_voxels * 4 + plan.largest_block_voxels * 4  # + the weights of the block being reduced
    voxels = math.prod(int(s) for s in spatial_shape)
    labels = voxels * torch.empty((), dtype=label_dtype(c)).element_size()
    if probabilities_in_memory:
        labels += c * voxels * 4
    chunk = _chunk_voxels(c, k)
    flush = chunk * (c * 4 + 4 + 8) + (chunk * c * 2 if probabilities else 0)
    batch = sw_batch_size * k * math.prod(window) * 4 * (2 if mirrored else 1)
    return int(buffer + labels + flush + batch)


_CHUNK_BYTES = 16 * 1024 * 1024


def _chunk_voxels(num_classes: int, buffer_channels: int) -> int:
    """Voxels per flush chunk: the logits of a chunk (``num_classes`` float32) stay within 16 MB
    when a head makes them (with no head they are views of the buffer: bounded by the buffer itself)."""
    return max(1, _CHUNK_BYTES // (4 * max(num_classes, buffer_channels)))


def _available_host_bytes() -> int | None:
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


def _available_device_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no driver, no context: do not refuse on a guess
            return None
    return _available_host_bytes()


def _check_finite(inputs: torch.Tensor) -> None:
    """InputError if any voxel is NaN or infinite (checked a few planes at a time: no input-sized mask),
    naming the image file when ``inputs`` is a MetaTensor that knows it.

    Files are checked when read (:class:`medseg.io.reader.ImageFileReader`); this catches what reaches the
    network otherwise (arrays given directly, values made non-finite by preprocessing)."""
    if not inputs.is_floating_point():
        return
    depth = inputs.shape[-1]
    plane = max(1, inputs.numel() // max(depth, 1))
    chunk = max(1, (1 << 24) // plane)
    for z0 in range(0, depth, chunk):
        if not bool(torch.isfinite(inputs[..., z0 : z0 + chunk]).all()):
            meta = getattr(inputs, "meta", None) or {}
            source = meta.get("filename_or_obj") if isinstance(meta, dict) else None
            raise InputError(source if isinstance(source, str) and source else None,
                             "the image has NaN or infinite voxel values; sliding-window inference refused")


def slab_sliding_window(
    inputs: torch.Tensor,
    roi_size: Sequence[int],
    network: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    overlap: Sequence[float] | float = 0.5,
    sw_batch_size: int = 4,
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: PytorchPadMode | str = "constant",
    cval: float = 0.0,
    probabilities_path: str | os.PathLike[str] | None = None,
    probabilities_in_memory: bool = False,
    device: torch.device | str | None = None,
    progress: bool = False,
    mirror_axes: Sequence[int] = (),
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature_channels: int | None = None,
    buffer_bytes: int | None = None,
) -> SlabResult:
    """Gaussian-blended sliding-window inference whose memory does not grow with classes x volume.

    Same windows, importance map and normalisation as
    ``monai.inferers.sliding_window_inference(inputs, roi_size, sw_batch_size, network, overlap,
    mode="gaussian", sigma_scale=sigma_scale, padding_mode=padding_mode, cval=cval)``; the blended logits
    agree up to float rounding, and the result is their argmax (and optionally softmax).

    Parameters
    ----------
    inputs
        ``(1, C_in, *spatial)``, 2D or 3D, on the CPU (or any device). Axis ``-1`` is streamed.
    roi_size
        Window size per spatial axis; non-positive entries take the whole axis (as in MONAI). Axes of
        the volume smaller than the roi are padded symmetrically and cropped back (as in MONAI).
    network
        ``(B, C_in, *roi) -> (B, num_classes, *roi)`` logits (with ``head``: ``(B, feature_channels, *roi)``
        features); called under ``torch.inference_mode()``.
    num_classes
        Classes of the logits.
    overlap, sw_batch_size, sigma_scale, padding_mode, cval
        As in MONAI (``mode`` is always ``"gaussian"``); with a ``head`` on the CPU the network takes
        one window at a time whatever ``sw_batch_size`` (less memory, and faster on the CPU measured).
    probabilities_path
        When given, a ``.npy`` file of ``(num_classes, *spatial)`` float16 softmax probabilities is
        written there (as a memory map, slab by slab) and returned open in ``SlabResult.probabilities``.
    probabilities_in_memory
        Without ``probabilities_path``: return the softmax probabilities as a float32 array in memory
        (for callers whose ``num_classes x volume`` is small).
    device
        Where windows go through the network and the blocks live (default: the input's device);
        the label map is always on the CPU.
    progress
        Show a tqdm bar over the window batches.
    mirror_axes
        Test-time mirroring: spatial axes (0-based, ``-1`` = last). Each window's logits are the average
        of ``network(window)`` and, for every axis ``a`` given, ``flip(network(flip(window, a)), a)``, one
        flip per axis (not every combination of axes): ``1 + len(mirror_axes)`` forward passes. Because the
        Gaussian blending is linear, this equals averaging MONAI runs whose predictor flips the window,
        and equals averaging MONAI runs on the flipped volume whenever the window grid is symmetric.
    head, feature_channels
        A *pointwise affine* map ``(1, feature_channels, *block) -> (1, num_classes, *block)`` (a 1 x 1 x 1
        convolution: the last layer of DynUNet, BasicUNet, SegResNet; see
        :func:`medseg.networks.split_pointwise_head`). Then the network's features, not its logits, are
        blended, and the head runs on each finished block: the blocks have ``feature_channels`` channels
        whatever the number of classes. Because the Gaussian blending is a normalised weighted mean,
        ``head(blend(features)) == blend(head(features))`` up to float rounding.
    buffer_bytes
        Budget of the accumulation buffer (default: :data:`DEFAULT_BUFFER_BYTES` on the CPU, none on other
        devices). A 3D volume whose buffer would exceed it is swept in 2 or more strips along x, cut at
        window starts: the windows straddling a cut go through the network once per strip (at most
        :data:`MAX_EXTRA_WINDOWS` more windows; the smallest buffer within that when the budget cannot be
        met). The result does not change: every voxel still blends every window that covers it.

    Raises
    ------
    InputError
        NaN or infinite voxels; or the estimate of :func:`estimate_slab_bytes` exceeds the memory available
        (the message names both in GB).
    ValueError
        Wrong shapes or arguments, or a network output of the wrong shape.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    inputs = inputs.as_subclass(torch.Tensor) if type(inputs) is not torch.Tensor else inputs  # MetaTensor
    if inputs.ndim not in (4, 5) or inputs.shape[0] != 1:
        raise ValueError(f"inputs must be (1, C_in, *spatial) with 2 or 3 spatial axes, got {tuple(inputs.shape)}")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    sw_batch_size = int(sw_batch_size)
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    spatial = tuple(int(s) for s in inputs.shape[2:])
    nd = len(spatial)
    if min(spatial) < 1:
        raise InputError(None, f"the image is empty (spatial shape {spatial})")
    roi, pad_lo, padded, scan, window = _geometry(spatial, roi_size, overlap)
    axes: list[int] = []
    for a in mirror_axes:
        a = int(a)
        if not -nd <= a < nd:
            raise ValueError(f"mirror axis {a} out of range for {nd} spatial axes")
        if a % nd not in axes:
            axes.append(a % nd)
    device = torch.device(device) if device is not None else inputs.device

    if head is not None and not feature_channels:
        raise ValueError("a head needs feature_channels (the channels the network returns)")
    buffer_channels = int(feature_channels) if head is not None else num_classes
    # With a head on the CPU the body takes one window at a time: the head path exists for memory that
    # does not grow, and a batch of windows multiplies the network's own activations (measured with
    # DynUNet(8..64), 96x96x64 windows, 2 threads: 0.20 GB and 0.20 s per window alone, 0.34 GB and
    # 0.27 s per window in pairs). On a GPU the window batch is kept: there it buys throughput.
    step = 1 if head is not None and device.type == "cpu" else sw_batch_size
    # windows: MONAI's positions in the padded volume, in the order that keeps the fewest blocks alive,
    # in x-strips when the buffer would exceed its budget
    budget = buffer_bytes if buffer_bytes is not None else (DEFAULT_BUFFER_BYTES if device.type == "cpu" else None)
    plan = _plan(padded, window, scan, buffer_channels, budget)
    in_memory = probabilities_in_memory and probabilities_path is None
    need = _estimate_bytes(plan, spatial, window, num_classes, step, bool(axes),
                           probabilities_path is not None or in_memory, buffer_channels, in_memory)
    avail = _available_device_bytes(device)
    if avail is not None and need > avail:
        raise InputError(
            None,
            f"sliding-window inference of a {'x'.join(map(str, spatial))} volume with {num_classes} classes "
            f"needs {need / _GB:.1f} GB for the slab buffer (roi {'x'.join(map(str, roi))}), "
            f"only {avail / _GB:.1f} GB available; use a smaller roi or fewer classes, or free memory",
        )
    _check_finite(inputs)

    pad_mode = look_up_option(padding_mode, PytorchPadMode)
    pad_hi = tuple(p - s - lo for p, s, lo in zip(padded, spatial, pad_lo))
    needs_pad = any(pad_lo) or any(pad_hi)
    # F.pad lists the last axis first
    pad_arg = [v for d in reversed(range(nd)) for v in (pad_lo[d], pad_hi[d])]
    in_dtype = inputs.dtype if inputs.is_floating_point() else torch.float32

    # allocated outside inference mode, so that callers may modify them in place afterwards
    labels = torch.empty(spatial, dtype=label_dtype(num_classes))
    probs = None
    if probabilities_path is not None:
        probs = np.lib.format.open_memmap(os.fspath(probabilities_path), mode="w+", dtype=np.float16,
                                          shape=(num_classes, *spatial))
    elif in_memory:
        probs = np.empty((num_classes, *spatial), dtype=np.float32)
    if probs is not None:
        writer = _ProbabilityWriter(probs)
        probs_dtype = torch.float16 if probs.dtype == np.float16 else torch.float32
    lead = nd - 2  # the leading axis (x in 3D) is whole in every block of a strip; 2D has none
    chunk_voxels = _chunk_voxels(num_classes, buffer_channels)

    with torch.inference_mode():
        importance = compute_importance_map(window, mode="gaussian", sigma_scale=sigma_scale, device=device,
                                            dtype=torch.float32)
        live: dict[tuple[int, ...], torch.Tensor] = {}  # block -> sum over windows of importance * output
        arena = torch.empty(buffer_channels * plan.arena_voxels, dtype=torch.float32, device=device)  # see _BlockPlan
        strips = plan.strips()
        strip = strips[0]

        def lead_parts(start: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
            """Where a window starting at ``start`` meets the strip along the leading axis: (in the strip's
            blocks, in the window); nothing in 2D."""
            if not lead:
                return (), ()
            x0, x1 = max(start[0], strip.x0), min(start[0] + window[0], strip.x1)
            return (slice(x0 - strip.x0, x1 - strip.x0),), (slice(x0 - start[0], x1 - start[0]),)

        def block_weight(block: tuple[int, ...], bounds: list[tuple[int, int]]) -> torch.Tensor:
            """The block's sum of importance maps (MONAI's count map), from the windows that cover it."""
            blocks = strip.blocks
            weight = torch.zeros((*strip.lead_shape, *(b1 - b0_ for b0_, b1 in bounds)), dtype=torch.float32,
                                 device=device)
            for w in blocks.windows_of[block]:
                start = strip.starts[w]
                dst, src = lead_parts(start)
                weight[dst] += importance[(*src, *blocks.window_part(start, bounds))]
            return weight

        def flush(block: tuple[int, ...]) -> None:
            acc = live.pop(block)
            blocks = strip.blocks
            bounds = blocks.bounds_of(block)
            if lead_crop is None:
                return  # padding only
            # the block's part of the original (unpadded) volume
            sel, out_index = [], []
            for axis, (b0, b1) in zip(blocks.axes, bounds):
                o0, o1 = max(b0, pad_lo[axis]), min(b1, pad_lo[axis] + spatial[axis])
                if o0 >= o1:
                    return  # padding only
                sel.append(slice(o0 - b0, o1 - b0))
                out_index.append(slice(o0 - pad_lo[axis], o1 - pad_lo[axis]))
            acc = acc[(slice(None), *lead_crop, *sel)]
            acc.div_(block_weight(block, bounds)[(*lead_crop, *sel)])  # MONAI: output /= count_map
            rows = max(1, chunk_voxels // max(1, math.prod(acc.shape[2:])))
            for r0 in range(0, acc.shape[1], rows):  # bounded temporaries along the first axis
                r1 = min(acc.shape[1], r0 + rows)
                logits = acc[:, r0:r1]
                if head is not None:
                    logits = _head_logits(head, logits, num_classes)
                best, idx = logits.max(dim=0)  # first maximum on ties, as argmax
                if lead:
                    index = (slice(lead_out + r0, lead_out + r1), *out_index)
                else:  # 2D: the first axis is a block axis
                    first = out_index[0]
                    index = (slice(first.start + r0, first.start + r1), *out_index[1:])
                labels[index].copy_(idx)
                if probs is not None:
                    logits.sub_(best).exp_()
                    logits.div_(logits.sum(dim=0))
                    writer.write(logits.to(probs_dtype).cpu().numpy(), index)

        def window_input(start: tuple[int, ...]) -> torch.Tensor:
            if not needs_pad:
                return inputs[(slice(None), slice(None), *(slice(s, s + w) for s, w in zip(start, window)))]
            # padded axes: the window covers the whole padded extent (the roi), so pad just this window
            sl = []
            for d in range(nd):
                if pad_lo[d] or pad_hi[d]:
                    sl.append(slice(None))
                else:
                    sl.append(slice(start[d], start[d] + window[d]))
            # torch refuses a value for the other modes (MONAI passes cval regardless, and fails if it is not 0)
            value = cval if pad_mode == "constant" else None
            return F.pad(inputs[(slice(None), slice(None), *sl)], pad_arg, mode=pad_mode, value=value)

        def forward(batch: torch.Tensor) -> torch.Tensor:
            out = _logits(network, batch, buffer_channels, window)
            if axes and out.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr():
                out = out.clone()  # a network that returns (a view of) its input: keep the batch for the flips
            for a in axes:
                dim = a + 2
                out += _logits(network, torch.flip(batch, (dim,)), buffer_channels, window).flip(dim)
            if axes:
                out /= 1 + len(axes)
            return out

        bar = None
        if progress:
            from monai.utils import optional_import

            tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
            if has_tqdm:
                bar = tqdm(total=sum(math.ceil(len(s.starts) / step) for s in strips), desc="sliding window",
                           unit="window batch")
        for strip in strips:
            blocks, starts = strip.blocks, strip.starts
            lead_crop, lead_out = strip.crop(pad_lo, spatial)  # the strip's unpadded part, for flush
            for b0 in range(0, len(starts), step):
                group = starts[b0 : b0 + step]
                batch = torch.cat([window_input(s) for s in group]).to(device=device, dtype=in_dtype)
                out = forward(batch)
                out *= importance  # MONAI: seg_prob *= w_t, then output[window] += seg_prob
                for i, (p, start) in enumerate(zip(out, group)):
                    w = b0 + i
                    dst, src = lead_parts(start)
                    for block in blocks.covers[w]:
                        bounds = blocks.bounds_of(block)
                        if block not in live:
                            shape = (buffer_channels, *strip.lead_shape, *(b1 - b0_ for b0_, b1 in bounds))
                            offset = buffer_channels * blocks.offset_of[block]
                            live[block] = arena[offset : offset + math.prod(shape)].view(shape).zero_()
                        # the block lies inside the window along the block axes
                        win = blocks.window_part(start, bounds)
                        live[block][(slice(None), *dst)] += p[(slice(None), *src, *win)]
                    for block in blocks.finished_after[w]:
                        flush(block)
                del batch, out
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()

    if isinstance(probs, np.memmap):
        probs.flush()
    return SlabResult(labels=labels, probabilities=probs, buffer_channels=buffer_channels,
                      peak_buffer_voxels=plan.arena_voxels, num_windows=plan.num_windows,
                      strips=len(strips))


def _window_order(padded: Sequence[int], window: Sequence[int], scan: Sequence[int]) -> list[tuple[int, ...]]:
    """MONAI's window starts (``dense_patch_slices``) in the order that keeps the fewest blocks alive:
    by z-step (``z_start // step_z``: MONAI's last z-start, moved back to end at the volume's edge, joins
    the step before it), then y, then z, then x."""
    starts = [tuple(int(s) for s, _ in w) for w in dense_patch_slices(padded, window, scan, return_slice=False)]
    if len(padded) > 1:
        starts.sort(key=lambda s: (s[-1] // scan[-1], s[-2], s[-1], *s[:-2]))
    return starts


@dataclass
class _Strip:
    """The windows meeting ``[x0, x1)`` of the padded volume (all of it in 2D), in sweep order, and their blocks
    (cut to the strip along x: what a window has outside the strip is left to the neighbouring strip)."""

    x0: int
    x1: int
    starts: list[tuple[int, ...]]
    blocks: _BlockPlan
    lead_shape: tuple[int, ...]

    def crop(self, pad_lo: Sequence[int], spatial: Sequence[int]) -> tuple[tuple[slice, ...] | None, int]:
        """(the strip's unpadded part along x, in strip coordinates; where it starts in the output); ``None``
        when the strip is padding only; ``((), 0)`` in 2D."""
        if not self.lead_shape:
            return (), 0
        o0, o1 = max(self.x0, pad_lo[0]), min(self.x1, pad_lo[0] + spatial[0])
        if o0 >= o1:
            return None, 0
        return (slice(o0 - self.x0, o1 - self.x0),), o0 - pad_lo[0]


@dataclass
class _Plan:
    """The strips of one sweep (x-ranges of the padded volume), the arena's size (for the widest strip) and
    the windows that go through the network. :meth:`strips` builds each strip's windows and blocks."""

    padded: tuple[int, ...]
    window: tuple[int, ...]
    starts: list[tuple[int, ...]]
    edges: list[int]
    arena_voxels: int
    largest_block_voxels: int
    num_windows: int

    def strips(self) -> list[_Strip]:
        """Each strip's windows and block plan (built here: only the sweep needs them)."""
        padded, window, starts = self.padded, self.window, self.starts
        if len(padded) < 3:
            return [_Strip(0, int(padded[0]), starts, _BlockPlan(padded, window, starts), ())]
        out = []
        for x0, x1 in zip(self.edges[:-1], self.edges[1:]):
            mine = [s for s in starts if s[0] < x1 and s[0] + window[0] > x0]
            lead = (x1 - x0, *(int(p) for p in padded[1:-2]))
            out.append(_Strip(x0, x1, mine, _BlockPlan(padded, window, mine, math.prod(lead)), lead))
        return out


def _plan(padded: Sequence[int], window: Sequence[int], scan: Sequence[int], channels: int,
          budget: int | None) -> _Plan:
    """The sweep of a volume: one strip, or (3D, buffer over ``budget`` bytes) the fewest x-strips that bring
    the buffer under it, cut at MONAI's window starts as evenly as they allow, while the windows computed
    twice stay within :data:`MAX_EXTRA_WINDOWS` of MONAI's (the last within that bound when none does).

    The buffer's floor is a slice of the volume as thick as the windows' overlap along z (32 planes of
    512 x 512 for a 96 x 96 x 64 roi at overlap 0.5): sweeping in strips divides its area, at the price of
    the windows that straddle a cut (one column of windows per cut at overlap 0.5).

    Blocks are cut along y and z only, and a strip's windows come column by column in the same (y, z)
    order, so a strip's arena is the arena of one column of windows per voxel of width: the choice is made
    on that one plan, and the strips' own plans are built only for the sweep.
    """
    padded, window = tuple(int(p) for p in padded), tuple(int(w) for w in window)
    starts = _window_order(padded, window, scan)
    if len(padded) < 3:
        one = _BlockPlan(padded, window, starts)
        return _Plan(padded, window, starts, [0, padded[0]], one.arena_voxels, one.largest_block_voxels, len(starts))
    xs = sorted({s[0] for s in starts})
    column = _BlockPlan(padded, window, [s for s in starts if s[0] == xs[0]], math.prod(padded[1:-2]))
    per_column = len(starts) // len(xs)

    def plan(edges: list[int]) -> _Plan:
        widths = [b - a for a, b in itertools.pairwise(edges)]
        columns = sum(sum(1 for x in xs if x < b and x + window[0] > a) for a, b in itertools.pairwise(edges))
        return _Plan(padded, window, starts, edges, column.arena_voxels * max(widths),
                     column.largest_block_voxels * max(widths), columns * per_column)

    best = plan([0, padded[0]])
    if budget is None:
        return best
    for count in range(2, len(xs) + 1):
        if channels * best.arena_voxels * 4 <= budget:
            break
        cuts: list[int] = []
        for k in range(1, count):  # the window start nearest to an even cut, after the previous one
            later = [x for x in xs if x > (cuts[-1] if cuts else 0)]
            if not later:
                break
            cuts.append(min(later, key=lambda x: abs(x - k * padded[0] / count)))
        if len(cuts) < count - 1:
            break
        candidate = plan([0, *cuts, padded[0]])
        if candidate.num_windows > (1 + MAX_EXTRA_WINDOWS) * len(starts):
            break
        if candidate.arena_voxels < best.arena_voxels:
            best = candidate
    return best


class _BlockPlan:
    """Blocks of the accumulation buffer: the padded volume cut along its last two axes at every window
    start and end (leading axes whole). A block is allocated when the first window touching it arrives
    and reduced to labels and freed right after the last one: with windows ordered by z then y, at most
    about ``(roi_z - step_z)`` planes plus two rows of blocks are alive at any time."""

    def __init__(self, padded: Sequence[int], window: Sequence[int], starts: Sequence[tuple[int, ...]],
                 lead_voxels: int | None = None) -> None:
        nd = len(padded)
        self.axes = tuple(range(max(0, nd - 2), nd))
        self.cuts = []
        for a in self.axes:
            cuts = {0, int(padded[a])} | {s[a] for s in starts} | {s[a] + window[a] for s in starts}
            self.cuts.append(sorted(cuts))
        self.covers: list[list[tuple[int, ...]]] = []
        for s in starts:
            ranges = [range(bisect.bisect_left(c, s[a]), bisect.bisect_left(c, s[a] + window[a]))
                      for c, a in zip(self.cuts, self.axes)]
            self.covers.append(list(itertools.product(*ranges)))
        last: dict[tuple[int, ...], int] = {}
        self.windows_of: dict[tuple[int, ...], list[int]] = {}
        for w, covered in enumerate(self.covers):
            for block in covered:
                last[block] = w
                self.windows_of.setdefault(block, []).append(w)
        self.finished_after: list[list[tuple[int, ...]]] = [[] for _ in starts]
        for block, w in last.items():
            self.finished_after[w].append(block)
        lead = lead_voxels if lead_voxels is not None else math.prod(int(p) for p in padded[: nd - len(self.axes)])
        self.largest_block_voxels = max(self.voxels(b) for b in last) * lead
        # One arena for all blocks: a block is a contiguous piece of it, placed first-fit when the first
        # window reaches the block and given back (merged with free neighbours) when the last has passed.
        # Allocating and freeing blocks of tens of MB in varying shapes through the C allocator
        # fragmented its heap: the resident set ended 0.3 GB above the live blocks.
        self.offset_of: dict[tuple[int, ...], int] = {}
        free: list[list[int]] = []  # [start, size] of free intervals, sorted, in voxels of one channel
        end = 0
        for w, covered in enumerate(self.covers):
            for block in covered:
                if block in self.offset_of:
                    continue
                size = self.voxels(block) * lead
                for interval in free:
                    if interval[1] >= size:
                        self.offset_of[block] = interval[0]
                        interval[0] += size
                        interval[1] -= size
                        break
                else:
                    if free and free[-1][0] + free[-1][1] == end:  # grow the arena from its free tail
                        self.offset_of[block] = free[-1][0]
                        end = free.pop()[0] + size
                    else:
                        self.offset_of[block] = end
                        end += size
                free = [i for i in free if i[1] > 0]
            for block in self.finished_after[w]:
                free.append([self.offset_of[block], self.voxels(block) * lead])
            free.sort()
            merged: list[list[int]] = []
            for interval in free:
                if merged and merged[-1][0] + merged[-1][1] == interval[0]:
                    merged[-1][1] += interval[1]
                else:
                    merged.append(interval)
            free = merged
        self.arena_voxels = end

    def bounds_of(self, block: tuple[int, ...]) -> list[tuple[int, int]]:
        return [(c[i], c[i + 1]) for c, i in zip(self.cuts, block)]

    def window_part(self, start: tuple[int, ...], bounds: list[tuple[int, int]]) -> tuple[slice, ...]:
        """Where a block lies in a window starting at ``start`` (along the block axes)."""
        return tuple(slice(b0 - start[a], b1 - start[a]) for a, (b0, b1) in zip(self.axes, bounds))

    def voxels(self, block: tuple[int, ...]) -> int:
        return math.prod(b1 - b0 for b0, b1 in self.bounds_of(block))


def _head_logits(head: Callable, features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``head`` on a ``(F, *block)`` block of blended features -> ``(num_classes, *block)`` float32."""
    out = head(features[None])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes, *features.shape[1:]):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the head returned {got} for {tuple(features.shape)} features, expected "
                         f"{(1, num_classes, *features.shape[1:])}")
    return out[0].to(torch.float32)


def _logits(network: Callable, batch: torch.Tensor, channels: int, window: tuple[int, ...]) -> torch.Tensor:
    out = network(batch)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the network must return one tensor, got {type(out).__name__}")
    expected = (batch.shape[0], channels, *window)
    if tuple(out.shape) != expected:
        raise ValueError(f"the network returned {tuple(out.shape)} for a {tuple(batch.shape)} batch, expected {expected}")
    return out.to(torch.float32)


class _ProbabilityWriter:
    """Writes z-ranges into the ``(C, *spatial)`` float16 memory map without growing the resident set.

    The last axis is the fastest in the file, so every z-range touches every page of the file. Written
    in pieces of at most ``chunk_bytes`` of the file, each piece's pages are unmapped from this process
    right after (``MADV_DONTNEED``; the data stays in the page cache, dirty, and the kernel writes it
    back): the resident set grows by one piece, not by the size of the file (22 GB for 105 classes
    on a 512 x 512 x 400 CT).
    """

    def __init__(self, probs: np.ndarray, chunk_bytes: int = 32 * 1024 * 1024) -> None:
        self.probs = probs
        mm = getattr(probs, "_mmap", None)
        delta = int(getattr(probs, "offset", 0)) % mmap.ALLOCATIONGRANULARITY  # where the array starts in mm
        ok = (
            mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")
            and delta + probs.nbytes <= len(mm)
        )
        self.mm, self.delta = (mm, delta) if ok else (None, 0)
        row = math.prod(probs.shape[2:]) * probs.itemsize  # bytes of one index along the first spatial axis
        self.rows = max(1, chunk_bytes // max(row, 1))
        self.row_bytes = row

    def write(self, values: np.ndarray, index: tuple[slice, ...]) -> None:
        """``probs[(slice(None), *index)] = values`` (``index``: one slice per spatial axis)."""
        probs = self.probs
        nx, x_start = probs.shape[1], index[0].start or 0
        x_stop = x_start + values.shape[1]
        for c in range(probs.shape[0]):
            for x0 in range(x_start, x_stop, self.rows):
                x1 = min(x_stop, x0 + self.rows)
                probs[(c, slice(x0, x1), *index[1:])] = values[c, x0 - x_start : x1 - x_start]
                if self.mm is not None:
                    start = self.delta + (c * nx + x0) * self.row_bytes
                    stop = self.delta + (c * nx + x1) * self.row_bytes
                    page0 = start - start % mmap.PAGESIZE
                    try:
                        self.mm.madvise(mmap.MADV_DONTNEED, page0, stop - page0)
                    except (OSError, ValueError):
                        self.mm = None
