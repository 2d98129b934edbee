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
buffer would still exceed its budget (``buffer_bytes``, 96 MiB on the CPU, 220 MiB for an ensemble), a 3D volume is swept in
strips along x, each cut along y when that helps, at window starts, one after the other: the buffer shrinks
with the strip's area, and the windows that straddle a cut go through the network once for each strip (at
overlap 0.5 one column or row of windows per cut; never more than 30 % more windows in all, 100 % for an
ensemble, whose buffer holds every member's channels). Peak memory is therefore the
input + that buffer + the label map + one batch of windows through the network, independent of the
volume's depth and, with a head, of the number of classes.

The parts: :mod:`medseg.inference.windows` (where the windows, strips and blocks go),
:mod:`medseg.inference.merger` (Gaussian blending into blocks, reduced to labels and probabilities when
finished), :mod:`medseg.inference.memory` (what it allocates, what is available); this module feeds the
windows through the network.

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
* ``mirror_axes`` (test-time mirroring) is not in MONAI; see :func:`slab_sliding_window`. Because the
  Gaussian blending is linear, it equals averaging MONAI runs whose predictor flips the window, and
  equals averaging MONAI runs on the flipped volume whenever the window grid is symmetric.

With a pointwise ``head``, ``head(blend(features)) == blend(head(features))`` up to float rounding, because
the Gaussian blending is a normalised weighted mean. Sweeping in strips does not change the result
either: every voxel still blends every window that covers it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import PytorchPadMode, look_up_option, optional_import

from medseg.errors import InputError
from medseg.inference.memory import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_ENSEMBLE_BUFFER_BYTES,
    estimate_plan_bytes,
    require_memory,
)
from medseg.inference.merger import BlockReducer, GaussianBlockMerger
from medseg.inference.windows import (
    MAX_EXTRA_WINDOWS,
    MAX_EXTRA_WINDOWS_ENSEMBLE,
    Strip,
    WindowGeometry,
    plan_sweep,
    window_geometry,
)
from medseg.labels import Region

__all__ = ["SlabResult", "slab_sliding_window"]


@dataclass
class SlabResult:
    """What :func:`slab_sliding_window` returns.

    Attributes
    ----------
    labels
        ``(*spatial)`` label map on the CPU: the argmax over classes of the blended logits (with ``regions``:
        the regions painted where their sigmoid exceeds 0.5); uint8 for up to 256 classes, int16 up to
        32768, int32 beyond.
    probabilities
        ``(C, *spatial)`` float16 softmax (with ``regions``: sigmoid) of the blended logits in a ``.npy`` file
        opened as a memory map (``numpy.load(path, mmap_mode="r")`` reopens it); with
        ``probabilities_in_memory`` a float32 array in memory; else ``None``.
    buffer_channels
        Channels of the accumulation buffer: the feature (or class) channels blended (the weights, MONAI's
        count map, are summed for one block at a time when it is reduced).
    peak_buffer_voxels
        Voxels of the accumulation buffer allocated: one arena in which each block takes a piece when the
        first window reaches it and gives it back when the last has passed (about as many voxels as
        blocks are alive at one time); times ``buffer_channels`` float32, instead of ``(C, *spatial)``.
    num_windows
        How many windows went through the network (times ``1 + len(mirror_axes)`` passes): MONAI's
        windows, plus those computed again at the borders of strips.
    strips
        Strips the volume was swept in (x-ranges, each maybe cut into y-ranges; 1: the whole cross-section at once).
    """

    labels: torch.Tensor
    probabilities: np.ndarray | None = None
    buffer_channels: int = 0
    peak_buffer_voxels: int = 0
    num_windows: int = 0
    strips: int = 1


