"""`medseg predict --engine ray` on a local Ray (2 CPU workers, one torch thread each): the same label maps as the
serial engine, a worker killed mid-run recovered with every case written once, a finished run not redone."""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.errors import InputError
from medseg.inference.cohort import JOURNAL_FOLDER
from medseg.inference.ray_engine import FAULT_FILE_ENV, _check_reachable, import_ray

CASES = 6


@pytest.fixture(scope="module")
def ray_session() -> Iterator[ModuleType]:
    """One local Ray for the module (starting one takes seconds): 2 CPUs for the predictor actors and one for the
    read stage, as ``medseg predict --engine ray --workers 2`` starts it."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six CT phantoms (``medseg synth``, 64 voxels in-plane) in one folder."""
    root = tmp_path_factory.mktemp("ray-cohort")
    assert main(["synth", "--out", str(root / "synth"), "--cases", "8", "--size", "64", "--seed", "5"]) == 0
    folder = root / "synth" / "imagesTr"
    assert len(list(folder.iterdir())) == CASES
    return folder


@pytest.fixture(scope="module")
def serial_outputs(tmp_path_factory: pytest.TempPathFactory, cohort: Path, untrained_run: Path) -> Path:
    """The serial engine's label maps (in this process: torch's threads as tests/conftest.py sets them, where each
    Ray worker has one)."""
    out = tmp_path_factory.mktemp("serial") / "out"
    assert main(["predict", "--model", str(untrained_run), "--input", str(cohort), "--output", str(out)]) == 0
    return out


def _predict_ray(model: Path, cohort: Path, out: Path) -> int:
    return main(["predict", "--engine", "ray", "--workers", "2", "--model", str(model), "--input", str(cohort),
                 "--output", str(out)])


@pytest.fixture(scope="module")
def ray_outputs(tmp_path_factory: pytest.TempPathFactory, ray_session: ModuleType, cohort: Path,
                untrained_run: Path) -> Path:
    out = tmp_path_factory.mktemp("ray") / "out"
    assert _predict_ray(untrained_run, cohort, out) == 0
    return out


def _label_maps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith("_seg.nii.gz"))


def _assert_same_outputs(ray_out: Path, serial_out: Path) -> None:
    ours, theirs = _label_maps(ray_out), _label_maps(serial_out)
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == CASES
    for a, b in zip(ours, theirs):
        image_a, image_b = nib.load(a), nib.load(b)
        assert image_a.header.binaryblock == image_b.header.binaryblock, a.name
        assert np.array_equal(image_a.affine, image_b.affine), a.name
        assert np.array_equal(np.asarray(image_a.dataobj), np.asarray(image_b.dataobj)), a.name
    # something was predicted: a random network still paints more than background
    assert any(np.asarray(nib.load(p).dataobj).max() > 0 for p in ours)


def _assert_written_once(out: Path) -> None:
    """One label map and one completion record per case; no pending record, temporary file or other file."""
    records = sorted(p.name for p in (out / JOURNAL_FOLDER).iterdir())
    assert records == sorted(f"{p.name[: -len('_seg.nii.gz')]}.done.json" for p in _label_maps(out))
    assert sorted(p.name for p in out.iterdir()) == sorted([JOURNAL_FOLDER] + [p.name for p in _label_maps(out)])


@pytest.mark.slow
def test_ray_engine_writes_the_serial_engines_label_maps(ray_outputs: Path, serial_outputs: Path) -> None:
    _assert_same_outputs(ray_outputs, serial_outputs)
    _assert_written_once(ray_outputs)
    for record in (ray_outputs / JOURNAL_FOLDER).iterdir():  # the serial engine's stages, read in the read stage
        assert set(json.loads(record.read_text())["seconds"]) == {"read", "preprocess", "infer", "write"}


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_replaced_and_every_case_is_written_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_session: ModuleType, cohort: Path, untrained_run: Path,
        serial_outputs: Path) -> None:
    fault = tmp_path / "kill-once"
    fault.touch()
    monkeypatch.setenv(FAULT_FILE_ENV, str(fault))
    out = tmp_path / "out"
    assert _predict_ray(untrained_run, cohort, out) == 0
    assert not fault.exists() and Path(f"{fault}.fired").exists()  # a worker did die after writing a label map
    _assert_written_once(out)
    _assert_same_outputs(out, serial_outputs)


@pytest.mark.slow
def test_a_finished_ray_run_started_again_skips_every_case(ray_outputs: Path, cohort: Path, untrained_run: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in [*ray_outputs.iterdir(), *(ray_outputs / JOURNAL_FOLDER).iterdir()]}
    capsys.readouterr()
    assert _predict_ray(untrained_run, cohort, ray_outputs) == 0
    captured = capsys.readouterr()
    assert f"{CASES} case(s) already finished" in captured.err and "0 to do" in captured.err
    assert captured.out.split() == [str(p) for p in _label_maps(ray_outputs)]
    after = {p.name: p.stat().st_mtime_ns for p in [*ray_outputs.iterdir(), *(ray_outputs / JOURNAL_FOLDER).iterdir()]}
    assert after == before


@pytest.mark.slow
def test_a_bad_case_fails_alone_and_the_others_are_recorded(tmp_path: Path, ray_session: ModuleType, cohort: Path,
                                                            untrained_run: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good = sorted(cohort.iterdir())[:2]
    for image in good:
        (images / image.name).symlink_to(image)
    (images / "truncated.nii.gz").write_bytes(good[0].read_bytes()[:4000])
    out = tmp_path / "out"
    capsys.readouterr()
    assert _predict_ray(untrained_run, images, out) == 2
    err = capsys.readouterr().err
    assert "1 of 3 case(s) failed" in err and "truncated.nii.gz" in err
    assert [p.name for p in _label_maps(out)] == [image.name.replace(".nii.gz", "_seg.nii.gz") for image in good]
    _assert_written_once(out)


def test_an_address_where_no_ray_listens_is_refused_at_once() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(InputError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}")
    _check_reachable("auto")  # resolved by Ray itself


def test_ray_options_without_the_ray_engine_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["predict", "--model", str(tmp_path), "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                 "--workers", "2", "--gpus-per-worker", "1"])
    assert code == 2
    assert "--workers, --gpus-per-worker needs --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_ray_the_engine_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(InputError, match=r"pip install 'medseg\[ray\]'"):
        import_ray()
