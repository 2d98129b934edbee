"""Safe mode, second pass: the arguments of every allow-listed ``_target_`` of a config as MONAI will see it.

The first pass (:mod:`medseg.bundle.safety`) vets each document on its own: no ``$`` expressions, macros
inside the bundle, every ``_target_`` on the allow list. This pass merges a config the way
``monai.bundle.run`` does (MONAI's own ``ConfigParser``: ``read_config``, ``read_meta``, the ``--set``
overrides, macros and relative ids; nothing is instantiated or evaluated) and checks, for every
component, the rules its :class:`~medseg.bundle.allowlist.Vetted` entry records:

- only named parameters of the target (or reviewed ``**kwargs``) are passed;
- arguments pinned in ``fixed`` hold one of their allowed literal values;
- ``names`` are single path components;
- every argument naming a file or folder resolves (``~`` expanded, relative to the bundle, the folder
  ``medseg bundle run`` runs it from, symlinks followed) inside the bundle or inside a path the user
  gave on the command line; a value that is computed (other than by a vetted path factory such as
  ``bundle_path``) cannot be checked and is refused;
- a target that names files may not be used with ``_mode_: callable`` (its caller would choose them).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.bundle.allowlist import Vetted

__all__ = [
    "Confinement",
    "Problem",
    "is_single_component",
    "merged_config",
    "signature_parameters",
]

_REF, _MACRO, _EXPR = "@", "%", "$"
_NON_ARGS = frozenset({"_target_", "_disabled_", "_requires_", "_desc_", "_mode_", "_debug_"})
_MAX_DEPTH = 64
_MAX_LEAVES = 100_000


@dataclass(frozen=True)
class Problem:
    """A refused argument: the MONAI id of the value and what is wrong with it."""

    key: str
    problem: str


@dataclass(frozen=True)
class _Component:
    """A ``{"_target_": ...}`` value met where a literal was expected."""

    key: str
    content: Mapping[str, Any]


class _Opaque(Exception):
    """A value that cannot be followed to literals (an expression, a missing reference, a cycle)."""


class Confinement:
    """Checks the components of one merged config (see the module docstring).

    Parameters
    ----------
    config
        The merged config, as ``ConfigParser.get()`` returns it after macros and relative ids are resolved.
    root
        The bundle folder (relative paths are taken relative to it).
    user_paths
        Paths the user gave on the command line (``--set`` values): files may be read or written there too.
    resolve
        ``target name -> (object, entry) or None``: how the first pass resolved each ``_target_``.
    """

    def __init__(self, config: Any, root: Path, user_paths: Sequence[Path],
                 resolve: Any) -> None:
        self.config = config
        self.root = root.resolve()
        self.roots = [self.root, *(p.resolve() for p in user_paths)]
        self.resolve = resolve
        self.problems: list[Problem] = []
        self.budget = _MAX_LEAVES

    # -- walking ----------------------------------------------------------------------------------
    def check(self) -> list[Problem]:
        """Every problem in the config (empty if it may run)."""
        for key, component in self._components(self.config, []):
            self._check_component(key, component)
        return self.problems

    def _components(self, value: Any, path: list[str]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        if isinstance(value, Mapping):
            if isinstance(value.get("_target_"), str):
                yield "#".join(path), value
            for key, item in value.items():
                yield from self._components(item, [*path, str(key)])
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from self._components(item, [*path, str(index)])

    def _lookup(self, reference: str) -> Any:
        node: Any = self.config
        for part in reference.replace("::", "#").split("#") if reference else []:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise _Opaque(f"refers to {_REF}{reference}, which does not exist")
        return node

    def _leaves(self, value: Any, key: str, containers: bool, depth: int = 0) -> Iterator[Any]:
        """Literal values (and components) ``value`` stands for, references followed.

        ``containers``: also descend into lists and plain dictionaries (data lists); otherwise only lists.
        """
        self.budget -= 1
        if depth > _MAX_DEPTH or self.budget < 0:
            raise _Opaque("references nest too deeply or expand to too many values to follow")
        if isinstance(value, str) and value.startswith(_REF):
            yield from self._leaves(self._lookup(value[len(_REF):]), key, containers, depth + 1)
        elif isinstance(value, str) and value.startswith((_EXPR, _MACRO)):
            raise _Opaque("is an expression or macro, which cannot be checked")
        elif isinstance(value, Mapping) and "_target_" in value:
            yield _Component(key, value)
        elif isinstance(value, Mapping):
            if not containers:
                raise _Opaque("is a mapping where a file name is expected")
            for item in value.values():
                yield from self._leaves(item, key, containers, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from self._leaves(item, key, containers, depth + 1)
        else:
            yield value

    # -- rules ------------------------------------------------------------------------------------
    def _add(self, key: str, problem: str) -> None:
        self.problems.append(Problem(key, problem))

    def _check_component(self, key: str, component: Mapping[str, Any]) -> None:
        found = self.resolve(component["_target_"])
        if found is None:  # refused by the first pass already
            return
        target, entry = found
        mode = component.get("_mode_", "default")
        if isinstance(mode, str) and mode.strip() == "callable" and entry.paths:
            self._add(_join(key, "_mode_"), f"{entry.name} names files ({', '.join(entry.paths)}); with _mode_ "
                                            "'callable' its caller would choose them")
        self._check_arguments(key, component, target, entry)
        for argument, allowed in entry.fixed.items():
            if argument in component:
                self._check_fixed(_join(key, argument), component[argument], allowed, entry)
        for argument in entry.names:
            if argument in component:
                self._check_names(_join(key, argument), component[argument], entry)
        for argument in entry.paths:
            if argument in component:
                self._check_paths(_join(key, argument), component[argument], entry, argument in entry.data)

    def _check_arguments(self, key: str, component: Mapping[str, Any], target: Any, entry: Vetted) -> None:
        named, var_keyword = signature_parameters(target)
        for argument in component:
            if not isinstance(argument, str) or argument in _NON_ARGS or argument in named:
                continue
            if var_keyword and ("*" in entry.extra or argument in entry.extra):
                continue
            self._add(_join(key, str(argument)), f"{argument!r} is not a reviewed argument of {entry.name}")

    def _literals(self, key: str, value: Any, containers: bool, why: str) -> list[Any] | None:
        """What ``value`` stands for (:meth:`_leaves`), or None after reporting, with ``why`` appended,
        that it cannot be followed to literals."""
        try:
            return list(self._leaves(value, key, containers))
        except _Opaque as exc:
            self._add(key, f"{exc}{why}")
            return None

    def _check_fixed(self, key: str, value: Any, allowed: tuple[Any, ...], entry: Vetted) -> None:
        leaves = self._literals(key, value, False, f"; {entry.name} accepts only {_choices(allowed)} here")
        if leaves is None:
            return
        if len(leaves) != 1 or isinstance(leaves[0], _Component) or leaves[0] not in allowed:
            self._add(key, f"{entry.name} accepts only {_choices(allowed)} here")

    def _check_names(self, key: str, value: Any, entry: Vetted) -> None:
        leaves = self._literals(key, value, False, f" (part of a file name of {entry.name})")
        for leaf in leaves or ():
            if leaf is None or (isinstance(leaf, (int, float)) and not isinstance(leaf, bool)):
                continue
            if not isinstance(leaf, str) or not is_single_component(leaf):
                self._add(key, f"{_short(leaf)} is not a plain file-name part ({entry.name} joins it into a path: "
                               "no '/', '\\', '..' or NUL)")

    def _check_paths(self, key: str, value: Any, entry: Vetted, data: bool) -> None:
        leaves = self._literals(key, value, data, f"; a file or folder of {entry.name} must be a literal path")
        for leaf in leaves or ():
            if isinstance(leaf, _Component):
                if not data:  # a dataset or loader in a data argument is vetted where it stands
                    self._check_path_factory(key, leaf, entry)
            elif isinstance(leaf, str):
                if (problem := self._outside(leaf)) is not None:
                    self._add(key, f"{_short(leaf)} {problem} ({entry.name} {_verb(entry, key)} it)")
            elif leaf is not None and not data:
                self._add(key, f"{_short(leaf)} is not a path ({entry.name} {_verb(entry, key)} a file or folder here)")

    def _check_path_factory(self, key: str, component: _Component, entry: Vetted) -> None:
        found = self.resolve(component.content["_target_"])
        if found is not None and not found[1].path_result:
            self._add(key, f"is computed by {found[1].name}, which cannot be checked; a file or folder of "
                           f"{entry.name} must be a literal path or come from a path factory (bundle_path, image_list)")
        # a path factory's own arguments are checked where the component itself stands in the config

    def _outside(self, text: str) -> str | None:
        if "\x00" in text:
            return "contains a NUL character"
        path = Path(os.path.expanduser(text))
        resolved = (self.root / path).resolve()
        if any(resolved.is_relative_to(root) for root in self.roots):
            return None
        return f"resolves to {resolved}, outside the bundle and the paths given on the command line"


def signature_parameters(target: Any) -> tuple[frozenset[str], bool]:
    """``(named keyword parameters, whether **kwargs is taken)`` of a class or function.

    A target without an introspectable signature (a C builtin) takes only reviewed ``extra`` arguments.
    """
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return frozenset(), True
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return (frozenset(p.name for p in parameters if p.kind in kinds),
            any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters))


def is_single_component(text: str) -> bool:
    """True for a plain file-name part: no path separator, not ``.``/``..``, no NUL."""
    return not any(c in text for c in ("/", "\\", "\x00")) and text not in (".", "..")


def _join(key: str, argument: str) -> str:
    return f"{key}#{argument}" if key else argument


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _choices(allowed: tuple[Any, ...]) -> str:
    return ", ".join("null" if v is None else repr(v) for v in allowed)


def _verb(entry: Vetted, key: str) -> str:
    argument = key.rsplit("#", 1)[-1]
    return "writes" if argument in entry.writes else "reads"


def merged_config(config_file: Path | Sequence[Path], meta_file: Path | None, overrides: Mapping[str, Any],
                  root: Path) -> Any:
    """The config as ``monai.bundle.run`` builds it before instantiating anything (MONAI's own parser:
    the file, or the files merged in order, ``_meta_``, the overrides, then macros and relative ids,
    resolved from inside the bundle).

    Raises
    ------
    Exception
        Whatever MONAI's parser raises for a config it cannot merge (callers report it as a finding).
    """
    from monai.bundle import ConfigParser

    files = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    with contextlib.chdir(root):
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        if meta_file is not None and meta_file.is_file():
            parser.read_meta(str(meta_file))
        parser.update(dict(overrides))
        parser.resolve_macro_and_relative_ids()
        return parser.get()
