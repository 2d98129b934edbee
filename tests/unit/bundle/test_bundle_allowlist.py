"""The safe-mode allow list itself: every entry resolves, carries a review note, and has each argument
that could name a file, import a module or pick a writer classified.

Adding a target without that review fails here: a name-based heuristic finds the arguments a reviewer
must look at, and each of them must be listed as written, read, data, a file-name part, pinned, or
reviewed-harmless. ``docs/safe_mode.md`` (the published list) must match the code.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from medseg.bundle.allowlist import ALLOWED_TARGETS, Vetted, allowed_objects, allowlist_markdown
from medseg.bundle.confinement import signature_parameters

#: argument names a reviewer must classify: files, folders, imports, code, pickles
SUSPICIOUS = frozenset({
    "path", "paths", "dir", "dirs", "directory", "file", "files", "filename", "fname", "folder", "root", "save",
    "cache", "writer", "reader", "url", "prefix", "postfix", "suffix", "ext", "module", "cmd", "command", "compile",
    "pickle", "load", "pretrained", "download", "hub", "checkpoint", "name", "format", "layout", "logger", "handler",
    "script", "exec", "eval", "import", "locate", "shell", "process", "formatter"})


def _suspicious(argument: str) -> bool:
    """An argument name with a token (``_``-separated) that suggests files, imports or code."""
    return any(token in SUSPICIOUS for token in argument.lower().split("_"))


DOC = Path(__file__).resolve().parents[3] / "docs" / "safe_mode.md"


def _parameters(entry: Vetted) -> dict[str, inspect.Parameter]:
    obj, _ = next(v for v in allowed_objects().values() if v[1] is entry)
    try:
        return dict(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return {}


def test_every_entry_resolves_to_a_distinct_object() -> None:
    names = [entry.name for entry in ALLOWED_TARGETS]
    assert len(names) == len(set(names)), "duplicate names"
    assert len(allowed_objects()) == len(ALLOWED_TARGETS), "two names resolve to the same object"
    for obj, entry in allowed_objects().values():
        assert callable(obj), entry.name
        assert not any(part.startswith("_") for part in entry.name.split(".")), entry.name


@pytest.mark.parametrize("entry", ALLOWED_TARGETS, ids=lambda e: e.name)
def test_entry_has_a_review_note_and_every_file_like_argument_classified(entry: Vetted) -> None:
    assert len(entry.review.split()) >= 6, f"{entry.name}: write what it reads, writes, imports and executes"
    parameters = _parameters(entry)
    named, var_keyword = signature_parameters(next(v[0] for v in allowed_objects().values() if v[1] is entry))
    classified = set(entry.paths) | set(entry.names) | set(entry.fixed) | set(entry.reviewed)
    unreviewed = [name for name in named if _suspicious(name) and name not in classified]
    assert not unreviewed, f"{entry.name}: classify {unreviewed} (writes/reads/data/names/fixed/reviewed)"
    # what the entry lists must be real arguments (a renamed argument would silently escape its rule)
    for name in classified:
        assert name in named, f"{entry.name}: {name!r} is not an argument"
    if entry.extra:
        assert var_keyword, f"{entry.name}: extra arguments listed but it takes no **kwargs"
        assert "*" in entry.extra or not set(entry.extra) & set(named), entry.name
    for name in entry.paths:  # a default path is relative to the bundle (where it runs) or None
        default = parameters[name].default if name in parameters else None
        if default is not inspect.Parameter.empty and default is not None:
            assert isinstance(default, str) and not Path(default).is_absolute() and ".." not in Path(default).parts
    for name, allowed in entry.fixed.items():  # leaving the argument out is allowed: its default must be too
        default = parameters[name].default
        assert default is inspect.Parameter.empty or default in allowed, f"{entry.name}: default of {name}"
    if entry.path_result:
        assert entry.paths, f"{entry.name}: a path factory must say under which argument its result lies"


def test_published_list_matches_the_code() -> None:
    assert DOC.read_text(encoding="utf-8") == allowlist_markdown(), (
        "docs/safe_mode.md is out of date: run `python -m medseg.bundle.allowlist > docs/safe_mode.md`")


def test_known_code_runners_and_writers_are_not_on_the_list() -> None:
    import logging

    import ignite.utils
    import monai.bundle
    import numpy
    import torch

    from medseg.bundle.allowlist import vetted

    for obj in (ignite.utils.setup_logger, torch.load, torch.save, numpy.save, numpy.savetxt, numpy.load,
                monai.bundle.run, monai.bundle.ConfigParser, logging.FileHandler, torch.jit.load):
        assert vetted(obj) is None, obj
