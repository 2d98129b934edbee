"""``configs/ensemble.json`` of an ensemble across configurations: read strictly, members confined to the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.bundle.ensembles import ENSEMBLE_FILE, copy_member, read_ensemble, remove_ensemble, write_ensemble
from medseg.errors import BundleError
from medseg.inference.postprocess import PostprocessingRules


def _bundle(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)
    other = tmp_path / "other"
    for fold in (0, 1):
        for part in ("configs", "models"):
            (other / f"fold_{fold}" / part).mkdir(parents=True)
        (other / f"fold_{fold}" / "models" / "model.pt").write_bytes(b"weights")
    (other / "fold_0" / "checkpoints").mkdir()  # not copied
    relative = copy_member(run, other, [0, 1], {"configs/plan.json": "{}", "configs/inference.json": "{}"})
    write_ensemble(run, [relative], PostprocessingRules(largest_component_labels=(2,)))
    return run


def test_members_are_copied_into_the_bundle_and_read_back(tmp_path: Path) -> None:
    run = _bundle(tmp_path)
    members, rules = read_ensemble(run)
    assert members == [(run / "members" / "other").resolve()]
    assert (members[0] / "fold_1" / "models" / "model.pt").read_bytes() == b"weights"
    assert (members[0] / "configs" / "inference.json").is_file() and not (members[0] / "fold_0" / "checkpoints").exists()
    assert rules.largest_component_labels == (2,)
    assert read_ensemble(tmp_path / "other") is None  # no ensemble file: a plain bundle
    remove_ensemble(run)
    assert read_ensemble(run) is None and not (run / "members").exists()


@pytest.mark.parametrize(("members", "message"), [
    (["../other"], "is not a folder inside the bundle"),
    (["/tmp"], "is not a folder inside the bundle"),
    (["."], "is not a folder inside the bundle"),
    (["members/nothing"], "does not exist in the bundle"),
    ([], "non-empty list"),
    ("members/other", "non-empty list"),
])
def test_members_outside_the_bundle_or_missing_are_refused(tmp_path: Path, members: object, message: str) -> None:
    run = _bundle(tmp_path)
    (run / ENSEMBLE_FILE).write_text(json.dumps({"format": "medseg-ensemble/1", "members": members}))
    with pytest.raises(BundleError, match=message):
        read_ensemble(run)


def test_another_format_or_unknown_keys_are_refused(tmp_path: Path) -> None:
    run = _bundle(tmp_path)
    for data in ({"format": "medseg-ensemble/2", "members": ["members/other"]},
                 {"format": "medseg-ensemble/1", "members": ["members/other"], "run": "python evil.py"}):
        (run / ENSEMBLE_FILE).write_text(json.dumps(data))
        with pytest.raises(BundleError, match="not a medseg-ensemble/1 file"):
            read_ensemble(run)
    (run / ENSEMBLE_FILE).write_text("{")
    with pytest.raises(BundleError, match="cannot read the ensemble file"):
        read_ensemble(run)
