"""Safe mode: refuse a MONAI bundle whose configs could run code or write outside its folders, *before*
MONAI parses them.

MONAI's ``ConfigParser`` is a small programming language: ``"$..."`` strings go to ``eval()``,
``"_target_"`` imports and calls any dotted name (``pydoc.locate``), ``"%file#id"`` macros pull
content from other files, ``"_mode_": "debug"`` / ``"_debug_": true`` start ``pdb``. A bundle from
the internet is therefore code. Safe mode (the default of ``medseg bundle run``; ``--trust`` skips
it) reads every config with ``json.loads`` / ``yaml.safe_load`` only and refuses the bundle if any
of the rules below matches, listing every offending key in one :class:`~medseg.errors.BundleError`.

Rules (``key`` is the MONAI id of the value, ``#``-joined, e.g. ``network_def#_target_``, ``run#0``):

1. A string value or dict key starting with ``$`` (a Python expression; under ``imports`` an import).
2. ``_target_`` must be a literal name that resolves, exactly as MONAI resolves it (a bare name through
   MONAI's ``ComponentLocator``, the first module it lists; a dotted name like ``pydoc.locate``), to a
   class or function on the allow list (:data:`medseg.bundle.allowlist.ALLOWED_TARGETS`, compared by
   identity, so aliases are found). Only modules of :data:`RESOLVABLE_PACKAGES` are imported to
   resolve a name; private names (``_x``) are refused.
3. ``_mode_`` must be ``"default"`` or ``"callable"`` (a partial of an already vetted target);
   ``"debug"`` runs ``pdb`` and anything else is not a MONAI mode. A truthy ``_debug_`` runs
   ``breakpoint()``.
4. A ``%`` macro naming a file (MONAI: a ``.json|.yaml|.yml`` path; here also anything with a
   ``/``) must stay inside the bundle after resolving ``..`` and symlinks (relative paths are taken
   relative to the bundle folder); the referenced in-bundle file is scanned as well.
5. ``allow_pickle`` other than false/null and ``weights_only`` other than true/null (unpickling).
6. ``--set`` overrides obey the same rules (id = the override key; a value that is a JSON document
   is scanned both raw and parsed); keys that are parameters of ``monai.bundle.run`` rather than
   config ids (``config_file``, ``args_file``, ``tracking``, ...) are refused.
7. A config file that does not parse, or that is a symlink leaving the bundle.
8. Once rules 1-7 pass, each config is merged as MONAI will run it (with ``_meta_`` and the
   overrides) and the arguments of every component are checked against its allow-list entry
   (:mod:`medseg.bundle.confinement`): only reviewed arguments; pinned arguments (readers, writers
   named by strings) hold allowed values; file-name parts are single components; every file or
   folder read or written resolves inside the bundle or a path given on the command line.

What the runner adds (:mod:`medseg.bundle.runner`): the bundle's ``logging.conf`` is not applied in
safe mode (``fileConfig`` instantiates handler classes with arguments from the file: a FileHandler
can write anywhere); the bundle folder is never put on ``sys.path`` (MONAI adds the config's bundle
folder before ``run``; medseg runs a copy of the config from an empty folder); ``torch.load`` is
forced to ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medseg.bundle.allowlist import Vetted, allowed_objects, vetted
from medseg.bundle.confinement import Confinement, merged_config
from medseg.errors import BundleError
from medseg.layout import META_FILE

__all__ = [
    "ALLOWED_MODES",
    "RESOLVABLE_PACKAGES",
    "RUN_PARAMETERS",
    "Finding",
    "check_bundle",
    "resolve_target",
    "scan_bundle",
    "scan_config",
    "scan_overrides",
    "user_paths",
]

RESOLVABLE_PACKAGES: tuple[str, ...] = ("monai", "torch", "medseg", "ignite", "numpy")
"""Top-level packages whose modules may be imported to resolve a ``_target_`` name (trusted library code,
never bundle code); what may actually be called is decided by the allow list."""

_UNPICKLES = "unpickles data, which can run arbitrary code"

ALLOWED_MODES: tuple[str, ...] = ("default", "callable")
"""``_mode_`` values accepted in safe mode; ``callable`` only returns (a partial of) a vetted target."""

RUN_PARAMETERS: tuple[str, ...] = ("workflow_name", "args_file", "config_file", "meta_file", "logging_file",
                                   "tracking", "properties_path")
"""``--set`` keys that ``monai.bundle.run`` takes as arguments (files, classes), not as config ids."""

_EXPR, _MACRO, _OVERRIDES = "$", "%", "--set"
_SUFFIXES = (".json", ".yaml", ".yml")
_Configs = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
_MAX_NODES = 200_000


class _TooLarge(Exception):
    """The documents hold more values than a scan will look at."""


@dataclass(frozen=True, order=True)
class Finding:
    """One reason to refuse a bundle: ``file`` (bundle-relative, or ``--set``), MONAI ``key`` and ``problem``."""

    file: str
    key: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.problem}" if self.key else f"{self.file}: {self.problem}"


def _quote(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _segments(key: Any) -> list[str]:
    """Id segments of a dict key: MONAI splits ``a#b`` / ``a::b`` and merges ``+a`` into ``a``."""
    return [s.lstrip("+") for s in str(key).replace("::", "#").split("#")]


