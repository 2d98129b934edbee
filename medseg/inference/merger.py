"""Gaussian blending of sliding windows into blocks that are reduced to labels as soon as they are finished.

:class:`GaussianBlockMerger` is a MONAI :class:`~monai.inferers.Merger` (``aggregate(values, location)``,
then ``finalize()``) for the windows of a :class:`~medseg.inference.windows.SweepPlan`, in the plan's
order: each window is weighted by MONAI's Gaussian importance map and added into the blocks of the
accumulation buffer it touches; right after the last window touching a block, the block is divided by
its sum of importance maps (MONAI's count map) and handed to a :class:`BlockReducer`, which applies the
pointwise head (when the blocks hold features), takes the argmax into the label map and, when asked,
writes softmax probabilities (:class:`ProbabilityWriter`); for a region-based model (one sigmoid output
per region) it paints the regions into the label map instead
(:func:`medseg.transforms.regions.regions_to_label_map`) and writes sigmoid probabilities. The memory is one arena of blocks
(:class:`~medseg.inference.windows.BlockPlan`) instead of MONAI's ``C x volume`` output and count map.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import Merger

from medseg.inference.memory import chunk_voxels, label_dtype
from medseg.inference.windows import Block, Strip, SweepPlan, WindowGeometry
from medseg.labels import Region
from medseg.transforms.regions import regions_to_label_map

__all__ = ["BlockReducer", "GaussianBlockMerger", "ProbabilityWriter", "nnunet_importance"]


class ProbabilityWriter:
    """Writes z-ranges into the ``(C, *spatial)`` float16 memory map without growing the resident set.

    The last axis is the fastest in the file, so every z-range touches every page of the file. Written
    in pieces of at most ``chunk_bytes`` of the file, each piece's pages are unmapped from this process
    right after (``MADV_DONTNEED``; the data stays in the page cache, dirty, and the kernel writes it
    back): the resident set grows by one piece, not by the size of the file (22 GB for 105 classes
    on a 512 x 512 x 400 CT). Any other array (in memory) is written plainly.
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
                key: tuple[int | slice, ...] = (c, slice(x0, x1), *index[1:])
                probs[key] = values[c, x0 - x_start : x1 - x_start]
                if self.mm is not None:
                    start = self.delta + (c * nx + x0) * self.row_bytes
                    stop = self.delta + (c * nx + x1) * self.row_bytes
                    page0 = start - start % mmap.PAGESIZE
                    try:
                        self.mm.madvise(mmap.MADV_DONTNEED, page0, stop - page0)
                    except (OSError, ValueError):
                        self.mm = None


def _head_logits(head: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
    """``head`` on a ``(F, *block)`` block of blended features -> ``(num_classes, *block)`` float32.

    Raises
    ------
    ValueError
        The head returns anything but one ``(1, num_classes, *block)`` tensor.
    """
    out = head(features[None])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes, *features.shape[1:]):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the head returned {got} for {tuple(features.shape)} features, expected "
                         f"{(1, num_classes, *features.shape[1:])}")
    return out[0].to(torch.float32)


