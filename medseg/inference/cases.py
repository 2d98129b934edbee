"""The input cases of a prediction: one image file per case, or, for a model of several input channels,
the channel files of each case in nnU-Net's layout (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...: the
case name, an underscore, the channel number in four digits, the file ending), grouped by case name.

A case's label map is named by medseg's one rule (:func:`medseg.io.image.label_map_name`): ``CASE_seg``
with the ending of its (first channel) file. A one-channel model keeps the name of its file as the case
name, as before (``scan.nii.gz`` -> ``scan_seg.nii.gz``, ``CASE_0000.nii.gz`` -> ``CASE_0000_seg.nii.gz``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import InputError
from medseg.io.image import case_name, image_suffix, label_map_name, list_images
from medseg.plan import Plan

__all__ = ["InputCase", "channel_case", "channel_file_name", "collect_cases", "group_channel_files"]

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its name and its image files, one per input channel in channel order."""

    name: str
    files: tuple[Path, ...]

    @property
    def first(self) -> Path:
        """The first channel's file: the grid, header and file ending of the case's outputs."""
        return self.files[0]

    def output_name(self, kind: str = "seg") -> str:
        """``<case>_<kind><ending of the first channel's file>`` (:func:`medseg.io.image.label_map_name`)."""
        return label_map_name(self.name, image_suffix(self.first) or "", kind)


def channel_case(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """``(case name, channel number)`` of a file named in nnU-Net's layout (``BRATS_001_0002.nii.gz`` ->
    ``("BRATS_001", 2)``); None for another name."""
    match = _CHANNEL.match(case_name(path))
    return (match["case"], int(match["channel"])) if match else None


def channel_file_name(case: str, channel: int, suffix: str) -> str:
    """The file name of channel ``channel`` of ``case`` in nnU-Net's layout: ``<case>_<NNNN><suffix>``."""
    return f"{case}_{channel:04d}{suffix}"


def group_channel_files(paths: Sequence[Path], plan: Plan, where: Path | None = None) -> list[InputCase]:
    """Group channel files (nnU-Net's layout) into cases of ``plan``'s input channels, sorted by case name.

    Raises
    ------
    InputError
        A file not named ``CASE_NNNN<ending>`` or with a channel number beyond the model's (naming the file);
        a case with a missing channel (naming the case, the missing file and its channel); two files of one
        channel (another file ending).
    """
    channels = plan.input_channels
    names = ", ".join(f"{i:04d} {c.name}" for i, c in enumerate(channels))
    cases: dict[str, dict[int, Path]] = {}
    for path in paths:
        parsed = channel_case(path)
        if parsed is None:
            raise InputError(path, f"not named CASE_NNNN{image_suffix(path) or ''}: a model of {len(channels)} "
                                   f"input channels ({names}) reads each case as one file per channel, "
                                   "as nnU-Net names them (CASE_0000, CASE_0001, ...)")
        case, channel = parsed
        if channel >= len(channels):
            raise InputError(path, f"channel {channel:04d} of case {case}, but the model takes {len(channels)} "
                                   f"input channels ({names})")
        files = cases.setdefault(case, {})
        if channel in files:
            raise InputError(path, f"a second file of channel {channel:04d} of case {case} (also {files[channel].name})")
        files[channel] = path
    grouped = []
    for case in sorted(cases):
        files = cases[case]
        first = files[min(files)]
        missing = [c for c in range(len(channels)) if c not in files]
        if missing:
            absent = ", ".join(f"{channel_file_name(case, c, image_suffix(first) or '')} ({channels[c].name})"
                               for c in missing)
            raise InputError(where or first.parent, f"case {case}: missing channel file(s) {absent}")
        grouped.append(InputCase(case, tuple(files[c] for c in range(len(channels)))))
    return grouped


def collect_cases(input_path: str | os.PathLike[str], plan: Plan) -> list[InputCase]:
    """The cases to predict with ``plan``'s model: one image file, or every image file in a folder, each a
    case of its own for a one-channel model; for a model of several channels, the folder's files grouped
    into cases (:func:`group_channel_files`), or the case of one given channel file (its channels found
    beside it).

    Raises
    ------
    InputError
        Missing path, non-image file, empty folder; channel files not grouping into complete cases.
    """
    path = Path(input_path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        files = list_images(path)
    elif image_suffix(path) is None:
        raise InputError(path, "not a supported image file (expected .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd)")
    else:
        files = [path]
    if plan.num_channels == 1:
        return [InputCase(case_name(f), (f,)) for f in files]
    if not path.is_dir():
        parsed = channel_case(path)
        if parsed is not None:  # the channels of this one case, beside it
            files = [f for f in list_images(path.parent) if (channel_case(f) or ("", 0))[0] == parsed[0]]
    return group_channel_files(files, plan, path)
