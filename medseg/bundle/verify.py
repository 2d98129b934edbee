"""``medseg bundle verify``: check a bundle (model-zoo layout, see :mod:`medseg.bundle.create`) against its plan.

The model-zoo metadata fields, ``network_data_format`` (channels, dimensions, class names), one
``segments`` entry per foreground label, the training records (``data_source`` without local paths;
with weights, ``eval_metrics`` and a docs README that describe them), MONAI's own
``verify_net_in_out`` (the ``network_def`` of ``configs/inference.json`` fed a fake input of the shape
the metadata declares; only for a bundle safe mode accepts, unless ``trust=True``) and, when there are
weights, that ``models/model.pt`` loads into the network (``weights_only=True``), or in a bundle of ``medseg
select`` (a fold ensemble) every fold's, a winning pair's other run included. Every problem is
collected and one :class:`~medseg.errors.BundleError` lists them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medseg.bundle.components import fold_ensemble
from medseg.bundle.create import NOT_TRAINED, README_FILE, local_paths
from medseg.bundle.ensembles import ensemble_folds, read_ensemble
from medseg.bundle.monai_calls import INFERENCE_FILE, NET_ID, describe, first_line, quiet_monai
from medseg.bundle.nnunet import NNUNET_FILE, read_nnunet_file
from medseg.bundle.runner import weights_only_loads
from medseg.errors import BundleError
from medseg.layout import META_FILE, WEIGHTS_FILE
from medseg.networks import build_network, load_weights
from medseg.plan import Plan, load_plan

__all__ = [
    "METADATA_ALIASES",
    "REQUIRED_METADATA",
    "VERIFY_N",
    "verify_bundle",
]

log = logging.getLogger(__name__)

#: Fields of the MONAI model-zoo metadata schema every bundle must have.
REQUIRED_METADATA: tuple[str, ...] = (
    "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version",
    "name", "task", "description", "authors", "copyright", "data_source", "data_type", "image_classes",
    "label_classes", "pred_classes", "eval_metrics", "intended_use", "references", "network_data_format",
)

#: MONAI >= 1.4 renamed ``optional_packages_version``; either name satisfies the requirement.
METADATA_ALIASES: dict[str, str] = {"optional_packages_version": "required_packages_version"}

#: ``n`` of MONAI's fake input ("<divisor>*n" per axis). With n=1 the deepest U-Net level is a single
#: voxel, which instance normalisation refuses ("Expected more than 1 spatial element"); n=2 is the
#: smallest input every medseg U-Net accepts.
VERIFY_N = 2


def _safety_findings(bundle: Path) -> list[str]:
    from medseg.bundle.safety import scan_bundle

    return [str(finding) for finding in scan_bundle(bundle)]


_MISSING = object()


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _class_names(plan: Plan) -> dict[str, str]:
    """The output channels' names: the classes, or for a region-based plan the regions in order."""
    if plan.regions:
        return {str(i): r.name for i, r in enumerate(plan.regions)}
    return {str(k): v for k, v in sorted(plan.labels.items())}


# --------------------------------------------------------------------------------------------- verify


def _read_metadata(bundle: Path, problems: list[str]) -> dict[str, Any] | None:
    path = bundle / META_FILE
    if not path.is_file():
        problems.append(f"{META_FILE}: missing")
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{META_FILE}: not valid JSON ({first_line(exc)})")
        return None
    if not isinstance(meta, dict):
        problems.append(f"{META_FILE}: not a JSON object")
        return None
    return meta


def _check_required(meta: dict[str, Any], lines: list[str], problems: list[str]) -> None:
    missing = [f for f in REQUIRED_METADATA if f not in meta and METADATA_ALIASES.get(f) not in meta]
    if missing:
        problems.append(f"{META_FILE}: missing required model-zoo fields: {', '.join(missing)}")
    else:
        lines.append(f"metadata: all {len(REQUIRED_METADATA)} required model-zoo fields present")
    for old, new in METADATA_ALIASES.items():
        if old in meta and new not in meta:
            lines.append(f"warning: MONAI reads the deprecated metadata field {old!r} as {new!r}")


