"""Tests of safe mode (medseg.bundle.safety): hostile bundles are refused before anything runs.

Every hostile payload would create a marker file if MONAI executed it; the tests assert the refusal
lists each offending key and that no marker appeared. Only ``test_monai_really_executes_the_payload``
lets MONAI run a payload (a harmless ``touch`` in ``tmp_path``), to show the other tests guard
against a real attack.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from medseg.bundle.safety import (
    RESOLVABLE_PACKAGES,
    Finding,
    check_bundle,
    scan_bundle,
    scan_config,
    scan_overrides,
)
from medseg.errors import BundleError


def _touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _bundle(root: Path, configs: dict[str, Any], files: dict[str, Any] | None = None) -> Path:
    """A model-zoo layout bundle: ``configs/<name>`` (JSON or YAML by suffix), ``models/``, ``docs/``."""
    for sub in ("configs", "models", "docs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, content in {**{f"configs/{k}": v for k, v in configs.items()}, **(files or {})}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):  # raw text (e.g. a broken file)
            path.write_text(content)
        elif path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(content))
        else:
            path.write_text(json.dumps(content, indent=2))
    return root


def _refusal(bundle: Path, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(BundleError) as info:
        check_bundle(bundle, overrides)
    message = str(info.value)
    head = f"{bundle}: refused to run an untrusted bundle (safe mode); pass --trust to run it anyway:\n"
    assert message.startswith(head)
    assert info.value.exit_code == 2
    return message


class _PickleBomb:
    """Unpickling this runs ``touch <marker>``; the tests only ever *write* it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (_touch(self.marker),)


def _payloads(tmp: Path) -> dict[str, tuple[dict[str, Any], list[str], str]]:
    """name -> (inference.json content, offending keys, problem fragment); each would create tmp/MARKER-<name>."""
    names = ("expr", "system", "imports", "subprocess", "exec", "pickle", "nested", "debug", "alias", "merge", "bare",
             "partial")
    m = {name: tmp / f"MARKER-{name}" for name in names}
    return {
        "expr": ({"x": f"$__import__('os').system({_touch(m['expr'])!r})"}, ["x"], "Python expression"),
        "system": ({"x": {"_target_": "os.system", "command": _touch(m["system"])}}, ["x#_target_"],
                   "not on the safe-mode allow list"),
        "imports": ({"imports": ["$import os"], "go": f"$os.system({_touch(m['imports'])!r})"},
                    ["imports#0", "go"], "Python"),
        "subprocess": ({"x": {"_target_": "subprocess.run", "args": ["touch", str(m["subprocess"])]}}, ["x#_target_"],
                       "not on the safe-mode allow list"),
        "exec": ({"x": {"_target_": "builtins.exec", "source": f"open({str(m['exec'])!r}, 'w')"}}, ["x#_target_"],
                 "not on the safe-mode allow list"),
        "pickle": ({"x": {"_target_": "torch.load", "f": "models/model.pt", "weights_only": False}},
                   ["x#_target_", "x#weights_only"], "unpickles"),
        "nested": ({"x": {"_target_": "monai.bundle.run", "config_file": "docs/other.json", "run_id": "go"}},
                   ["x#_target_"], "not on the safe-mode allow list"),
        "passwd": ({"x": "%/etc/passwd#x"}, ["x"], "leaves the bundle"),
        "outside": ({"x": "%../outside.json#x"}, ["x"], "leaves the bundle"),
        "debug": ({"x": {"_target_": "torch.nn.Identity", "_mode_": "debug"}}, ["x#_mode_"], "pdb"),
        "debug_kwarg": ({"x": {"_target_": "torch.nn.Identity", "_debug_": True}}, ["x#_debug_"], "breakpoint"),
        # pydoc.locate("torch.os.system") is os.system: an allowed prefix is not enough
        "alias": ({"x": {"_target_": "torch.os.system", "command": _touch(m["alias"])}}, ["x#_target_"], "(it is posix.system)"),
        # MONAI merges top-level "a#b" keys into a's content: this overrides net's _target_
        "merge": ({"net": {"_target_": "torch.nn.Identity", "command": _touch(m["merge"])},
                   "net#_target_": "os.system"}, ["net#_target_"], "not on the safe-mode allow list"),
        # a bare name that is no MONAI component falls back to builtins in pydoc.locate
        "bare": ({"x": {"_target_": "exec", "source": f"open({str(m['bare'])!r}, 'w')"}}, ["x#_target_"],
                 "not a MONAI component"),
        "reference": ({"t": "os.system", "x": {"_target_": "@t", "command": _touch(m["partial"])}}, ["x#_target_"],
                      "not a literal dotted name"),
    }


