"""The sliding-window inferer of ``medseg predict`` and of the bundles' ``inference.json``.

:class:`SlabInferer` is a MONAI :class:`~monai.inferers.Inferer` (so ``SupervisedEvaluator`` and
``monai.bundle run`` use it like MONAI's ``SlidingWindowInferer``) around
:func:`medseg.inference.sliding.slab_sliding_window`: Gaussian blending, streamed in slabs, with
features instead of logits blended when the network ends in a pointwise head (memory independent of
the class count), optional test-time mirroring, and on the CPU the network's thin convolutions run in
channels-last (:func:`medseg.inference.accelerate.inference_network`).

It returns either

* softmax probabilities ``(1, C, *spatial)`` float32, when ``C`` x the larger of the input's native grid
  and the processed grid fits in ``max_probability_bytes`` (then the caller can resample probabilities
  back to the native grid linearly, the better inversion); or
* the label map ``(1, 1, *spatial)`` (float32 holding integer labels), to be resampled back with nearest
  neighbour: the memory of the whole prediction is then independent of the class count.

:class:`InvertPredictiond` undoes the preprocessing for either.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import AsDiscreted, Compose, Invertd, MapTransform

from medseg.inference.accelerate import inference_network
from medseg.inference.sliding import slab_sliding_window
from medseg.networks import split_pointwise_head

__all__ = ["DEFAULT_MAX_PROBABILITY_BYTES", "InvertPredictiond", "SlabInferer"]

DEFAULT_MAX_PROBABILITY_BYTES = 1024**3
OUTPUTS = ("auto", "labels", "probabilities")


class SlabInferer(Inferer):
    """Bounded-memory Gaussian sliding-window inference (see the module docstring).

    Parameters
    ----------
    roi_size
        Window size (the plan's patch size).
    num_classes
        Classes the network predicts (background included).
    overlap, sw_batch_size
        As in MONAI's ``SlidingWindowInferer``.
    mirror_axes
        Test-time mirroring along these spatial axes (``()``: off); ``1 + len(mirror_axes)`` passes.
    output
        ``"labels"``, ``"probabilities"`` or ``"auto"`` (probabilities when they fit in
        ``max_probability_bytes``, see the module docstring).
    progress
        tqdm bar over the window batches.
    accelerate
        On the CPU, run thin convolutions in channels-last (same arithmetic; off: the network as given).

    Raises
    ------
    ValueError
        For an overlap outside [0, 1), a batch size below 1 or an unknown ``output``.
    """

    def __init__(self, roi_size: Sequence[int], num_classes: int, overlap: float = 0.5, sw_batch_size: int = 2,
                 mirror_axes: Sequence[int] = (), output: str = "auto",
                 max_probability_bytes: int = DEFAULT_MAX_PROBABILITY_BYTES, progress: bool = False,
                 accelerate: bool = True) -> None:
        super().__init__()
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.roi_size = tuple(int(r) for r in roi_size)
        self.num_classes = int(num_classes)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.output = output
        self.max_probability_bytes = int(max_probability_bytes)
        self.progress = progress
        self.accelerate = accelerate
        self._prepared: tuple[int, str, Callable, Callable | None, int | None] | None = None

    def _prepare(self, network: Callable[..., torch.Tensor], device: torch.device):
        """(body, head, feature channels) for ``network``, cached per network object and device."""
        key = (id(network), device.type)
        if self._prepared is not None and self._prepared[:2] == key:
            return self._prepared[2:]
        body, head, features = network, None, None
        if isinstance(network, torch.nn.Module):
            split = split_pointwise_head(network)
            if split is not None and split[2] < self.num_classes:  # blend whichever has fewer channels
                body, head, features = split
            if self.accelerate and device.type == "cpu":
                body = inference_network(body)
        self._prepared = (*key, body, head, features)
        return body, head, features

    def wants_probabilities(self, inputs: torch.Tensor) -> bool:
        """Whether ``output="auto"`` gives probabilities for this (processed) input."""
        if self.output != "auto":
            return self.output == "probabilities"
        spatial = tuple(int(s) for s in inputs.shape[2:])
        voxels = math.prod(spatial)
        native = getattr(inputs, "meta", {}).get("spatial_shape") if isinstance(inputs, MetaTensor) else None
        if native is not None:
            shape = np.asarray(native).reshape(-1)[-len(spatial):]
            voxels = max(voxels, int(np.prod(shape)))
        return self.num_classes * voxels * 4 <= self.max_probability_bytes

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        """``inputs`` ``(1, C_in, *spatial)`` -> probabilities ``(1, C, *spatial)`` or labels ``(1, 1, *spatial)``
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
        body, head, features = self._prepare(network, inputs.device)
        kwargs_net = dict(kwargs)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return body(x, *args, **kwargs_net)

        common = dict(roi_size=self.roi_size, network=forward, num_classes=self.num_classes, overlap=self.overlap,
                      sw_batch_size=self.sw_batch_size, mirror_axes=self.mirror_axes, progress=self.progress,
                      head=head, feature_channels=features)
        if self.wants_probabilities(inputs):
            with tempfile.TemporaryDirectory(prefix="medseg-probs-") as tmp:
                result = slab_sliding_window(inputs, probabilities_path=Path(tmp) / "p.npy", **common)
                out = torch.from_numpy(np.asarray(result.probabilities, dtype=np.float32))[None]
                del result
        else:
            out = slab_sliding_window(inputs, **common).labels.to(torch.float32)[None, None]
        out = out.to(inputs.device)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta)
        return out


class InvertPredictiond(MapTransform):
    """Undo the preprocessing on a :class:`SlabInferer` prediction: probabilities are resampled linearly
    and then reduced to labels (argmax); a one-channel label map is resampled with nearest neighbour."""

    def __init__(self, keys: str | Sequence[str], transform: Compose, orig_keys: str = "image") -> None:
        super().__init__(keys)
        self.transform = transform
        self.orig_keys = orig_keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = d[key].shape[0] == 1
            d = dict(Invertd(keys=key, transform=self.transform, orig_keys=self.orig_keys, nearest_interp=labels,
                             to_tensor=True)(d))
            if not labels:
                d = dict(AsDiscreted(keys=key, argmax=True)(d))
        return d