def slab_sliding_window(
    inputs: torch.Tensor,
    roi_size: Sequence[int],
    network: Callable[[torch.Tensor], torch.Tensor] | Sequence[Callable[[torch.Tensor], torch.Tensor]],
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
    regions: Sequence[Region] = (),
    grid: str = "monai",
    members: int = 1,
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
        features); called under ``torch.inference_mode()``. A list or tuple of networks: an ensemble's members
        (or their bodies), whose outputs lie side by side in that order; one window at a time (a head on the CPU)
        they run and are blended one after another, so that one member's output is alive at a time; in batches
        of windows their outputs are joined.
    num_classes
        Classes of the logits.
    overlap, sw_batch_size, sigma_scale, padding_mode, cval
        As in MONAI (``mode`` is always ``"gaussian"``); with a ``head`` on the CPU the network takes
        one window at a time whatever ``sw_batch_size`` (less memory, and faster on the CPU measured).
    probabilities_path
        When given, a ``.npy`` file of ``(num_classes, *spatial)`` float16 softmax probabilities is
        written there (as a memory map, slab by slab) and returned open in ``SlabResult.probabilities``.
    probabilities_in_memory
        Without ``probabilities_path``: float32 softmax probabilities in memory (small ``num_classes x volume``).
    device
        Where windows go through the network and the blocks live (default: the input's device);
        the label map is always on the CPU.
    progress
        Show a tqdm bar over the window batches.
    mirror_axes
        Test-time mirroring: spatial axes (0-based, ``-1`` = last). Each window's logits are the average
        of ``network(window)`` and, for every axis ``a`` given, ``flip(network(flip(window, a)), a)``, one
        flip per axis (not every combination of axes): ``1 + len(mirror_axes)`` forward passes.
    head, feature_channels
        A *pointwise affine* map ``(1, feature_channels, *block) -> (1, num_classes, *block)`` (a 1 x 1 x 1
        convolution: the last layer of DynUNet, BasicUNet, SegResNet; see
        :func:`medseg.networks.split_pointwise_head`). Then the network's features, not its logits, are
        blended, and the head runs on each finished block: the blocks have ``feature_channels`` channels
        whatever the number of classes.
    buffer_bytes
        Budget of the accumulation buffer (default on the CPU: :data:`medseg.inference.memory.DEFAULT_BUFFER_BYTES`,
        for an ensemble :data:`~medseg.inference.memory.DEFAULT_ENSEMBLE_BUFFER_BYTES`; none on other devices).
        A 3D volume whose buffer would exceed it is swept in 2 or more strips along x (and y), cut at window starts
        (:func:`medseg.inference.windows.plan_sweep`).
    regions
        A region-based network: ``num_classes`` logits are one sigmoid per region, in painting order; the label
        map is painted region by region (:func:`medseg.transforms.regions.regions_to_label_map` of the
        blended logits' sigmoid) and the probabilities are the sigmoids. Empty: softmax classes.
    grid
        ``"monai"`` (MONAI's windows and Gaussian, as above) or ``"nnunet"``: nnU-Net v2's window starts
        (:func:`medseg.inference.windows.nnunet_starts`) and Gaussian (:func:`medseg.inference.merger.nnunet_importance`),
        for models imported from nnU-Net.
    members
        An ensemble of ``members`` models whose ``network`` returns their logits side by side (``members x
        num_classes`` channels, member by member; with ``head``: their features, and a head to all their
        logits): every member's logits are blended as one model's would be, and each finished block becomes
        the mean of the members' probabilities (:class:`~medseg.inference.merger.BlockReducer`). The result
        equals averaging the members' own probability maps. The buffer holds every member's channels: to keep it
        near its budget, the sweep may compute up to :data:`~medseg.inference.windows.MAX_EXTRA_WINDOWS_ENSEMBLE`
        more windows than MONAI's (narrower strips, cut along y too), which an ensemble pays ``members`` times.

    Raises
    ------
    InputError
        NaN or infinite voxels; or the estimate of :func:`medseg.inference.memory.estimate_slab_bytes`
        exceeds the memory available (the message names both in GB).
    ValueError
        Wrong shapes or arguments (``regions`` not one per logit channel), or a network output of the wrong shape.
    """
    inputs, num_classes, sw_batch_size = _checked(inputs, num_classes, sw_batch_size)
    spatial = tuple(int(s) for s in inputs.shape[2:])
    geometry = window_geometry(spatial, roi_size, overlap, grid)
    axes = _mirror_axes(mirror_axes, len(spatial))
    device = torch.device(device) if device is not None else inputs.device
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    outputs = num_classes * members  # an ensemble's logits lie side by side, member by member
    buffer_channels = _buffer_channels(head is not None, feature_channels, outputs)
    step = _window_step(head is not None, device, sw_batch_size)
    budget = buffer_bytes if buffer_bytes is not None else _default_budget(device, members)
    plan = plan_sweep(geometry.padded, geometry.window, geometry.scan, buffer_channels, budget, geometry.axis_starts,
                      MAX_EXTRA_WINDOWS if members == 1 else MAX_EXTRA_WINDOWS_ENSEMBLE)
    in_memory = probabilities_in_memory and probabilities_path is None
    need = estimate_plan_bytes(plan, spatial, num_classes, step, bool(axes),
                               probabilities_path is not None or in_memory, buffer_channels, in_memory)
    require_memory(need, device, spatial, num_classes, geometry.roi)
    _check_finite(inputs)
    windows = _WindowInputs(inputs, geometry, padding_mode, cval)
    parts = list(network) if isinstance(network, list | tuple) else None
    if parts is not None and not parts:
        raise ValueError("an empty list of networks")
    reducer = BlockReducer(spatial, num_classes, buffer_channels, head, probabilities_path, in_memory, regions,
                           members)
    with torch.inference_mode():
        merger = GaussianBlockMerger(plan, geometry, reducer, sigma_scale, device, importance=grid)
        for group in _batches(merger.strips, step, progress):
            batch = windows.batch(group, device)
            if parts is not None and len(group) == 1:  # member by member: one member's output at a time
                first = 0
                for part in parts:
                    out = _forward(part, batch, None, geometry.window, axes)
                    if out.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr():
                        out = out.clone()  # weighted in place: the next member needs the window as it was
                    merger.add(out, group[0], first)
                    first += out.shape[1]
                    del out
                merger.finish(group[0])
                continue
            if parts is not None:
                out = torch.cat([_forward(part, batch, None, geometry.window, axes) for part in parts], dim=1)
                _check_channels(out, buffer_channels)
            else:
                out = _forward(network, batch, buffer_channels, geometry.window, axes)  # type: ignore[arg-type]
            for i, start in enumerate(group):
                merger.aggregate(out[i : i + 1], start)
            del out  # before the next batch goes through the network
        labels, probs = merger.finalize()
    return SlabResult(labels=labels, probabilities=probs, buffer_channels=buffer_channels,
                      peak_buffer_voxels=plan.arena_voxels, num_windows=plan.num_windows, strips=len(merger.strips))


def _default_budget(device: torch.device, members: int) -> int | None:
    """The buffer budget on ``device``: none off the CPU; one model's, or an ensemble's (larger: fewer strips)."""
    if device.type != "cpu":
        return None
    return DEFAULT_BUFFER_BYTES if members == 1 else DEFAULT_ENSEMBLE_BUFFER_BYTES


def _buffer_channels(head: bool, feature_channels: int | None, num_classes: int) -> int:
    """Channels of the accumulation buffer: the network's features with a head, else the classes.

    Raises
    ------
    ValueError
        A head without ``feature_channels``.
    """
    if head and not feature_channels:
        raise ValueError("a head needs feature_channels (the channels the network returns)")
    return int(feature_channels) if head and feature_channels else num_classes


def _window_step(head: bool, device: torch.device, sw_batch_size: int) -> int:
    """Windows per forward pass: with a head on the CPU the body takes one window at a time, else
    ``sw_batch_size``.

    The head path exists for memory that does not grow, and a batch of windows multiplies the network's
    own activations (measured with DynUNet(8..64), 96x96x64 windows, 2 threads: 0.20 GB and 0.20 s per
    window alone, 0.34 GB and 0.27 s per window in pairs). On a GPU the window batch is kept: there it
    buys throughput.
    """
    return 1 if head and device.type == "cpu" else sw_batch_size


def _checked(inputs: torch.Tensor, num_classes: int, sw_batch_size: int) -> tuple[torch.Tensor, int, int]:
    """``(inputs as a plain tensor, num_classes, sw_batch_size)``, checked.

    Raises
    ------
    TypeError
        ``inputs`` is not a tensor.
    ValueError
        ``inputs`` not ``(1, C_in, *spatial)`` with 2 or 3 spatial axes; ``num_classes`` or ``sw_batch_size``
        below 1.
    InputError
        An empty image (a spatial axis of length 0).
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
    if min(spatial) < 1:
        raise InputError(None, f"the image is empty (spatial shape {spatial})")
    return inputs, num_classes, sw_batch_size


def _mirror_axes(mirror_axes: Sequence[int], nd: int) -> list[int]:
    """The distinct mirror axes as ``0 .. nd - 1``.

    Raises
    ------
    ValueError
        An axis outside ``-nd .. nd - 1``.
    """
    axes: list[int] = []
    for a in mirror_axes:
        a = int(a)
        if not -nd <= a < nd:
            raise ValueError(f"mirror axis {a} out of range for {nd} spatial axes")
        if a % nd not in axes:
            axes.append(a % nd)
    return axes


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


class _WindowInputs:
    """The input under each window, padded one window at a time where the volume is smaller than the roi.

    Raises
    ------
    ValueError
        An unknown ``padding_mode``.
    """

    def __init__(self, inputs: torch.Tensor, geometry: WindowGeometry, padding_mode: PytorchPadMode | str,
                 cval: float) -> None:
        self.inputs, self.window = inputs, geometry.window
        spatial = tuple(int(s) for s in inputs.shape[2:])
        self.pad_mode = look_up_option(padding_mode, PytorchPadMode)
        self.pad_lo = geometry.pad_lo
        self.pad_hi = tuple(p - s - lo for p, s, lo in zip(geometry.padded, spatial, geometry.pad_lo))
        self.needs_pad = any(self.pad_lo) or any(self.pad_hi)
        # F.pad lists the last axis first
        self.pad_arg = [v for d in reversed(range(len(spatial))) for v in (self.pad_lo[d], self.pad_hi[d])]
        # torch refuses a value for the other modes (MONAI passes cval regardless, and fails if it is not 0)
        self.value = cval if self.pad_mode == "constant" else None
        #: the dtype of the windows that reach the network
        self.dtype = inputs.dtype if inputs.is_floating_point() else torch.float32

    def __call__(self, start: tuple[int, ...]) -> torch.Tensor:
        """``(1, C_in, *window)``: the window starting at ``start`` in the padded volume."""
        window = self.window
        if not self.needs_pad:
            return self.inputs[(slice(None), slice(None), *(slice(s, s + w) for s, w in zip(start, window)))]
        # padded axes: the window covers the whole padded extent (the roi), so pad just this window
        sl = []
        for d in range(len(window)):
            if self.pad_lo[d] or self.pad_hi[d]:
                sl.append(slice(None))
            else:
                sl.append(slice(start[d], start[d] + window[d]))
        return F.pad(self.inputs[(slice(None), slice(None), *sl)], self.pad_arg, mode=self.pad_mode, value=self.value)

    def batch(self, starts: Sequence[tuple[int, ...]], device: torch.device) -> torch.Tensor:
        """``(len(starts), C_in, *window)``: the windows starting at ``starts``, on ``device`` in :attr:`dtype`."""
        return torch.cat([self(s) for s in starts]).to(device=device, dtype=self.dtype)


def _batches(strips: list[Strip], step: int, progress: bool) -> Iterator[list[tuple[int, ...]]]:
    """The window starts of each strip in turn, ``step`` at a time (the last of a strip may have fewer),
    with a tqdm bar over them when ``progress`` (and tqdm is installed)."""
    bar = None
    if progress:
        tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
        if has_tqdm:
            bar = tqdm(total=sum(math.ceil(len(s.starts) / step) for s in strips), desc="sliding window",
                       unit="window batch")
    try:
        for strip in strips:
            for b0 in range(0, len(strip.starts), step):
                yield strip.starts[b0 : b0 + step]
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()


def _logits(network: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, channels: int | None,
            window: tuple[int, ...]) -> torch.Tensor:
    """``network(batch)`` as float32.

    Raises
    ------
    ValueError
        The network returns anything but one ``(B, channels, *window)`` tensor (any channels when ``None``).
    """
    out = network(batch)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the network must return one tensor, got {type(out).__name__}")
    expected = (batch.shape[0], out.shape[1] if channels is None and out.ndim > 1 else channels, *window)
    if tuple(out.shape) != expected:
        raise ValueError(f"the network returned {tuple(out.shape)} for a {tuple(batch.shape)} batch, "
                         f"expected {expected}")
    return out.to(torch.float32)


def _check_channels(out: torch.Tensor, channels: int) -> None:
    """ValueError unless the members' outputs side by side have the buffer's ``channels``."""
    if out.shape[1] != channels:
        raise ValueError(f"the members returned {out.shape[1]} channels in all, expected {channels}")


def _forward(network: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, channels: int | None,
             window: tuple[int, ...], axes: Sequence[int]) -> torch.Tensor:
    """:func:`_logits` of ``batch``, averaged with those of its flips along ``axes`` (flipped back).

    Raises
    ------
    ValueError
        As :func:`_logits`.
    """
    out = _logits(network, batch, channels, window)
    if axes and out.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr():
        out = out.clone()  # a network that returns (a view of) its input: keep the batch for the flips
    for a in axes:
        dim = a + 2
        out += _logits(network, torch.flip(batch, (dim,)), channels, window).flip(dim)
    if axes:
        out /= 1 + len(axes)
    return out
