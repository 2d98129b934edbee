"""A Medical Segmentation Decathlon dataset in the nnU-Net v2 raw layout (``medseg convert-msd``).

The MSD stores a multi-modal case (BraTS' four MR sequences in Task01, the prostate's T2 and ADC in
Task05) as one 4D NIfTI file, its volumes along the fourth axis in the order of ``dataset.json``'s
``modality``. medseg reads one file per channel, as nnU-Net v2 does, so such a dataset is converted
once, as ``nnUNetv2_convert_MSD_dataset`` does it: ``imagesTr/CASE_0000.nii.gz`` .. one 3D file per
channel, the label maps copied, a ``dataset.json`` with ``channel_names``, ``labels`` (name -> value),
``numTraining`` and ``file_ending``. Each channel file is the 4D file's header made 3D (qform, sform,
data type and scaling untouched) followed by that volume's bytes: the voxels are not decoded and
re-encoded, so nothing is rounded. One-channel MSD datasets need no conversion (medseg reads them as
they are) but convert too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isal import igzip

from medseg.data.channels import parse_channel_names
from medseg.data.datalist import check_unique_names, listed_path, read_dataset_json
from medseg.data.validation import read_label_map
from medseg.errors import InputError
from medseg.io.atomic import atomic_path
from medseg.io.image import case_name, is_nifti, read_geometry
from medseg.io.nifti import check_nifti_header, read_nifti_bytes
from medseg.labels import parse_dataset_labels

__all__ = ["MsdConversion", "convert_msd"]

log = logging.getLogger(__name__)

#: Keys of an MSD ``dataset.json`` that the raw layout replaces (the rest is copied).
_REPLACED = {"training", "test", "modality", "channel_names", "labels", "numTraining", "numTest", "tensorImageSize",
             "file_ending"}
_ENDING = ".nii.gz"


@dataclass(frozen=True)
class MsdConversion:
    """The converted dataset: its ``dataset.json``, cases and channels."""

    dataset_json: Path
    training: int
    test: int
    channels: int


def _listed(root: Path, entry: Any, key: str, json_path: Path) -> Path:
    """A file listed in the MSD ``dataset.json`` (relative to its folder), which must exist and be NIfTI."""
    path = listed_path(root, entry, key, json_path)
    if not path.is_file():
        raise InputError(path, f"listed in {json_path.name} but does not exist")
    if not is_nifti(path):
        raise InputError(path, "the MSD layout holds NIfTI files (.nii.gz); this one is not")
    return path


def _write_gz(path: Path, data: bytes) -> None:
    with igzip.open(path, "wb", compresslevel=2) as stream:  # type: ignore[no-untyped-call]
        stream.write(data)


def _split_channels(image: Path, channels: int, folder: Path, case: str) -> list[Path]:
    """Write ``folder/CASE_XXXX.nii.gz`` per channel of ``image`` (3D for one channel, else 4D with
    ``channels`` volumes): the header made 3D, then the volume's bytes as stored.

    Raises
    ------
    InputError
        Naming ``image``: a header or stream :func:`check_nifti_header` / :func:`read_nifti_bytes`
        refuses, a 4th axis that does not hold ``channels`` volumes, more than four axes.
    """
    info = check_nifti_header(image)
    shape = tuple(int(n) for n in info.shape)
    volumes = {3: 1, 4: shape[-1]}.get(len(shape))
    if volumes != channels:
        found = f"a {len(shape)}D image" + (f" of {volumes} volumes" if len(shape) == 4 else "")
        raise InputError(image, f"is {found} ({' x '.join(map(str, shape))}); dataset.json declares {channels} "
                         f"channel(s), so each case must be {'a 3D image' if channels == 1 else f'4D with {channels} volumes'}")
    raw = read_nifti_bytes(image, info)  # one decompression, the stream checked to its end
    header = info.header.copy()  # as written, NIfTI-1 or NIfTI-2
    header.set_data_shape(shape[:3])
    header.set_data_offset(header.sizeof_hdr + 4)  # no extensions
    head = header.binaryblock + b"\x00" * 4
    volume = math.prod(shape[:3]) * info.dtype.itemsize
    files = []
    for k in range(channels):
        start = info.offset + k * volume
        path = folder / f"{case}_{k:04d}{_ENDING}"
        _write_gz(path, head + raw[start : start + volume])
        files.append(path)
    return files


def _copy_label(label: Path, image_channel: Path, image: Path, values: tuple[int, ...], target: Path) -> None:
    """Check ``label`` against the grid of the case's first channel and the declared values, then copy it
    (a ``.nii`` compressed)."""
    geometry = read_geometry(image_channel)
    read_label_map(label, image, geometry, values)
    if label.name.lower().endswith(".gz"):
        shutil.copyfile(label, target)
    else:
        _write_gz(target, label.read_bytes())


def _cases(data: dict[str, Any], key: str, root: Path, json_path: Path) -> list[tuple[Path, Path | None]]:
    entries = data.get(key) or []
    if not isinstance(entries, list):
        raise InputError(json_path, f"'{key}' must be a list")
    cases = []
    for entry in entries:
        if isinstance(entry, dict):
            if "image" not in entry or (key == "training" and "label" not in entry):
                needs = "'image' and 'label'" if key == "training" else "'image'"
                raise InputError(json_path, f"{key} entry {entry!r} needs {needs}")
            label = entry.get("label")
            cases.append((_listed(root, entry["image"], key, json_path),
                          _listed(root, label, key, json_path) if label else None))
        else:
            cases.append((_listed(root, entry, key, json_path), None))
    return cases


def _raw_labels(labels: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net v2's ``labels`` (name -> value): the MSD's ``{"0": "background", ...}`` turned around; labels
    already written that way (regions, an ignore label) as they are."""
    if all(str(key).strip().isdigit() and isinstance(name, str) for key, name in labels.items()):
        return {name: int(key) for key, name in sorted(labels.items(), key=lambda item: int(item[0]))}
    return dict(labels)


