"""The ``network`` object of ``plan.json``: the architecture's name and its fields, each checked."""

from __future__ import annotations

from typing import Any

from medseg.architectures import FIELDS, IMPORTED, NORMS, PLAN_ARCHITECTURES, NetworkSpec
from medseg.plan.fields import Fields, as_json, shown

__all__ = ["read_network"]


def read_network(fields: Fields, dims: int) -> NetworkSpec:
    """The ``network`` object: ``name`` (absent: ``"unet"``, so plans written before DynUNet and SegResNet
    load as they did) and that architecture's fields, each defaulting to :class:`NetworkSpec`'s; the
    fields of another architecture are refused by name."""
    name = fields.get("name", str, lambda v: v in PLAN_ARCHITECTURES, " or ".join(f'"{a}"' for a in PLAN_ARCHITECTURES),
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
    values.update({"unet": _unet, "dynunet": _dynunet, "segresnet": _segresnet, "unet_head": _unet_head,
                   IMPORTED: _imported}[name](fields, default, dims))
    fields.done()
    return NetworkSpec(name, **values)


def _imported(fields: Fields, default: NetworkSpec, dims: int) -> dict[str, Any]:
    """An imported nnU-Net network has no fields here: ``configs/nnunet.json`` defines it."""
    return {}


def _channels(fields: Fields, default: NetworkSpec, expected: str) -> tuple[int, ...]:
    """``network.channels``: positive integers, or the default's when absent."""
    channels = fields.numbers("channels", None, int, lambda v: v >= 1, expected) \
        if "channels" in fields.data else default.channels
    fields.read.add("channels")
    return tuple(channels)


def _res_units(fields: Fields, default: NetworkSpec) -> int:
    """``network.num_res_units``: an integer >= 0, or the default's."""
    units: int = fields.get("num_res_units", int, lambda v: v >= 0, "an integer >= 0", default=default.num_res_units)
    return units


def _unet(fields: Fields, default: NetworkSpec, dims: int) -> dict[str, Any]:
    channels = _channels(fields, default, "positive integers")
    strides = fields.numbers("strides", len(channels) - 1, int, lambda v: v >= 1, "positive integers (one fewer "
                             "than channels)") if "strides" in fields.data else default.strides
    fields.read.add("strides")
    return {"channels": channels, "strides": tuple(strides), "num_res_units": _res_units(fields, default)}


def _unet_head(fields: Fields, default: NetworkSpec, dims: int) -> dict[str, Any]:
    """``unet_head`` fields: ``channels`` and ``level_strides`` per level (absent: planned later from
    the patch, see :meth:`NetworkSpec.planned`), ``num_res_units``."""
    return {"channels": _channels(fields, default, "positive integers (one per level)"),
            "level_strides": _levels(fields, "level_strides", dims, (1, 2), "1 or 2"),
            "num_res_units": _res_units(fields, default)}


def _dynunet(fields: Fields, default: NetworkSpec, dims: int) -> dict[str, Any]:
    """DynUNet fields; ``filters``, ``kernel_sizes`` and ``level_strides`` absent or empty: planned later
    from the patch (see :meth:`NetworkSpec.planned`)."""
    filters = fields.numbers("filters", None, int, lambda v: v >= 1, "positive integers (one per level)") \
        if fields.data.get("filters") not in (None, [], ()) else default.filters
    fields.read.add("filters")
    return {"filters": tuple(filters),
            "kernel_sizes": _levels(fields, "kernel_sizes", dims, (1, 3, 5, 7), "1, 3, 5 or 7"),
            "level_strides": _levels(fields, "level_strides", dims, (1, 2), "1 or 2"),
            "res_block": fields.get("res_block", object, lambda v: isinstance(v, bool), "true or false",
                                    default=default.res_block),
            "deep_supervision": fields.get("deep_supervision", object, lambda v: isinstance(v, bool), "true or false",
                                           default=default.deep_supervision)}


def _levels(fields: Fields, key: str, dims: int, allowed: tuple[int, ...], expected: str
            ) -> tuple[tuple[int, ...], ...]:
    """``network.<key>``: a list of levels, each a list of ``dims`` values from ``allowed``; absent or empty: ()."""
    fields.read.add(key)
    if fields.data.get(key) in (None, [], ()):
        return ()
    value = fields.data[key]
    levels = tuple(tuple(as_json(v, int) for v in level) if isinstance(level, (list, tuple)) else None
                   for level in value) if isinstance(value, (list, tuple)) else None
    if not levels or any(level is None or len(level) != dims or any(v not in allowed for v in level)
                         for level in levels):
        raise ValueError(f"field 'network.{key}' must be a list of levels, each a list of {dims} values "
                         f"{expected}, got {shown(value)}")
    return tuple(level for level in levels if level is not None)  # (none is None: checked above)


def _segresnet(fields: Fields, default: NetworkSpec, dims: int) -> dict[str, Any]:
    blocks = {key: tuple(fields.numbers(key, None, int, lambda v: v >= 1, "positive integers"))
              if key in fields.data else getattr(default, key) for key in ("blocks_down", "blocks_up")}
    fields.read.update(blocks)
    return {"init_filters": fields.get("init_filters", int, lambda v: v >= 1, "an integer >= 1",
                                       default=default.init_filters), **blocks}