class BlockReducer:
    """The label map (and probabilities) that finished blocks of blended logits or features are reduced into.

    Parameters
    ----------
    spatial_shape
        The output's spatial shape (the unpadded volume).
    num_classes
        Channels of the logits: classes, or regions; the label map is
        :func:`~medseg.inference.memory.label_dtype` of the classes (of the largest region value + 1).
    buffer_channels
        Channels of the blocks: ``num_classes``, or the features that ``head`` maps to the classes.
    head
        A pointwise map ``(1, buffer_channels, *block) -> (1, num_classes, *block)``, or ``None`` when the
        blocks hold the logits.
    probabilities_path
        Write float16 softmax probabilities ``(num_classes, *spatial)`` into a new ``.npy`` memory map there.
    probabilities_in_memory
        Without ``probabilities_path``: keep float32 softmax probabilities in memory.
    regions
        The regions of a region-based model, one per logit channel in painting order: the label map is
        painted where each region's sigmoid exceeds 0.5 (later regions over earlier ones), and the
        probabilities are the sigmoids. Empty: softmax and argmax over the classes.
    members
        Models of an ensemble whose logits lie side by side (``members x num_classes`` channels, member by
        member): each member's block becomes probabilities (softmax, or sigmoid per region) and their mean is
        reduced, so the result equals averaging the members' own blended probabilities; 1: one model.

    The label map and the probabilities are allocated here, outside inference mode (callers may modify them
    in place afterwards), on the CPU.

    Raises
    ------
    OSError
        ``probabilities_path`` cannot be created.
    ValueError
        ``regions`` given, but not one per logit channel.
    """

    def __init__(self, spatial_shape: Sequence[int], num_classes: int, buffer_channels: int,
                 head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 probabilities_path: str | os.PathLike[str] | None = None,
                 probabilities_in_memory: bool = False, regions: Sequence[Region] = (), members: int = 1) -> None:
        spatial = tuple(int(s) for s in spatial_shape)
        self.num_classes, self.buffer_channels, self.head = int(num_classes), int(buffer_channels), head
        self.members = int(members)
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        self.regions = tuple(regions)
        if self.regions and len(self.regions) != self.num_classes:
            raise ValueError(f"{len(self.regions)} regions for {self.num_classes} output channels")
        values = max(r.value for r in self.regions) + 1 if self.regions else self.num_classes
        with torch.inference_mode(False):
            self.labels = torch.empty(spatial, dtype=label_dtype(values))
        self.probabilities: np.ndarray | None = None
        if probabilities_path is not None:
            self.probabilities = np.lib.format.open_memmap(os.fspath(probabilities_path), mode="w+",
                                                           dtype=np.float16, shape=(self.num_classes, *spatial))
        elif probabilities_in_memory:
            self.probabilities = np.empty((self.num_classes, *spatial), dtype=np.float32)
        self._writer = ProbabilityWriter(self.probabilities) if self.probabilities is not None else None
        self._probs_dtype = torch.float16 if self.probabilities is not None and \
            self.probabilities.dtype == np.float16 else torch.float32
        self._chunk_voxels = chunk_voxels(self.num_classes * self.members, self.buffer_channels)

    def reduce(self, values: torch.Tensor, region: tuple[slice, ...]) -> None:
        """Reduce ``(buffer_channels, *region)`` normalised blocks into the output at ``region`` (one slice with
        a start per spatial axis), in bounded chunks along the first axis. ``values`` is overwritten.

        Raises
        ------
        ValueError
            The head returns a tensor of the wrong shape.
        """
        rows = max(1, self._chunk_voxels // max(1, math.prod(values.shape[2:])))
        first = region[0].start
        for r0 in range(0, values.shape[1], rows):  # bounded temporaries along the first axis
            r1 = min(values.shape[1], r0 + rows)
            logits = values[:, r0:r1]
            if self.head is not None:
                logits = _head_logits(self.head, logits, self.num_classes * self.members)
            index = (slice(first + r0, first + r1), *region[1:])
            if self.members > 1:
                self._reduce_members(logits, index)
                continue
            if self.regions:
                probabilities = logits.sigmoid_()
                self.labels[index].copy_(regions_to_label_map(probabilities, self.regions, dtype=self.labels.dtype)[0])
                if self._writer is not None:
                    self._writer.write(probabilities.to(self._probs_dtype).cpu().numpy(), index)
                continue
            best, idx = logits.max(dim=0)  # first maximum on ties, as argmax
            self.labels[index].copy_(idx)
            if self._writer is not None:
                logits.sub_(best).exp_()
                logits.div_(logits.sum(dim=0))
                self._writer.write(logits.to(self._probs_dtype).cpu().numpy(), index)

    def _reduce_members(self, logits: torch.Tensor, index: tuple[slice, ...]) -> None:
        """An ensemble's ``(members x num_classes, *block)`` logits -> the mean of the members' probabilities,
        reduced into the label map (argmax, or regions painted) and the probabilities at ``index``."""
        grouped = logits.reshape(self.members, self.num_classes, *logits.shape[1:])
        probabilities = (grouped.sigmoid() if self.regions else grouped.softmax(dim=1)).mean(dim=0)
        if self.regions:
            self.labels[index].copy_(regions_to_label_map(probabilities, self.regions, dtype=self.labels.dtype)[0])
        else:
            self.labels[index].copy_(probabilities.argmax(dim=0))
        if self._writer is not None:
            self._writer.write(probabilities.to(self._probs_dtype).cpu().numpy(), index)

    def close(self) -> tuple[torch.Tensor, np.ndarray | None]:
        """``(label map, probabilities or None)``, the memory map flushed to its file."""
        if isinstance(self.probabilities, np.memmap):
            self.probabilities.flush()
        return self.labels, self.probabilities


def nnunet_importance(window: Sequence[int]) -> torch.Tensor:
    """nnU-Net v2's Gaussian importance map of a window: a unit impulse at voxel ``size // 2`` of each axis
    smoothed by a Gaussian of sigma ``size / 8`` (scipy, zero outside, truncated at 4 sigma), scaled to a
    maximum of 1 (nnU-Net scales to 10: the blend is a normalised mean, the scale cancels); voxels that
    come out 0 get the smallest non-zero weight."""
    from scipy.ndimage import gaussian_filter

    size = tuple(int(w) for w in window)
    impulse = np.zeros(size)
    impulse[tuple(s // 2 for s in size)] = 1.0
    weights = gaussian_filter(impulse, [s / 8 for s in size], 0, mode="constant", cval=0.0)
    weights /= weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return torch.from_numpy(weights.astype(np.float32))


class GaussianBlockMerger(Merger):
    """Gaussian-weighted average of the windows of a sweep, reduced block by block (see the module docstring).

    Windows come in the plan's sweep order (each strip's ``starts`` in turn; a window straddling two strips
    comes once for each) as ``aggregate(values, start)``; ``finalize()`` returns what the reducer holds.

    Parameters
    ----------
    plan, geometry
        The sweep and the window geometry of the volume (:func:`~medseg.inference.windows.plan_sweep`).
    reducer
        Where finished blocks go; its label map's shape is the unpadded volume's.
    sigma_scale
        Of MONAI's Gaussian importance map (``compute_importance_map(mode="gaussian")``).
    device
        Where the accumulation blocks live.
    importance
        ``"monai"``: MONAI's Gaussian; ``"nnunet"``: nnU-Net v2's (:func:`nnunet_importance`, sigma 1/8 of the window).
    """

    def __init__(self, plan: SweepPlan, geometry: WindowGeometry, reducer: BlockReducer,
                 sigma_scale: Sequence[float] | float = 0.125, device: torch.device | str = "cpu",
                 importance: str = "monai") -> None:
        spatial = tuple(reducer.labels.shape)
        channels = reducer.buffer_channels
        super().__init__(merged_shape=(1, channels, *geometry.padded), cropped_shape=(1, channels, *spatial),
                         device=device)
        self.geometry, self.reducer, self.spatial = geometry, reducer, spatial
        self.channels = channels
        self.importance = (nnunet_importance(geometry.window).to(device) if importance == "nnunet" else
                           compute_importance_map(geometry.window, mode="gaussian", sigma_scale=sigma_scale,
                                                  device=device, dtype=torch.float32))
        self.arena = torch.empty(channels * plan.arena_voxels, dtype=torch.float32, device=device)
        self.live: dict[Block, torch.Tensor] = {}  # block -> sum over windows of importance * output
        self.strips = plan.strips()
        self._strip, self._next = -1, 0  # the current strip, the index of the next window in it
        self._crop: tuple[tuple[slice, ...] | None, int] = ((), 0)
        self._added = 0  # channels of the current window added so far
        self._advance()

    def _advance(self) -> None:
        """Move to the next strip that has windows, if the current one has had all its windows."""
        while self._strip + 1 < len(self.strips) and (self._strip < 0 or self._next == len(self.strip.starts)):
            self._strip, self._next = self._strip + 1, 0
            self._crop = self.strips[self._strip].crop(self.geometry.pad_lo, self.spatial)

    @property
    def strip(self) -> Strip:
        """The strip whose windows are being aggregated."""
        return self.strips[self._strip]

    def aggregate(self, values: torch.Tensor, location: Sequence[int]) -> None:
        """Add ``values`` ``(1, channels, *window)`` of the window starting at ``location`` (in the padded
        volume), weighted by the importance map (in place: ``values`` is overwritten); reduce the blocks that
        no later window touches. The same as :meth:`add` of all channels, then :meth:`finish`.

        Raises
        ------
        ValueError
            After :meth:`finalize`; a window out of the plan's order, or values of the wrong shape.
        """
        self.add(values, location)
        self.finish(location)

    def add(self, values: torch.Tensor, location: Sequence[int], first_channel: int = 0) -> None:
        """Add ``values`` ``(1, c, *window)`` of the next window of the plan, starting at ``location``, into
        channels ``first_channel .. first_channel + c - 1`` of its blocks, weighted by the importance map (in
        place). An ensemble's members add their channels one after another, so that one member's output is
        alive at a time; :meth:`finish` closes the window once every channel was added.

        Raises
        ------
        ValueError
            After :meth:`finalize`; a window out of the plan's order, or values of the wrong shape.
        """
        if self.is_finalized:
            raise ValueError("the merger is finalized; make a new one to aggregate")
        self._advance()
        strip, w = self.strip, self._next
        start = tuple(int(s) for s in location)
        if w >= len(strip.starts) or strip.starts[w] != start:
            expected = strip.starts[w] if w < len(strip.starts) else "none"
            raise ValueError(f"window at {start} out of the plan's order: expected {expected}")
        c0 = int(first_channel)
        c1 = c0 + (int(values.shape[1]) if values.ndim > 1 else 0)
        if values.ndim != 2 + len(self.geometry.window) or values.shape[0] != 1 or \
                tuple(values.shape[2:]) != self.geometry.window or not 0 <= c0 < c1 <= self.channels:
            raise ValueError(f"values of shape {tuple(values.shape)} from channel {c0}, expected "
                             f"{(1, self.channels, *self.geometry.window)} in all")
        p = values[0]
        p *= self.importance  # MONAI: seg_prob *= w_t, then output[window] += seg_prob
        blocks = strip.blocks
        dst, src = strip.lead_parts(start, self.geometry.window)
        for block in blocks.covers[w]:
            bounds = blocks.bounds_of(block)
            if block not in self.live:
                shape = (self.channels, *strip.lead_shape, *(b1 - b0 for b0, b1 in bounds))
                offset = self.channels * blocks.offset_of[block]
                self.live[block] = self.arena[offset : offset + math.prod(shape)].view(shape).zero_()
            # the block lies inside the window along the block axes
            win = blocks.window_part(start, bounds)
            self.live[block][(slice(c0, c1), *dst)] += p[(slice(None), *src, *win)]
        self._added += c1 - c0

    def finish(self, location: Sequence[int]) -> None:
        """Close the window starting at ``location`` once all its channels were added; reduce the blocks that
        no later window touches.

        Raises
        ------
        ValueError
            Not the window being added, or not all its channels added.
        """
        strip, w = self.strip, self._next
        start = tuple(int(s) for s in location)
        if self.is_finalized or w >= len(strip.starts) or strip.starts[w] != start:
            raise ValueError(f"window at {start} is not the one being added")
        if self._added != self.channels:
            raise ValueError(f"window at {start}: {self._added} of {self.channels} channels added")
        self._added = 0
        self._next += 1
        for block in strip.blocks.finished_after[w]:
            self._flush(block)

    def _weight(self, block: Block, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """The block's sum of importance maps (MONAI's count map), from the windows that cover it."""
        strip = self.strip
        blocks = strip.blocks
        weight = torch.zeros((*strip.lead_shape, *(b1 - b0 for b0, b1 in bounds)), dtype=torch.float32,
                             device=self.arena.device)
        for w in blocks.windows_of[block]:
            start = strip.starts[w]
            dst, src = strip.lead_parts(start, self.geometry.window)
            weight[dst] += self.importance[(*src, *blocks.window_part(start, bounds))]
        return weight

    def _flush(self, block: Block) -> None:
        """Normalise a finished block and reduce its part of the unpadded volume; give its place back."""
        acc = self.live.pop(block)
        strip = self.strip
        bounds = strip.blocks.bounds_of(block)
        lead_crop, lead_out = self._crop
        if lead_crop is None:
            return  # padding only
        pad_lo, spatial = self.geometry.pad_lo, self.spatial
        sel, out_index = [], []
        for axis, (b0, b1) in zip(strip.blocks.axes, bounds):
            o0, o1 = max(b0, pad_lo[axis]), min(b1, pad_lo[axis] + spatial[axis])
            if o0 >= o1:
                return  # padding only
            sel.append(slice(o0 - b0, o1 - b0))
            out_index.append(slice(o0 - pad_lo[axis], o1 - pad_lo[axis]))
        acc = acc[(slice(None), *lead_crop, *sel)]
        acc.div_(self._weight(block, bounds)[(*lead_crop, *sel)])  # MONAI: output /= count_map
        lead = (slice(lead_out, lead_out + acc.shape[1]),) if strip.lead_shape else ()
        self.reducer.reduce(acc, (*lead, *out_index))

    def finalize(self) -> tuple[torch.Tensor, np.ndarray | None]:
        """``(label map, probabilities or None)`` of the reducer (see :meth:`BlockReducer.close`).

        Raises
        ------
        ValueError
            Windows of the plan not aggregated yet (their blocks would be missing from the label map).
        """
        if not self.is_finalized:
            self._advance()
            if self._strip < len(self.strips) - 1 or self._next < len(self.strip.starts) or self.live:
                raise ValueError("finalize before every window of the plan was aggregated")
            self.is_finalized = True
        return self.reducer.close()
