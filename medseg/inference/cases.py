"""The input cases of a prediction: one image file per case, or, for a model of several input channels,
the channel files of each case in nnU-Net's layout (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...: the
case name, an underscore, the channel number in four digits, the file ending), grouped by case name.

A case's label map is named by medseg's one rule (:func:`medseg.io.image.label_map_name`): ``CASE_seg``
with the ending of its (first channel) file. A one-channel model keeps the name of its file as the case
name, as before (``scan.nii.gz`` -> ``scan_seg.nii.gz``, ``CASE_0000.nii.gz`` -> ``CASE_0000_seg.nii.gz``).

A cohort is given as a folder or as a manifest (:func:`read_manifest`): a CSV file with a header row, a
column ``image`` (one channel) or ``image_0000``, ``image_0001``, ... (one per input channel), and an
optional ``case`` column naming the case (default: the first channel's file name, as above); relative
paths are taken from the manifest's folder. :func:`shard_cases` takes the disjoint share ``I/N`` of a
job array or of one ``torchrun`` rank.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import InputError
from medseg.io.atomic import atomic_write_text
from medseg.io.image import case_name, image_suffix, label_map_name, list_images
from medseg.plan import Plan

__all__ = ["InputCase", "Shard", "channel_case", "channel_file_name", "collect_cases", "group_channel_files",
           "manifest_image_columns", "parse_shard", "read_manifest", "shard_cases", "write_manifest"]

#: The file ending of a manifest (:func:`read_manifest`).
MANIFEST_SUFFIX = ".csv"

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

    A ``.csv`` file is a manifest (:func:`read_manifest`).

    Raises
    ------
    InputError
        Missing path, non-image file, empty folder; channel files not grouping into complete cases; a bad
        manifest.
    """
    path = Path(input_path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file() and path.name.lower().endswith(MANIFEST_SUFFIX):
        return read_manifest(path, plan)
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


def manifest_image_columns(channels: int) -> list[str]:
    """The image columns of a manifest for ``channels`` input channels: ``image``, or ``image_0000``, ..."""
    return ["image"] if channels == 1 else [f"image_{c:04d}" for c in range(channels)]


def write_manifest(path: str | os.PathLike[str], cases: Sequence[InputCase]) -> Path:
    """Write ``cases`` (of one channel count) as a manifest :func:`read_manifest` reads: ``case`` and the image
    columns, absolute paths; atomically. Returns the path."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["case", *manifest_image_columns(len(cases[0].files) if cases else 1)])
    writer.writerows([case.name, *(str(Path(f).absolute()) for f in case.files)] for case in cases)
    return atomic_write_text(path, text.getvalue())


def _manifest_columns(path: Path, header: Sequence[str], plan: Plan) -> list[str]:
    """The image columns of a manifest's header, in channel order.

    Raises
    ------
    InputError
        No image column, or other channels than the model's (naming ``path``).
    """
    channels = plan.num_channels
    expected = manifest_image_columns(channels)
    if channels == 1 and "image" not in header and "image_0000" in header:
        expected = ["image_0000"]
    extra = sorted(c for c in header if c.startswith("image") and c not in expected)
    missing = [c for c in expected if c not in header]
    if missing or extra:
        names = ", ".join(c.name for c in plan.input_channels)
        problem = f"column(s) {', '.join(missing)} missing" if missing else f"unexpected column(s) {', '.join(extra)}"
        raise InputError(path, f"manifest header {','.join(header)}: {problem}; the model takes {channels} input "
                               f"channel(s) ({names}): columns {', '.join(expected)} and optionally case")
    return expected


def read_manifest(manifest: str | os.PathLike[str], plan: Plan) -> list[InputCase]:
    """The cases of a manifest CSV, in its row order: a header row with ``image`` (or ``image_0000``,
    ``image_0001``, ... for a model of several input channels) and optionally ``case``; one row per case,
    relative paths from the manifest's folder, blank rows skipped.

    Raises
    ------
    InputError
        Naming the manifest (and the row): unreadable or not UTF-8, no header or rows, missing columns, an
        empty cell, a file that is missing or not a supported image, a case name that is not a plain file
        name, or a case given twice.
    """
    path = Path(manifest)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read the manifest ({type(exc).__name__}: {exc})") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise InputError(path, "empty manifest: expected a header row (case,image) and one row per case")
    header = [cell.strip() for cell in rows[0]]
    columns = _manifest_columns(path, header, plan)
    cases: list[InputCase] = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], 2):
        cells = dict(zip(header, (cell.strip() for cell in row)))
        files = []
        for column in columns:
            value = cells.get(column, "")
            if not value:
                raise InputError(path, f"row {number}: no {column}")
            file = Path(value) if os.path.isabs(value) else path.parent / value
            if not file.is_file():
                raise InputError(path, f"row {number}: {value}: no such file")
            if image_suffix(file) is None:
                raise InputError(path, f"row {number}: {value}: not a supported image file (expected .nii, .nii.gz, "
                                       ".nrrd, .nhdr, .mha or .mhd)")
            files.append(file)
        name = cells.get("case") or case_name(files[0])
        if plan.num_channels > 1 and not cells.get("case"):
            name = (channel_case(files[0]) or (name, 0))[0]
        if name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
            raise InputError(path, f"row {number}: case name {name!r} is not a plain file name")
        if name in seen:
            raise InputError(path, f"row {number}: case {name} is also in row {seen[name]}")
        seen[name] = number
        cases.append(InputCase(name, tuple(files)))
    return cases


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (0-based): of a job array (``$SLURM_ARRAY_TASK_ID``,
    ``$JOB_COMPLETION_INDEX``) or of one ``torchrun`` rank."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` (``0 <= I < N``) as a :class:`Shard`.

    Raises
    ------
    InputError
        Anything else, with the accepted form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or not 0 <= int(match[1]) < int(match[2]):
        raise InputError(None, f"--shard {text}: expected I/N with 0 <= I < N (e.g. --shard $SLURM_ARRAY_TASK_ID/"
                               "$SLURM_ARRAY_TASK_COUNT with a 0-based array)")
    return Shard(int(match[1]), int(match[2]))


def shard_cases(cases: Sequence[InputCase], shard: Shard | None) -> list[InputCase]:
    """The cases of ``shard``: every ``count``-th of the cases sorted by name, starting at ``index``. Shards
    given the same input are disjoint and together hold every case (sizes differ by one at most)."""
    if shard is None or shard.count == 1:
        return list(cases)
    ordered = sorted(cases, key=lambda case: case.name)
    return ordered[shard.index::shard.count]
