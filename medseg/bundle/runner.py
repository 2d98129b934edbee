"""Run any bundle in the MONAI model-zoo layout: ``medseg bundle run BUNDLE [--config NAME] [--set K=V] [--trust]``.

Safe mode (the default) scans the configs before MONAI parses anything (see
:mod:`medseg.bundle.safety`) and then runs them so that nothing of the bundle but its configs is used:
the bundle's ``logging.conf`` is not applied (``logging.config.fileConfig`` builds handlers from the
file, e.g. a FileHandler writing anywhere), and the bundle folder is kept off ``sys.path`` (MONAI puts
the config's bundle folder on it before ``run``: a ``.py`` file in the bundle could shadow a module
imported later; here MONAI sees a copy of the config in an empty temporary folder). In every mode
``torch.load`` is forced to ``weights_only=True`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), so a pickled
checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from medseg.errors import BundleError, InputError, unwrapped

log = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
#: Override keys holding paths; relative values are taken relative to the caller's working folder.
PATH_KEYS = ("bundle_root", "dataset_dir", "output_dir", "data_dir", "ckpt_dir", "ckpt_path")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["epochs=5", "device=cpu", "network_def#channels=[8,16]"]`` -> dict; values are parsed as
    JSON when they are valid JSON (numbers, lists, true/false/null), else kept as strings.

    Raises
    ------
    InputError
        For an item without ``=``.
    """
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(None, f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def find_config(bundle: Path, name: str) -> Path:
    """``configs/<name>.json|yaml|yml`` of a bundle.

    Raises
    ------
    BundleError
        If the bundle folder or the config does not exist.
    """
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle folder")
    configs = bundle / "configs"
    for suffix in CONFIG_SUFFIXES:
        candidate = configs / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in configs.glob("*")
                       if p.suffix in CONFIG_SUFFIXES and p.stem not in ("metadata", "plan"))
    raise BundleError(f"{configs}: no config named {name!r}" + (f"; available: {', '.join(available)}" if available else ""))


#: Configs an override config (one that uses ids it does not define, like model-zoo ``evaluate.json``) is
#: layered on, tried in order: medseg's ``evaluate.json`` overrides ``inference.json``, the zoo's ``train.json``.
BASE_CONFIGS = ("inference", "train")


def read_config_data(path: Path) -> Any:
    """A config file as plain JSON / YAML data (``json.loads`` / ``yaml.safe_load``: nothing is evaluated);
    None if it does not parse (safe mode names the problem)."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return None


def _ids(content: Any) -> tuple[set[str], set[str]]:
    """(ids a config defines at its top level, ids it uses: references ``@id...`` and nested keys ``id#...``)."""
    if not isinstance(content, Mapping):
        return set(), set()
    defined = {str(k).lstrip("+") for k in content if "#" not in str(k) and "::" not in str(k)}
    used: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str) and value.startswith("@") and not value.startswith(("@#", "@::")):
            used.add(value[1:].replace("::", "#").split("#")[0])
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for key, value in content.items():
        head = str(key).lstrip("+").replace("::", "#")
        if "#" in head:
            used.add(head.split("#")[0])
        walk(value)
    return defined, used


def config_layers(bundle: Path, name: str) -> list[Path]:
    """The config files that ``--config name`` runs, in MONAI's merge order: ``[base, config]`` when the
    config uses ids it does not define and one of :data:`BASE_CONFIGS` defines them all (as
    ``--config_file "['configs/inference.json','configs/evaluate.json']"``), else ``[config]``.

    Raises
    ------
    BundleError
        As :func:`find_config`.
    """
    config = find_config(bundle, name)
    defined, used = _ids(read_config_data(config))
    missing = used - defined - {"_meta_"}
    if missing and name not in BASE_CONFIGS:
        for base_name in BASE_CONFIGS:
            try:
                base = find_config(bundle, base_name)
            except BundleError:
                continue
            base_defined, _ = _ids(read_config_data(base))
            if missing <= base_defined | defined:
                return [base, config]
    return [config]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force ``torch.load(..., weights_only=True)`` for everything run inside."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


