"""The sliding-window inferer of ``medseg predict`` and of the bundles' ``inference.json``.

:class:`SlabInferer` is a MONAI :class:`~monai.inferers.Inferer` (so ``SupervisedEvaluator`` and
``monai.bundle run`` use it like MONAI's ``SlidingWindowInferer``) around
:func:`medseg.inference.sliding.slab_sliding_window`: Gaussian blending, streamed in slabs, with
features instead of logits blended when the network ends in a pointwise head (memory independent of
the class count), optional test-time mirroring, and on the CPU the network's convolutions run by
oneDNN, thin ones in channels-last (:func:`medseg.inference.accelerate.inference_network`), with freed
activations kept in the heap between windows (:func:`medseg.inference.accelerate.retained_heap`).

It returns one of

* ``"probabilities"``: softmax probabilities ``(1, C, *spatial)`` float32 in memory;
* ``"disk"``: the same probabilities in float16, in a memory-mapped file on disk (``TMPDIR``; the file is
  unlinked at once, so nothing is left behind even after a crash): a ``(1, C, *spatial)`` float16 tensor
  whose pages are read only when used;
* ``"labels"``: the label map ``(1, 1, *spatial)``, uint8 up to 256 classes (then int16, int32);
* ``"auto"`` (the default): ``"probabilities"`` when ``C`` x the larger of the input's native grid and the
  processed grid fits in ``max_probability_bytes`` (1 GB), else ``"disk"``.

:class:`InvertPredictiond` undoes the preprocessing for each: in-memory probabilities are resampled
linearly (all classes at once) and reduced to labels (argmax); float16 probabilities on disk the same
way but one class at a time with a running maximum, so that memory holds two native-grid float32 maps
instead of ``C`` (the label maps agree: linear resampling treats channels independently); a label map is
resampled with nearest neighbour (about 1-2 Dice points worse on the phantoms, which is why ``"auto"``
never picks it).

A region-based model (``regions``: one sigmoid output per region, nnU-Net's region training) is the same
with sigmoid for softmax and painting for argmax: the probabilities are the sigmoids of the blended
logits, one channel per region, and the label map paints each region's value where its (resampled)
probability exceeds 0.5, in the regions' order (:func:`medseg.transforms.regions.regions_to_label_map`).
Test-time mirroring averages the logits of the mirrored passes, as for softmax models (and as nnU-Net
does for both); the blending is linear in them, so a pointwise head still runs on blended features.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import AsDiscreted, Compose, Invertd, MapTransform

from medseg.errors import InputError
from medseg.inference.accelerate import inference_network, retained_heap
from medseg.inference.sliding import slab_sliding_window
from medseg.inference.windows import GRIDS
from medseg.labels import Region
from medseg.networks import split_pointwise_head
from medseg.networks.ensemble import ModelEnsemble
from medseg.transforms.regions import RegionsToLabelMapd

__all__ = ["DEFAULT_MAX_PROBABILITY_BYTES", "InvertPredictiond", "SlabInferer", "label_map_by_class"]

DEFAULT_MAX_PROBABILITY_BYTES = 1024**3
OUTPUTS = ("auto", "probabilities", "disk", "labels")
PRECISIONS = ("float32", "bfloat16")


class SlabInferer(Inferer):
    """Bounded-memory Gaussian sliding-window inference (see the module docstring).

    Parameters
    ----------
    roi_size
        Window size (the plan's patch size).
    num_classes
        Output channels of the network: the classes it predicts (background included), or its regions.
    overlap, sw_batch_size, sigma_scale
        As in MONAI's ``SlidingWindowInferer`` (overlap and sigma_scale: one value, or one per axis).
    mirror_axes
        Test-time mirroring along these spatial axes (``()``: off); ``1 + len(mirror_axes)`` passes.
    output
        ``"auto"``, ``"probabilities"``, ``"disk"`` or ``"labels"`` (see the module docstring).
    progress
        tqdm bar over the window batches.
    accelerate
        On the CPU, run the 3D convolutions through oneDNN, thin ones in channels-last, and keep freed
        activations in glibc's heap during the call (:mod:`medseg.inference.accelerate`; same arithmetic;
        off: the network and the allocator as given).
    precision
        ``"float32"`` or ``"bfloat16"``: the network's forward pass under ``torch.autocast`` in bfloat16
        (about twice as fast on CPUs with AVX-512 BF16 and on GPUs); blending, head and softmax stay
        float32. Not bit-compatible with float32: check the agreement on your model first.
    buffer_bytes
        Budget of the blending buffer, above which a 3D volume is swept in x-strips (default: 96 MiB on
        the CPU, 220 MiB for an ensemble, none on a GPU); see :func:`medseg.inference.sliding.slab_sliding_window`.
    regions
        The regions of a region-based network, one per output channel in painting order (see the module
        docstring); empty: softmax classes.
    grid
        ``"monai"``, or ``"nnunet"``: nnU-Net v2's windows and Gaussian (models imported from nnU-Net).
    members
        An ensemble of this many models (:class:`medseg.networks.ensemble.ModelEnsemble`: their logits side by
        side): each blended as one model's, their probabilities averaged block by block
        (:func:`medseg.inference.sliding.slab_sliding_window`); 1: one model.

    Raises
    ------
    ValueError
        For an overlap outside [0, 1), a batch size below 1, an unknown ``output``, ``precision`` or ``grid``,
        or ``regions`` that are not one per output channel.
    """

    def __init__(self, roi_size: Sequence[int], num_classes: int, overlap: Sequence[float] | float = 0.5,
                 sw_batch_size: int = 2,
                 mirror_axes: Sequence[int] = (), output: str = "auto",
                 max_probability_bytes: int = DEFAULT_MAX_PROBABILITY_BYTES, progress: bool = False,
                 accelerate: bool = True, precision: str = "float32", buffer_bytes: int | None = None,
                 regions: Sequence[Region] = (), grid: str = "monai", members: int = 1,
                 sigma_scale: Sequence[float] | float = 0.125) -> None:
        super().__init__()
        if int(members) < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        self.members = int(members)
        overlaps = [float(o) for o in overlap] if isinstance(overlap, Sequence) else [float(overlap)]
        if not all(0.0 <= o < 1.0 for o in overlaps) or (isinstance(overlap, Sequence) and len(overlaps) != len(roi_size)):
            raise ValueError(f"overlap must be in [0, 1) (one value, or one per axis of the window), got {overlap}")
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.roi_size = tuple(int(r) for r in roi_size)
        self.num_classes = int(num_classes)
        self.overlap: tuple[float, ...] | float = tuple(overlaps) if isinstance(overlap, Sequence) else overlaps[0]
        self.sw_batch_size = int(sw_batch_size)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.output = output
        self.max_probability_bytes = int(max_probability_bytes)
        self.progress = progress
        self.accelerate = accelerate
        self.precision = precision
        self.buffer_bytes = None if buffer_bytes is None else int(buffer_bytes)
        self.sigma_scale: tuple[float, ...] | float = (tuple(float(s) for s in sigma_scale)
                                                       if isinstance(sigma_scale, Sequence) else float(sigma_scale))
        self.regions = tuple(regions)
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
        self.grid = grid
        if self.regions and len(self.regions) != self.num_classes:
            raise ValueError(f"{len(self.regions)} regions for {self.num_classes} output channels")

    def _prepare(self, network: Callable[..., torch.Tensor],
                 device: torch.device) -> tuple[list[Callable[..., torch.Tensor]], Any, int | None]:
        """(the networks whose outputs are blended side by side, head, feature channels) for ``network``: one,
        or an ensemble's members (or their bodies) one by one; made anew on every call (a few shallow copies),
        so that a network trained between calls is never seen with stale weights."""
        body, head, features = network, None, None
        if not isinstance(network, torch.nn.Module):
            return [network], None, None
        split = split_pointwise_head(network)
        if split is not None and split[2] < self.num_classes * self.members:  # blend the fewer channels
            body, head, features = split
        parts: list[Callable[..., torch.Tensor]] = list(body.members) if isinstance(body, ModelEnsemble) else [body]
        if self.accelerate and device.type == "cpu":
            parts = [inference_network(part) if isinstance(part, torch.nn.Module) else part for part in parts]
        return parts, head, features

    def resolve_output(self, inputs: torch.Tensor) -> str:
        """What this call returns for this (processed) input: ``output``, with ``"auto"`` resolved."""
        if self.output != "auto":
            return self.output
        spatial = tuple(int(s) for s in inputs.shape[2:])
        voxels = math.prod(spatial)
        native = inputs.meta.get("spatial_shape") if isinstance(inputs, MetaTensor) else None
        if native is not None:
            shape = np.asarray(native).reshape(-1)[-len(spatial):]
            voxels = max(voxels, int(np.prod(shape)))
        return "probabilities" if self.num_classes * voxels * 4 <= self.max_probability_bytes else "disk"

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        """``inputs`` ``(1, C_in, *spatial)`` -> probabilities ``(1, C, *spatial)`` (softmax, or sigmoid per region)
        or labels ``(1, 1, *spatial)``
        (a MetaTensor with the input's metadata when the input is one).

        Raises
        ------
        medseg.errors.InputError
            NaN/Inf voxels, or a slab buffer larger than the memory available.
        ValueError
            A batch of more than one image, or a network output of the wrong shape.
        """
        if inputs.shape[0] != 1:
            raise ValueError(f"SlabInferer takes one image at a time, got a batch of {inputs.shape[0]}")
        parts, head, features = self._prepare(network, inputs.device)
        kwargs_net = dict(kwargs)

        def forward_of(body: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
            def forward(x: torch.Tensor) -> torch.Tensor:
                if self.precision == "bfloat16":
                    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                        return body(x, *args, **kwargs_net)
                return body(x, *args, **kwargs_net)
            return forward

        forwards = [forward_of(part) for part in parts]
        net: Any = forwards if len(forwards) > 1 else forwards[0]
        common = dict(roi_size=self.roi_size, network=net, num_classes=self.num_classes, overlap=self.overlap,
                      sw_batch_size=self.sw_batch_size, mirror_axes=self.mirror_axes, progress=self.progress,
                      head=head, feature_channels=features, buffer_bytes=self.buffer_bytes, regions=self.regions,
                      grid=self.grid, members=self.members, sigma_scale=self.sigma_scale)
        output = self.resolve_output(inputs)
        with retained_heap() if self.accelerate and inputs.device.type == "cpu" else contextlib.nullcontext():
            out = self._infer(inputs, output, common)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta)
        return out

    @staticmethod
    def _infer(inputs: torch.Tensor, output: str, common: dict[str, Any]) -> torch.Tensor:
        if output == "probabilities":
            result = slab_sliding_window(inputs, probabilities_in_memory=True, **common)
            out = torch.from_numpy(result.probabilities)[None].to(inputs.device)
        elif output == "disk":
            out = torch.from_numpy(_disk_probabilities(inputs, common))[None]  # stays on the CPU, on disk
        else:
            out = slab_sliding_window(inputs, **common).labels[None, None].to(inputs.device)
        return out


def _disk_probabilities(inputs: torch.Tensor, common: dict[str, Any]) -> np.ndarray:
    """Float16 probabilities in an unlinked memory-mapped file in ``TMPDIR``.

    Raises
    ------
    medseg.errors.InputError
        When ``TMPDIR`` has not the room for them (the message names the GB needed and the folder).
    """
    folder = tempfile.gettempdir()
    need = common["num_classes"] * math.prod(int(s) for s in inputs.shape[2:]) * 2
    free = shutil.disk_usage(folder).free
    if need * 1.05 + (64 << 20) > free:
        raise InputError(None, f"the {common['num_classes']}-class probabilities of this image need "
                               f"{need / 1024**3:.1f} GB of temporary disk in {folder}, only {free / 1024**3:.1f} GB "
                               "free; point TMPDIR at a larger disk")
    fd, path = tempfile.mkstemp(prefix="medseg-probs-", suffix=".npy")
    os.close(fd)
    try:
        result = slab_sliding_window(inputs, probabilities_path=path, **common)
    finally:
        os.unlink(path)  # the mapping keeps the data until it is released
    return result.probabilities


class InvertPredictiond(MapTransform):
    """Undo the preprocessing on a :class:`SlabInferer` prediction (see the module docstring):
    float32 probabilities are resampled linearly and reduced to labels (argmax; with ``regions``, the
    sigmoid probabilities painted region by region), float16 probabilities the same way one channel at
    a time, a one-channel label map with nearest neighbour."""

    def __init__(self, keys: str | Sequence[str], transform: Compose, orig_keys: str = "image",
                 regions: Sequence[Region] = ()) -> None:
        super().__init__(keys)
        self.transform = transform
        self.orig_keys = orig_keys
        self.regions = tuple(regions)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            labels = pred.shape[0] == 1
            if not labels and pred.dtype == torch.float16:
                d[key] = self._by_class(d, key)
                continue
            d = dict(self._invert(key, labels)(d))
            if not labels:
                reduce = (RegionsToLabelMapd(keys=key, regions=self.regions, sigmoid=False) if self.regions
                          else AsDiscreted(keys=key, argmax=True))
                d = dict(reduce(d))
        return d

    def _invert(self, key: Hashable, nearest: bool) -> Invertd:
        return Invertd(keys=key, transform=self.transform, orig_keys=self.orig_keys, nearest_interp=nearest,
                       to_tensor=True)

    def native_channel(self, d: Mapping[Hashable, Any], key: Hashable, channel: int) -> torch.Tensor:
        """Channel ``channel`` of the probabilities at ``key``, resampled linearly to the input's grid ``(1, *spatial)``
        float32 (one channel in memory, whatever the classes)."""
        pred = d[key]
        meta = pred.meta if isinstance(pred, MetaTensor) else {}
        one = MetaTensor(torch.as_tensor(pred[channel : channel + 1]).to(torch.float32), meta=dict(meta))
        return self._invert(key, False)({**d, key: one})[key]

    def _by_class(self, d: dict[Hashable, Any], key: Hashable) -> torch.Tensor:
        """Linear inversion and reduction one class at a time (:func:`label_map_by_class`)."""
        metas: list[Any] = []

        def channel(c: int) -> torch.Tensor:
            native = self.native_channel(d, key, c)
            if c == 0:
                metas.append(native.meta if isinstance(native, MetaTensor) else None)
            return native

        labels = label_map_by_class(int(d[key].shape[0]), channel, self.regions, torch.float32)
        return labels if metas[0] is None else MetaTensor(labels, meta=metas[0])


def label_map_by_class(num_channels: int, probability: Callable[[int], torch.Tensor], regions: Sequence[Region] = (),
                       dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The label map of ``num_channels`` probability maps made one at a time by ``probability(c)``: the argmax
    (first maximum on ties, as ``torch.argmax``), or with ``regions`` each region painted where its probability
    exceeds 0.5, in order. Only the running maximum, the label map and the channel at hand are alive.

    Raises
    ------
    ValueError
        ``num_channels`` below 1.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    best: torch.Tensor | None = None
    labels = torch.zeros(0)
    for c in range(num_channels):
        channel = probability(c)
        if c == 0:
            labels = torch.zeros(channel.shape, dtype=dtype)
        if regions:
            labels[channel > 0.5] = regions[c].value
        elif best is None:
            best = channel
        else:
            labels[channel > best] = c
            best = torch.maximum(best, channel)
        del channel  # before the next channel is made
    return labels