def convert_msd(dataset: str | os.PathLike[str], out: str | os.PathLike[str]) -> MsdConversion:
    """Convert the MSD dataset ``dataset`` (its folder or ``dataset.json``) into the nnU-Net v2 raw layout
    in the new folder ``out`` (see the module docstring); test cases go to ``imagesTs/`` (their label maps,
    when listed, to ``labelsTs/``). Everything is written into a temporary folder beside ``out`` and moved
    into place at the end: a failure leaves nothing behind, and the input is only read.

    Raises
    ------
    InputError
        ``out`` exists and is not an empty folder; a missing or invalid ``dataset.json`` (no ``training``
        list, bad ``labels`` or ``modality``); a listed file that is missing, not NIfTI, unreadable,
        truncated, or whose channel count differs from ``modality``'s; a label map off its image's grid or
        with undeclared values; two cases of one name.
    """
    json_path = Path(dataset)
    if json_path.is_dir():
        json_path = json_path / "dataset.json"
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(target, "exists and is not empty; choose a new folder")
    data = read_dataset_json(json_path)
    json_path = json_path.resolve()
    if not isinstance(data.get("training"), list) or not data["training"]:
        raise InputError(json_path, "an MSD dataset.json lists its cases in 'training' (a non-empty list of "
                                    "{\"image\": ..., \"label\": ...}); this one has none")
    channel_names = parse_channel_names(data, json_path)
    declared = parse_dataset_labels(data.get("labels"), data.get("regions_class_order"), json_path)
    training = _cases(data, "training", json_path.parent, json_path)
    test = _cases(data, "test", json_path.parent, json_path)
    check_unique_names([case_name(image) for image, _ in training + test], json_path)
    channels = len(channel_names)
    with atomic_path(target) as tmp:
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / folder).mkdir(parents=True)
        for part, cases in (("Tr", training), ("Ts", test)):
            for image, label in cases:
                name = case_name(image)
                files = _split_channels(image, channels, tmp / f"images{part}", name)
                if label is not None:
                    _copy_label(label, files[0], image, declared.label_values,
                                tmp / f"labels{part}" / f"{name}{_ENDING}")
                log.info("converted %s (%d channel(s))", name, channels)
        if not any((tmp / "labelsTs").iterdir()):
            (tmp / "labelsTs").rmdir()
        description = {key: value for key, value in data.items() if key not in _REPLACED}
        description.update({
            "channel_names": {str(k): name for k, name in enumerate(channel_names)},
            "labels": _raw_labels(data["labels"]),
            "numTraining": len(training), "file_ending": _ENDING,
            "converted_from": f"the MSD dataset {json_path} (medseg convert-msd)",
        })
        (tmp / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %d training and %d test cases (%d channel(s)) to %s", len(training), len(test), channels, target)
    return MsdConversion(target / "dataset.json", len(training), len(test), channels)