class _DropMessage(logging.Filter):
    """Drops MONAI's notices about the logging and metadata files that medseg chose (and names itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "skipping logging" not in message and "Cannot find the metadata config file" not in message


@contextlib.contextmanager
def _isolated(bundle: Path, config_files: Sequence[Path], folder: str) -> Iterator[list[Path]]:
    """Copies of ``config_files`` in ``folder/configs`` (MONAI adds ``folder`` to ``sys.path``, not the
    bundle), with every ``sys.path`` entry that is the working folder or inside the bundle (but not
    inside the running Python's environment, should the bundle folder hold it) removed for the
    duration (restored afterwards)."""
    copies = [Path(folder) / "configs" / config_file.name for config_file in config_files]
    copies[0].parent.mkdir()
    for config_file, copy in zip(config_files, copies):
        shutil.copyfile(config_file, copy)
    saved = list(sys.path)
    environment = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix}]

    def bundle_code(entry: str) -> bool:  # inside the bundle, and not the running Python's own environment
        path = Path(os.path.abspath(entry)).resolve()
        return path.is_relative_to(bundle) and not any(path.is_relative_to(env) for env in environment)

    sys.path[:] = [entry for entry in saved if entry not in ("", ".") and not bundle_code(entry)]
    try:
        yield copies
    finally:
        sys.path[:] = saved


@contextlib.contextmanager
def _no_notice() -> Iterator[None]:
    """Without MONAI's notice that no logging config is applied (``logging_file=False`` is medseg's choice)."""
    workflows = logging.getLogger("monai.bundle.workflows")
    drop = _DropMessage()
    workflows.addFilter(drop)
    try:
        yield
    finally:
        workflows.removeFilter(drop)


def run_bundle(bundle_dir: str | os.PathLike[str], config: str = "inference", overrides: Mapping[str, Any] | None = None,
               trust: bool = False) -> None:
    """Run ``configs/<config>`` of a bundle with MONAI's ``monai.bundle.run`` (ids ``initialize``,
    ``run``, ``finalize``), ``bundle_root`` set to the bundle and ``overrides`` applied; an override config
    (medseg's ``evaluate.json``) layered on the config it overrides (:func:`config_layers`).

    Raises
    ------
    BundleError
        Missing bundle or config, a bundle refused by safe mode (unless ``trust``), or a failure
        inside the bundle (its root cause is named).
    InputError
        Bad input found by medseg's own components while running.
    """
    from monai.bundle import run

    from medseg.bundle.components import META_FILE
    from medseg.bundle.safety import check_bundle

    bundle = Path(bundle_dir).resolve()
    config_files = config_layers(bundle, config)
    config_file = config_files[-1]
    values = dict(overrides or {})
    for key in PATH_KEYS:  # relative to the caller's folder, before we move into the bundle
        value = values.get(key)
        if isinstance(value, str) and value and not value.startswith(("@", "%", "$")) and not os.path.isabs(value):
            values[key] = os.path.abspath(value)
    values.setdefault("bundle_root", str(bundle))  # checked as it will run
    if not trust:
        check_bundle(bundle, values, config=config_files)  # before MONAI parses anything
    else:
        log.warning("running %s with --trust: its configs may execute arbitrary code", bundle)
    meta = bundle / META_FILE
    logging_conf = bundle / "configs" / "logging.conf"
    kwargs: dict[str, Any] = {"config_file": [str(f) for f in config_files]}
    if meta.is_file():
        kwargs["meta_file"] = str(meta)
    else:
        log.warning("%s: no %s; running without metadata", bundle, META_FILE.as_posix())
    quiet = logging.getLogger("medseg").getEffectiveLevel() > logging.INFO  # libraries are kept at WARNING anyway
    # a trusted bundle's own logging, unless medseg runs --quiet; otherwise medseg's logging stays as it is
    # (safe mode never applies the bundle's file: fileConfig builds handlers, e.g. files, from it)
    kwargs["logging_file"] = str(logging_conf) if trust and logging_conf.is_file() and not quiet else False
    log.info("running %s (%s)", " + ".join(map(str, config_files)), ", ".join(f"{k}={v}" for k, v in values.items()))

    def failed(cause: BaseException) -> BundleError:  # what the bundle did wrong, not MONAI's wrappers
        first = str(cause).strip().splitlines()[0][:400] if str(cause).strip() else ""
        return BundleError(f"{config_file}: the bundle failed: {type(cause).__name__}: {first}")

    # MONAI resolves relative `%file` macros against the working folder; safe mode checked them
    # against the bundle, so run from inside the bundle
    with unwrapped(failed), weights_only_loads(), contextlib.chdir(bundle), tempfile.TemporaryDirectory() as tmp, \
            _no_notice():
        if quiet:
            for name in ("monai.bundle.scripts", "monai.bundle.workflows"):  # own handlers, level INFO
                logging.getLogger(name).setLevel(logging.WARNING)
        if trust:  # the bundle's own code may be imported while it runs, not by whatever runs next
            saved_path = list(sys.path)
            try:
                run(**kwargs, **values)
            finally:
                sys.path[:] = saved_path
        else:
            with _isolated(bundle, config_files, tmp) as copies, warnings.catch_warnings():
                # MONAI warns that _target_ runs with no allow list: in safe mode it was checked against one
                warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
                run(**{**kwargs, "config_file": [str(c) for c in copies]}, **values)

