"""A dataset as medseg reads it: cases (one file per input channel, a label map) and what the dataset
declares (labels or regions, an ignore label, channel names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.data.channels import channel_preset
from medseg.labels import Region

__all__ = ["Case", "Datalist"]


@dataclass
class Case:
    """One case of a dataset: its image files and (for training, or test with references) its label map.

    ``image`` is the first channel; ``channels`` lists every channel file in channel order when the
    dataset has several (empty for one channel).
    """

    name: str
    image: Path
    label: Path | None = None
    channels: tuple[Path, ...] = ()

    @property
    def images(self) -> tuple[Path, ...]:
        """Every channel file in channel order (one for a one-channel dataset)."""
        return self.channels or (self.image,)


@dataclass
class Datalist:
    """A parsed dataset: labels, channels and the training / test cases with absolute paths.

    ``labels`` are the values of the label maps a model outputs (for a region-based dataset: 0 and the
    value each region is painted with, named by the region); ``regions`` (painting order) is empty for
    plain labels; ``ignore_label`` is a training label-map value excluded from loss and metrics.
    """

    path: Path
    name: str
    modality: str  # "CT", "MR" or the raw name of channel 0
    labels: dict[int, str]
    training: list[Case]
    test: list[Case]
    extra: dict[str, Any] = field(default_factory=dict)
    channel_names: tuple[str, ...] = ()
    regions: tuple[Region, ...] = ()
    ignore_label: int | None = None
    file_ending: str | None = None

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def foreground_labels(self) -> dict[int, str]:
        return {k: v for k, v in self.labels.items() if k != 0}

    @property
    def preset(self) -> str:
        """Intensity preset name of channel 0: ``"ct"`` for CT, ``"mr"`` for everything else."""
        return "ct" if self.modality == "CT" else "mr"

    @property
    def num_channels(self) -> int:
        return max(1, len(self.channel_names))

    @property
    def channel_presets(self) -> tuple[str, ...]:
        """The intensity preset of each channel (:func:`medseg.data.channels.channel_preset`)."""
        if not self.channel_names:
            return (self.preset,)
        return tuple(channel_preset(name) for name in self.channel_names)

    @property
    def allowed_label_values(self) -> tuple[int, ...]:
        """The values a training label map may hold: the labels (for regions: 0 and the values the regions
        unite) and the ignore label."""
        values = {0}.union(*(r.labels for r in self.regions)) if self.regions else set(self.labels)
        if self.ignore_label is not None:
            values.add(self.ignore_label)
        return tuple(sorted(values))