def _check_data_format(meta: dict[str, Any], plan: Plan, lines: list[str], problems: list[str]) -> None:
    fmt = meta.get("network_data_format", _MISSING)
    if fmt is _MISSING:
        return  # already reported as a missing required field
    before = len(problems)
    prefix = "network_data_format"
    image, pred = _dig(fmt, "inputs", "image"), _dig(fmt, "outputs", "pred")
    if not isinstance(image, Mapping):
        problems.append(f"{prefix}.inputs.image: missing (the network's input)")
        image = {}
    if not isinstance(pred, Mapping):
        problems.append(f"{prefix}.outputs.pred: missing (the network's output)")
        pred = {}
    inputs = f"{plan.num_channels} channel{'s' if plan.num_channels > 1 else ''}"
    outputs = f"{len(plan.regions)} regions (sigmoid)" if plan.regions else f"{plan.num_classes} classes"
    if image and image.get("num_channels") != plan.num_channels:
        problems.append(f"{prefix}.inputs.image.num_channels is {image.get('num_channels')!r}; the network takes {inputs}")
    if pred and pred.get("num_channels") != plan.num_outputs:
        problems.append(f"{prefix}.outputs.pred.num_channels is {pred.get('num_channels')!r}; the plan has {outputs}")
    for name, part, required in (("inputs.image", image, True), ("outputs.pred", pred, False)):
        if not part or ("spatial_shape" not in part and not required):
            continue
        shape = part.get("spatial_shape")
        if not isinstance(shape, list) or len(shape) != plan.dims:
            problems.append(f"{prefix}.{name}.spatial_shape is {shape!r}; the plan is {plan.dims}D "
                            f"({plan.dims} entries expected)")
    expected = _class_names(plan)
    if pred:
        channel_def = pred.get("channel_def")
        actual = {str(k): v for k, v in channel_def.items()} if isinstance(channel_def, Mapping) else channel_def
        if actual != expected:
            problems.append(f"{prefix}.outputs.pred.channel_def is {json.dumps(actual)}; "
                            f"the plan's {'regions' if plan.regions else 'classes'} are {json.dumps(expected)}")
    if len(problems) == before:
        what = "regions, sigmoid" if plan.regions else ""
        lines.append(f"network_data_format: {plan.num_channels} input channel{'s' if plan.num_channels > 1 else ''}, "
                     f"{plan.num_outputs} output channels ({what + ': ' if what else ''}{', '.join(expected.values())}), "
                     f"{plan.dims}D spatial shape {image.get('spatial_shape')}")


def _check_segments(meta: dict[str, Any], plan: Plan, lines: list[str], problems: list[str]) -> None:
    segments = meta.get("segments")
    foreground = {k: v for k, v in sorted(plan.labels.items()) if k != 0}
    if not isinstance(segments, Mapping):
        problems.append(f"{META_FILE}: no segments (one entry per foreground label, with its SNOMED CT code)")
        return
    before, coded = len(problems), 0
    for value, name in foreground.items():
        entry = segments.get(str(value))
        if not isinstance(entry, Mapping):
            problems.append(f"segments: no entry for label {value} ({name!r})")
            continue
        if entry.get("name") not in (None, name):
            problems.append(f"segments.{value}.name is {entry.get('name')!r}; the plan calls label {value} {name!r}")
        snomed = entry.get("snomed")
        if isinstance(snomed, Mapping) and snomed.get("code"):
            coded += 1
        else:
            lines.append(f"warning: segment {value} ({name!r}) has no SNOMED CT code; set segments.{value}.snomed "
                         f"in {META_FILE} (DICOM SEG export needs one)")
    if len(problems) == before:
        lines.append(f"segments: {len(foreground)} foreground labels described, {coded} with a SNOMED CT code")


