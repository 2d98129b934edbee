"""External tools the tests drive for real (Debian packages installed by scripts/install_system_deps.sh).

A test that needs a missing tool is skipped on a developer's machine, but runs (and fails) under
``CI=true``: CI must never pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
DCIODVFY = shutil.which("dciodvfy")


def needs(found: object, what: str) -> pytest.MarkDecorator:
    """Skip unless ``found`` (a tool's path, or a truth value) is set; under CI=true the test runs instead."""
    return pytest.mark.skipif(not found and not IN_CI,
                              reason=f"{what} not installed (scripts/install_system_deps.sh installs it as root)")


needs_dciodvfy = needs(DCIODVFY, "dciodvfy (dicom3tools)")


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for a DICOM file (warnings are not errors)."""
    assert DCIODVFY is not None, "dciodvfy is required in CI: scripts/install_system_deps.sh installs dicom3tools"
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]

#: Seconds a test waits for something that must happen (a SEG, a state, a process) before it gives up.
#: A hang guard, not a speed requirement: a slow or loaded machine waits longer, it does not fail.
HANG_GUARD = 900.0


def load_script(name: str) -> types.ModuleType:
    """A module of ``scripts/`` (``scripts/<name>.py``), loaded once by its file (the folder is no package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
