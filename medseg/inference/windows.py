"""Where the windows and the blocks of the accumulation buffer go in a slab-streamed sliding window.

The windows are MONAI's (``_get_scan_interval``, ``dense_patch_slices`` on the volume padded to the roi), or
with ``grid="nnunet"`` nnU-Net v2's (per axis the fewest windows whose step is at most ``roi x (1 - overlap)``,
spread evenly and rounded: :func:`nnunet_starts`; models imported from nnU-Net see the windows they were
validated with),
visited in the order of their start along z, then y (:func:`window_order`). A 3D volume whose buffer would
exceed its budget is swept in strips along x, each cut along y when that helps, at window starts
(:func:`plan_sweep`); within a strip the buffer is cut into blocks along y and z at every window start and end
(:class:`BlockPlan`), each placed in one arena when the first window reaches it and given back when the last
has passed.
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
    "MAX_EXTRA_WINDOWS_ENSEMBLE",
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
#: At most this fraction of MONAI's windows is computed a second time at the borders of strips.
MAX_EXTRA_WINDOWS = 0.3
#: The same for an ensemble, whose buffer holds every member's channels (5 x 8 features: 484 MB in 4 x-strips of a
#: 512 x 512 x 400 volume at a 96 x 96 x 64 roi): up to twice MONAI's windows, so that its memory stays near its
#: budget (with 96 MiB: 153 MB, 2304 windows, 1.5 x one model's 1560; with the ensemble's default 220 MiB: 230 MB,
#: 1872 windows, 1.2 x); its time grows by as much.
MAX_EXTRA_WINDOWS_ENSEMBLE = 1.0

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
                 lead_voxels: int | None = None, limits: Sequence[tuple[int, int]] | None = None) -> None:
        nd = len(padded)
        self.axes = tuple(range(max(0, nd - 2), nd))
        # the part of the block axes this plan covers (a tile's y-range): blocks beyond it are another tile's
        self.limits = tuple((int(lo), int(hi)) for lo, hi in limits) if limits is not None else \
            tuple((0, int(padded[a])) for a in self.axes)
        self.cuts: list[list[int]] = []
        for a, (lo, hi) in zip(self.axes, self.limits):
            edges = {s[a] for s in starts} | {s[a] + window[a] for s in starts}
            self.cuts.append(sorted({lo, hi} | {e for e in edges if lo < e < hi}))
        self.covers: list[list[Block]] = []
        for s in starts:
            ranges = [range(bisect.bisect_left(c, max(s[a], lo)), bisect.bisect_left(c, min(s[a] + window[a], hi)))
                      for c, a, (lo, hi) in zip(self.cuts, self.axes, self.limits)]
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
    """The windows meeting ``[x0, x1)`` (and ``[y0, y1)``) of the padded volume (all of it in 2D), in sweep order,
    and their blocks (cut to the strip along x and y: what a window has outside it is left to the neighbouring
    strips)."""

    x0: int
    x1: int
    starts: list[tuple[int, ...]]
    blocks: BlockPlan
    lead_shape: tuple[int, ...]  # the strip's extent along the leading axes (x in 3D; none in 2D)

    def crop(self, pad_lo: Sequence[int], spatial: Sequence[int]) -> tuple[tuple[slice, ...] | None, int]:
        """(the strip's unpadded part along x, in strip coordinates; where it starts in the output); ``None``
        when the strip is padding only; ``((), 0)`` in 2D. (Along y its blocks lie inside its range.)"""
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
    """The strips of one sweep (x-ranges of the padded volume, each cut into y-ranges when ``y_edges`` has
    more than two), the arena's size (for the largest strip) and the windows that go through the network.
    :meth:`strips` builds each strip's windows and blocks."""

    padded: tuple[int, ...]
    window: tuple[int, ...]
    starts: list[tuple[int, ...]]
    edges: list[int]
    arena_voxels: int
    largest_block_voxels: int
    num_windows: int
    y_edges: list[int] | None = None  # None: y whole

    def strips(self) -> list[Strip]:
        """Each strip's windows and block plan (built here: only the sweep needs them), x-range by x-range,
        y-range by y-range within each."""
        padded, window, starts = self.padded, self.window, self.starts
        if len(padded) < 3:
            return [Strip(0, int(padded[0]), starts, BlockPlan(padded, window, starts), ())]
        y_edges = self.y_edges or [0, int(padded[1])]
        out = []
        for x0, x1 in itertools.pairwise(self.edges):
            lead = (x1 - x0, *(int(p) for p in padded[1:-2]))
            for y0, y1 in itertools.pairwise(y_edges):
                mine = [s for s in starts if s[0] < x1 and s[0] + window[0] > x0
                        and s[1] < y1 and s[1] + window[1] > y0]
                limits = ((y0, y1), (0, int(padded[2])))
                out.append(Strip(x0, x1, mine, BlockPlan(padded, window, mine, math.prod(lead), limits), lead))
        return out


@dataclass
class _Grid:
    """A 3D volume's windows as a grid of x-columns and y-rows (MONAI's and nnU-Net's windows are a product of
    starts per axis): the arena of a strip is its width times the arena of one column of windows over its
    y-range, so the plans of candidate cuts are made without building their strips."""

    padded: tuple[int, ...]
    window: tuple[int, ...]
    starts: list[tuple[int, ...]]
    xs: list[int]  # the window starts along x
    ys: list[int]  # along y
    per_row: int  # windows per (x-start, y-start): the z-starts

    def meeting(self, positions: list[int], axis: int, edges: list[int]) -> int:
        """Window starts along ``axis`` summed over the ranges between ``edges`` they meet."""
        w = self.window[axis]
        return sum(sum(1 for p in positions if p < b and p + w > a) for a, b in itertools.pairwise(edges))

    def column(self, y_edges: list[int]) -> BlockPlan:
        """The block plan of the first x-column over the largest arena of the y-ranges between ``y_edges``."""
        plans = []
        for y0, y1 in itertools.pairwise(y_edges):
            mine = [s for s in self.starts if s[0] == self.xs[0] and s[1] < y1 and s[1] + self.window[1] > y0]
            plans.append(BlockPlan(self.padded, self.window, mine, 1, ((y0, y1), (0, self.padded[2]))))
        return max(plans, key=lambda plan: plan.arena_voxels)

    def plan(self, edges: list[int], y_edges: list[int], column: BlockPlan) -> SweepPlan:
        """The sweep in strips ``[edges[i], edges[i + 1]) x [y_edges[j], y_edges[j + 1])``."""
        width = max(b - a for a, b in itertools.pairwise(edges))
        windows = self.meeting(self.xs, 0, edges) * self.meeting(self.ys, 1, y_edges) * self.per_row
        return SweepPlan(self.padded, self.window, self.starts, edges, column.arena_voxels * width,
                         column.largest_block_voxels * width, windows,
                         y_edges if len(y_edges) > 2 else None)


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
               budget: int | None, axis_starts: Sequence[Sequence[int]] | None = None,
               max_extra: float = MAX_EXTRA_WINDOWS) -> SweepPlan:
    """The sweep of a volume: one strip, or (3D, buffer over ``budget`` bytes) strips along x, each cut along y
    when that helps, at window starts as evenly as they allow: of the cuts whose windows computed twice stay
    within ``max_extra`` of MONAI's (default :data:`MAX_EXTRA_WINDOWS`), the one with the fewest windows that
    brings the buffer under the budget, or, when none does, the one with the smallest buffer.

    The buffer's floor is a slice of the volume as thick as the windows' overlap along z (32 planes of
    512 x 512 for a 96 x 96 x 64 roi at overlap 0.5): cutting it into strips divides its area, at the price of
    the windows that straddle a cut (one column, or row, of windows per cut at overlap 0.5).

    Blocks are cut along y and z only, and a strip's windows come column by column in the same (y, z)
    order, so a strip's arena is its width times the arena of one column of windows over its y-range: the
    choice is made on those, and the strips' own plans are built only for the sweep.

    ``padded``, ``window``, ``scan``, ``axis_starts`` are a :class:`WindowGeometry`'s; ``channels`` the
    buffer's channels.
    """
    padded, window = tuple(int(p) for p in padded), tuple(int(w) for w in window)
    starts = window_order(padded, window, scan, axis_starts)
    if len(padded) < 3:
        one = BlockPlan(padded, window, starts)
        return SweepPlan(padded, window, starts, [0, padded[0]], one.arena_voxels, one.largest_block_voxels,
                         len(starts))
    xs, ys = sorted({s[0] for s in starts}), sorted({s[1] for s in starts})
    grid = _Grid(padded, window, starts, xs, ys, len(starts) // (len(xs) * len(ys)))
    whole_y = [0, padded[1]]
    best = grid.plan([0, padded[0]], whole_y, grid.column(whole_y))
    if budget is None or channels * best.arena_voxels * 4 <= budget:
        return best
    limit = (1 + max_extra) * len(starts)
    candidates = [best]
    for ny in range(1, len(ys) + 1):
        y_edges = [0, *cuts, padded[1]] if (cuts := _even_cuts(ys, ny, padded[1])) is not None else None
        if y_edges is None or grid.meeting(ys, 1, y_edges) * len(xs) * grid.per_row > limit:
            break
        column = grid.column(y_edges)
        for nx in range(1, len(xs) + 1):
            x_cuts = _even_cuts(xs, nx, padded[0])
            if x_cuts is None:
                break
            candidate = grid.plan([0, *x_cuts, padded[0]], y_edges, column)
            if candidate.num_windows > limit:
                break
            candidates.append(candidate)
    within = [c for c in candidates if channels * c.arena_voxels * 4 <= budget]
    if within:
        return min(within, key=lambda c: (c.num_windows, c.arena_voxels))
    return min(candidates, key=lambda c: (c.arena_voxels, c.num_windows))
