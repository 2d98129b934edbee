"""The previous stage's label map in a cascade stage's data (nnU-Net's ``3d_cascade_fullres``).

The label map travels as its own key, ``"previous"``, through the spatial steps (resampled, cropped, rotated and
mirrored by nearest neighbour, as the reference label map), is perturbed in training as nnU-Net perturbs it
(:class:`PerturbPreviousd`: its model must not trust the previous stage blindly), and ends as the image's last
channel (:class:`AttachPreviousd`), one-hot inside the network
(:class:`~medseg.networks.cascade.PreviousStageInput`).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor
from scipy import ndimage

from medseg.errors import InputError

__all__ = ["PREVIOUS_KEY", "AttachPreviousd", "PerturbPreviousd", "RequirePreviousd"]

#: The data key of the previous stage's label map.
PREVIOUS_KEY = "previous"
#: nnU-Net's perturbation of the previous stage in training: a random morphological operation per class (p 0.4
#: per patch, radius 1-8 voxels) and the removal of a random connected component (p 0.2 per patch) of at most
#: 15 % of the patch.
MORPHOLOGY_PROBABILITY = 0.4
MORPHOLOGY_RADIUS = (1, 8)
COMPONENT_PROBABILITY = 0.2
COMPONENT_MAX_SHARE = 0.15


class RequirePreviousd(MapTransform):
    """Refuse a data item without the previous stage's label map (``previous_key``), naming its image: a cascade
    stage cannot run without it.

    Raises
    ------
    InputError
        From ``__call__``: no such key.
    """

    def __init__(self, image_key: str = "image", previous_key: str = PREVIOUS_KEY) -> None:
        super().__init__([image_key])
        self.image_key, self.previous_key = image_key, previous_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.previous_key not in data:
            image = data.get(self.image_key)
            raise InputError(str(image) if isinstance(image, (str, os.PathLike)) else None,
                             "a cascade stage (3d_cascade_fullres) takes the previous stage's label map of each image "
                             f"('{self.previous_key}' beside 'image'); medseg predict --model BUNDLE predicts it with "
                             "the bundle's previous/ model first")
        return dict(data)


class AttachPreviousd(MapTransform):
    """Append ``previous_key`` (a one-channel label map on the image's grid) to ``image_key`` as its last channel
    (float) and drop it; the image keeps its metadata and the record of its transforms (what the inversion undoes).

    Raises
    ------
    ValueError
        From ``__call__``: a label map of another spatial shape than the image.
    """

    def __init__(self, image_key: str = "image", previous_key: str = PREVIOUS_KEY) -> None:
        super().__init__([image_key])
        self.image_key, self.previous_key = image_key, previous_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image, previous = d[self.image_key], d.pop(self.previous_key)
        plain = convert_to_tensor(image, track_meta=False)
        labels = convert_to_tensor(previous, track_meta=False)
        if tuple(labels.shape[1:]) != tuple(plain.shape[1:]):
            raise ValueError(f"the previous stage's label map has shape {tuple(labels.shape)}, the image "
                             f"{tuple(plain.shape)}")
        joined = torch.cat([plain, labels[:1].to(plain.dtype)])
        d[self.image_key] = (MetaTensor(joined, meta=image.meta, applied_operations=image.applied_operations)
                             if isinstance(image, MetaTensor) else joined)
        return d


class PerturbPreviousd(Randomizable, MapTransform):
    """nnU-Net's perturbation of the previous stage's label map ``keys`` in a training patch: with probability
    ``morphology``, each class present (in random order) is dilated, eroded, opened or closed (one drawn per class)
    by a radius drawn from ``radius`` (voxels, as that many steps of the 6-neighbourhood: a diamond, where nnU-Net
    takes a ball; a grown class takes the voxels of others, a shrunk one leaves background); then with probability
    ``component``, each class loses one connected component drawn among those covering at most ``max_share`` of
    the patch (to background)."""

    def __init__(self, keys: Any, morphology: float = MORPHOLOGY_PROBABILITY,
                 radius: tuple[int, int] = MORPHOLOGY_RADIUS, component: float = COMPONENT_PROBABILITY,
                 max_share: float = COMPONENT_MAX_SHARE) -> None:
        MapTransform.__init__(self, keys)
        self.morphology, self.radius, self.component, self.max_share = morphology, radius, component, max_share

    def randomize(self, data: Any = None) -> None:
        pass  # the draws depend on the classes present (made in __call__)

    def _morphology(self, labels: np.ndarray) -> np.ndarray:
        out = labels.copy()
        classes = [int(c) for c in np.unique(labels) if c != 0]
        for value in self.R.permutation(classes):
            mask = out == value
            radius = int(self.R.randint(self.radius[0], self.radius[1] + 1))
            operation = (ndimage.binary_dilation, ndimage.binary_erosion, ndimage.binary_opening,
                         ndimage.binary_closing)[self.R.randint(4)]
            changed = operation(mask, structure=ndimage.generate_binary_structure(labels.ndim, 1), iterations=radius)
            out[mask & ~changed] = 0
            out[changed & ~mask] = value
        return out

    def _components(self, labels: np.ndarray) -> np.ndarray:
        out = labels.copy()
        for value in [int(c) for c in np.unique(labels) if c != 0]:
            parts, count = ndimage.label(out == value)
            if not count:
                continue
            sizes = np.bincount(parts.ravel())[1:]
            small = np.flatnonzero(sizes <= self.max_share * labels.size) + 1
            if len(small):
                out[parts == int(small[self.R.randint(len(small))])] = 0
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = convert_to_tensor(d[key], track_meta=False)
            labels = value[0].cpu().numpy()
            changed = False
            if self.R.rand() < self.morphology:
                labels, changed = self._morphology(labels), True
            if self.R.rand() < self.component:
                labels, changed = self._components(labels), True
            if changed:
                d[key] = torch.as_tensor(labels, dtype=value.dtype)[None]
        return d

