"""medseg.bundle.verify and medseg.bundle.export: verify_bundle collects every problem; TorchScript and ONNX exports
reproduce the network."""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.bundle.create import NOT_TRAINED, local_paths, record_training, write_bundle
from medseg.bundle.export import export_bundle
from medseg.bundle.verify import REQUIRED_METADATA, verify_bundle
from medseg.errors import BundleError
from medseg.networks import build_network
from medseg.plan import Intensity, NetworkSpec, Plan

# "mystery" has no SNOMED CT code: a warning line, not a problem
LABELS = {0: "background", 1: "liver", 2: "mystery"}


def small_plan(channels: tuple[int, ...] = (8, 16, 32)) -> Plan:
    return Plan(3, "CT", dict(LABELS), (1.5, 1.5, 2.0), (32, 32, 16), Intensity("ct", -160.0, 240.0, 50.0, 40.0),
                NetworkSpec(channels=channels, strides=(2, 2)))


def trained_network(plan: Plan) -> torch.nn.Module:
    """The network whose state dict is the bundle's models/model.pt (random but fixed weights)."""
    torch.manual_seed(0)
    return build_network(plan).eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly written bundle with weights; tests that change it work on a copy (:func:`copy_of`)."""
    plan = small_plan()
    root = write_bundle(tmp_path_factory.mktemp("bundles") / "b", plan, data_source="test")
    torch.save(trained_network(plan).state_dict(), root / "models" / "model.pt")
    record_training(root, plan, mean_dice=0.8, per_label={"liver": 0.9, "mystery": 0.7}, note="trained in a test",
                    data_source="synthetic test data")
    return root


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("model.ts", "model.onnx"))
    return target


def edit_metadata(bundle: Path, edit) -> None:
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


def patch_input(plan: Plan, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, *plan.patch_size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- verify


def test_verify_passes_on_fresh_bundle_with_weights(bundle: Path) -> None:
    lines = verify_bundle(bundle)
    text = "\n".join(lines)
    assert f"all {len(REQUIRED_METADATA)} required model-zoo fields present" in text
    assert any(line.startswith("MONAI verify_net_in_out:") for line in lines)
    assert any(line.startswith("weights: models/model.pt loads") for line in lines)
    assert any(line.startswith("network_data_format: 1 input channel, 3 output channels") for line in lines)
    # an unknown label name has a null SNOMED code: reported as a warning line, the bundle still passes
    assert any(line.startswith("warning: segment 2 ('mystery') has no SNOMED CT code") for line in lines)
    assert not any("no weights yet" in line for line in lines)
    assert any(line.startswith("training records: eval_metrics (val_mean_dice,") for line in lines)


def test_verify_refuses_weights_that_the_metadata_and_docs_call_untrained(tmp_path: Path) -> None:
    """Weights beside "Not trained yet" and an empty eval_metrics (a bundle trained before training
    recorded itself, or weights copied in by hand): both fields named, exit status 2."""
    plan = small_plan()
    root = write_bundle(tmp_path / "b", plan, data_source="test")
    verify_bundle(root)  # no weights: an untrained bundle is fine
    torch.save(trained_network(plan).state_dict(), root / "models" / "model.pt")
    with pytest.raises(BundleError) as info:
        verify_bundle(root)
    message = str(info.value)
    assert info.value.exit_code == 2 and "2 problems found" in message
    assert "configs/metadata.json: eval_metrics is empty but models/model.pt exists" in message
    assert f"docs/README.md: says {NOT_TRAINED!r} but models/model.pt exists" in message


@pytest.mark.parametrize("source", ["MSD dataset 'ct' (/home/me/data/dataset.json): 9 training cases",
                                    "C:\\Users\\me\\data", "~/data/ct", "file:///srv/data"])
def test_verify_refuses_a_local_path_in_data_source(bundle: Path, tmp_path: Path, source: str) -> None:
    copy = copy_of(bundle, tmp_path)
    edit_metadata(copy, lambda meta: meta.update(data_source=source))
    with pytest.raises(BundleError, match=r"1 problem found:\n  - configs/metadata.json: data_source names a local "
                                          r"absolute path"):
        verify_bundle(copy)


def test_data_source_descriptions_and_urls_are_not_local_paths() -> None:
    for text in ("medseg synthetic CT phantoms (`medseg synth --out DATA --cases 24`), CT/MR, 1/2 of them",
                 "MSD Task09 from https://medicaldecathlon.com/ and s3://bucket/x", "dataset.json in the bundle"):
        assert local_paths(text) == [], text


def test_record_training_bumps_version_and_rewrites_metrics(tmp_path: Path) -> None:
    plan = small_plan()
    root = write_bundle(tmp_path / "b", plan, data_source="MSD dataset 'x' (/tmp/data/dataset.json): 4 cases")
    day = datetime.date(2026, 1, 2)
    assert record_training(root, plan, mean_dice=0.61234, per_label={"liver": 0.9, "mystery": None}, note="first",
                           data_source="MSD dataset 'x': 4 training cases", today=day) == "0.2.0"
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["changelog"] == {"0.2.0": "2026-01-02: first", "0.1.0": "created by medseg bundle init"}
    assert meta["eval_metrics"] == {"val_mean_dice": 0.6123, "val_dice_liver": 0.9, "val_dice_mystery": None}
    assert meta["data_source"] == "MSD dataset 'x': 4 training cases"  # the local path is gone ...
    readme = (root / "docs" / "README.md").read_text()
    assert "/tmp/data" not in readme and "MSD dataset 'x': 4 training cases" in readme  # ... from the docs too
    assert NOT_TRAINED not in readme and "| 1 | liver | 0.900 |" in readme and "| 2 | mystery | n/a |" in readme

    assert record_training(root, plan, mean_dice=0.7, per_label={"liver": 0.95}, note="second",
                           data_source="other", today=day) == "0.3.0"
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert list(meta["changelog"]) == ["0.3.0", "0.2.0", "0.1.0"]
    assert meta["eval_metrics"] == {"val_mean_dice": 0.7, "val_dice_liver": 0.95}  # the old weights' metrics go
    assert meta["data_source"] == "MSD dataset 'x': 4 training cases"  # a description without local paths stays
    readme = (root / "docs" / "README.md").read_text()
    assert readme.count("## Metrics") == 1 and "0.950" in readme and "0.900" not in readme


def test_record_training_refuses_a_version_it_cannot_bump(tmp_path: Path) -> None:
    plan = small_plan()
    root = write_bundle(tmp_path / "b", plan, data_source="test")
    edit_metadata(root, lambda meta: meta.update(version="v1"))
    with pytest.raises(BundleError, match=r"metadata.json: version 'v1' is not MAJOR.MINOR.PATCH"):
        record_training(root, plan, mean_dice=0.5, per_label={}, note="x", data_source="y")


def test_verify_without_weights_says_so(bundle: Path, tmp_path: Path) -> None:
    copy = copy_of(bundle, tmp_path)
    (copy / "models" / "model.pt").unlink()
    lines = verify_bundle(copy)
    assert any(line.startswith("no weights yet") for line in lines)
    assert any(line.startswith("MONAI verify_net_in_out:") for line in lines)


def test_verify_reports_every_problem(bundle: Path, tmp_path: Path) -> None:
    copy = copy_of(bundle, tmp_path)

    def break_it(meta: dict) -> None:
        for field in ("authors", "references", "intended_use"):
            del meta[field]
        meta["network_data_format"]["inputs"]["image"]["num_channels"] = 3
        meta["network_data_format"]["outputs"]["pred"]["channel_def"]["2"] = "spleen"
        del meta["segments"]["1"]

    edit_metadata(copy, break_it)
    with pytest.raises(BundleError) as info:
        verify_bundle(copy)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert message.startswith(str(copy))
    first, *problems = message.splitlines()
    assert "5 problems" in first
    assert all(line.startswith("  - ") for line in problems) and len(problems) == 5
    for field in ("authors", "references", "intended_use"):
        assert field in problems[0]
    assert "inputs.image.num_channels is 3" in message
    assert "channel_def" in message and "spleen" in message
    assert "segments: no entry for label 1 ('liver')" in message
    # MONAI feeds a 3-channel fake input to a 1-channel network: its failure is listed too
    assert "MONAI verify_net_in_out (network_def of configs/inference.json) failed" in message


def test_verify_fails_when_weights_do_not_fit(bundle: Path, tmp_path: Path) -> None:
    copy = copy_of(bundle, tmp_path)
    torch.save(build_network(small_plan(channels=(4, 8, 16))).state_dict(), copy / "models" / "model.pt")
    with pytest.raises(BundleError, match=r"1 problem found:\n  - .*model\.pt: cannot load these weights"):
        verify_bundle(copy)
    with pytest.raises(BundleError, match="cannot load these weights"):
        export_bundle(copy, "torchscript")
    assert not (copy / "models" / "model.ts").exists()


def test_verify_refuses_configs_that_run_code_before_monai_parses_them(bundle: Path, tmp_path: Path) -> None:
    copy = copy_of(bundle, tmp_path)
    marker = tmp_path / "pwned"
    config = copy / "configs" / "inference.json"
    content = json.loads(config.read_text())
    content["network_def"] = f"$open({str(marker)!r}, 'w').write('x')"
    config.write_text(json.dumps(content))
    with pytest.raises(BundleError, match="safe mode refuses") as info:
        verify_bundle(copy)
    assert "verify_net_in_out skipped" in str(info.value)
    with pytest.raises(BundleError, match="safe mode"):
        export_bundle(copy, "torchscript")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def torchscript_file(bundle: Path) -> Path:
    return export_bundle(bundle, "torchscript")


def test_export_torchscript_matches_network_and_embeds_metadata(bundle: Path, torchscript_file: Path) -> None:
    """TorchScript (torch.jit.script of the same modules) must match the eager network on a random
    batch of 2 patches within atol=1e-5, rtol=1e-5 (measured: 0, the same CPU kernels run)."""
    assert torchscript_file == bundle / "models" / "model.ts"
    assert not list(torchscript_file.parent.glob(".*.tmp"))  # the atomic writer left nothing behind
    plan = small_plan()
    extra = {"metadata.json": "", "inference.json": ""}
    module = torch.jit.load(str(torchscript_file), map_location="cpu", _extra_files=extra).eval()
    x = patch_input(plan, batch=2)
    with torch.no_grad():
        want, got = trained_network(plan)(x), module(x)
    assert got.shape == (2, plan.num_classes, *plan.patch_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    meta = json.loads(extra["metadata.json"])
    assert meta["name"] == "b"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {str(k): v for k, v in LABELS.items()}
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "medseg.networks.build_network"


def test_export_to_an_output_without_suffix(bundle: Path, tmp_path: Path) -> None:
    out = export_bundle(bundle, "TorchScript", tmp_path / "exported" / "net")
    assert out == tmp_path / "exported" / "net.ts"
    assert sorted(p.name for p in out.parent.iterdir()) == ["net.ts"]


@pytest.fixture(scope="module")
def onnx_file(bundle: Path) -> Path:
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package, reason="ONNX export needs onnx, onnxscript and onnxruntime")
    return export_bundle(bundle, "onnx")


@pytest.mark.parametrize("shape", [(2, 1, 32, 32, 16), (1, 1, 48, 40, 24)], ids=["patch-batch2", "other-size"])
def test_export_onnx_matches_network_with_dynamic_axes(onnx_file: Path, shape: tuple[int, ...]) -> None:
    """onnxruntime (CPU) must match the PyTorch network within atol=1e-4 (measured: about 5e-6), for
    the export's own patch size and for another batch and spatial size (dynamic axes; spatial sizes
    must stay multiples of the network's total stride, 4 here, as for the PyTorch U-Net itself)."""
    import onnx
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.shape[0] == "batch" and image.shape[2:] == ["x", "y", "z"]
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = trained_network(small_plan())(x).numpy()
    (got,) = session.run(["pred"], {"image": x.numpy()})
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    assert json.loads(props["metadata.json"])["segments"]["1"]["name"] == "liver"


