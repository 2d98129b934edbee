"""The nnU-Net v2 raw dataset layout: cases found by their file names, not listed.

A case ``CASE`` with channels 0..N-1 is ``imagesTr/CASE_0000<file_ending>`` .. ``CASE_000{N-1}<file_ending>``
(one file per channel, four-digit channel numbers) with its label map ``labelsTr/CASE<file_ending>``; test
cases likewise in ``imagesTs/`` (reference label maps in ``labelsTs/`` when present). A ``dataset.json``
with a ``"dataset"`` mapping (``{"CASE": {"images": [...], "label": ...}}``) names the training files
instead of ``imagesTr/``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.data.cases import Case
from medseg.errors import InputError
from medseg.io.image import IMAGE_SUFFIXES, image_suffix

__all__ = ["check_file_ending", "raw_cases", "raw_dataset_cases"]


def check_file_ending(data: dict[str, Any], json_path: Path) -> str:
    """The dataset's ``file_ending`` (e.g. ``".nii.gz"``).

    Raises
    ------
    InputError
        (naming ``json_path``) Missing, or not an image file ending medseg reads.
    """
    ending = data.get("file_ending")
    if not isinstance(ending, str) or not ending:
        raise InputError(json_path, "no 'file_ending' (e.g. \".nii.gz\"): an nnU-Net v2 raw dataset needs it "
                         "to find its cases (an MSD dataset.json lists them in 'training')")
    if image_suffix("x" + ending) != ending.lower():
        raise InputError(json_path, f"file_ending {ending!r} is not an image type medseg reads ({', '.join(IMAGE_SUFFIXES)})")
    return ending


def _files(folder: Path, ending: str) -> list[Path]:
    """Image files in ``folder``; an image file of another ending is refused."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.name.endswith(ending):
            files.append(path)
        elif image_suffix(path):
            raise InputError(path, f"an image file whose ending is not the dataset's file_ending {ending!r}")
    return files


def raw_cases(images_dir: Path, labels_dir: Path | None, ending: str, channel_names: Sequence[str],
              labels_required: bool) -> list[Case]:
    """The cases of ``images_dir`` (``CASE_XXXX<ending>``, one file per channel), each with its label map
    ``labels_dir/CASE<ending>`` (required or, if not, taken when present).

    Raises
    ------
    InputError
        Naming the file: a file not named ``CASE_XXXX<ending>``, a channel number the dataset does not
        declare, a missing channel file, a missing label map (when required), a label map without images.
    """
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    found: dict[str, dict[int, Path]] = {}
    declared = len(channel_names)
    for path in _files(images_dir, ending):
        match = pattern.fullmatch(path.name)
        if match is None:
            raise InputError(path, f"not a channel file: expected CASE_0000{ending} .. CASE_{declared - 1:04d}{ending}")
        channel = int(match.group(2))
        if channel >= declared:
            raise InputError(path, f"channel {channel}, but dataset.json declares {declared} channel(s) "
                             f"({', '.join(channel_names)}): an extra file")
        found.setdefault(match.group(1), {})[channel] = path
    cases = []
    for name, channels in sorted(found.items()):
        for number in range(declared):
            if number not in channels:
                missing = images_dir / f"{name}_{number:04d}{ending}"
                raise InputError(missing, f"missing: channel {number} ({channel_names[number]}) of case {name}")
        label = labels_dir / f"{name}{ending}" if labels_dir is not None else None
        if label is not None and not label.is_file():
            if labels_required:
                raise InputError(label, f"missing: the label map of case {name} ({channels[0].name})")
            label = None
        files = tuple(channels[k] for k in range(declared))
        cases.append(Case(name, files[0], label, files if declared > 1 else ()))
    if labels_dir is not None and labels_dir.is_dir():
        for path in _files(labels_dir, ending):
            if path.name[: -len(ending)] not in found:
                raise InputError(path, f"a label map without images: no {images_dir.name}/"
                                 f"{path.name[: -len(ending)]}_0000{ending}")
    return cases


def _listed_cases(root: Path, listed: Any, channel_names: Sequence[str], json_path: Path) -> list[Case]:
    """Training cases named by a ``"dataset"`` mapping ``{"CASE": {"images": [...], "label": ...}}``."""
    if not isinstance(listed, dict) or not listed:
        raise InputError(json_path, "'dataset' must map case names to {\"images\": [...], \"label\": ...}")
    cases = []
    for name, entry in listed.items():
        images = entry.get("images") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images) \
                or not isinstance(label, str) or not label:
            raise InputError(json_path, f"'dataset' entry {name!r} needs 'images' (a list of files) and 'label'")
        if len(images) != len(channel_names):
            raise InputError(json_path, f"case {name!r} lists {len(images)} image(s) for {len(channel_names)} "
                             f"channel(s) ({', '.join(channel_names)})")
        files = tuple((root / f).resolve() for f in images)
        cases.append(Case(str(name), files[0], (root / label).resolve(), files if len(files) > 1 else ()))
    return cases


def raw_dataset_cases(root: Path, data: dict[str, Any], channel_names: Sequence[str],
                      json_path: Path) -> tuple[list[Case], list[Case], str]:
    """Training and test cases of an nnU-Net v2 raw dataset in ``root``, and its file ending.

    Raises
    ------
    InputError
        No or a bad ``file_ending``; no ``imagesTr/`` (nor ``"dataset"``); the problems of :func:`raw_cases`;
        ``numTraining`` that is not the number of training cases found.
    """
    ending = check_file_ending(data, json_path)
    if "dataset" in data:
        training = _listed_cases(root, data["dataset"], channel_names, json_path)
    else:
        images_dir = root / "imagesTr"
        if not images_dir.is_dir():
            raise InputError(json_path, "no 'training' list (MSD layout) and no imagesTr/ folder (nnU-Net v2 raw layout)")
        training = raw_cases(images_dir, root / "labelsTr", ending, channel_names, labels_required=True)
        if not training:
            raise InputError(images_dir, f"no training cases (files CASE_0000{ending})")
    expected = data.get("numTraining")
    if expected is not None and expected != len(training):
        raise InputError(json_path, f"numTraining is {expected!r} but {len(training)} training case(s) were found "
                         f"({', '.join(c.name for c in training[:5])}{', ...' if len(training) > 5 else ''})")
    test: list[Case] = []
    if (root / "imagesTs").is_dir():
        test = raw_cases(root / "imagesTs", root / "labelsTs", ending, channel_names, labels_required=False)
    return training, test, ending
