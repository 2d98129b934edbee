"""``medseg predict`` over a cohort as users run it: a process killed mid-run and started again, job-array
shards and ``torchrun`` ranks into one folder, a manifest; every case written exactly once, as the serial run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.inference.cohort import JOURNAL_FOLDER
from tests.tools import HANG_GUARD

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, ct_dataset: Path, untrained_run: Path) -> tuple[Path, Path]:
    """Six phantom CTs in a folder and their serial prediction (``medseg predict`` in this process)."""
    root = tmp_path_factory.mktemp("cohort")
    images = root / "images"
    images.mkdir()
    sources = sorted((ct_dataset.parent / "imagesTr").iterdir())[:3] + sorted((ct_dataset.parent / "imagesTs").iterdir())
    for source in sources:
        shutil.copy(source, images / source.name)
    serial = root / "serial"
    assert main(["--quiet", "predict", "--model", str(untrained_run), "--input", str(images), "--output", str(serial)]) == 0
    return images, serial


def _medseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg", "--quiet", *args]


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*_seg.nii.gz"))}


def _same_as_serial(out: Path, serial: Path) -> None:
    got, expected = _labels(out), _labels(serial)
    assert sorted(got) == sorted(expected) and len(expected) == 6
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
    done = sorted(p.name for p in (out / JOURNAL_FOLDER).iterdir())
    assert done == sorted(n.replace("_seg.nii.gz", ".done.json") for n in expected), "one record per case, no pending"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "no temporary left"


def test_a_killed_run_started_again_writes_every_case_exactly_once(cohort: tuple[Path, Path], untrained_run: Path,
                                                                  tmp_path: Path) -> None:
    images, serial = cohort
    out = tmp_path / "out"
    command = _medseg("predict", "--model", str(untrained_run), "--input", str(images), "--output", str(out))
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + HANG_GUARD
    while not list((out / JOURNAL_FOLDER).glob("*.done.json")) and process.poll() is None:
        assert time.monotonic() < deadline, "no case finished"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.nii.gz")
                if (out / JOURNAL_FOLDER / p.name.replace("_seg.nii.gz", ".done.json")).exists()}
    assert 1 <= len(finished) < 6, "killed after the first case and before the last"
    for path in out.glob("*_seg.nii.gz"):  # an unrecorded output can only be the case being written, whole
        sitk.ReadImage(str(path))

    again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    _same_as_serial(out, serial)
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished, "finished cases were not written again"
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and {n: (out / n).stat().st_mtime_ns for n in finished} == finished


def test_job_array_shards_and_torchrun_ranks_share_one_folder(cohort: tuple[Path, Path], untrained_run: Path,
                                                              tmp_path: Path) -> None:
    images, serial = cohort
    shards = tmp_path / "shards"
    processes = [subprocess.Popen(_medseg("predict", "--model", str(untrained_run), "--input", str(images), "--output",
                                          str(shards), "--shard", f"{i}/2"), env=ENV, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    _same_as_serial(shards, serial)

    ranks = tmp_path / "ranks"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medseg",
                "--quiet", "predict", "--model", str(untrained_run), "--input", str(images), "--output", str(ranks)]
    result = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    _same_as_serial(ranks, serial)
    printed = [line for line in result.stdout.splitlines() if line.endswith("_seg.nii.gz")]
    assert len(printed) == 6, "each rank printed its own share"


def test_a_manifest_in_and_bad_shards_refused(cohort: tuple[Path, Path], untrained_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    images, serial = cohort
    manifest = tmp_path / "cohort.csv"
    rows = [f"{p.name.removesuffix('.nii.gz')},{p}" for p in sorted(images.iterdir())]
    manifest.write_text("case,image\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["--quiet", "predict", "--model", str(untrained_run), "--input", str(manifest), "--output", str(out)]) == 0
    _same_as_serial(out, serial)
    capsys.readouterr()
    code = main(["--quiet", "predict", "--model", str(untrained_run), "--input", str(manifest), "--output",
                 str(tmp_path / "x"), "--shard", "2/2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--shard 2/2: expected I/N" in err[0]
    assert not (tmp_path / "x").exists()