def _dotted(name: str) -> tuple[Any, str | None]:
    """Resolve a dotted name the way ``pydoc.locate`` does: ``(object, None)`` or ``(None, problem)``."""
    parts = name.split(".")
    if parts[0] not in RESOLVABLE_PACKAGES:
        return None, f"{name!r} is not on the safe-mode allow list (outside the packages {', '.join(RESOLVABLE_PACKAGES)})"
    if any(p.startswith("_") for p in parts):
        return None, f"{name!r} names a private attribute"
    obj: Any = None
    n = 0
    while n < len(parts):  # import the longest module prefix, as pydoc.locate does
        try:
            obj = importlib.import_module(".".join(parts[: n + 1]))
        except Exception:  # noqa: BLE001 - not a module: the rest are attributes
            break
        n += 1
    if obj is None:
        return None, f"{name!r} cannot be imported"
    for part in parts[n:]:
        try:
            obj = getattr(obj, part)
        except Exception:  # noqa: BLE001 - MONAI would fail to locate it
            return None, f"{name!r} does not exist"
    return obj, None


def _home(obj: Any) -> str:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def resolve_target(value: Any, locator: Any) -> tuple[tuple[Any, Vetted] | None, str | None]:
    """How MONAI will resolve a ``_target_`` value, and its allow-list entry.

    Returns
    -------
    tuple
        ``((object, entry), None)`` for an allowed target, ``(None, problem)`` otherwise, and
        ``(None, None)`` for a ``$`` expression (reported by the expression rule).
    """
    if not isinstance(value, str):
        return None, f"_target_ must be a literal class or function name, not {type(value).__name__}"
    if value.startswith(_EXPR):
        return None, None
    parts = value.split(".")
    if not all(p.isidentifier() for p in parts):
        return None, f"_target_ {_quote(value)} is not a literal dotted name (references and macros are not allowed)"
    name = value
    if len(parts) == 1:
        modules = locator.get_component_module_name(value)  # exactly MONAI's lookup of a bare name
        if not modules:
            return None, f"_target_ {value!r} is not a MONAI component (write the full dotted name)"
        name = f"{modules[0] if isinstance(modules, list) else modules}.{value}"  # MONAI takes the first
    obj, problem = _dotted(name)
    if problem is not None:
        return None, f"_target_ {problem}"
    entry = vetted(obj)
    if entry is None:
        where = "" if value == _home(obj) else f" (it is {_home(obj)})"
        return None, (f"_target_ {value!r}{where} is not on the safe-mode allow list: only reviewed classes and "
                      "functions run without --trust (medseg.bundle.allowlist)")
    return (obj, entry), None


def _locator() -> Any:
    from monai.bundle.config_item import ComponentLocator

    return ComponentLocator()


