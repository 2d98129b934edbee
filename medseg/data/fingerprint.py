"""The dataset fingerprint the planner starts from (``configs/fingerprint.json``), as nnU-Net extracts it:
per training case the voxel spacing, the image shape before and after cropping to the voxels that are
non-zero in any channel, the intensities of its foreground voxels per channel (labelled, the ignore
label left out) and the voxels of each label-map value; for the dataset, intensity statistics per
channel of foreground voxels sampled evenly from all cases, and what the planner needs of the dataset
besides (channel names, labels, regions, the ignore label).

Spacings and shapes are in R, A, S axis order (the order after ``Orientation("RAS")``, as plans are).
Each case is read once, in worker processes (:func:`extract_fingerprint`), and checked on the way
as :func:`medseg.data.validation.validate_case` does: every channel and the label map on the first
channel's grid, integer label values the dataset allows, one dimensionality for all cases.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from nibabel.orientations import io_orientation
from tqdm import tqdm

from medseg.data.cases import Case, Datalist
from medseg.data.validation import read_label_map
from medseg.errors import InputError, MedsegError, printable
from medseg.io.atomic import atomic_write_text
from medseg.io.geometry import Geometry
from medseg.io.image import read_voxels
from medseg.labels import Region

__all__ = ["FINGERPRINT_FORMAT", "CaseFingerprint", "Fingerprint", "IntensityStats", "extract_fingerprint",
           "intensity_stats"]

FINGERPRINT_FORMAT = "medseg-fingerprint/1"
#: Foreground voxels sampled per channel over the whole dataset (with replacement, evenly per case).
FOREGROUND_SAMPLES = 10_000_000
PERCENTILES = (0.5, 50.0, 99.5)


@dataclass
class IntensityStats:
    """Statistics of foreground intensities of one channel (None where there was no foreground)."""

    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    percentile_00_5: float | None = None
    median: float | None = None
    percentile_99_5: float | None = None


def intensity_stats(values: np.ndarray) -> IntensityStats:
    """The statistics of ``values`` (empty: all None)."""
    if values.size == 0:
        return IntensityStats()
    values = values.astype(np.float64, copy=False)
    low, median, high = (float(v) for v in np.percentile(values, PERCENTILES))
    return IntensityStats(float(values.mean()), float(values.std()), float(values.min()), float(values.max()),
                          low, median, high)


@dataclass
class CaseFingerprint:
    """One training case: spacing (mm), shape, shape after cropping to non-zero (RAS order), the
    foreground intensity statistics per channel and the voxels of each label value."""

    name: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    shape_after_crop: tuple[int, ...]
    intensity: tuple[IntensityStats, ...]
    class_voxels: dict[int, int]


@dataclass
class Fingerprint:
    """A dataset's fingerprint (see the module docstring)."""

    dataset: str
    dims: int
    channels: tuple[str, ...]
    labels: dict[int, str]
    cases: list[CaseFingerprint]
    intensity: tuple[IntensityStats, ...]
    regions: tuple[Region, ...] = ()
    ignore_label: int | None = None
    format: str = FINGERPRINT_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        """Outputs of a network for this dataset: one per region, else one per label value 0..max."""
        return len(self.regions) if self.regions else max(self.labels) + 1

    @property
    def spacings(self) -> np.ndarray:
        """One row of spacings per case."""
        return np.array([c.spacing for c in self.cases], dtype=float)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        """One row of shapes (after cropping to non-zero) per case."""
        return np.array([c.shape_after_crop for c in self.cases], dtype=float)

    @property
    def median_relative_size_after_cropping(self) -> float:
        return float(np.median([np.prod(c.shape_after_crop) / np.prod(c.shape) for c in self.cases]))

    def to_json(self) -> dict[str, Any]:
        cases = [{**asdict(c), "class_voxels": {str(k): v for k, v in c.class_voxels.items()}} for c in self.cases]
        return {"format": self.format, "dataset": self.dataset, "dims": self.dims, "channels": list(self.channels),
                "labels": {str(k): v for k, v in self.labels.items()},
                "regions": [r.to_json() for r in self.regions],
                "ignore_label": self.ignore_label,
                "intensity": [asdict(s) for s in self.intensity],
                "median_relative_size_after_cropping": round(self.median_relative_size_after_cropping, 4),
                "cases": cases, **self.extra}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``fingerprint.json`` atomically."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Fingerprint:
        """Read a ``fingerprint.json`` written by :meth:`save`.

        Raises
        ------
        InputError
            Missing or unreadable file, another format, missing fields.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FINGERPRINT_FORMAT:
                raise ValueError(f"format {data.get('format')!r} is not {FINGERPRINT_FORMAT!r}")
            cases = [CaseFingerprint(c["name"], tuple(c["spacing"]), tuple(c["shape"]), tuple(c["shape_after_crop"]),
                                     tuple(IntensityStats(**s) for s in c["intensity"]),
                                     {int(k): int(v) for k, v in c["class_voxels"].items()}) for c in data["cases"]]
            regions = tuple(Region(str(r["name"]), tuple(int(v) for v in r["labels"]), int(r["value"]))
                            for r in data.get("regions", []))
            ignore = data.get("ignore_label")
            return cls(data["dataset"], int(data["dims"]), tuple(data["channels"]),
                       {int(k): str(v) for k, v in data["labels"].items()}, cases,
                       tuple(IntensityStats(**s) for s in data["intensity"]), regions,
                       None if ignore is None else int(ignore))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(path, f"not a readable medseg fingerprint ({type(exc).__name__}: {exc})") from None


def _ras_order(geometry: Geometry, per_axis: Sequence[float]) -> tuple[float, ...]:
    """Per-index-axis values reordered to the R, A, S axes."""
    out = [0.0] * geometry.dims
    for axis, (ras_axis, _) in enumerate(io_orientation(geometry.affine_ras())):
        out[int(ras_axis)] = float(per_axis[axis])
    return tuple(out)


def _nonzero_shape(channels: Sequence[np.ndarray]) -> tuple[int, ...]:
    """Shape of the bounding box of the voxels that are non-zero in any channel (index order)."""
    mask = np.zeros(channels[0].shape, dtype=bool)
    for array in channels:
        mask |= array != 0
    if not mask.any():
        return tuple(map(int, mask.shape))
    shape: list[int] = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        shape.append(int(hits[-1] - hits[0] + 1))
    return tuple(shape)


def analyze_case(case: Case, labels: Sequence[int], samples: int, seed: int, ignore_label: int | None = None
                 ) -> tuple[CaseFingerprint, list[np.ndarray], int]:
    """The fingerprint of one case, its sampled foreground intensities per channel (``samples`` each,
    with replacement; the foreground: label values above 0 but ``ignore_label``) and its
    dimensionality. ``labels``: the values its label map may hold. Every file is read once.

    Raises
    ------
    InputError
        An unreadable image or label map, a label map off the image's grid, undeclared or non-integer
        label values, channels on different grids.
    """
    files = case.images
    geometry, first = read_voxels(files[0])
    arrays = [first]
    for number, file in enumerate(files[1:], start=1):
        channel_geometry, array = read_voxels(file, geometry.dims)
        problem = geometry.mismatch(channel_geometry)
        if problem:
            raise InputError(file, f"channel {number} of case {case.name} is not on the grid of channel 0 "
                             f"({files[0].name}): {problem}")
        arrays.append(array)
    assert case.label is not None, "training cases have label maps"
    label, counts = read_label_map(case.label, case.image, geometry, labels)
    foreground = (label > 0) if ignore_label is None else (label > 0) & (label != ignore_label)
    rng = np.random.default_rng(seed)
    stats, sampled = [], []
    for array in arrays:
        values = array[foreground]
        stats.append(intensity_stats(values))
        sampled.append(rng.choice(values, samples, replace=True).astype(np.float32) if values.size
                       else np.empty(0, np.float32))
    fingerprint = CaseFingerprint(
        case.name, _ras_order(geometry, geometry.spacing), tuple(int(n) for n in _ras_order(geometry, geometry.size)),
        tuple(int(n) for n in _ras_order(geometry, _nonzero_shape(arrays))), tuple(stats),
        {int(v): int(counts[v]) for v in labels})
    return fingerprint, sampled, geometry.dims


class _Failure(NamedTuple):
    """A case's :class:`InputError` as it comes back from a worker (medseg's exceptions do not survive
    pickling)."""

    path: str | None
    problem: str


def _analyze(case: Case, labels: tuple[int, ...], samples: int, seed: int, ignore_label: int | None) -> Any:
    """:func:`analyze_case` in a worker, a medseg error returned as a :class:`_Failure`."""
    try:
        return analyze_case(case, labels, samples, seed, ignore_label)
    except InputError as exc:
        return _Failure(exc.path, exc.problem)
    except MedsegError as exc:
        return _Failure(None, str(exc))


def _results(cases: Sequence[Case], labels: tuple[int, ...], ignore_label: int | None, samples: int, workers: int,
             progress: bool) -> Iterator[tuple[int, Any]]:
    """(case index, result of :func:`_analyze`) as the cases are done."""
    bar = tqdm(total=len(cases), desc="fingerprint", unit="case", disable=not (progress and sys.stderr.isatty()))
    with bar:
        if workers <= 1 or len(cases) == 1:
            for index, case in enumerate(cases):
                yield index, _analyze(case, labels, samples, index, ignore_label)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")  # no fork of a process whose threads hold locks
        try:
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(cases)), mp_context=context) as pool:
                futures = {pool.submit(_analyze, case, labels, samples, index, ignore_label): index
                           for index, case in enumerate(cases)}
                for future in concurrent.futures.as_completed(futures):
                    yield futures[future], future.result()
                    bar.update()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise MedsegError("a fingerprint worker process ended abruptly (out of memory? or a script that starts "
                              "processes without an `if __name__ == \"__main__\":` guard); try --workers 1") from exc


def extract_fingerprint(datalist: Datalist, workers: int = 1, samples: int = FOREGROUND_SAMPLES,
                        progress: bool = True) -> Fingerprint:
    """The fingerprint of the training cases of ``datalist``, ``workers`` processes reading the cases
    (a tqdm bar on a terminal). Foreground intensities: ``samples // cases`` voxels per case and
    channel, drawn with replacement (seeded by the case's position), pooled for the dataset statistics.

    Raises
    ------
    InputError
        As :func:`analyze_case` for the first bad case (in dataset order), or cases of mixed
        dimensionality; ``workers`` below 1.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(None, f"--workers must be an integer of at least 1, got {workers!r}")
    cases = datalist.training
    labels = tuple(datalist.allowed_label_values)
    per_case = max(1, samples // max(1, len(cases)))
    results: dict[int, Any] = dict(_results(cases, labels, datalist.ignore_label, per_case, workers, progress))
    found: list[CaseFingerprint] = []
    pooled: list[list[np.ndarray]] = []
    dims: int | None = None
    for index in range(len(cases)):
        result = results[index]
        if isinstance(result, _Failure):
            raise InputError(result.path, result.problem)
        fingerprint, sampled, case_dims = result
        if dims is not None and case_dims != dims:
            raise InputError(cases[index].image, f"is {case_dims}D while {printable(cases[0].image.name)} is "
                             f"{dims}D; all cases of a dataset must have the same dimensionality")
        dims = case_dims
        found.append(fingerprint)
        pooled.append(sampled)
    assert dims is not None, "a datalist has training cases"
    channels = len(pooled[0])
    intensity = tuple(intensity_stats(np.concatenate([case[c] for case in pooled])) for c in range(channels))
    names = datalist.channel_names or (datalist.modality,)
    return Fingerprint(datalist.name, dims, tuple(names), dict(datalist.labels), found, intensity,
                       tuple(datalist.regions), datalist.ignore_label)
