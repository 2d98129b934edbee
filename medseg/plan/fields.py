"""Reading the JSON objects of ``plan.json`` field by field, each checked for its type and range; a
misspelt or unknown key is an error, not a silent default."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MISSING", "Fields", "as_json", "shown"]

MISSING = object()
_JSON_TYPES = {int: "an integer", float: "a number", str: "a string", dict: "a JSON object", list: "a list"}


class Fields:
    """The fields of one JSON object of a plan, read one by one with their type and range checked;
    :meth:`done` refuses the fields nobody read (a misspelt key is an error, not a silent default)."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a JSON object, got {shown(data)}")
        self.data, self.where = data, where
        self.read: set[str] = set()

    def _name(self, key: str) -> str:
        return key if self.where == "plan" else f"{self.where}.{key}"

    def get(self, key: str, kind: type, check: Any = None, expected: str = "", default: Any = MISSING) -> Any:
        """``data[key]`` as ``kind`` (bool is never a number; an int is a float), checked by ``check``."""
        self.read.add(key)
        if key not in self.data:
            if default is MISSING:
                raise ValueError(f"field {self._name(key)!r} is missing")
            return default
        value = as_json(self.data[key], kind)
        if (value is None and kind is not object) or (check is not None and not check(value)):
            raise ValueError(f"field {self._name(key)!r} must be {expected or _JSON_TYPES[kind]}, "
                             f"got {shown(self.data[key])}")
        return value

    def optional_number(self, key: str) -> float | None:
        """``data[key]``: a finite number, or None when it is null or absent."""
        self.read.add(key)
        value = self.data.get(key)
        if value is None:
            return None
        number: float | None = as_json(value, float)
        if number is None or not math.isfinite(number):
            raise ValueError(f"field {self._name(key)!r} must be a finite number or null, got {shown(value)}")
        return number

    def numbers(self, key: str, count: int | None, kind: type, check: Any, expected: str) -> tuple[Any, ...]:
        """``data[key]``: a list of ``count`` (any number if None, at least one) values of ``kind``."""
        values = self.get(key, object)
        items = tuple(as_json(v, kind) for v in values) if isinstance(values, (list, tuple)) else ()
        if (count is not None and len(items) != count) or not items or any(v is None or not check(v) for v in items):
            size = f"{count} " if count is not None else ""
            raise ValueError(f"field {self._name(key)!r} must be a list of {size}{expected}, got {shown(values)}")
        return items

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise ValueError(f"unknown field {self._name(unknown[0])!r}")


def as_json(value: Any, kind: type) -> Any:
    """``value`` if it is a JSON value of ``kind`` (ints count as floats; booleans are neither), else None."""
    if kind is object:
        return value
    if isinstance(value, bool):
        return None
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, kind) else None


def shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."