def _write_side_files(bundle: Path, tmp: Path) -> None:
    (bundle / "models" / "model.pt").write_bytes(pickle.dumps(_PickleBomb(tmp / "MARKER-pickle")))
    nested = f"$__import__('os').system({_touch(tmp / 'MARKER-nested')!r})"
    (bundle / "docs" / "other.json").write_text(json.dumps({"go": nested}))
    (bundle.parent / "outside.json").write_text(json.dumps({"x": {"_target_": "os.system", "command": "true"}}))


def _no_markers(tmp: Path) -> None:
    assert sorted(p.name for p in tmp.rglob("MARKER*")) == []


@pytest.mark.parametrize("name", sorted(_payloads(Path("/")).keys()))
def test_each_hostile_payload_is_refused_and_runs_nothing(tmp_path: Path, name: str) -> None:
    config, keys, fragment = _payloads(tmp_path)[name]
    bundle = _bundle(tmp_path / "bundle", {"inference.json": config})
    _write_side_files(bundle, tmp_path)
    message = _refusal(bundle)
    lines = message.splitlines()[1:]
    for key in keys:
        assert any(line.startswith(f"  configs/inference.json: {key}: ") for line in lines), (key, message)
    assert fragment in message
    _no_markers(tmp_path)


def test_all_offences_of_one_bundle_are_listed_in_one_message(tmp_path: Path) -> None:
    payloads = _payloads(tmp_path)
    config: dict[str, Any] = {}
    expected: set[str] = set()
    for name, (content, keys, _) in payloads.items():
        if name in ("imports", "merge", "reference"):  # keep their top-level keys as they are
            config.update(content)
            expected.update(keys)
        else:
            config[name] = content["x"]
            expected.update(k.replace("x", name, 1) for k in keys)
    bundle = _bundle(tmp_path / "bundle", {"inference.json": config})
    _write_side_files(bundle, tmp_path)
    message = _refusal(bundle)
    listed = {line.split(": ")[1] for line in message.splitlines()[1:]}
    assert expected <= listed, expected - listed
    assert len(message.splitlines()) - 1 >= len(expected)
    _no_markers(tmp_path)


def test_findings_are_sorted_by_file_then_key(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", {"b.json": {"z": "$1", "a": "$2"}, "a.yaml": {"y": "$3"}})
    findings = scan_bundle(bundle)
    assert [(f.file, f.key) for f in findings] == [("configs/a.yaml", "y"), ("configs/b.json", "a"),
                                                   ("configs/b.json", "z")]
    assert findings == sorted(findings)
    assert str(findings[0]).startswith("configs/a.yaml: y: Python expression ('$3')")


BENIGN_INFERENCE: dict[str, Any] = {
    "bundle_root": ".",
    "device": "cpu",
    "roi": [96, 96, 96],
    "network_def": {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi", "sw_batch_size": 4, "overlap": 0.5},
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image", "image_only": False},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0,
         "clip": True},
    ]},
    "dataset": {"_target_": "monai.data.Dataset", "data": [], "transform": "@preprocessing"},
    "dataloader": {"_target_": "monai.data.DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
    "roi_copy": "%#roi",
    "post_keys": "%configs/other.json#y",
    "activation": {"_target_": "torch.softmax", "_mode_": "callable", "dim": 1},
    "handlers": [{"_target_": "CheckpointLoader", "load_path": "models/model.pt",
                  "load_dict": {"model": "@network_def"}, "map_location": "cpu"},
                 {"_target_": "StatsHandler", "iteration_log": False}],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network_def", "inferer": "@inferer", "val_handlers": "@handlers", "amp": False},
    "run": [{"_target_": "medseg.bundle.components.run_engine", "engine": "@evaluator"}],
    "_desc_": "no $ anywhere",
    "loader": {"_target_": "CacheDataset", "data": [{"image": "data/a.nii.gz"}], "cache_rate": 1.0,
               "_requires_": "@network_def", "_disabled_": False},
}


