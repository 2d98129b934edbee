"""The plan: everything a trained model needs to preprocess, infer and label (saved as ``plan.json``).

A plan is derived from the training data (target spacing, intensity statistics per channel, patch
size, labels or regions) and stored next to the weights, so ``medseg predict --model RUN_DIR`` needs
nothing else.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from medseg.architectures import NetworkSpec, slice_axis
from medseg.errors import BundleError, printable
from medseg.io.atomic import atomic_write_text
from medseg.labels import Region
from medseg.layout import PLAN_FILE
from medseg.plan.fields import Fields, shown
from medseg.plan.network_fields import read_network

__all__ = ["CONFIGURATIONS", "PLAN_FORMAT", "PREVIOUS_STAGES", "Channel", "Intensity", "Plan", "checked_network", "load_plan"]

PLAN_FORMAT = "medseg-plan/1"
#: Sigma of the windows' Gaussian along a slice axis, in windows: flat (exp(-x^2 / 2 sigma^2) is 1 in float32).
FLAT_SIGMA_SCALE = 1.0e6
#: The configurations a plan can be (nnU-Net's names; "custom": set by hand or planned before the planner).
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres", "custom")
#: The configurations whose label map a cascade stage takes as an input (``Plan.previous_stage``).
PREVIOUS_STAGES = ("3d_lowres",)


@dataclass
class Intensity:
    """Intensity normalisation of one channel: CT clips to [a_min, a_max] HU and z-scores with the
    foreground mean/std; MR z-scores each image on its non-zero voxels."""

    preset: str  # "ct" | "mr"
    a_min: float | None = None
    a_max: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass
class Channel:
    """One input channel (an nnU-Net ``channel_names`` entry, e.g. ``T1``, ``FLAIR``) and its normalisation."""

    name: str
    intensity: Intensity


@dataclass
class Plan:
    """Preprocessing, network and inference settings of one model.

    ``channels`` lists the input channels when there are several (empty: one channel named by
    ``modality`` and normalised by ``intensity``; when given, ``intensity`` is the first channel's).
    ``previous_stage`` (nnU-Net's ``3d_cascade_fullres``): the configuration whose label map of the same image
    is an input of this one (``"3d_lowres"``), else None.
    ``regions`` (empty: softmax over ``labels``) makes the network predict one sigmoid output per
    region, painted into the label map in order. ``ignore_label`` is a value of the training label
    maps left out of loss and metrics. ``configuration``, ``batch_size`` and ``planning`` record what
    the planner chose and why.
    """

    dims: int
    modality: str
    labels: dict[int, str]
    target_spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    intensity: Intensity
    network: NetworkSpec = field(default_factory=NetworkSpec)
    overlap: float = 0.5
    sw_batch_size: int = 2
    format: str = PLAN_FORMAT
    channels: tuple[Channel, ...] = ()
    regions: tuple[Region, ...] = ()
    ignore_label: int | None = None
    configuration: str = "custom"
    batch_size: int = 2
    planning: dict[str, Any] = field(default_factory=dict)
    previous_stage: str | None = None

    @property
    def num_classes(self) -> int:
        """Label-map values 0..max: the classes of a softmax network, the values a label map may hold."""
        return max(self.labels) + 1

    @property
    def planned(self) -> bool:
        """Made by the planner (``configuration`` not ``"custom"``): trained with the planned recipe."""
        return self.configuration != "custom"

    @property
    def num_outputs(self) -> int:
        """Output channels of the network: one per region, else one per class (background included)."""
        return len(self.regions) if self.regions else self.num_classes

    @property
    def input_channels(self) -> tuple[Channel, ...]:
        """The input channels in order, never empty."""
        return self.channels or (Channel(self.modality, self.intensity),)

    @property
    def num_channels(self) -> int:
        return len(self.input_channels)

    @property
    def network_inputs(self) -> int:
        """Input channels of the network: the image channels, and for a cascade stage (:attr:`previous_stage`) one
        more per foreground class (the previous stage's label map, one-hot: :class:`~medseg.networks.PreviousStageInput`)."""
        return self.num_channels + (self.num_classes - 1 if self.previous_stage else 0)

    @property
    def slice_axis(self) -> int | None:
        """The axis of a 3D plan whose patch is one voxel thick (the ``2d`` configuration of 3D data: the
        network sees one slice at a time), else None."""
        return slice_axis(self.patch_size) if self.dims == 3 else None

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        """The axes the network convolves (all but the slice axis): test-time mirroring flips these."""
        return tuple(axis for axis in range(self.dims) if axis != self.slice_axis)

    def in_plane(self) -> Plan:
        """The 2D plan of the two convolved axes of a plan over slices (:attr:`slice_axis`): their spacing and patch,
        the network without the slice axis' kernels and strides; any other plan itself."""
        flat = self.slice_axis
        if flat is None:
            return self
        axes = self.spatial_axes
        return replace(self, dims=2, target_spacing=tuple(self.target_spacing[a] for a in axes),
                       patch_size=tuple(self.patch_size[a] for a in axes), network=self.network.without_axis(flat))

    @property
    def window_size(self) -> tuple[int, ...]:
        """The sliding window of inference and validation: the patch; for a network over slices, as many slices
        as a training batch holds (the network sees each slice alone, so a thick window only batches them)."""
        flat = self.slice_axis
        if flat is None:
            return self.patch_size
        return tuple(max(1, self.batch_size) if axis == flat else n for axis, n in enumerate(self.patch_size))

    def window_overlap(self, overlap: float) -> float | tuple[float, ...]:
        """The windows' overlap per axis: ``overlap``, except none along a slice axis (every window predicts
        its slices alone, so overlapping them along it would predict the same slices twice)."""
        flat = self.slice_axis
        if flat is None:
            return overlap
        return tuple(0.0 if axis == flat else float(overlap) for axis in range(self.dims))

    def window_sigma_scale(self, sigma_scale: float = 0.125) -> float | tuple[float, ...]:
        """The Gaussian importance of the windows per axis (sigma / window): ``sigma_scale``, except flat along a
        slice axis (:data:`FLAT_SIGMA_SCALE`), so that a thick window weighs each slice's prediction as a window of
        one slice would (a Gaussian there, clamped at its tails, would change the in-plane blending)."""
        flat = self.slice_axis
        if flat is None:
            return sigma_scale
        return tuple(FLAT_SIGMA_SCALE if axis == flat else float(sigma_scale) for axis in range(self.dims))

    @property
    def axcodes(self) -> str:
        return "RAS"[: self.dims]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = {str(k): v for k, v in self.labels.items()}
        data["network"] = self.network.to_json()
        data["channels"] = [{"name": c.name, "intensity": asdict(c.intensity)} for c in self.channels]
        data["regions"] = [r.to_json() for r in self.regions]
        if self.previous_stage is None:  # plans of one stage are written as before cascades existed
            del data["previous_stage"]
        return data

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        """A plan from its JSON form, every field checked for its type and range.

        Raises
        ------
        ValueError
            Naming the first bad field: not a JSON object, an unknown format, a missing or unknown
            field, or a value of the wrong type or range (e.g. ``target_spacing: "abc"``, a patch size
            given as strings, labels that are not a mapping of integers to names, a region of label
            values that are not declared), a network field of another architecture, a patch the
            network cannot take (see :func:`checked_network`).
        """
        fields = Fields(data, "plan")
        plan_format = fields.get("format", str)
        if plan_format != PLAN_FORMAT:
            raise ValueError(f"unknown plan format {plan_format!r}, expected {PLAN_FORMAT!r}")
        dims = fields.get("dims", int, lambda v: v in (2, 3), "2 or 3")
        labels = _labels(fields.get("labels", dict))
        plan = cls(
            dims=dims,
            modality=fields.get("modality", str, bool, "a non-empty string"),
            labels=labels,
            target_spacing=fields.numbers("target_spacing", dims, float, lambda v: math.isfinite(v) and v > 0,
                                          "positive numbers"),
            patch_size=fields.numbers("patch_size", dims, int, lambda v: v >= 1, "positive integers"),
            intensity=_intensity(Fields(fields.get("intensity", dict), "intensity")),
            network=read_network(Fields(fields.get("network", dict, default={}), "network"), dims),
            overlap=fields.get("overlap", float, lambda v: 0 <= v < 1, "a number in [0, 1)", default=0.5),
            sw_batch_size=fields.get("sw_batch_size", int, lambda v: v >= 1, "an integer >= 1", default=2),
            channels=_channels(fields.get("channels", list, default=[])),
            regions=_regions(fields.get("regions", list, default=[]), labels),
            ignore_label=fields.get("ignore_label", object, lambda v: v is None or _label_value(v),
                                    "null or a label value (0..65535)", default=None),
            configuration=fields.get("configuration", str, lambda v: v in CONFIGURATIONS,
                                     " or ".join(f'"{c}"' for c in CONFIGURATIONS), default="custom"),
            batch_size=fields.get("batch_size", int, lambda v: v >= 1, "an integer >= 1", default=2),
            planning=fields.get("planning", dict, default={}),
            previous_stage=fields.get("previous_stage", object, lambda v: v is None or v in PREVIOUS_STAGES,
                                      "null or " + " or ".join(f'"{c}"' for c in PREVIOUS_STAGES), default=None),
        )
        fields.done()
        _check_together(plan)
        plan.network = checked_network(plan.network, plan.patch_size, plan.target_spacing)
        return plan

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Load ``plan.json``.

        Raises
        ------
        BundleError
            If the file is missing, not JSON (or not UTF-8), or not a valid plan: the message names the
            file and the field (see :meth:`from_json`).
        """
        path = Path(path)
        if not path.exists():
            raise BundleError(f"{printable(path)}: no such file; is this a medseg run folder (medseg train --out)?")
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"{printable(path)}: not a valid medseg plan: {exc}") from None


def load_plan(bundle_root: str | os.PathLike[str]) -> Plan:
    """The plan of a bundle or run folder, ``bundle_root/configs/plan.json``.

    Raises
    ------
    BundleError
        Missing folder or plan, or an invalid plan.
    """
    root = Path(bundle_root)
    if not root.is_dir():
        raise BundleError(f"{printable(root)}: no such bundle or run folder (expected the --out folder of medseg train)")
    return Plan.load(root / PLAN_FILE)


def _label_value(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535


def _labels(data: dict[str, Any]) -> dict[int, str]:
    labels: dict[int, str] = {}
    for key, name in data.items():
        try:
            number = int(key)
        except ValueError:
            number = -1
        if number < 0 or str(number) != key.strip():
            raise ValueError(f"field 'labels' must map label values (0, 1, ...) to names, got the key {shown(key)}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"field 'labels' must map label values to names, got {shown(name)} for {key}")
        labels[number] = name
    if 0 not in labels:
        raise ValueError("field 'labels' must name label 0 (the background)")
    return labels


def _intensity(fields: Fields) -> Intensity:
    preset = fields.get("preset", str, lambda v: v in ("ct", "mr"), '"ct" or "mr"')
    values = {key: fields.optional_number(key) for key in ("a_min", "a_max", "mean", "std")}
    fields.done()
    if preset == "ct":
        missing = [key for key, value in values.items() if value is None]
        if missing:
            raise ValueError(f"field '{fields.where}.{missing[0]}' must be a number for the CT preset")
        a_min, a_max, std = values["a_min"], values["a_max"], values["std"]
        assert a_min is not None and a_max is not None and std is not None, "missing values are refused above"
        if a_min >= a_max:
            raise ValueError(f"field '{fields.where}.a_min' ({a_min}) must be below '{fields.where}.a_max' ({a_max})")
        if std <= 0:
            raise ValueError(f"field '{fields.where}.std' must be positive, got {std}")
    return Intensity(preset, **values)



def _channels(items: list[Any]) -> tuple[Channel, ...]:
    channels = []
    for number, item in enumerate(items):
        fields = Fields(item, f"channels[{number}]")
        name = fields.get("name", str, bool, "a non-empty string")
        channels.append(Channel(name, _intensity(Fields(fields.get("intensity", dict), f"channels[{number}].intensity"))))
        fields.done()
    return tuple(channels)


def _regions(items: list[Any], labels: dict[int, str]) -> tuple[Region, ...]:
    regions = []
    for number, item in enumerate(items):
        where = f"regions[{number}]"
        fields = Fields(item, where)
        name = fields.get("name", str, bool, "a non-empty string")
        values = fields.numbers("labels", None, int, lambda v: v >= 1, "label values >= 1")
        value = fields.get("value", int, lambda v: v in labels and v != 0, "a non-zero value of 'labels'")
        fields.done()
        regions.append(Region(name, tuple(values), value))
    return tuple(regions)


def _check_together(plan: Plan) -> None:
    """Fields that only make sense together: channels and intensity, regions and labels, the ignore label, the
    previous stage and the cascade configuration."""
    if plan.channels and plan.channels[0].intensity != plan.intensity:
        raise ValueError("field 'intensity' must be the first channel's ('channels[0].intensity')")
    if plan.regions and sorted(r.value for r in plan.regions) != sorted(set(plan.labels) - {0}):
        raise ValueError(f"field 'regions' must paint each non-zero value of 'labels' once "
                         f"({sorted(set(plan.labels) - {0})}), got values {[r.value for r in plan.regions]}")
    if (plan.previous_stage is not None) != (plan.configuration == "3d_cascade_fullres"):
        raise ValueError("field 'previous_stage' must be given exactly for the configuration \"3d_cascade_fullres\" "
                         f"(configuration {plan.configuration!r}, previous_stage {plan.previous_stage!r})")
    if plan.ignore_label is not None and plan.ignore_label in plan.labels:
        raise ValueError(f"field 'ignore_label' ({plan.ignore_label}) must not be a value of 'labels'")


def checked_network(spec: NetworkSpec, patch_size: Sequence[int], spacing: Sequence[float]) -> NetworkSpec:
    """``spec`` planned for the patch (a DynUNet's missing topology, see :meth:`NetworkSpec.planned`) and
    checked, with the patch, against the architecture's rules.

    Raises
    ------
    ValueError
        Naming the field: fields that do not fit together, a patch too small for a DynUNet, or a patch
        that is not a multiple of what the network needs along each axis (:meth:`NetworkSpec.patch_divisors`).
    """
    spec = spec.planned(patch_size, spacing)
    spec.check(len(patch_size))
    spec.check_patch(patch_size)
    return spec