def test_unknown_format_and_missing_weights_raise(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="unknown export format 'tflite'; choose one of: torchscript, onnx"):
        export_bundle(bundle, "tflite")
    copy = copy_of(bundle, tmp_path)
    (copy / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"no models/model\.pt: train the bundle first") as info:
        export_bundle(copy, "torchscript")
    assert str(info.value).startswith(str(copy)) and info.value.exit_code == 2
    assert sorted(p.name for p in (copy / "models").iterdir()) == []


def test_missing_onnx_packages_say_what_to_install(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(BundleError, match=r"needs the packages .*onnxruntime.*: pip install .*onnxruntime==\d"):
        export_bundle(bundle, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:ONNX export mode is set to TrainingMode.EVAL:UserWarning")
def test_onnx_export_falls_back_to_the_torchscript_based_exporter(bundle: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Should torch's dynamo exporter fail on a network, the deprecated TorchScript-based one
    (``dynamo=False``) is tried; its model must match within the same atol=1e-4 at another size."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    export = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    out = export_bundle(bundle, "onnx", tmp_path / "legacy.onnx")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 1, 48, 40, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = trained_network(small_plan())(x).numpy()
    np.testing.assert_allclose(session.run(["pred"], {"image": x.numpy()})[0], want, atol=1e-4, rtol=0)