def test_benign_zoo_style_bundle_passes(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", {
        "inference.json": BENIGN_INFERENCE,
        "other.json": {"y": ["pred", "label"]},
        "train.yaml": {"lr": 1e-4, "optimizer": {"_target_": "torch.optim.Adam", "lr": "@lr"}},
        "metadata.json": {"version": "0.1.0", "monai_version": "1.6.1", "task": "spleen segmentation"},
    })
    assert scan_bundle(bundle) == []
    check_bundle(bundle, {"device": "cpu", "roi": [64, 64, 64], "network_def#channels": "[8, 16]"})


def test_typical_model_zoo_inference_json_is_refused_with_every_expression_listed(tmp_path: Path) -> None:
    zoo = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                        "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2,
                        "norm": "batch"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 4},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir"},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }
    bundle = _bundle(tmp_path / "spleen", {"inference.json": zoo})
    message = _refusal(bundle)
    listed = [line.split(": ")[1] for line in message.splitlines()[1:]]
    expected = ["dataset#data", "datalist", "device", "handlers#0#load_path", "imports#0", "imports#1", "initialize#0",
                "network", "output_dir", "run#0"]
    assert sorted(listed) == sorted(expected)
    assert "configs/inference.json: imports#0: imports run Python code ('$import glob')" in message
    assert "configs/inference.json: run#0: Python expression ('$@evaluator.run()') is not allowed" in message


def test_yaml_configs_are_scanned(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    bundle = _bundle(tmp_path / "bundle", {"train.yaml": {
        "trainer": {"_target_": "os.system", "command": _touch(marker)},
        "lr": "$0.1 * 2",
    }})
    message = _refusal(bundle)
    assert "  configs/train.yaml: lr: Python expression ('$0.1 * 2')" in message
    assert "  configs/train.yaml: trainer#_target_: _target_ 'os.system' is not on the safe-mode allow list" in message
    assert not marker.exists()


def test_set_overrides_are_scanned(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", {"inference.json": BENIGN_INFERENCE, "other.json": {"y": 1}})
    message = _refusal(bundle, {
        "device": "$torch.device('cpu')",
        "network_def#_target_": "os.system",
        "inferer": '{"_target_": "subprocess.run", "args": ["true"]}',
        "args_file": "/tmp/args.json",
        "post_keys": "%../../x.json#y",
    })
    assert "  --set: device: Python expression (\"$torch.device('cpu')\") is not allowed in safe mode" in message
    assert "  --set: network_def#_target_: _target_ 'os.system' is not on the safe-mode allow list" in message
    assert "  --set: inferer#_target_: _target_ 'subprocess.run' is not on the safe-mode allow list" in message
    assert "  --set: args_file: 'args_file' is a monai.bundle.run parameter" in message
    assert "  --set: post_keys: file reference leaves the bundle" in message
    assert scan_overrides({"device": "cpu", "roi": [8, 8], "network_def#channels": "[8, 16]"}, bundle) == []
    (bundle / "docs" / "evil.json").write_text(json.dumps({"n": "$exit()"}))
    assert "  docs/evil.json: n: Python expression ('$exit()')" in _refusal(bundle, {"inferer": "%docs/evil.json#n"})


def test_symlinked_config_leaving_the_bundle_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"a": 1}))
    bundle = _bundle(tmp_path / "bundle", {"inference.json": {"a": 1}, "shared.json": {"b": 2}})
    (bundle / "configs" / "evil.json").symlink_to(outside)
    (bundle / "configs" / "alias.json").symlink_to(bundle / "configs" / "shared.json")  # inside: fine
    findings = scan_bundle(bundle)
    assert [(f.file, f.key) for f in findings] == [("configs/evil.json", "")]
    assert "symlink leaves the bundle" in findings[0].problem
    assert f"  configs/evil.json: symlink leaves the bundle (resolves to {outside.resolve()})" in _refusal(bundle)


