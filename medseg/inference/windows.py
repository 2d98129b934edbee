"""Where the windows and the blocks of the accumulation buffer go in a slab-streamed sliding window.

The windows are MONAI's (``_get_scan_interval``, ``dense_patch_slices`` on the volume padded to the roi), or
with ``grid="nnunet"`` nnU-Net v2's (per axis the fewest windows whose step is at most ``roi x (1 - overlap)``,
spread evenly and rounded: :func:`nnunet_starts`; models imported from nnU-Net see the windows they were
validated with),
visited in the order of their start along z, then y (:func:`window_order`). A 3D volume whose buffer would
exceed its budget is swept in strips along x, cut at window starts (:func:`plan_sweep`); within a strip the
buffer is cut into blocks along y and z at every window start and end (:class:`BlockPlan`), each placed in
one arena when the first window reaches it and given back when the last has passed.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from monai.data.utils import dense_patch_slices, get_valid_patch_size
from monai.inferers.utils import _get_scan_interval
from monai.utils import ensure_tuple_rep, fall_back_tuple

__all__ = [
    "GRIDS",
    "MAX_EXTRA_WINDOWS",
    "Block",
    "BlockPlan",
    "Strip",
    "SweepPlan",
    "WindowGeometry",
    "nnunet_starts",
    "plan_sweep",
    "window_geometry",
    "window_order",
]

#: The window grids: MONAI's and nnU-Net v2's.
GRIDS = ("monai", "nnunet")
#: At most this fraction of MONAI's windows is computed a second time at the borders of x-strips.
MAX_EXTRA_WINDOWS = 0.3

Block = tuple[int, ...]  # a block's index along each block axis


class WindowGeometry(NamedTuple):
    """MONAI's window grid on one volume (all per spatial axis, in voxels)."""

    roi: tuple[int, ...]  # after the fall-back of non-positive entries to the whole axis
    pad_lo: tuple[int, ...]  # padding before the volume (axes smaller than the roi; the odd voxel goes after)
    padded: tuple[int, ...]  # the padded volume's shape
    scan: tuple[int, ...]  # the scan interval (step between window starts)
    window: tuple[int, ...]  # the window size (the roi, cut to the padded volume)
    axis_starts: tuple[tuple[int, ...], ...] | None = None  # nnU-Net's grid: the starts per axis (None: MONAI's)


def nnunet_starts(size: int, window: int, overlap: float) -> tuple[int, ...]:
    """nnU-Net v2's window starts along one axis of ``size`` voxels (at least ``window``): as few windows as keep
    each step at most ``window x (1 - overlap)``, the first at 0, the last at ``size - window``, rounded; a window
    of one voxel (the slice axis of a 2D network over a 3D image) at every position."""
    if window == 1:  # a 2D network over a 3D image: every slice once, as nnU-Net's 2d configuration
        return tuple(range(size))
    target = window * (1.0 - overlap)
    count = math.ceil((size - window) / target) + 1 if size > window else 1
    if count == 1:
        return (0,)
    step = (size - window) / (count - 1)
    return tuple(int(round(step * i)) for i in range(count))


