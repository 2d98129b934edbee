"""Safe mode against writers: a bundle that passes the name checks must still not write a file outside its
own folder and the folders the user named, nor put its own files on ``sys.path``.

The payload of issue 12 is the model: ``ignite.utils.setup_logger`` writing every log record into a
``.pth`` file in site-packages, which Python runs at its next start. Here "site-packages" is a folder
in ``tmp_path`` (``SITE``); each test asserts that no file appears there. The control tests run the same
payloads with ``--trust`` (in a subprocess) to show they are live.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medseg.bundle.runner import run_bundle
from medseg.bundle.safety import check_bundle, scan_bundle
from medseg.errors import BundleError

PTH_FORMAT = "import os; os.system('touch MARKER')%(message).0s"


def _bundle(root: Path, config: dict[str, Any], logging_conf: str | None = None) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps({"initialize": [], "run": [], **config}))
    if logging_conf is not None:
        (root / "configs" / "logging.conf").write_text(logging_conf)
    return root


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site-packages"
    site.mkdir(exist_ok=True)
    return site


def _refused(bundle: Path, overrides: dict[str, Any] | None = None) -> list[str]:
    """The finding lines of the refusal of ``configs/inference.json`` run with ``overrides``."""
    with pytest.raises(BundleError) as info:
        run_bundle(bundle, "inference", overrides)
    lines = str(info.value).splitlines()
    assert lines[0].endswith("refused to run an untrusted bundle (safe mode); pass --trust to run it anyway:")
    return lines[1:]


def _hostile(site: Path) -> dict[str, tuple[dict[str, Any], str, str]]:
    """name -> (component in `initialize`, offending key suffix, reason fragment); each would write into ``site``."""
    pth = str(site / "zz.pth")
    return {
        "ignite_setup_logger": ({"_target_": "ignite.utils.setup_logger", "name": None, "reset": True,
                                 "format": PTH_FORMAT, "filepath": pth}, "_target_", "not on the safe-mode allow list"),
        "stats_handler_file_handler": ({"_target_": "StatsHandler", "name": "x", "logger_handler": {
            "_target_": "logging.FileHandler", "filename": pth}}, "logger_handler#_target_", "not on the safe-mode"),
        "stats_handler_unknown_argument": ({"_target_": "StatsHandler", "filepath": pth}, "filepath",
                                           "not a reviewed argument"),
        "tensorboard_log_dir": ({"_target_": "TensorBoardStatsHandler", "log_dir": str(site)}, "log_dir",
                                "outside the bundle"),
        "tensorboard_summary_writer": ({"_target_": "TensorBoardStatsHandler", "summary_writer": {
            "_target_": "torch.utils.tensorboard.SummaryWriter", "log_dir": str(site)}}, "summary_writer#_target_",
            "not on the safe-mode allow list"),
        "tensorboard_summary_writer_reference": ({"_target_": "TensorBoardStatsHandler", "summary_writer": "@where"},
                                                 "summary_writer", "accepts only null"),
        "checkpoint_save_dir": ({"_target_": "CheckpointSaver", "save_dir": str(site), "save_dict": {},
                                 "save_final": True}, "save_dir", "outside the bundle"),
        "checkpoint_file_prefix": ({"_target_": "CheckpointSaver", "save_dir": "models", "save_dict": {},
                                    "file_prefix": f"../../{site.name}/zz"}, "file_prefix", "not a plain file-name"),
        "checkpoint_callable_mode": ({"_target_": "CheckpointSaver", "_mode_": "callable", "save_dict": {}},
                                     "_mode_", "caller would choose"),
        "save_image_output_dir": ({"_target_": "SaveImaged", "keys": "image", "output_dir": str(site),
                                   "output_ext": ".pth"}, "output_dir", "outside the bundle"),
        "save_image_data_root": ({"_target_": "SaveImaged", "keys": "image", "output_dir": "out",
                                  "data_root_dir": "/"}, "data_root_dir", "accepts only ''"),
        "save_image_writer_by_name": ({"_target_": "SaveImaged", "keys": "image", "output_dir": "out",
                                       "writer": "os.system"}, "writer", "accepts only null, 'NibabelWriter'"),
        "load_image_reader_by_name": ({"_target_": "LoadImaged", "keys": "image", "reader": "builtins.exec"},
                                      "reader", "accepts only null, 'NibabelReader'"),
        "medseg_postprocessing": ({"_target_": "medseg.bundle.components.inference_postprocessing",
                                   "plan": None, "preprocessing": None, "output_dir": "@where"}, "output_dir",
                                  "outside the bundle"),
        "medseg_run_training": ({"_target_": "medseg.engines.training.run_training", "trainer": None,
                                 "evaluator": None, "split": None, "bundle_root": str(site)}, "bundle_root",
                                "outside the bundle"),
        "computed_path": ({"_target_": "TensorBoardStatsHandler", "log_dir": {
            "_target_": "medseg.bundle.components.run_engine", "engine": None}}, "log_dir", "cannot be checked"),
        "home_folder": ({"_target_": "TensorBoardStatsHandler", "log_dir": "~/.config/autostart"}, "log_dir",
                        "outside the bundle"),
    }


@pytest.mark.parametrize("name", sorted(_hostile(Path("/x")).keys()))
def test_hostile_writer_is_refused_and_writes_nothing(tmp_path: Path, name: str) -> None:
    site = _site(tmp_path)
    component, key, fragment = _hostile(site)[name]
    bundle = _bundle(tmp_path / "bundle", {"initialize": [component], "where": "@elsewhere",
                                           "elsewhere": str(site)})
    lines = _refused(bundle)
    assert any(line.startswith(f"  configs/inference.json: initialize#0#{key}: ") and fragment in line
               for line in lines), lines
    assert list(site.iterdir()) == []
    assert not list(tmp_path.rglob("MARKER"))


def test_symlink_inside_the_bundle_that_leads_out_is_refused(tmp_path: Path) -> None:
    site = _site(tmp_path)
    bundle = _bundle(tmp_path / "bundle", {"initialize": [
        {"_target_": "TensorBoardStatsHandler", "log_dir": "logs/tb"}]})
    (bundle / "logs").symlink_to(site, target_is_directory=True)
    lines = _refused(bundle)
    assert any("initialize#0#log_dir" in line and f"resolves to {site.resolve()}/tb" in line for line in lines), lines


def test_paths_the_user_named_are_allowed_and_everything_else_stays_confined(tmp_path: Path) -> None:
    out = tmp_path / "user-out"
    writer = {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir"}
    bundle = _bundle(tmp_path / "bundle", {"output_dir": "/somewhere/else", "initialize": [writer]})
    assert any("initialize#0#log_dir" in line for line in _refused(bundle))
    check_bundle(bundle, {"output_dir": str(out)}, config="configs/inference.json")  # the user named it
    # a relative default stays inside the bundle
    inside = _bundle(tmp_path / "inside", {"output_dir": "predictions", "initialize": [writer]})
    check_bundle(inside, {}, config="configs/inference.json")
    # medseg's own factory chain: bundle_path -> load_weights, image_list -> Dataset
    chain = _bundle(tmp_path / "chain", {
        "dataset_dir": "data",
        "weights": {"_target_": "medseg.bundle.components.bundle_path", "bundle_root": ".", "parts": ["models", "m.pt"]},
        "bad_weights": {"_target_": "medseg.bundle.components.bundle_path", "bundle_root": ".",
                        "parts": ["..", "m.pt"]},
        "datalist": {"_target_": "medseg.bundle.components.image_list", "dataset_dir": "@dataset_dir"},
        "dataset": {"_target_": "monai.data.Dataset", "data": "@datalist"},
        "literal": {"_target_": "monai.data.Dataset", "data": [{"image": "/etc/shadow"}]},
    })
    findings = {(f.key, f.problem.split(" (")[0]) for f in scan_bundle(chain)}
    assert findings == {("bad_weights#parts", "'..' is not a plain file-name part"),
                        ("literal#data", ("'/etc/shadow' resolves to /etc/shadow, outside the bundle and the paths "
                                         "given on the command line"))}


def test_the_bundles_logging_conf_is_not_applied_in_safe_mode(tmp_path: Path) -> None:
    site = _site(tmp_path)
    conf = (f"[loggers]\nkeys=root\n\n[handlers]\nkeys=file\n\n[formatters]\nkeys=evil\n\n"
            f"[logger_root]\nlevel=INFO\nhandlers=file\n\n[handler_file]\nclass=FileHandler\nlevel=INFO\n"
            f"formatter=evil\nargs=({str(site / 'zz.pth')!r},)\n\n[formatter_evil]\nformat={PTH_FORMAT}\n")
    bundle = _bundle(tmp_path / "bundle", {}, logging_conf=conf)
    run_bundle(bundle, "inference")
    assert list(site.iterdir()) == []
    # control: trusted, MONAI applies it and the file handler creates the .pth
    result = subprocess.run([sys.executable, "-m", "medseg", "bundle", "run", str(bundle), "--trust"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (site / "zz.pth").exists()


def test_the_bundle_folder_is_not_on_sys_path_while_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monai.bundle.workflows import ConfigWorkflow

    seen: list[list[str]] = []
    original = ConfigWorkflow._run_expr

    def record(self: Any, id: str, **kwargs: Any) -> Any:  # noqa: A002 - MONAI calls _run_expr(id=...)
        seen.append(list(sys.path))
        return original(self, id, **kwargs)

    monkeypatch.setattr(ConfigWorkflow, "_run_expr", record)
    bundle = _bundle(tmp_path / "bundle", {})
    (bundle / "tensorboard.py").write_text("open('MARKER', 'w')\n")  # would shadow a lazily imported module
    monkeypatch.syspath_prepend(str(bundle))  # even if the caller had it on sys.path
    before = list(sys.path)
    run_bundle(bundle, "inference")
    assert seen and all(not Path(os.path.abspath(p)).resolve().is_relative_to(bundle.resolve()) and p != ""
                        for paths in seen for p in paths)
    assert sys.path == before
    seen.clear()
    run_bundle(bundle, "inference", trust=True)  # control: MONAI puts the bundle on sys.path
    assert any(Path(p).resolve() == bundle.resolve() for p in seen[-1])


def test_issue_payload_through_the_cli_creates_no_file_and_does_with_trust(tmp_path: Path) -> None:
    """The exact payload of issue 12 (site-packages replaced by a folder of tmp_path), through `medseg`."""
    site = _site(tmp_path)
    payload = {"_target_": "ignite.utils.setup_logger", "name": None, "reset": True, "format": PTH_FORMAT,
               "filepath": str(site / "zz.pth")}
    bundle = _bundle(tmp_path / "bundle", {"initialize": [payload],
                                           "run": [{"_target_": "StatsHandler", "name": "medseg.probe"}]})
    refused = subprocess.run([sys.executable, "-m", "medseg", "bundle", "run", str(bundle)], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2
    assert "initialize#0#_target_: _target_ 'ignite.utils.setup_logger' is not on the safe-mode allow list" in refused.stderr
    assert list(site.iterdir()) == []
    trusted = subprocess.run([sys.executable, "-m", "medseg", "bundle", "run", str(bundle), "--trust"],
                             capture_output=True, text=True, timeout=300)
    assert trusted.returncode == 0, trusted.stderr
    assert (site / "zz.pth").exists()


def test_data_lists_are_confined_wherever_they_stand(tmp_path: Path) -> None:
    """A literal data list is read by whatever loads it: as a dataset's data, a loader's dataset or an
    engine's data loader, its file names must stay inside the bundle; vetted datasets and loaders pass."""
    items = [{"image": "/etc/shadow"}]
    bundle = _bundle(tmp_path / "bundle", {
        "dataset": {"_target_": "monai.data.Dataset", "data": [{"image": "images/a.nii.gz"}]},
        "loader": {"_target_": "monai.data.DataLoader", "dataset": "@dataset"},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "cpu", "val_data_loader": "@loader",
                      "network": {"_target_": "torch.nn.Identity"}},
        "bad_loader": {"_target_": "monai.data.DataLoader", "dataset": items},
        "bad_evaluator": {"_target_": "SupervisedEvaluator", "device": "cpu", "val_data_loader": items,
                          "network": {"_target_": "torch.nn.Identity"}},
    })
    keys = {f.key for f in scan_bundle(bundle)}
    assert keys == {"bad_loader#dataset", "bad_evaluator#val_data_loader"}