def test_unparsable_config_is_a_finding(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", {"inference.json": '{"a": ', "train.yaml": "a: [1, 2\n"})
    message = _refusal(bundle)
    assert "  configs/inference.json: cannot be parsed as JSON" in message
    assert "  configs/train.yaml: cannot be parsed as YAML" in message


def test_macro_referenced_files_inside_the_bundle_are_scanned_too(tmp_path: Path) -> None:
    config = {"net": "%models/net.json#n", "missing": "%docs/nope.yaml"}
    bundle = _bundle(tmp_path / "bundle", {"inference.json": config},
                     files={"models/net.json": {"n": {"_target_": "os.system", "command": "true"}}})
    findings = {(f.file, f.key) for f in scan_bundle(bundle)}
    assert findings == {("models/net.json", "n#_target_"), ("configs/inference.json", "missing")}


def test_relative_and_absolute_macros(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", {"other.json": {"y": 1}})
    # "%##" at depth 2 is the root: "%##../outside.json" is MONAI's "%../outside.json"
    config = {"a": {"b": "%##x", "c": "%#y", "d": "%configs/../configs/other.json#y",
                    "e": f"%{bundle}/configs/other.json#y", "f": "%##../outside.json",
                    "g": f"%{tmp_path}/outside.yaml"}, "x": 1}
    keys = {f.key: f.problem for f in scan_config(config, "configs/inference.json", bundle)}
    assert set(keys) == {"a#f", "a#g"}
    assert all("leaves the bundle" in problem for problem in keys.values())


def test_field_rules(tmp_path: Path) -> None:
    config = {
        "a": {"_target_": 42},
        "b": {"_target_": "torch.nn.Identity", "_mode_": "partial"},
        "c": {"_target_": "LoadImaged", "keys": "image", "reader": "NumpyReader", "allow_pickle": True},
        "d": {"_target_": "torch.serialization.load"},  # torch.load under its real name
        "e": {"_target_": "torch.nn.Module.__subclasses__"},
        "f": {"_target_": "numpy.savetxt", "fname": "x.pth", "X": [[0]], "header": "import os"},
        "g": {"_target_": "monai.utils.optional_import", "module": "os"},
        "h": {"_target_": "ignite.handlers.Checkpoint"},
        "$key": 1,
        "i": {"_target_": "torch.nn.Identity", "_mode_": " callable "},
        "j": {"_target_": "run", "config_file": "x.json"},  # bare name -> monai.bundle.scripts.run
    }
    keys = {f.key: f.problem for f in scan_config(config, "c.json", tmp_path)}
    assert set(keys) == {"a#_target_", "b#_mode_", "c#allow_pickle", "d#_target_", "e#_target_", "f#_target_",
                         "g#_target_", "h#_target_", "$key", "j#_target_"}
    assert "private" in keys["e#_target_"]
    assert "monai.bundle.scripts.run" in keys["j#_target_"]
    assert "monai.utils.module.optional_import" in keys["g#_target_"]


def test_public_api_shapes(tmp_path: Path) -> None:
    assert RESOLVABLE_PACKAGES == ("monai", "torch", "medseg", "ignite", "numpy")
    finding = Finding("configs/x.json", "run#0", "problem")
    assert str(finding) == "configs/x.json: run#0: problem"
    with pytest.raises(BundleError, match="no such bundle folder"):
        check_bundle(tmp_path / "missing")


def test_monai_really_executes_the_payload(tmp_path: Path) -> None:
    """CONTROL TEST - deliberately runs a payload through MONAI (a harmless ``touch`` in tmp_path).

    Shows that the ``_target_: os.system`` config refused above is a real attack: without safe mode,
    MONAI's ConfigParser runs it.
    """
    from monai.bundle import ConfigParser

    marker = tmp_path / "MARKER-control"
    shell = {"_target_": "os.system", "command": _touch(marker)}
    bundle = _bundle(tmp_path / "bundle", {"inference.json": {"shell": shell}})
    assert "shell#_target_" in _refusal(bundle)
    assert not marker.exists()

    parser = ConfigParser()  # what an unchecked runner would do
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.get_parsed_content("shell")
    assert marker.exists()


def test_yaml_alias_bomb_and_cycles_do_not_hang_the_scan(tmp_path: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(7))
    cycle = "&c {self: *c, x: 1}\n"
    bundle = _bundle(tmp_path / "bundle", {"bomb.yaml": bomb, "cycle.yaml": cycle})
    findings = {(f.file, f.key): f.problem for f in scan_bundle(bundle)}
    assert "values to check" in findings[("configs/bomb.yaml", "")]
    assert "recursive structure" in findings[("configs/cycle.yaml", "self")]