def _macro_file(text: str, segments: list[str]) -> tuple[str | None, str | None]:
    """``(file part, problem)`` of a ``%`` macro, split exactly as MONAI's ``ConfigParser`` splits it."""
    from monai.bundle.config_parser import ConfigParser

    try:
        resolved = ConfigParser.resolve_relative_ids("::".join(segments), text)
    except ValueError as exc:
        return None, f"macro {_quote(text)}: {exc}"
    path, ids = ConfigParser.split_path_id(resolved[len(_MACRO):])
    if not path:  # MONAI reads no file, but refuse anything that looks like a path anyway
        head = ids.split("::")[0]
        path = head if ("/" in head or "\\" in head) else ""
    return path or None, None


class _Scanner:
    """Walks parsed documents, collecting findings and the in-bundle files that macros reference."""

    def __init__(self, bundle_dir: Path) -> None:
        self.root = Path(bundle_dir).resolve()
        allowed_objects()  # import the allow-listed modules first: MONAI's locator only sees imported modules
        self.locator = _locator()
        self.findings: list[Finding] = []
        self.references: list[Path] = []
        self.budget = 0

    def scan(self, content: Any, file: str, segments: list[str] | None = None) -> None:
        self.budget = _MAX_NODES  # per document: YAML aliases can expand exponentially ("billion laughs")
        try:
            self._walk(content, file, segments or [], set())
        except RecursionError:
            self.add(file, segments or [], "nested too deeply to check")
        except _TooLarge:
            self.add(file, segments or [], f"more than {_MAX_NODES} values to check (YAML alias bomb?)")

    def add(self, file: str, segments: list[str], problem: str) -> None:
        self.findings.append(Finding(file, "#".join(segments), problem))

    def _walk(self, value: Any, file: str, segments: list[str], active: set[int]) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise _TooLarge
        self._check_field(value, file, segments)
        if isinstance(value, (Mapping, list, tuple)):
            if id(value) in active:
                self.add(file, segments, "recursive structure (YAML alias cycle)")
                return
            active = active | {id(value)}
        if isinstance(value, Mapping):
            for key, item in value.items():
                sub = segments + _segments(key)
                if isinstance(key, str) and key.startswith(_EXPR):
                    self.add(file, sub, f"Python expression key ({_quote(key)}) is not allowed in safe mode")
                self._walk(item, file, sub, active)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                self._walk(item, file, [*segments, str(index)], active)
        elif isinstance(value, str):
            self._check_string(value, file, segments)

    def _check_string(self, value: str, file: str, segments: list[str]) -> None:
        if value.startswith(_EXPR):
            if segments[:1] == ["imports"]:
                self.add(file, segments, f"imports run Python code ({_quote(value)}); not allowed in safe mode")
            else:
                self.add(file, segments, f"Python expression ({_quote(value)}) is not allowed in safe mode")
        elif value.startswith(_MACRO):
            path, problem = _macro_file(value, segments)
            if problem:
                self.add(file, segments, problem)
            elif path is not None:
                target = (self.root / path).resolve()
                if not target.is_relative_to(self.root):
                    self.add(file, segments, f"file reference leaves the bundle ({_quote(value)})")
                elif not target.is_file():
                    self.add(file, segments, f"macro file not found in the bundle ({_quote(value)})")
                else:
                    self.references.append(target)

    def _check_field(self, value: Any, file: str, segments: list[str]) -> None:
        field = segments[-1] if segments else ""
        problem = None
        if field == "_target_":
            problem = resolve_target(value, self.locator)[1]
        elif field == "_mode_":
            mode = value.strip() if isinstance(value, str) else value
            if mode == "debug":
                problem = "_mode_ 'debug' runs the component under pdb (interactive debugger)"
            elif mode not in ALLOWED_MODES:
                problem = f"_mode_ {_quote(str(value))} is not allowed (safe mode accepts {', '.join(ALLOWED_MODES)})"
        elif field == "_debug_" and value not in (False, None, 0):
            problem = "_debug_ runs breakpoint() (interactive debugger)"
        elif field == "allow_pickle" and value not in (False, None):
            problem = "allow_pickle " + _UNPICKLES
        elif field == "weights_only" and value not in (True, None):
            problem = "weights_only=false " + _UNPICKLES
        if problem and not (isinstance(value, str) and value.startswith(_EXPR)):
            self.add(file, segments, problem)


def _load(path: Path) -> Any:
    """Parse a JSON or YAML file with the standard, non-executing parsers."""
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)


