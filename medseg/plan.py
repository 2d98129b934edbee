"""The plan: everything a trained model needs to preprocess, infer and label (saved as ``plan.json``).

A plan is derived from the training data (target spacing, intensity statistics, patch size) and
stored next to the weights, so ``medseg predict --model RUN_DIR`` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from nibabel.orientations import io_orientation

from medseg.architectures import ARCHITECTURES, FIELDS, NORMS, NetworkSpec
from medseg.data.datalist import Case, Datalist
from medseg.errors import BundleError, printable
from medseg.io.atomic import atomic_write_text
from medseg.io.geometry import Geometry
from medseg.io.image import read_image
from medseg.layout import PLAN_FILE

log = logging.getLogger(__name__)

PLAN_FORMAT = "medseg-plan/1"


@dataclass
class Intensity:
    """Intensity normalisation: CT clips to [a_min, a_max] HU and z-scores with the foreground
    mean/std; MR z-scores each image on its non-zero voxels."""

    preset: str  # "ct" | "mr"
    a_min: float | None = None
    a_max: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass
class Plan:
    """Preprocessing, network and inference settings of one model."""

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

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    @property
    def axcodes(self) -> str:
        return "RAS"[: self.dims]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = {str(k): v for k, v in self.labels.items()}
        data["network"] = self.network.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        """A plan from its JSON form, every field checked for its type and range.

        Raises
        ------
        ValueError
            Naming the first bad field: not a JSON object, an unknown format, a missing or unknown
            field, or a value of the wrong type or range (e.g. ``target_spacing: "abc"``, a patch size
            given as strings, labels that are not a mapping of integers to names), a network field of
            another architecture, a patch the network cannot take (see :func:`checked_network`).
        """
        fields = _Fields(data, "plan")
        plan_format = fields.get("format", str)
        if plan_format != PLAN_FORMAT:
            raise ValueError(f"unknown plan format {plan_format!r}, expected {PLAN_FORMAT!r}")
        dims = fields.get("dims", int, lambda v: v in (2, 3), "2 or 3")
        plan = cls(
            dims=dims,
            modality=fields.get("modality", str, bool, "a non-empty string"),
            labels=_labels(fields.get("labels", dict)),
            target_spacing=fields.numbers("target_spacing", dims, float, lambda v: math.isfinite(v) and v > 0,
                                          "positive numbers"),
            patch_size=fields.numbers("patch_size", dims, int, lambda v: v >= 1, "positive integers"),
            intensity=_intensity(_Fields(fields.get("intensity", dict), "intensity")),
            network=_network(_Fields(fields.get("network", dict, default={}), "network"), dims),
            overlap=fields.get("overlap", float, lambda v: 0 <= v < 1, "a number in [0, 1)", default=0.5),
            sw_batch_size=fields.get("sw_batch_size", int, lambda v: v >= 1, "an integer >= 1", default=2),
        )
        fields.done()
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


_MISSING = object()
_JSON_TYPES = {int: "an integer", float: "a number", str: "a string", dict: "a JSON object", list: "a list"}


class _Fields:
    """The fields of one JSON object of a plan, read one by one with their type and range checked;
    :meth:`done` refuses the fields nobody read (a misspelt key is an error, not a silent default)."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a JSON object, got {_shown(data)}")
        self.data, self.where = data, where
        self.read: set[str] = set()

    def _name(self, key: str) -> str:
        return key if self.where == "plan" else f"{self.where}.{key}"

    def get(self, key: str, kind: type, check: Any = None, expected: str = "", default: Any = _MISSING) -> Any:
        """``data[key]`` as ``kind`` (bool is never a number; an int is a float), checked by ``check``."""
        self.read.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise ValueError(f"field {self._name(key)!r} is missing")
            return default
        value = _as(self.data[key], kind)
        if (value is None and kind is not object) or (check is not None and not check(value)):
            raise ValueError(f"field {self._name(key)!r} must be {expected or _JSON_TYPES[kind]}, "
                             f"got {_shown(self.data[key])}")
        return value

    def optional_number(self, key: str) -> float | None:
        """``data[key]``: a finite number, or None when it is null or absent."""
        self.read.add(key)
        value = self.data.get(key)
        if value is None:
            return None
        number: float | None = _as(value, float)
        if number is None or not math.isfinite(number):
            raise ValueError(f"field {self._name(key)!r} must be a finite number or null, got {_shown(value)}")
        return number

    def numbers(self, key: str, count: int | None, kind: type, check: Any, expected: str) -> tuple[Any, ...]:
        """``data[key]``: a list of ``count`` (any number if None, at least one) values of ``kind``."""
        values = self.get(key, object)
        items = tuple(_as(v, kind) for v in values) if isinstance(values, (list, tuple)) else ()
        if (count is not None and len(items) != count) or not items or any(v is None or not check(v) for v in items):
            size = f"{count} " if count is not None else ""
            raise ValueError(f"field {self._name(key)!r} must be a list of {size}{expected}, got {_shown(values)}")
        return items

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise ValueError(f"unknown field {self._name(unknown[0])!r}")


