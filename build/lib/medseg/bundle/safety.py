"""Safe mode: refuse a MONAI bundle whose configs could run code, *before* MONAI parses them.

MONAI's ``ConfigParser`` is a small programming language: ``"$..."`` strings go to ``eval()``,
``"_target_"`` imports and calls any dotted name (``pydoc.locate``), ``"%file#id"`` macros pull
content from other files, ``"_mode_": "debug"`` / ``"_debug_": true`` start ``pdb``. A bundle from
the internet is therefore code. Safe mode (the default of ``medseg bundle run``; ``--trust`` skips
it) reads every config with ``json.loads`` / ``yaml.safe_load`` only and refuses the bundle if any
of the rules below matches, listing every offending key in one :class:`~medseg.errors.BundleError`.

Rules (``key`` is the MONAI id of the value, ``#``-joined, e.g. ``network_def#_target_``, ``run#0``):

1. A string value or dict key starting with ``$`` (a Python expression; under ``imports`` an import).
2. ``_target_`` must be a literal name resolving, like MONAI resolves it, to a class or function of
   :data:`ALLOWED_PACKAGES` (a bare name through MONAI's ``ComponentLocator``) and not under
   :data:`DENIED_TARGETS`. Private names (``_x``) are refused; so is every step of the attribute
   path that leaves the allowed packages (``torch.os.system`` is ``os.system`` to ``pydoc.locate``).
   The allowed modules are imported to resolve the name (trusted library code, never bundle code).
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

Safe mode vets *names*, not behaviour: an allowed function that writes attacker-chosen text to an
attacker-chosen path is code execution too (``site-packages/x.pth``), so the known writers are
denied, but the deny list is best effort. ``--trust`` is for bundles whose source you trust.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from medseg.errors import BundleError

ALLOWED_PACKAGES: tuple[str, ...] = ("monai", "torch", "medseg", "ignite", "numpy")
"""Top-level packages whose classes and functions a safe-mode ``_target_`` may name."""

_UNPICKLES = "unpickles data, which can run arbitrary code"
_EXECUTES_CONFIGS = "parses and runs other, unchecked bundle configs"
_WRITES_TEXT = "writes attacker-chosen content to any path (e.g. a site-packages .pth file runs at Python start)"

DENIED_TARGETS: Mapping[str, str] = {
    # Matched by dotted prefix against the name as written AND the resolved home of the object
    # (torch.load lives in torch.serialization, numpy.load in numpy.lib._npyio_impl, ...).
    "torch.load": _UNPICKLES,  # weights_only=False is just a keyword away
    "torch.serialization": _UNPICKLES + "; torch.save " + _WRITES_TEXT,  # home of torch.load/save
    "torch.save": _WRITES_TEXT,
    "torch.jit.load": "loads TorchScript archives, which carry code",
    "torch.jit._serialization": "loads TorchScript archives, which carry code",  # home of torch.jit.load
    "torch.hub": "downloads repositories and runs their hubconf.py",
    "torch.utils.model_zoo": "downloads and unpickles checkpoints (aliases of torch.hub)",
    "torch.package": "PackageImporter imports code shipped inside the package",
    "torch.utils.cpp_extension": "compiles and loads native code",
    "torch.ops.load_library": "dlopen()s an arbitrary shared library",
    "torch._ops._Ops.load_library": "dlopen()s an arbitrary shared library",  # home of the above
    "torch.classes.load_library": "dlopen()s an arbitrary shared library",
    "torch.export.load": "deserialises saved programs",
    "torch.distributed": "process launchers (run, launch, elastic), RPC and checkpoint loaders that unpickle",
    "torch.backends.xeon": "run_cpu launches processes",
    "torch.utils.collect_env": "runs shell commands",
    "torch.utils.benchmark": "Timer executes Python source strings",
    "torch.utils.data.datapipes": "datapipe decoders " + _UNPICKLES,
    "numpy.load": "allow_pickle=True " + _UNPICKLES,
    "numpy.lib.npyio": "numpy.load " + _UNPICKLES + "; savetxt " + _WRITES_TEXT,
    "numpy.lib._npyio_impl": "numpy.load " + _UNPICKLES + "; savetxt " + _WRITES_TEXT,  # numpy 2 home
    "numpy.lib.format": "reads pickled arrays and writes/maps files",
    "numpy.save": _WRITES_TEXT,
    "numpy.savetxt": _WRITES_TEXT,
    "numpy.savez": _WRITES_TEXT,
    "numpy.savez_compressed": _WRITES_TEXT,
    "numpy.memmap": "creates and writes files at any path",
    "numpy.ctypeslib": "loads shared libraries",
    "numpy.f2py": "runs compilers and shell commands",
    "numpy.distutils": "runs compilers and shell commands",
    "numpy.testing": "runstring() executes Python source",
    "monai.bundle": _EXECUTES_CONFIGS + " (run, load, download, ConfigParser, ConfigWorkflow)",
    "monai.utils.module": "optional_import/instantiate/locate import and call arbitrary names",
    "monai.utils.misc.run_cmd": "runs a subprocess",
    "monai.apps": "downloads and extracts archives, runs auto3dseg/nnU-Net subprocesses",
    "monai.auto3dseg": "algo_from_pickle " + _UNPICKLES,
    "monai.fl": "federated clients " + _EXECUTES_CONFIGS,
    "monai.data.torchscript_utils": "loads TorchScript archives, which carry code",
    "ignite.handlers.checkpoint": "Checkpoint/DiskSaver load, write and delete checkpoints at any path "
                                  "(use monai.handlers.CheckpointLoader)",
    "medseg.cli": "re-enters the medseg CLI (e.g. `bundle run --trust`)",
    "medseg.__main__": "re-enters the medseg CLI",
    "medseg.bundle.runner": "re-enters the bundle runner, which can run other bundles",
    "medseg.io.atomic": _WRITES_TEXT,
}
"""Dangerous callables inside :data:`ALLOWED_PACKAGES` (dotted prefix -> why)."""

ALLOWED_MODES: tuple[str, ...] = ("default", "callable")
"""``_mode_`` values accepted in safe mode; ``callable`` only returns (a partial of) a vetted target."""

RUN_PARAMETERS: tuple[str, ...] = ("workflow_name", "args_file", "config_file", "meta_file", "logging_file",
                                   "tracking", "properties_path")
"""``--set`` keys that ``monai.bundle.run`` takes as arguments (files, classes), not as config ids."""

_EXPR, _MACRO, _OVERRIDES = "$", "%", "--set"
_SUFFIXES = (".json", ".yaml", ".yml")
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


def _denied(name: str) -> str | None:
    for prefix, reason in DENIED_TARGETS.items():
        if name == prefix or name.startswith(prefix + "."):
            return reason
    return None


def _origin(obj: Any) -> str:
    """Dotted home of ``obj``: a module's name, a class's or function's ``module.qualname``, else its type's."""
    if isinstance(obj, ModuleType):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if (inspect.isclass(obj) or callable(obj)) and isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _outside(name: str) -> str | None:
    """Problem if ``name`` is outside the allowed packages or denied, else None."""
    if name.split(".")[0] not in ALLOWED_PACKAGES:
        return f"is outside the allowed packages ({', '.join(ALLOWED_PACKAGES)})"
    reason = _denied(name)
    return None if reason is None else f"is denied in safe mode: {reason}"


def _dotted_problem(name: str) -> str | None:
    """Resolve a dotted name the way ``pydoc.locate`` does, vetting every step; problem or None."""
    parts = name.split(".")
    if problem := _outside(name):
        return f"{name!r} {problem}"
    if any(p.startswith("_") for p in parts):
        return f"{name!r} names a private attribute"
    obj: Any = None
    n = 0
    while n < len(parts):  # import the longest module prefix, as pydoc.locate does
        try:
            obj = importlib.import_module(".".join(parts[: n + 1]))
        except Exception:  # noqa: BLE001 - not a module: the rest are attributes
            break
        n += 1
    if obj is None:
        return f"{name!r} cannot be imported"
    steps = [obj]
    for part in parts[n:]:
        try:
            obj = getattr(obj, part)
        except Exception:  # noqa: BLE001 - MONAI would fail to locate it
            return f"{name!r} does not exist"
        steps.append(obj)
    for step in steps:
        if problem := _outside(_origin(step)):
            return f"{name!r} resolves to {_origin(step)!r}, which {problem}"
    return None


def _target_problem(value: Any, locator: Any) -> str | None:
    """Why a ``_target_`` value is refused, or None; ``$`` strings are reported by the expression rule."""
    if not isinstance(value, str):
        return f"_target_ must be a literal class or function name, not {type(value).__name__}"
    if value.startswith(_EXPR):
        return None
    parts = value.split(".")
    if not all(p.isidentifier() for p in parts):
        return f"_target_ {_quote(value)} is not a literal dotted name (references and macros are not allowed)"
    if len(parts) > 1:
        problem = _dotted_problem(value)
        return None if problem is None else f"_target_ {problem}"
    modules = locator.get_component_module_name(value)  # exactly MONAI's lookup of a bare name
    if not modules:
        return f"_target_ {value!r} is not a MONAI component (write the full dotted name)"
    for module in [modules] if isinstance(modules, str) else modules:
        if problem := _dotted_problem(f"{module}.{value}"):
            return f"_target_ {problem}"
    return None


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
            problem = _target_problem(value, self.locator)
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
          overrides: Mapping[str, Any] | None) -> list[Finding]:
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
    return sorted(set(scanner.findings))


def scan_bundle(bundle_dir: str | os.PathLike[str],
                extra_files: Sequence[str | os.PathLike[str]] = ()) -> list[Finding]:
    """Findings in every ``configs/*.json|yaml|yml`` of a bundle, ``extra_files`` and the in-bundle
    files their ``%`` macros reference.

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
                 extra_files: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse an untrusted bundle (safe mode); call before anything reaches MONAI's parser.

    Parameters
    ----------
    bundle_dir
        The bundle folder.
    overrides
        The ``--set`` overrides that will be applied.
    extra_files
        More config files that will be parsed (see :func:`scan_bundle`).

    Raises
    ------
    BundleError
        ``<bundle_dir>: refused to run an untrusted bundle (safe mode); pass --trust to run it
        anyway:`` followed by one ``  file: key: problem`` line per finding; or if ``bundle_dir``
        is not a folder.
    """
    findings = _scan(bundle_dir, extra_files, overrides)
    if findings:
        lines = "\n".join(f"  {finding}" for finding in findings)
        raise BundleError(f"{bundle_dir}: refused to run an untrusted bundle (safe mode); "
                          f"pass --trust to run it anyway:\n{lines}")