def _check_training_records(bundle: Path, meta: dict[str, Any], lines: list[str], problems: list[str]) -> None:
    """``data_source`` holds no local absolute path; a bundle with weights says how they were trained
    (non-empty ``eval_metrics``, a docs/README.md that does not say "Not trained yet")."""
    before = len(problems)
    source = meta.get("data_source")
    found = local_paths(source) if isinstance(source, str) else []
    if found:
        problems.append(f"{META_FILE}: data_source names a local absolute path ({found[0]!r}): describe the data "
                        f"or give a path relative to the bundle")
    if not (bundle / WEIGHTS_FILE).exists():
        return
    metrics = meta.get("eval_metrics")
    if "eval_metrics" in meta and (not isinstance(metrics, Mapping) or not metrics):
        problems.append(f"{META_FILE}: eval_metrics is empty but {WEIGHTS_FILE.as_posix()} exists: record the "
                        f"measured metrics (medseg train writes the validation Dice there)")
    readme = bundle / README_FILE
    if not readme.is_file():
        lines.append(f"warning: no {README_FILE.as_posix()} describing the bundle")
    elif NOT_TRAINED in readme.read_text(encoding="utf-8", errors="replace"):
        problems.append(f"{README_FILE.as_posix()}: says {NOT_TRAINED!r} but {WEIGHTS_FILE.as_posix()} exists: "
                        f"its metrics section must describe the trained weights")
    if len(problems) == before and isinstance(metrics, Mapping) and metrics:
        lines.append(f"training records: eval_metrics ({', '.join(list(metrics)[:3])}{', ...' if len(metrics) > 3 else ''})"
                     f", version {meta.get('version')}, {README_FILE.as_posix()} describes the trained weights")


def _check_net_in_out(bundle: Path, device: str, lines: list[str], problems: list[str], net_id: str = NET_ID) -> None:
    from monai.bundle import verify_net_in_out

    try:
        with weights_only_loads(), quiet_monai():
            verify_net_in_out(net_id=net_id, meta_file=str(bundle / META_FILE), config_file=str(bundle / INFERENCE_FILE),
                              device=device, p=1, n=VERIFY_N, any=1, bundle_root=str(bundle))
    except Exception as exc:  # noqa: BLE001 - every failure is a problem of the bundle, reported with the others
        problems.append(f"MONAI verify_net_in_out ({net_id} of {INFERENCE_FILE}) failed: {describe(exc)}")
    else:
        lines.append(f"MONAI verify_net_in_out: {net_id} of {INFERENCE_FILE} maps a fake input (n={VERIFY_N}) to "
                     f"the channels and dtype the metadata declares")


def _check_imported(bundle: Path, device: str, lines: list[str], problems: list[str]) -> None:
    """A bundle imported from nnU-Net: one model (its ``network``, every fold's weights loaded, through MONAI's
    ``verify_net_in_out``) or several parts (each part's folds built and loaded; the parts run one after another
    on their own grids, so there is no one network to feed a fake input)."""
    from medseg.bundle.nnunet_parts import PARTS_FORMAT, nnunet_parts_network

    try:
        parts = read_nnunet_file(bundle, lambda data: isinstance(data, Mapping) and data.get("format") == PARTS_FORMAT)
    except BundleError as exc:
        problems.append(str(exc))
        return
    if not parts:
        _check_net_in_out(bundle, device, lines, problems, net_id="network")
        return
    try:
        network = nnunet_parts_network(bundle, device=device)
    except BundleError as exc:
        problems.append(str(exc).splitlines()[0])
        return
    folds = sum(len(part.folds) for part in network.parts)  # the network built above: configs/nnunet.json read once
    lines.append(f"weights: {len(network.parts)} parts of {folds} fold(s) load into their networks; MONAI "
                 "verify_net_in_out does not apply (each part runs on its own grid)")


def _check_fold_weights(bundle: Path, plan: Plan, folds: list[int], device: str, lines: list[str],
                        problems: list[str]) -> None:
    """A bundle of ``medseg select``: every fold's (and a pair's other run's folds') weights load."""
    members = [(bundle, plan, folds)]
    try:
        pair = read_ensemble(bundle)
        for member in pair[0] if pair else []:
            member_folds = ensemble_folds(member)
            if not member_folds:
                raise BundleError(f"{member / INFERENCE_FILE}: names no fold ensemble")
            members.append((member, load_plan(member), member_folds))
        for root, member_plan, numbers in members:
            fold_ensemble(member_plan, root, numbers, device=device)
    except BundleError as exc:
        problems.append(str(exc).splitlines()[0])
        return
    described = "; ".join(f"{'this run' if root == bundle else root.relative_to(bundle).as_posix()}: folds "
                          f"{', '.join(map(str, numbers))}" for root, _, numbers in members)
    lines.append(f"weights: the fold ensemble's models load into their networks ({described})")


