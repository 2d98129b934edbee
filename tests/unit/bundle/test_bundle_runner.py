"""Tests of medseg.bundle.runner: overrides, finding configs, and running a bundle safely or trusted."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from medseg.bundle.runner import find_config, parse_overrides, run_bundle, weights_only_loads
from medseg.errors import BundleError, InputError


def _bundle(root: Path, config: dict, name: str = "inference.json") -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "configs" / name).write_text(json.dumps(config), encoding="utf-8")
    return root


def test_parse_overrides_reads_json_values_and_keeps_strings() -> None:
    parsed = parse_overrides(["epochs=5", "lr=0.001", "network_def#channels=[8,16]", "resume=true",
                              "init_weights=null", "device=cuda:0", "name = a=b"])
    assert parsed == {"epochs": 5, "lr": 0.001, "network_def#channels": [8, 16], "resume": True,
                      "init_weights": None, "device": "cuda:0", "name": " a=b"}


@pytest.mark.parametrize("pair", ["epochs", "=5", " =x"])
def test_parse_overrides_refuses_items_without_a_key(pair: str) -> None:
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_overrides([pair])


def test_find_config_takes_json_or_yaml_and_lists_what_exists(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", {}, "train.json")
    (bundle / "configs" / "evaluate.yaml").write_text("{}\n", encoding="utf-8")
    (bundle / "configs" / "metadata.json").write_text("{}\n", encoding="utf-8")
    assert find_config(bundle, "evaluate").name == "evaluate.yaml"
    with pytest.raises(BundleError, match=r"no config named 'inference'; available: evaluate, train$"):
        find_config(bundle, "inference")
    with pytest.raises(BundleError, match="no such bundle folder"):
        find_config(tmp_path / "missing", "inference")


def test_weights_only_loads_is_forced_inside_and_restored_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    with weights_only_loads():
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    with weights_only_loads():
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "0"


def _writer_bundle(root: Path) -> Path:
    """A config whose run writes ``<output_dir>/ran.txt`` with a ``$`` expression (code: only with trust)."""
    return _bundle(root, {"output_dir": ".",
                          "run": ["$open(@output_dir + '/ran.txt', 'w').write('ran')"]})


def test_safe_mode_refuses_code_before_anything_runs(tmp_path: Path) -> None:
    bundle = _writer_bundle(tmp_path / "b")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BundleError, match=r"\$"):
        run_bundle(bundle, "inference", {"output_dir": str(out)})
    assert not (out / "ran.txt").exists()


def test_trusted_run_resolves_relative_paths_against_the_callers_folder(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _writer_bundle(tmp_path / "b")
    (tmp_path / "work" / "out").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    saved_path = list(sys.path)
    run_bundle(bundle, "inference", {"output_dir": "out"}, trust=True)  # the run itself happens inside the bundle
    assert (tmp_path / "work" / "out" / "ran.txt").read_text() == "ran"
    assert not (bundle / "out").exists()
    assert sys.path == saved_path and Path.cwd() == tmp_path / "work"


def test_a_failing_bundle_names_its_config_and_the_root_cause(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", {"run": ["$int('not a number')"]})
    with pytest.raises(BundleError, match=r"inference.json: the bundle failed: ValueError: invalid literal"):
        run_bundle(bundle, "inference", trust=True)
