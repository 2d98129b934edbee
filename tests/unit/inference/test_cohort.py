"""Cohort prediction: manifests, shards, and the completion records that make a stopped run resume exactly once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.data.datalist import load_datalist, validate_datalist
from medseg.data.synthetic import write_dataset
from medseg.errors import InputError
from medseg.inference.cases import InputCase, Shard, parse_shard, read_manifest, shard_cases
from medseg.inference.cohort import JOURNAL_FOLDER, CaseJournal, CohortCase, cohort_cases, predict_files
from medseg.inference.predictor import Predictor
from medseg.networks import build_network
from medseg.plan import NetworkSpec, Plan, make_plan


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, torch.nn.Module, Path]:
    """A one-channel plan, a random network and 5 test images (32 voxels in-plane)."""
    root = tmp_path_factory.mktemp("cohort")
    dataset = write_dataset(root / "data", "ct", cases=7, seed=1, size=32)
    datalist = load_datalist(dataset)
    plan = make_plan(datalist, validate_datalist(datalist), network=NetworkSpec(channels=(4, 8), strides=(2,)))
    torch.manual_seed(0)
    images = root / "images"
    images.mkdir()
    for case in datalist.training[:5]:
        (images / case.images[0].name).write_bytes(case.images[0].read_bytes())
    return plan, build_network(plan).eval(), images


def _predictor(plan: Plan, network: torch.nn.Module) -> Predictor:
    return Predictor(plan, network, torch.device("cpu"), progress=False)


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*_seg.nii.gz"))}


# ---- manifests and shards ----------------------------------------------------------------------------------------


def test_a_manifest_names_cases_and_resolves_paths_from_its_folder(model: tuple[Plan, torch.nn.Module, Path],
                                                                   tmp_path: Path) -> None:
    plan, _, images = model
    files = sorted(images.iterdir())
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("case,image\n" + f"first,{os.path.relpath(files[0], tmp_path)}\n\n" + f",{files[1]}\n")
    cases = read_manifest(manifest, plan)
    assert [c.name for c in cases] == ["first", files[1].name.removesuffix(".nii.gz")]
    assert [c.files[0].resolve() for c in cases] == [files[0].resolve(), files[1].resolve()]


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "empty manifest"),
    ("path\nx.nii.gz\n", "column(s) image missing"),
    ("case,image\na,missing.nii.gz\n", "row 2: missing.nii.gz: no such file"),
    ("case,image\na,\n", "row 2: no image"),
    ("case,image\na,{f0}\na,{f1}\n", "row 3: case a is also in row 2"),
    ("case,image\n../up,{f0}\n", "not a plain file name"),
    ("case,image,image_0001\na,{f0},{f1}\n", "unexpected column(s) image_0001"),
])
def test_a_bad_manifest_is_one_error_naming_it_and_the_row(model: tuple[Plan, torch.nn.Module, Path], tmp_path: Path,
                                                           text: str, fragment: str) -> None:
    plan, _, images = model
    files = sorted(images.iterdir())
    manifest = tmp_path / "bad.csv"
    manifest.write_text(text.format(f0=files[0], f1=files[1]))
    with pytest.raises(InputError) as raised:
        read_manifest(manifest, plan)
    assert raised.value.path == str(manifest) and fragment in str(raised.value)


def test_shards_are_disjoint_cover_every_case_and_differ_by_one_at_most() -> None:
    cases = [InputCase(f"case{i:02d}", (Path(f"case{i:02d}.nii.gz"),)) for i in (7, 3, 1, 9, 4, 2, 8)]
    shards = [shard_cases(cases, Shard(i, 3)) for i in range(3)]
    names = [c.name for share in shards for c in share]
    assert sorted(names) == sorted(c.name for c in cases) and len(set(names)) == len(cases)
    assert {len(share) for share in shards} <= {2, 3}
    assert shard_cases(list(reversed(cases)), Shard(1, 3)) == shards[1], "the input's order does not matter"
    assert parse_shard(" 2/5 ") == Shard(2, 5)
    for bad in ("5/5", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(InputError, match="expected I/N"):
            parse_shard(bad)


# ---- completion records ------------------------------------------------------------------------------------------


def test_a_stopped_run_keeps_finished_cases_and_the_same_call_does_the_rest(
        model: tuple[Plan, torch.nn.Module, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, network, images = model
    reference = tmp_path / "reference"
    predict_files(plan, lambda: _predictor(plan, network), images, reference)
    expected = _arrays(reference)
    assert len(expected) == 5 and len(list((reference / JOURNAL_FOLDER).glob("*.done.json"))) == 5

    out = tmp_path / "out"
    calls = {"n": 0}
    write = Predictor.write

    def stop_at_the_third(self: Predictor, *args: object, **kwargs: object) -> Path:
        calls["n"] += 1
        if calls["n"] == 3:  # the third case's file is half written when the run is stopped
            Path(str(args[2])).write_bytes(b"half")
            raise KeyboardInterrupt
        return write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Predictor, "write", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        predict_files(plan, lambda: _predictor(plan, network), images, out)
    monkeypatch.setattr(Predictor, "write", write)
    assert sorted(_arrays(out)) == sorted(expected)[:2], "two finished cases kept, no half file of the third"
    assert len(list((out / JOURNAL_FOLDER).iterdir())) == 2
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.nii.gz")}

    loads = {"n": 0}
    written = predict_files(plan, lambda: loads.__setitem__("n", loads["n"] + 1) or _predictor(plan, network),
                            images, out)
    assert [p.name for p in written] == sorted(expected)
    assert {k: v.tolist() for k, v in _arrays(out).items()} == {k: v.tolist() for k, v in expected.items()}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.nii.gz") if p.name in first} == first, \
        "finished cases are not written again"
    records = [json.loads(p.read_text()) for p in sorted((out / JOURNAL_FOLDER).iterdir())]
    assert len(records) == 5 and all(r["outputs"][0]["bytes"] == (out / r["outputs"][0]["file"]).stat().st_size
                                     for r in records)

    predict_files(plan, lambda: pytest.fail("nothing left to do, the model is not loaded"), images, out)


def test_what_a_killed_attempt_left_is_removed_and_the_case_done_again(
        model: tuple[Plan, torch.nn.Module, Path], tmp_path: Path) -> None:
    """A process killed while writing leaves a pending record, a temporary folder and maybe the output."""
    plan, network, images = model
    out = tmp_path / "out"
    file = sorted(images.iterdir())[0]
    case = InputCase(file.name.removesuffix(".nii.gz"), (file,))
    item = CohortCase(case, (out / case.output_name(),))
    journal = CaseJournal(out)
    (out / JOURNAL_FOLDER).mkdir(parents=True)
    (out / JOURNAL_FOLDER / f"{case.name}.pending.json").write_text("{}")
    temporary = out / f".{item.targets[0].name}.abc.tmp"
    temporary.mkdir()
    (temporary / item.targets[0].name).write_bytes(b"partial")
    item.targets[0].write_bytes(b"stale output of the killed attempt")
    assert journal.interrupted(item) and not journal.finished(item)

    cohort = cohort_cases(plan, file, out)
    assert [i.name for i in cohort.todo] == [case.name], "not refused as an existing file: the pending record owns it"
    predict_files(plan, lambda: _predictor(plan, network), file, out)
    assert not temporary.exists() and journal.finished(item) and not journal.interrupted(item)
    assert sitk.ReadImage(str(item.targets[0])).GetSize() == sitk.ReadImage(str(file)).GetSize()


def test_a_file_no_record_explains_is_never_replaced_and_other_settings_are_refused(
        model: tuple[Plan, torch.nn.Module, Path], tmp_path: Path) -> None:
    plan, network, images = model
    file = sorted(images.iterdir())[0]
    out = tmp_path / "out"
    out.mkdir()
    user_file = out / file.name.replace(".nii.gz", "_seg.nii.gz")
    user_file.write_bytes(b"precious")
    with pytest.raises(InputError, match="already exists"):
        predict_files(plan, lambda: pytest.fail("model loaded"), file, out)
    assert user_file.read_bytes() == b"precious" and not (out / JOURNAL_FOLDER).exists()
    user_file.unlink()

    predict_files(plan, lambda: _predictor(plan, network), file, out, settings={"model": "a", "tta": False})
    with pytest.raises(InputError, match=r"other settings \(tta: False\)"):
        predict_files(plan, lambda: pytest.fail("model loaded"), file, out, settings={"model": "a", "tta": True})
    predict_files(plan, lambda: _predictor(plan, network), file, out, settings={"model": "a", "tta": True},
                  overwrite=True)
    assert CaseJournal(out).read(file.name.removesuffix(".nii.gz"))["settings"]["tta"] is True  # type: ignore[index]


def test_shards_into_one_folder_give_the_serial_result(model: tuple[Plan, torch.nn.Module, Path],
                                                       tmp_path: Path) -> None:
    plan, network, images = model
    predict_files(plan, lambda: _predictor(plan, network), images, tmp_path / "serial")
    sharded = tmp_path / "sharded"
    first = predict_files(plan, lambda: _predictor(plan, network), images, sharded, shard=Shard(0, 2))
    second = predict_files(plan, lambda: _predictor(plan, network), images, sharded, shard=Shard(1, 2))
    assert len(first) == 3 and len(second) == 2 and not set(first) & set(second)
    serial, both = _arrays(tmp_path / "serial"), _arrays(sharded)
    assert sorted(serial) == sorted(both) and all(np.array_equal(serial[k], both[k]) for k in serial)


def test_the_completion_record_keeps_the_seconds_of_each_stage(model: tuple[Plan, torch.nn.Module, Path],
                                                              tmp_path: Path) -> None:
    plan, network, images = model
    file = sorted(images.iterdir())[0]
    predict_files(plan, lambda: _predictor(plan, network), file, tmp_path / "out")
    record = CaseJournal(tmp_path / "out").read(file.name.removesuffix(".nii.gz"))
    assert record is not None and set(record["seconds"]) == {"read", "preprocess", "infer", "write"}
    assert all(value >= 0 for value in record["seconds"].values()) and record["seconds"]["infer"] > 0