def _display(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def scan_config(content: Any, file: str, bundle_dir: str | os.PathLike[str]) -> list[Finding]:
    """Findings in one parsed config document (macro-referenced files are not followed here).

    Parameters
    ----------
    content
        The document as ``json.loads`` / ``yaml.safe_load`` returned it.
    file
        Name to report it under (usually bundle-relative, ``configs/inference.json``).
    bundle_dir
        The bundle folder; ``%`` macros must not leave it.

    Returns
    -------
    list[Finding]
        Sorted by file, key and problem; empty if the document is safe.
    """
    scanner = _Scanner(Path(bundle_dir))
    scanner.scan(content, file)
    return sorted(set(scanner.findings))


def _override_findings(scanner: _Scanner, overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        segments = _segments(key)
        if str(key).strip() in RUN_PARAMETERS:
            scanner.add(_OVERRIDES, segments, f"{key!r} is a monai.bundle.run parameter (loads files or classes), "
                                               "not a config id; not allowed in safe mode")
        if isinstance(key, str) and key.startswith(_EXPR):
            scanner.add(_OVERRIDES, segments, f"Python expression key ({_quote(key)}) is not allowed in safe mode")
        scanner.scan(value, _OVERRIDES, segments)
        if isinstance(value, str):  # MONAI-style CLIs parse values; scan what they may become as well
            try:
                parsed = json.loads(value)
            except ValueError:
                continue
            if parsed != value:
                scanner.scan(parsed, _OVERRIDES, segments)


def scan_overrides(overrides: Mapping[str, Any], bundle_dir: str | os.PathLike[str]) -> list[Finding]:
    """Findings in ``--set KEY=VALUE`` overrides (reported under file ``--set``, key = the override key).

    Parameters
    ----------
    overrides
        Override id -> value (a string, or a value already parsed from JSON).
    bundle_dir
        The bundle folder; ``%`` macros must not leave it.

    Returns
    -------
    list[Finding]
        Sorted findings; empty if the overrides are safe.
    """
    scanner = _Scanner(Path(bundle_dir))
    _override_findings(scanner, overrides)
    return sorted(set(scanner.findings))


def _config_files(root: Path) -> Iterator[Path]:
    configs = root / "configs"
    if configs.is_dir():
        yield from sorted(p for p in configs.iterdir() if p.suffix.lower() in _SUFFIXES)


def _scan(bundle_dir: str | os.PathLike[str], extra_files: Sequence[str | os.PathLike[str]],
          overrides: Mapping[str, Any] | None, config: _Configs | None = None) -> list[Finding]:
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    scanner = _Scanner(root)
    if overrides:
        _override_findings(scanner, overrides)
    # (path, whether it must stay inside the bundle): extra files the user names outside it are theirs
    queue = [(p, True) for p in _config_files(root)]
    for extra in extra_files:
        path = (root / Path(extra)).absolute()
        queue.append((path, path.is_relative_to(root)))
    queue.extend((ref, True) for ref in scanner.references)  # files that --set macros name
    scanner.references.clear()
    seen: set[Path] = set()
    while queue:
        path, inside = queue.pop(0)
        name, resolved = _display(path, root), path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        if inside and not resolved.is_relative_to(root):
            scanner.add(name, [], f"symlink leaves the bundle (resolves to {resolved})")
            continue
        try:
            content = _load(resolved)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            scanner.add(name, [], f"cannot be parsed as {resolved.suffix.lstrip('.').upper() or 'JSON/YAML'}: {first}")
            continue
        scanner.scan(content, name)
        queue.extend((ref, True) for ref in scanner.references)
        scanner.references.clear()
    if not scanner.findings:  # rule 8 needs configs that MONAI can merge without running anything
        if config is not None:  # the config about to run, with the overrides it runs with
            files = [config] if isinstance(config, (str, os.PathLike)) else list(config)
            scanner.findings.extend(_argument_findings(scanner, [root / Path(f) for f in files], overrides or {}))
        else:  # each config as it runs: an override config (multi_gpu_train.json) on the config it overrides
            for path in _config_files(root):
                scanner.findings.extend(_argument_findings(scanner, _layers(root, path), {}))
            for path in ((root / Path(extra)).absolute() for extra in extra_files):
                scanner.findings.extend(_argument_findings(scanner, [path], {}))
    return sorted(set(scanner.findings))


def _layers(root: Path, path: Path) -> list[Path]:
    """The configs that run ``path`` (:func:`medseg.bundle.runner.config_layers`), else ``[path]``."""
    from medseg.bundle.runner import config_layers

    try:
        layers = config_layers(root, path.stem)
    except BundleError:
        return [path]
    return layers if layers and layers[-1].resolve() == path.resolve() else [path]


def user_paths(overrides: Mapping[str, Any], root: Path) -> list[Path]:
    """The paths a user named in ``--set`` values (literal strings; relative ones are taken relative to the
    bundle, where the runner runs): files may be read and written there as well as in the bundle."""
    paths: list[Path] = []

    def collect(value: Any) -> None:
        if isinstance(value, str) and value and not value.startswith((_EXPR, _MACRO, "@")) and "\x00" not in value:
            paths.append(root / os.path.expanduser(value))
        elif isinstance(value, Mapping):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    for value in overrides.values():
        collect(value)
    return paths


def _argument_findings(scanner: _Scanner, configs: Sequence[Path], overrides: Mapping[str, Any]) -> list[Finding]:
    """Rule 8 for one config (or several layered in MONAI's merge order): its components' arguments, merged
    with ``_meta_`` and the overrides."""
    name = " + ".join(_display(config, scanner.root) for config in configs)
    try:
        merged = merged_config(configs, scanner.root / META_FILE, overrides, scanner.root)
    except Exception as exc:  # noqa: BLE001 - MONAI's parser failing is a reason to refuse, not a crash
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return [Finding(name, "", f"cannot be merged with its overrides and metadata as MONAI would: {first}")]

    def resolve(value: Any) -> tuple[Any, Vetted] | None:
        return resolve_target(value, scanner.locator)[0]

    confinement = Confinement(merged, scanner.root, user_paths(overrides, scanner.root), resolve)
    return [Finding(name, problem.key, problem.problem) for problem in confinement.check()]


def scan_bundle(bundle_dir: str | os.PathLike[str],
                extra_files: Sequence[str | os.PathLike[str]] = ()) -> list[Finding]:
    """Findings in every ``configs/*.json|yaml|yml`` of a bundle, ``extra_files`` and the in-bundle
    files their ``%`` macros reference; when those pass, the arguments of every config (rule 8, no overrides).

    Parameters
    ----------
    bundle_dir
        The bundle folder (model-zoo layout).
    extra_files
        More config files to scan; relative paths are relative to ``bundle_dir``.

    Returns
    -------
    list[Finding]
        Sorted by file, key and problem; a file that does not parse is itself a finding.

    Raises
    ------
    BundleError
        If ``bundle_dir`` is not a folder.
    """
    return _scan(bundle_dir, extra_files, None)


def check_bundle(bundle_dir: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None,
                 extra_files: Sequence[str | os.PathLike[str]] = (),
                 config: _Configs | None = None) -> None:
    """Refuse an untrusted bundle (safe mode); call before anything reaches MONAI's parser.

    Parameters
    ----------
    bundle_dir
        The bundle folder.
    overrides
        The ``--set`` overrides that will be applied.
    extra_files
        More config files that will be parsed (see :func:`scan_bundle`).
    config
        The config file that will run (bundle-relative or absolute), or the files that will run layered
        (MONAI's merge order): rule 8 checks it merged with ``overrides``. None: every config, without
        overrides.

    Raises
    ------
    BundleError
        ``<bundle_dir>: refused to run an untrusted bundle (safe mode); pass --trust to run it
        anyway:`` followed by one ``  file: key: problem`` line per finding; or if ``bundle_dir``
        is not a folder.
    """
    findings = _scan(bundle_dir, extra_files, overrides, config)
    if findings:
        lines = "\n".join(f"  {finding}" for finding in findings)
        raise BundleError(f"{bundle_dir}: refused to run an untrusted bundle (safe mode); "
                          f"pass --trust to run it anyway:\n{lines}")