def _as(value: Any, kind: type) -> Any:
    """``value`` if it is a JSON value of ``kind`` (ints count as floats; booleans are neither), else None."""
    if kind is object:
        return value
    if isinstance(value, bool):
        return None
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, kind) else None


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _labels(data: dict[str, Any]) -> dict[int, str]:
    labels: dict[int, str] = {}
    for key, name in data.items():
        try:
            number = int(key)
        except ValueError:
            number = -1
        if number < 0 or str(number) != key.strip():
            raise ValueError(f"field 'labels' must map label values (0, 1, ...) to names, got the key {_shown(key)}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"field 'labels' must map label values to names, got {_shown(name)} for {key}")
        labels[number] = name
    if 0 not in labels:
        raise ValueError("field 'labels' must name label 0 (the background)")
    return labels


def _intensity(fields: _Fields) -> Intensity:
    preset = fields.get("preset", str, lambda v: v in ("ct", "mr"), '"ct" or "mr"')
    values = {key: fields.optional_number(key) for key in ("a_min", "a_max", "mean", "std")}
    fields.done()
    if preset == "ct":
        missing = [key for key, value in values.items() if value is None]
        if missing:
            raise ValueError(f"field 'intensity.{missing[0]}' must be a number for the CT preset")
        a_min, a_max, std = values["a_min"], values["a_max"], values["std"]
        assert a_min is not None and a_max is not None and std is not None, "missing values are refused above"
        if a_min >= a_max:
            raise ValueError(f"field 'intensity.a_min' ({a_min}) must be below 'intensity.a_max' ({a_max})")
        if std <= 0:
            raise ValueError(f"field 'intensity.std' must be positive, got {std}")
    return Intensity(preset, **values)


def _network(fields: _Fields, dims: int) -> NetworkSpec:
    """The ``network`` object: ``name`` (absent: ``"unet"``, so plans written before DynUNet and SegResNet
    load as they did) and that architecture's fields, each defaulting to :class:`NetworkSpec`'s; the
    fields of another architecture are refused by name."""
    name = fields.get("name", str, lambda v: v in ARCHITECTURES, " or ".join(f'"{a}"' for a in ARCHITECTURES),
                      default="unet")
    foreign = sorted(set(fields.data) & (set().union(*FIELDS.values()) - set(FIELDS[name])))
    if foreign:
        raise ValueError(f"field 'network.{foreign[0]}' is not a setting of the {name} network (its settings: "
                         f"{', '.join(FIELDS[name])})")
    default = NetworkSpec(name)
    norms = (lambda v: bool(v), "a normalisation name") if name == "unet" else \
        (lambda v: v in NORMS, " or ".join(f'"{n}"' for n in NORMS))
    values = {"norm": fields.get("norm", str, *norms, default=default.norm),
              "dropout": fields.get("dropout", float, lambda v: 0 <= v < 1, "a number in [0, 1)",
                                    default=default.dropout)}
    values.update({"unet": _unet, "dynunet": _dynunet, "segresnet": _segresnet}[name](fields, default, dims))
    fields.done()
    return NetworkSpec(name, **values)


def _unet(fields: _Fields, default: NetworkSpec, dims: int) -> dict[str, Any]:
    channels = fields.numbers("channels", None, int, lambda v: v >= 1, "positive integers") \
        if "channels" in fields.data else default.channels
    strides = fields.numbers("strides", len(channels) - 1, int, lambda v: v >= 1, "positive integers (one fewer "
                             "than channels)") if "strides" in fields.data else default.strides
    fields.read.update({"channels", "strides"})
    return {"channels": tuple(channels), "strides": tuple(strides),
            "num_res_units": fields.get("num_res_units", int, lambda v: v >= 0, "an integer >= 0",
                                        default=default.num_res_units)}


def _dynunet(fields: _Fields, default: NetworkSpec, dims: int) -> dict[str, Any]:
    """DynUNet fields; ``filters``, ``kernel_sizes`` and ``level_strides`` absent or empty: planned later
    from the patch (see :meth:`NetworkSpec.planned`)."""
    filters = fields.numbers("filters", None, int, lambda v: v >= 1, "positive integers (one per level)") \
        if fields.data.get("filters") not in (None, [], ()) else default.filters
    fields.read.add("filters")
    return {"filters": tuple(filters),
            "kernel_sizes": _levels(fields, "kernel_sizes", dims, (1, 3, 5, 7), "1, 3, 5 or 7"),
            "level_strides": _levels(fields, "level_strides", dims, (1, 2), "1 or 2"),
            "res_block": fields.get("res_block", object, lambda v: isinstance(v, bool), "true or false",
                                    default=default.res_block)}


def _levels(fields: _Fields, key: str, dims: int, allowed: tuple[int, ...], expected: str
            ) -> tuple[tuple[int, ...], ...]:
    """``network.<key>``: a list of levels, each a list of ``dims`` values from ``allowed``; absent or empty: ()."""
    fields.read.add(key)
    if fields.data.get(key) in (None, [], ()):
        return ()
    value = fields.data[key]
    levels = tuple(tuple(_as(v, int) for v in level) if isinstance(level, (list, tuple)) else None
                   for level in value) if isinstance(value, (list, tuple)) else None
    if not levels or any(level is None or len(level) != dims or any(v not in allowed for v in level)
                         for level in levels):
        raise ValueError(f"field 'network.{key}' must be a list of levels, each a list of {dims} values "
                         f"{expected}, got {_shown(value)}")
    return tuple(level for level in levels if level is not None)  # (none is None: checked above)


def _segresnet(fields: _Fields, default: NetworkSpec, dims: int) -> dict[str, Any]:
    blocks = {key: tuple(fields.numbers(key, None, int, lambda v: v >= 1, "positive integers"))
              if key in fields.data else getattr(default, key) for key in ("blocks_down", "blocks_up")}
    fields.read.update(blocks)
    return {"init_filters": fields.get("init_filters", int, lambda v: v >= 1, "an integer >= 1",
                                       default=default.init_filters), **blocks}


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


def _to_ras_order(geometry: Geometry, per_axis: Sequence[float]) -> np.ndarray:
    """Reorder per-index-axis values to the R, A, S axes (the order after ``Orientation("RAS")``)."""
    ornt = io_orientation(geometry.affine_ras())
    out = np.empty(geometry.dims)
    for axis, (ras_axis, _) in enumerate(ornt):
        out[int(ras_axis)] = per_axis[axis]
    return out


def ras_spacing(geometry: Geometry) -> np.ndarray:
    """Voxel spacing along the R, A, S axes (the order after ``Orientation("RAS")``)."""
    return _to_ras_order(geometry, geometry.spacing)


def ras_extent(geometry: Geometry) -> np.ndarray:
    """Field of view in mm along the R, A, S axes."""
    return _to_ras_order(geometry, [sp * n for sp, n in zip(geometry.spacing, geometry.size, strict=True)])


def ct_intensity_statistics(cases: Sequence[Case], window: Sequence[float] | None = None,
                            max_samples: int = 200_000, seed: int = 0) -> Intensity:
    """nnU-Net-style CT statistics of the foreground (labelled) voxels: clip range = the 0.5/99.5
    percentiles, or the given HU ``window`` (e.g. ``(-160, 240)``); mean and std after clipping.

    Raises
    ------
    ValueError
        If ``window`` is not two increasing values.
    """
    if window is not None and (len(window) != 2 or window[0] >= window[1]):
        raise ValueError(f"a CT window needs two increasing HU values, got {list(window)}")
    rng = np.random.default_rng(seed)
    samples: list[np.ndarray] = []
    per_case = max(1, max_samples // max(1, len(cases)))
    for case in cases:
        image = sitk.GetArrayFromImage(read_image(case.image))
        label = sitk.GetArrayFromImage(read_image(case.label)) if case.label else None
        values = image[label > 0] if label is not None else image.ravel()
        if values.size:
            samples.append(rng.choice(values, size=min(per_case, values.size), replace=False).astype(np.float64))
    if not samples:
        low, high = window if window is not None else (-1000.0, 1000.0)
        return Intensity("ct", float(low), float(high), (low + high) / 2, (high - low) / 4)
    values = np.concatenate(samples)
    a_min, a_max = window if window is not None else np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, a_min, a_max)
    std = float(max(clipped.std(), 1e-3))
    return Intensity("ct", float(a_min), float(a_max), float(clipped.mean()), std)


def default_patch_size(dims: int, median_shape: np.ndarray, cap: Sequence[int]) -> tuple[int, ...]:
    """Patch no larger than the median resampled image, a multiple of 16, at most ``cap``."""
    patch = []
    for axis in range(dims):
        size = int(min(cap[axis], max(16, 16 * round(median_shape[axis] / 16))))
        patch.append(size)
    return tuple(patch)


def make_plan(
    datalist: Datalist,
    geometries: Sequence[Geometry],
    target_spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    network: NetworkSpec | None = None,
    ct_window: Sequence[float] | None = None,
) -> Plan:
    """Derive a plan from validated training data.

    ``target_spacing`` defaults to the median RAS spacing of the training images; ``patch_size``
    to the median resampled size rounded to multiples of 16, capped at 64x64x32 (3D) or 256x256 (2D);
    CT intensities clip to ``ct_window`` (HU) if given, else to foreground percentiles. The network
    (default: a U-Net) is planned for the patch and checked with it (see :func:`checked_network`).

    Raises
    ------
    ValueError
        A target spacing, patch size or CT window of the wrong length; a network that does not fit
        the patch (naming the field).
    """
    dims = geometries[0].dims
    spacings = np.stack([ras_spacing(g) for g in geometries])
    extents = np.stack([ras_extent(g) for g in geometries])
    spacing = np.asarray(target_spacing if target_spacing is not None else np.median(spacings, axis=0), float)
    if spacing.shape != (dims,):
        raise ValueError(f"target spacing needs {dims} values, got {spacing.tolist()}")
    median_shape = np.median(extents, axis=0) / spacing
    cap = (64, 64, 32) if dims == 3 else (256, 256)
    patch = tuple(int(p) for p in patch_size) if patch_size is not None else default_patch_size(dims, median_shape, cap)
    if len(patch) != dims:
        raise ValueError(f"patch size needs {dims} values, got {list(patch)}")
    spec = checked_network(network or NetworkSpec(), patch, tuple(float(s) for s in spacing))
    if datalist.preset == "ct":
        intensity = ct_intensity_statistics(datalist.training, ct_window)
    else:
        intensity = Intensity("mr")
    plan = Plan(dims, datalist.modality, dict(datalist.labels), tuple(float(s) for s in spacing), patch, intensity, spec)
    log.info("plan: %dD %s, target spacing %s mm, patch %s, %d classes, %s", dims, plan.modality,
             [round(s, 3) for s in plan.target_spacing], list(patch), plan.num_classes, plan.network.title)
    return plan
