"""A bundle that is an ensemble across configurations (written by ``medseg select`` when a pair of runs wins).

The chosen run folder stays a bundle of its own folds (its ``configs/inference.json``, what ``python -m
monai.bundle run`` runs) and gains::

    RUN/configs/ensemble.json               the members besides the run itself, and the rules file
    RUN/members/<NAME>/                     a copy of each other member: its configs and its folds' configs
                                            and weights (a self-contained bundle of that run's fold ensemble)
    RUN/configs/ensemble_postprocessing.json   the largest-component rules chosen for the ensemble

``medseg predict --model RUN`` then runs the run and its members together
(:class:`medseg.inference.configurations.ConfigurationEnsemble`). Member paths are relative and must stay inside
the bundle: an ensemble file never makes medseg read a folder the user did not give.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.bundle.create import inference_config
from medseg.bundle.monai_calls import INFERENCE_FILE
from medseg.errors import BundleError, InputError
from medseg.inference.postprocess import PostprocessingRules, read_rules, write_rules
from medseg.io.atomic import atomic_write_text
from medseg.layout import PLAN_FILE, PREVIOUS_DIR
from medseg.plan import Plan

__all__ = ["ENSEMBLE_FILE", "ENSEMBLE_FORMAT", "ENSEMBLE_RULES_FILE", "FOLD_ENSEMBLE", "copy_member", "ensemble_folds",
           "ensemble_inference_config", "member_files", "read_ensemble", "remove_ensemble", "write_ensemble"]

ENSEMBLE_FILE = Path("configs") / "ensemble.json"
ENSEMBLE_RULES_FILE = Path("configs") / "ensemble_postprocessing.json"
ENSEMBLE_FORMAT = "medseg-ensemble/1"
MEMBERS_DIR = "members"
#: The ``_target_`` of a fold ensemble's ``network`` in ``configs/inference.json`` (written by ``medseg select``).
C = "medseg.bundle.components"
FOLD_ENSEMBLE = f"{C}.fold_ensemble"


def ensemble_inference_config(folds: Sequence[int], postprocessing: bool) -> dict[str, Any]:
    """medseg's ``inference.json`` for the ensemble of ``folds`` of a cross-validation run (the bundle root is the
    run folder), with its ``configs/postprocessing.json`` applied when ``postprocessing``."""
    config = inference_config()
    del config["weights"]
    config["folds"] = [int(k) for k in folds]
    config["network"] = {"_target_": f"{C}.fold_ensemble", "plan": "@plan", "bundle_root": "@bundle_root",
                         "folds": "@folds", "device": "@device"}
    config["inferer"]["members"] = len(folds)
    if postprocessing:
        config["postprocessing_rules"] = {"_target_": f"{C}.postprocessing_rules", "bundle_root": "@bundle_root"}
        config["postprocessing"]["rules"] = "@postprocessing_rules"
    return config


def member_files(plan: Plan, folds: Sequence[int]) -> dict[str, str]:
    """A member's plan and inference config (its fold ensemble, no postprocessing: the ensemble has its own)."""
    return {PLAN_FILE.as_posix(): json.dumps(plan.to_json(), indent=2) + "\n",
            "configs/inference.json": json.dumps(ensemble_inference_config(folds, False), indent=2) + "\n"}


def ensemble_folds(bundle: str | os.PathLike[str]) -> list[int] | None:
    """The folds of the fold ensemble that a bundle's ``configs/inference.json`` names (a bundle of ``medseg
    select``), or None: no such file, unreadable (other checks report it), or a single model's config."""
    try:
        config = json.loads((Path(bundle) / INFERENCE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    network = config.get("network") if isinstance(config, dict) else None
    folds = config.get("folds") if isinstance(config, dict) else None
    if not isinstance(network, dict) or network.get("_target_") != FOLD_ENSEMBLE or not isinstance(folds, list):
        return None
    return [k for k in folds if isinstance(k, int)]


def read_ensemble(bundle: str | os.PathLike[str]) -> tuple[list[Path], PostprocessingRules] | None:
    """``(member bundle folders, rules)`` of a bundle's ``configs/ensemble.json``, or None when it has none.

    Raises
    ------
    BundleError
        (naming the file) Not JSON, another format, members that are not relative paths to folders inside the
        bundle; the rules file as :func:`~medseg.inference.postprocess.read_rules` refuses it.
    """
    root = Path(os.path.abspath(bundle))
    path = root / ENSEMBLE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot read the ensemble file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != ENSEMBLE_FORMAT or set(data) - {"format", "members", "note"}:
        raise BundleError(f"{path}: not a {ENSEMBLE_FORMAT} file (format, members, note)")
    members = data.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        raise BundleError(f"{path}: 'members' must be a non-empty list of folders inside the bundle")
    folders = []
    for member in members:
        folder = (root / member).resolve()
        if Path(member).is_absolute() or not folder.is_relative_to(root.resolve()) or folder == root.resolve():
            raise BundleError(f"{path}: member {member!r} is not a folder inside the bundle")
        if not folder.is_dir():
            raise BundleError(f"{path}: member {member!r} does not exist in the bundle")
        folders.append(folder)
    try:
        rules = read_rules(root / ENSEMBLE_RULES_FILE)
    except InputError as exc:
        raise BundleError(str(exc)) from None
    return folders, rules


def copy_member(run: Path, member: Path, folds: Sequence[int], files: dict[str, str],
                relative: Path | None = None) -> str:
    """Copy what a member's fold ensemble needs (each fold's ``configs/`` and ``models/``; a cascade stage's previous
    stage, ``previous/``, without the maps its folds trained on) into ``run/members/<member name>`` (or
    ``run/relative``) with ``files`` (relative path -> text: its plan and inference config), replacing an older copy;
    its path relative to ``run``."""
    relative = relative if relative is not None else Path(MEMBERS_DIR) / member.name
    target = run / relative
    staging = target.parent / f".{target.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for fold in folds:
        for part in ("configs", "models"):
            shutil.copytree(member / f"fold_{fold}" / part, staging / f"fold_{fold}" / part)
    if (member / PREVIOUS_DIR / PLAN_FILE).is_file():
        shutil.copytree(member / PREVIOUS_DIR, staging / PREVIOUS_DIR)
    for name, text in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text, encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return relative.as_posix()


def write_ensemble(run: Path, members: Sequence[str], rules: PostprocessingRules) -> None:
    """Write ``configs/ensemble.json`` (members relative to ``run``) and the ensemble's rules."""
    write_rules(rules, run / ENSEMBLE_RULES_FILE)
    data = {"format": ENSEMBLE_FORMAT, "members": list(members),
            "note": "medseg predict --model on this folder runs it with these members, probabilities averaged in "
                    "the input grid; python -m monai.bundle run runs this folder's own folds only"}
    atomic_write_text(run / ENSEMBLE_FILE, json.dumps(data, indent=2) + "\n")


def remove_ensemble(run: Path) -> None:
    """Remove an ensemble's files from ``run`` (a later selection chose the run alone)."""
    for path in (run / ENSEMBLE_FILE, run / ENSEMBLE_RULES_FILE):
        path.unlink(missing_ok=True)
    shutil.rmtree(run / MEMBERS_DIR, ignore_errors=True)