def window_geometry(spatial_shape: Sequence[int], roi_size: Sequence[int] | int,
                    overlap: Sequence[float] | float, grid: str = "monai") -> WindowGeometry:
    """MONAI's geometry of a sliding window over ``spatial_shape`` (with ``grid="nnunet"``, nnU-Net's window
    starts on the same padded volume: nnU-Net pads an axis smaller than the roi as MONAI does).

    Raises
    ------
    ValueError
        ``roi_size`` with another number of axes than ``spatial_shape``, an overlap outside ``[0, 1)`` or an
        unknown grid.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
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
    starts = (tuple(nnunet_starts(p, w, o) for p, w, o in zip(padded, window, overlaps)) if grid == "nnunet"
              else None)
    return WindowGeometry(roi, pad_lo, padded, tuple(int(s) for s in scan), window, starts)


def window_order(padded: Sequence[int], window: Sequence[int], scan: Sequence[int],
                 axis_starts: Sequence[Sequence[int]] | None = None) -> list[tuple[int, ...]]:
    """MONAI's window starts (``dense_patch_slices``; or every combination of ``axis_starts``) in the order
    that keeps the fewest blocks alive: by z-step (``z_start // step_z``: MONAI's last z-start, moved back to
    end at the volume's edge, joins the step before it), then y, then z, then x."""
    if axis_starts is not None:
        starts = [tuple(int(v) for v in s) for s in itertools.product(*axis_starts)]
    else:
        starts = [tuple(int(s.start) for s in w) for w in dense_patch_slices(padded, window, scan)]
    if len(padded) > 1:
        starts.sort(key=lambda s: (s[-1] // scan[-1], s[-2], s[-1], *s[:-2]))
    return starts


class BlockPlan:
    """Blocks of the accumulation buffer: the padded volume cut along its last two axes at every window
    start and end (leading axes whole). A block is allocated when the first window touching it arrives
    and reduced to labels and freed right after the last one: with windows ordered by z then y, at most
    about ``(roi_z - step_z)`` planes plus two rows of blocks are alive at any time.

    Attributes
    ----------
    axes
        The block axes (the last two spatial axes; both in 2D).
    covers
        For each window (index into ``starts``), the blocks it touches.
    windows_of
        For each block, the windows that touch it.
    finished_after
        For each window, the blocks that no later window touches.
    offset_of
        Each block's place in the arena, in voxels of one channel.
    arena_voxels, largest_block_voxels
        The arena's size and the largest block's, in voxels of one channel.
    """

    def __init__(self, padded: Sequence[int], window: Sequence[int], starts: Sequence[tuple[int, ...]],
                 lead_voxels: int | None = None) -> None:
        nd = len(padded)
        self.axes = tuple(range(max(0, nd - 2), nd))
        self.cuts: list[list[int]] = []
        for a in self.axes:
            cuts = {0, int(padded[a])} | {s[a] for s in starts} | {s[a] + window[a] for s in starts}
            self.cuts.append(sorted(cuts))
        self.covers: list[list[Block]] = []
        for s in starts:
            ranges = [range(bisect.bisect_left(c, s[a]), bisect.bisect_left(c, s[a] + window[a]))
                      for c, a in zip(self.cuts, self.axes)]
            self.covers.append(list(itertools.product(*ranges)))
        last: dict[Block, int] = {}
        self.windows_of: dict[Block, list[int]] = {}
        for w, covered in enumerate(self.covers):
            for block in covered:
                last[block] = w
                self.windows_of.setdefault(block, []).append(w)
        self.finished_after: list[list[Block]] = [[] for _ in starts]
        for block, w in last.items():
            self.finished_after[w].append(block)
        lead = lead_voxels if lead_voxels is not None else math.prod(int(p) for p in padded[: nd - len(self.axes)])
        self.largest_block_voxels = max(self.voxels(b) for b in last) * lead
        self.offset_of, self.arena_voxels = _place_blocks(self.covers, self.finished_after,
                                                          lambda block: self.voxels(block) * lead)

    def bounds_of(self, block: Block) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` of ``block`` in the padded volume along each block axis."""
        return [(c[i], c[i + 1]) for c, i in zip(self.cuts, block)]

    def window_part(self, start: tuple[int, ...], bounds: list[tuple[int, int]]) -> tuple[slice, ...]:
        """Where a block lies in a window starting at ``start`` (along the block axes)."""
        return tuple(slice(b0 - start[a], b1 - start[a]) for a, (b0, b1) in zip(self.axes, bounds))

    def voxels(self, block: Block) -> int:
        """Voxels of ``block`` along the block axes (the leading axes not counted)."""
        return math.prod(b1 - b0 for b0, b1 in self.bounds_of(block))


def _place_blocks(covers: list[list[Block]], finished_after: list[list[Block]],
                  size_of: Callable[[Block], int]) -> tuple[dict[Block, int], int]:
    """First-fit placement of the blocks in one arena, in window order: ``(offset of each block, arena size)``.

    A block is a contiguous piece of the arena, placed when the first window reaches it and given back
    (merged with free neighbours) when the last has passed. Allocating and freeing blocks of tens of MB
    in varying shapes through the C allocator fragmented its heap: the resident set ended 0.3 GB above
    the live blocks.
    """
    offset_of: dict[Block, int] = {}
    free: list[list[int]] = []  # [start, size] of free intervals, sorted, in voxels of one channel
    end = 0
    for w, covered in enumerate(covers):
        for block in covered:
            if block in offset_of:
                continue
            size = size_of(block)
            for interval in free:
                if interval[1] >= size:
                    offset_of[block] = interval[0]
                    interval[0] += size
                    interval[1] -= size
                    break
            else:
                if free and free[-1][0] + free[-1][1] == end:  # grow the arena from its free tail
                    offset_of[block] = free[-1][0]
                    end = free.pop()[0] + size
                else:
                    offset_of[block] = end
                    end += size
            free = [i for i in free if i[1] > 0]
        for block in finished_after[w]:
            free.append([offset_of[block], size_of(block)])
        free.sort()
        merged: list[list[int]] = []
        for interval in free:
            if merged and merged[-1][0] + merged[-1][1] == interval[0]:
                merged[-1][1] += interval[1]
            else:
                merged.append(interval)
        free = merged
    return offset_of, end


@dataclass
class Strip:
    """The windows meeting ``[x0, x1)`` of the padded volume (all of it in 2D), in sweep order, and their blocks
    (cut to the strip along x: what a window has outside the strip is left to the neighbouring strip)."""

    x0: int
    x1: int
    starts: list[tuple[int, ...]]
    blocks: BlockPlan
    lead_shape: tuple[int, ...]  # the strip's extent along the leading axes (x in 3D; none in 2D)

    def crop(self, pad_lo: Sequence[int], spatial: Sequence[int]) -> tuple[tuple[slice, ...] | None, int]:
        """(the strip's unpadded part along x, in strip coordinates; where it starts in the output); ``None``
        when the strip is padding only; ``((), 0)`` in 2D."""
        if not self.lead_shape:
            return (), 0
        o0, o1 = max(self.x0, pad_lo[0]), min(self.x1, pad_lo[0] + spatial[0])
        if o0 >= o1:
            return None, 0
        return (slice(o0 - self.x0, o1 - self.x0),), o0 - pad_lo[0]

    def lead_parts(self, start: tuple[int, ...], window: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Where a window starting at ``start`` meets the strip along the leading axis: (in the strip's
        blocks, in the window); nothing in 2D."""
        if not self.lead_shape:
            return (), ()
        x0, x1 = max(start[0], self.x0), min(start[0] + window[0], self.x1)
        return (slice(x0 - self.x0, x1 - self.x0),), (slice(x0 - start[0], x1 - start[0]),)


@dataclass
class SweepPlan:
    """The strips of one sweep (x-ranges of the padded volume), the arena's size (for the widest strip) and
    the windows that go through the network. :meth:`strips` builds each strip's windows and blocks."""

    padded: tuple[int, ...]
    window: tuple[int, ...]
    starts: list[tuple[int, ...]]
    edges: list[int]
    arena_voxels: int
    largest_block_voxels: int
    num_windows: int

    def strips(self) -> list[Strip]:
        """Each strip's windows and block plan (built here: only the sweep needs them)."""
        padded, window, starts = self.padded, self.window, self.starts
        if len(padded) < 3:
            return [Strip(0, int(padded[0]), starts, BlockPlan(padded, window, starts), ())]
        out = []
        for x0, x1 in itertools.pairwise(self.edges):
            mine = [s for s in starts if s[0] < x1 and s[0] + window[0] > x0]
            lead = (x1 - x0, *(int(p) for p in padded[1:-2]))
            out.append(Strip(x0, x1, mine, BlockPlan(padded, window, mine, math.prod(lead)), lead))
        return out


@dataclass
class _Columns:
    """A 3D volume's windows seen as columns along x: the plan of one column (the first x-start) scales with
    the width of a strip, so the plans of candidate cuts are made without building their strips."""

    padded: tuple[int, ...]
    window: tuple[int, ...]
    starts: list[tuple[int, ...]]
    xs: list[int]  # the window starts along x
    column: BlockPlan
    per_column: int  # windows per column

    def plan(self, edges: list[int]) -> SweepPlan:
        """The sweep in strips ``[edges[i], edges[i + 1])``."""
        widths = [b - a for a, b in itertools.pairwise(edges)]
        window = self.window
        columns = sum(sum(1 for x in self.xs if x < b and x + window[0] > a) for a, b in itertools.pairwise(edges))
        return SweepPlan(self.padded, window, self.starts, edges, self.column.arena_voxels * max(widths),
                         self.column.largest_block_voxels * max(widths), columns * self.per_column)


def _even_cuts(xs: list[int], count: int, length: int) -> list[int] | None:
    """``count - 1`` window starts from ``xs`` nearest to ``count`` even strips of ``length``, each after the
    previous one; ``None`` when there are not enough."""
    cuts: list[int] = []
    for k in range(1, count):
        later = [x for x in xs if x > (cuts[-1] if cuts else 0)]
        if not later:
            return None
        cuts.append(min(later, key=lambda x: abs(x - k * length / count)))
    return cuts


def plan_sweep(padded: Sequence[int], window: Sequence[int], scan: Sequence[int], channels: int,
               budget: int | None, axis_starts: Sequence[Sequence[int]] | None = None) -> SweepPlan:
    """The sweep of a volume: one strip, or (3D, buffer over ``budget`` bytes) the fewest x-strips that bring
    the buffer under it, cut at MONAI's window starts as evenly as they allow, while the windows computed
    twice stay within :data:`MAX_EXTRA_WINDOWS` of MONAI's (the last within that bound when none does).

    The buffer's floor is a slice of the volume as thick as the windows' overlap along z (32 planes of
    512 x 512 for a 96 x 96 x 64 roi at overlap 0.5): sweeping in strips divides its area, at the price of
    the windows that straddle a cut (one column of windows per cut at overlap 0.5).

    Blocks are cut along y and z only, and a strip's windows come column by column in the same (y, z)
    order, so a strip's arena is the arena of one column of windows per voxel of width: the choice is made
    on that one plan, and the strips' own plans are built only for the sweep.

    ``padded``, ``window``, ``scan``, ``axis_starts`` are a :class:`WindowGeometry`'s; ``channels`` the
    buffer's channels.
    """
    padded, window = tuple(int(p) for p in padded), tuple(int(w) for w in window)
    starts = window_order(padded, window, scan, axis_starts)
    if len(padded) < 3:
        one = BlockPlan(padded, window, starts)
        return SweepPlan(padded, window, starts, [0, padded[0]], one.arena_voxels, one.largest_block_voxels,
                         len(starts))
    xs = sorted({s[0] for s in starts})
    column = BlockPlan(padded, window, [s for s in starts if s[0] == xs[0]], math.prod(padded[1:-2]))
    columns = _Columns(padded, window, starts, xs, column, len(starts) // len(xs))
    best = columns.plan([0, padded[0]])
    if budget is None:
        return best
    for count in range(2, len(xs) + 1):
        if channels * best.arena_voxels * 4 <= budget:
            break
        cuts = _even_cuts(xs, count, padded[0])
        if cuts is None:
            break
        candidate = columns.plan([0, *cuts, padded[0]])
        if candidate.num_windows > (1 + MAX_EXTRA_WINDOWS) * len(starts):
            break
        if candidate.arena_voxels < best.arena_voxels:
            best = candidate
    return best
