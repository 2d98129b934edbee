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

from medseg.errors import BundleError, InputError, MedsegError, root_cause

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
def _isolated(bundle: Path, config_file: Path, folder: str) -> Iterator[Path]:
    """A copy of ``config_file`` in ``folder/configs`` (MONAI adds ``folder`` to ``sys.path``, not the
    bundle), with every ``sys.path`` entry that is the working folder or inside the bundle (but not
    inside the running Python's environment, should the bundle folder hold it) removed for the
    duration (restored afterwards)."""
    copy = Path(folder) / "configs" / config_file.name
    copy.parent.mkdir()
    shutil.copyfile(config_file, copy)
    saved = list(sys.path)
    environment = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix}]

    def bundle_code(entry: str) -> bool:  # inside the bundle, and not the running Python's own environment
        path = Path(os.path.abspath(entry)).resolve()
        return path.is_relative_to(bundle) and not any(path.is_relative_to(env) for env in environment)

    sys.path[:] = [entry for entry in saved if entry not in ("", ".") and not bundle_code(entry)]
    try:
        yield copy
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
    ``run``, ``finalize``), ``bundle_root`` set to the bundle and ``overrides`` applied.

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
    config_file = find_config(bundle, config)
    values = dict(overrides or {})
    for key in PATH_KEYS:  # relative to the caller's folder, before we move into the bundle
        value = values.get(key)
        if isinstance(value, str) and value and not value.startswith(("@", "%", "$")) and not os.path.isabs(value):
            values[key] = os.path.abspath(value)
    values.setdefault("bundle_root", str(bundle))  # checked as it will run
    if not trust:
        check_bundle(bundle, values, config=config_file)  # before MONAI parses anything
    else:
        log.warning("running %s with --trust: its configs may execute arbitrary code", bundle)
    meta = bundle / META_FILE
    logging_conf = bundle / "configs" / "logging.conf"
    kwargs: dict[str, Any] = {"config_file": str(config_file)}
    if meta.is_file():
        kwargs["meta_file"] = str(meta)
    else:
        log.warning("%s: no %s; running without metadata", bundle, META_FILE.as_posix())
    quiet = logging.getLogger("medseg").getEffectiveLevel() > logging.INFO  # libraries are kept at WARNING anyway
    # a trusted bundle's own logging, unless medseg runs --quiet; otherwise medseg's logging stays as it is
    # (safe mode never applies the bundle's file: fileConfig builds handlers, e.g. files, from it)
    kwargs["logging_file"] = str(logging_conf) if trust and logging_conf.is_file() and not quiet else False
    log.info("running %s (%s)", config_file, ", ".join(f"{k}={v}" for k, v in values.items()))
    try:
        # MONAI resolves relative `%file` macros against the working folder; safe mode checked them
        # against the bundle, so run from inside the bundle
        with weights_only_loads(), contextlib.chdir(bundle), tempfile.TemporaryDirectory() as tmp, _no_notice():
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
                with _isolated(bundle, config_file, tmp) as copy, warnings.catch_warnings():
                    # MONAI warns that _target_ runs with no allow list: in safe mode it was checked against one
                    warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
                    run(**{**kwargs, "config_file": str(copy)}, **values)
    except MedsegError:
        raise
    except Exception as exc:  # report what the bundle did wrong, not MONAI's wrappers
        cause = root_cause(exc)
        if isinstance(cause, MedsegError):
            raise cause from exc
        first = str(cause).strip().splitlines()[0][:400] if str(cause).strip() else ""
        raise BundleError(f"{config_file}: the bundle failed: {type(cause).__name__}: {first}") from exc