def _check_weights(bundle: Path, plan: Plan | None, device: str, lines: list[str], problems: list[str]) -> None:
    weights = bundle / WEIGHTS_FILE
    folds = None if weights.exists() else ensemble_folds(bundle)
    if folds is not None and plan is not None:
        _check_fold_weights(bundle, plan, folds, device, lines, problems)
        return
    if not weights.exists():
        lines.append(f"no weights yet ({WEIGHTS_FILE} is missing): train the bundle first")
        return
    if plan is None:
        return  # the missing plan is already a problem
    try:
        network = load_weights(build_network(plan), weights, device=device)
    except BundleError as exc:
        problems.append(str(exc).splitlines()[0])
        return
    count = sum(p.numel() for p in network.parameters())
    lines.append(f"weights: {WEIGHTS_FILE} loads into the network ({len(network.state_dict())} tensors, "
                 f"{count:,} parameters)")


def verify_bundle(bundle_dir: str | os.PathLike[str], device: str = "cpu", *, trust: bool = False) -> list[str]:
    """Check a bundle against its plan and MONAI's expectations.

    Checks, in order: ``configs/metadata.json`` parses and has every :data:`REQUIRED_METADATA` field;
    ``network_data_format`` (the plan's input channels, one output channel per class or per region,
    ``spatial_shape`` with ``plan.dims`` entries, ``outputs.pred.channel_def`` = the plan's class or region
    names); a ``segments``
    entry for every foreground label (a missing SNOMED CT code is a warning line, not a problem);
    ``data_source`` without a local absolute path, and with ``models/model.pt`` present a non-empty
    ``eval_metrics`` and a ``docs/README.md`` that does not say "Not trained yet"; safe mode
    (unless ``trust``) and then MONAI's ``verify_net_in_out`` on ``network_def`` of
    ``configs/inference.json`` (``p=1``, ``n=``:data:`VERIFY_N`, ``any=1``, ``bundle_root`` set);
    ``models/model.pt``, if present, loads into the network (``weights_only``); in a fold ensemble (the
    ``network`` of ``inference.json`` is ``fold_ensemble``), each fold's does, and those of the members
    ``configs/ensemble.json`` names.

    Parameters
    ----------
    bundle_dir
        The bundle folder.
    device
        Where MONAI runs the network and the weights are loaded.
    trust
        Skip safe mode: let MONAI parse configs that could run code.

    Returns
    -------
    list[str]
        One human-readable line per passed check (and ``warning: ...`` lines).

    Raises
    ------
    BundleError
        ``<bundle>: N problem(s) found:`` followed by one ``  - problem`` line per problem found (all
        of them, not just the first); or if ``bundle_dir`` is not a folder.
    """
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle folder")
    lines: list[str] = []
    problems: list[str] = []

    meta = _read_metadata(bundle, problems)
    if meta is not None:
        _check_required(meta, lines, problems)

    plan: Plan | None = None
    try:
        plan = load_plan(bundle)
    except BundleError as exc:
        problems.append(str(exc))
    else:
        lines.append(f"plan: {plan.dims}D {plan.modality}, {plan.num_classes} classes, patch {list(plan.patch_size)}")

    if meta is not None and plan is not None:
        _check_data_format(meta, plan, lines, problems)
        _check_segments(meta, plan, lines, problems)
    if meta is not None:
        _check_training_records(bundle, meta, lines, problems)

    findings = [] if trust else _safety_findings(bundle)
    problems.extend(f"safe mode refuses {finding}" for finding in findings)
    if not (bundle / INFERENCE_FILE).is_file():
        problems.append(f"{INFERENCE_FILE}: missing")
    elif findings:
        problems.append("MONAI verify_net_in_out skipped: the configs could run code (pass trust=True to run it anyway)")
    elif meta is not None and (bundle / NNUNET_FILE).is_file():
        _check_imported(bundle, device, lines, problems)
    elif meta is not None:
        _check_net_in_out(bundle, device, lines, problems)

    if not (bundle / NNUNET_FILE).is_file():  # an imported bundle's weights are its folds', loaded above
        _check_weights(bundle, plan, device, lines, problems)

    if problems:
        listed = "\n".join(f"  - {' '.join(p.split())}" for p in problems)
        raise BundleError(f"{bundle}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found:\n{listed}")
    for line in lines:
        log.debug("%s: %s", bundle, line)
    return lines
