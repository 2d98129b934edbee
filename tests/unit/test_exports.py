"""The packages' public names: every name in ``__all__`` resolves, and the lazily exporting packages stay light."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["medseg.io", "medseg.io.dicom", "medseg.data", "medseg.engines", "medseg.inference", "medseg.metrics",
            "medseg.reports", "medseg.bundle", "medseg.pacs", "medseg.labels", "medseg.networks", "medseg.cli"]
#: Packages whose __init__ exports lazily (lazy_loader + __init__.pyi): importing them loads no submodule.
LAZY = ["medseg.io", "medseg.data", "medseg.engines", "medseg.inference", "medseg.metrics", "medseg.bundle",
        "medseg.pacs"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_resolves(name: str) -> None:
    package = importlib.import_module(name)
    exported = package.__all__
    assert exported and len(set(exported)) == len(exported)
    for attr in exported:
        assert getattr(package, attr) is not None, f"{name}.{attr}"
    assert set(exported) <= set(dir(package))


@pytest.mark.parametrize("name", LAZY)
def test_lazy_packages_list_their_names_in_the_stub(name: str) -> None:
    package = importlib.import_module(name)
    stub = ast.parse(Path(package.__file__).with_suffix(".pyi").read_text(encoding="utf-8"))
    listed = next(ast.literal_eval(node.value) for node in stub.body
                  if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__all__"])
    assert sorted(listed) == sorted(package.__all__)


def test_importing_a_lazy_package_loads_no_heavy_library() -> None:
    code = ("import sys\n" + "".join(f"import {name}\n" for name in LAZY)
            + "print(sorted(m for m in ('torch', 'monai', 'ignite', 'SimpleITK', 'pydicom', 'matplotlib') "
              "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
