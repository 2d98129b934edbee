"""Predicting a cohort of image files into a folder, resumable and exactly once.

Each finished case is recorded atomically (:class:`CaseJournal`): its label map (and instance map) is
written with :func:`medseg.io.atomic.atomic_path`, then a completion record
``OUTPUT/.medseg-cases/<case>.done.json`` (outputs with their sizes and SHA-256, inputs, the settings
that made them) replaces the case's pending record. A run killed at any point and started again with the
same command skips the recorded cases, removes what an interrupted case left (its pending record names
it: outputs and temporary folders) and redoes it, so no half file survives and no case is written twice.

:func:`predict_files` is ``medseg predict`` of files: every case to do is read once and checked
(header, pixels, whether the model fits it: :mod:`medseg.inference.fit`) before the model is loaded and
kept in memory up to :data:`HELD_BYTES` together, so bad input is refused before anything is written.
``shard`` takes a disjoint share of the cases (:func:`medseg.inference.cases.shard_cases`): job arrays
and ``torchrun`` ranks over one output folder. :func:`cohort_cases` and :func:`predict_case` are the
same steps for other engines (Ray Data).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medseg.errors import InputError
from medseg.inference.cases import InputCase, Shard, collect_cases, shard_cases
from medseg.inference.predictor import LabelMapPredictor, channel_plan, check_fit, lesion_labels
from medseg.io.atomic import atomic_write_text
from medseg.io.image import SourceImage, image_suffix, read_source
from medseg.plan import Plan

__all__ = ["HELD_BYTES", "JOURNAL_FOLDER", "CaseJournal", "Cohort", "CohortCase", "cohort_cases", "predict_case",
           "predict_files", "read_case"]

log = logging.getLogger(__name__)

#: Inputs read for the checks before the model is loaded stay in memory up to this many bytes together;
#: the rest are read again when their turn comes.
HELD_BYTES = 1 << 30

#: The folder of completion records inside an output folder.
JOURNAL_FOLDER = ".medseg-cases"

_DONE, _PENDING = ".done.json", ".pending.json"


@dataclass(frozen=True)
class CohortCase:
    """One case to predict and the files it writes: its label map, then its instance map when asked."""

    case: InputCase
    targets: tuple[Path, ...]

    @property
    def name(self) -> str:
        return self.case.name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _companions(target: Path) -> list[Path]:
    """The files of an output (the data file of a two-file format: ``.mhd`` + ``.raw``, ``.nhdr`` + ``.raw.gz``)."""
    suffix = image_suffix(target)
    if suffix not in (".mhd", ".nhdr"):
        return [target]
    stem = target.name[: -len(suffix or "")]
    return [target, *sorted(p for p in target.parent.glob(stem + ".*raw*") if p != target)]


class CaseJournal:
    """Completion records of an output folder (``OUTPUT/.medseg-cases/``), one per case.

    ``settings`` (model, options) are written into each record: a case recorded under other settings is
    not finished for this run (:meth:`finished` raises, naming what differs).
    """

    def __init__(self, output_dir: str | os.PathLike[str], settings: Mapping[str, Any] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / JOURNAL_FOLDER
        self.settings = dict(settings or {})

    def _record(self, name: str, kind: str) -> Path:
        return self.folder / f"{name}{kind}"

    def read(self, name: str) -> dict[str, Any] | None:
        """The completion record of case ``name``, None if it has none (or an unreadable one)."""
        try:
            record = json.loads(self._record(name, _DONE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def finished(self, item: CohortCase) -> bool:
        """Whether ``item`` is recorded as finished, with these targets, under these settings, and its outputs
        are still there with their recorded sizes (a deleted or replaced output makes it unfinished).

        Raises
        ------
        InputError
            The case was recorded with other settings (another model or options), naming its output.
        """
        record = self.read(item.name)
        if record is None:
            return False
        outputs = record.get("outputs", [])
        if sorted(o.get("file") for o in outputs) != sorted(t.name for t in item.targets):
            return False
        if any(not (self.output_dir / o["file"]).is_file()
               or (self.output_dir / o["file"]).stat().st_size != o.get("bytes") for o in outputs):
            return False
        recorded = record.get("settings", {})
        if self.settings and recorded != self.settings:
            differ = sorted(k for k in set(recorded) | set(self.settings) if recorded.get(k) != self.settings.get(k))
            raise InputError(item.targets[0], f"already predicted with other settings ({', '.join(differ)}: "
                                              f"{', '.join(str(recorded.get(k)) for k in differ)}); pass "
                                              "--overwrite to predict it again, or choose another --output folder")
        return True

    def interrupted(self, item: CohortCase) -> bool:
        """Whether an attempt at ``item`` was interrupted (a pending record without a completion record)."""
        return self._record(item.name, _PENDING).is_file()

    def _discard(self, item: CohortCase) -> None:
        """Remove what an attempt at ``item`` wrote: outputs, their temporary folders, the records."""
        for target in item.targets:
            for path in _companions(target):
                path.unlink(missing_ok=True)
            for tmp in target.parent.glob(f".{target.name}.*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        self._record(item.name, _DONE).unlink(missing_ok=True)
        self._record(item.name, _PENDING).unlink(missing_ok=True)

    @contextlib.contextmanager
    def recording(self, item: CohortCase, seconds: Mapping[str, float] | None = None) -> Iterator[None]:
        """Record ``item`` around the block that writes its targets: what an earlier interrupted attempt left
        is removed, a pending record is written, and on success the completion record replaces it (with
        ``seconds``, the case's time per stage, and the block's as ``write``); on an exception (Ctrl-C included)
        the targets the block wrote are removed again and the exception propagates."""
        started = time.monotonic()
        if self.interrupted(item):
            log.info("%s: an earlier attempt was interrupted; predicting it again", item.name)
        self._discard(item)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._record(item.name, _PENDING), json.dumps(
            {"case": item.name, "targets": [t.name for t in item.targets], "host": socket.gethostname(),
             "pid": os.getpid(), "started": _now()}, indent=1) + "\n")
        try:
            yield
            outputs = [{"file": t.name, "bytes": t.stat().st_size, "sha256": _sha256(t)} for t in item.targets]
            record = {"case": item.name, "inputs": [str(f) for f in item.case.files], "outputs": outputs,
                      "settings": self.settings, "host": socket.gethostname(), "finished": _now(),
                      "seconds": {**{k: round(v, 3) for k, v in (seconds or {}).items()},
                                  "write": round(time.monotonic() - started, 3)}}
            atomic_write_text(self._record(item.name, _DONE), json.dumps(record, indent=1) + "\n")
        except BaseException:
            self._discard(item)
            raise
        self._record(item.name, _PENDING).unlink(missing_ok=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Cohort:
    """The cases of a prediction with their outputs, the names of those already finished (skipped), and the
    journal that records them."""

    cases: list[CohortCase]
    finished: frozenset[str]
    journal: CaseJournal

    @property
    def todo(self) -> list[CohortCase]:
        """The cases still to predict, in order."""
        return [item for item in self.cases if item.name not in self.finished]


def _targets(cases: Sequence[InputCase], output_dir: Path, instances: bool,
             input_path: str | os.PathLike[str]) -> list[CohortCase]:
    """Each case with its outputs, checked: no input overwritten, no two cases onto one output."""
    items = [CohortCase(case, (output_dir / case.output_name(),)
                        + ((output_dir / case.output_name("instances"),) if instances else ())) for case in cases]
    inputs = {p.resolve() for case in cases for p in case.files}
    for item in items:
        for target in item.targets:
            if target.resolve() in inputs:
                raise InputError(target, "would overwrite an input image; choose another --output folder")
    names = [t.name for item in items for t in item.targets]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise InputError(Path(input_path), f"several inputs would be written to the same output: {', '.join(clashes)}")
    return items


def cohort_cases(plan: Plan, input_path: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
                 shard: Shard | None = None, overwrite: bool = False, instances: bool = False,
                 settings: Mapping[str, Any] | None = None) -> Cohort:
    """The cases of ``input_path`` (a file, a folder or a manifest: :func:`~medseg.inference.cases.collect_cases`)
    in ``shard``, split into those to do and those recorded as finished in ``output_dir`` under ``settings``
    (with ``overwrite`` every case is done again).

    Raises
    ------
    InputError
        As :func:`~medseg.inference.cases.collect_cases`; ``output_dir`` not a folder; an output that would
        overwrite an input; two cases onto one output; an existing output that no record of this folder
        explains (unless ``overwrite``); a case recorded with other settings (unless ``overwrite``).
    """
    cases = shard_cases(collect_cases(input_path, plan), shard)
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise InputError(output, "exists and is not a folder")
    journal = CaseJournal(output, settings)
    items = _targets(cases, output, instances, input_path)
    finished = set()
    for item in items:
        if not overwrite and journal.finished(item):
            finished.add(item.name)
        elif not overwrite and not journal.interrupted(item):
            for target in item.targets:
                if target.exists():
                    raise InputError(target, "already exists; pass --overwrite to replace it")
    return Cohort(items, frozenset(finished), journal)


def read_case(plan: Plan, case: InputCase, strict: bool = False) -> list[SourceImage]:
    """Every channel of ``case`` read once and checked: on the first channel's grid, and (:func:`check_fit`)
    fitting the model's channel.

    Raises
    ------
    InputError
        As :func:`medseg.io.image.read_source`; a channel on another grid; with ``strict``, a misfit.
    """
    sources: list[SourceImage] = []
    for channel, path in enumerate(case.files):
        source = read_source(path, plan.dims)
        if sources:
            problem = sources[0].geometry.mismatch(source.geometry)
            if problem is not None:
                raise InputError(path, f"is not on the grid of the case's first channel {case.first.name}: "
                                       f"{problem}; the channels of a case must share one grid")
        check_fit(channel_plan(plan, channel), path, source.geometry, source.voxels().T, strict=strict)
        sources.append(source)
    return sources


def predict_case(plan: Plan, predictor: LabelMapPredictor, item: CohortCase, journal: CaseJournal, *,
                 sources: list[SourceImage] | None = None, strict: bool = False,
                 instance_values: Sequence[int] | None = None, read_seconds: float | None = None) -> None:
    """Predict one case (read here unless ``sources`` holds its channels, read in ``read_seconds``) and write its
    outputs inside :meth:`CaseJournal.recording`, whose record keeps the seconds of each stage (``read``,
    ``preprocess``, ``infer``: the network and the inversion to the input grid, ``write``).

    Raises
    ------
    InputError
        As :func:`read_case`, :meth:`Predictor.load` and :meth:`Predictor.infer`; nothing of the case is left.
    """
    clock = time.monotonic()
    if sources is None:
        sources, read_seconds = read_case(plan, item.case, strict), time.monotonic() - clock
    seconds = {} if read_seconds is None else {"read": read_seconds}
    clock = time.monotonic()
    loaded = predictor.load(sources)
    for source in sources:
        source.drop_pixels()  # preprocessed: the label maps need only the first one's grid and header
    seconds["preprocess"], clock = time.monotonic() - clock, time.monotonic()
    labels = predictor.infer(loaded)
    del loaded
    seconds["infer"] = time.monotonic() - clock
    with journal.recording(item, seconds):
        predictor.write(labels, sources[0], item.targets[0], item.targets[1] if len(item.targets) > 1 else None,
                        instance_values)


def _instance_values(plan: Plan, model: Path | None, instance_labels: Sequence[int] | None) -> list[int]:
    values = list(instance_labels) if instance_labels is not None else lesion_labels(plan)
    unknown = sorted(set(values) - set(plan.labels) | ({0} & set(values)))
    if not values or unknown:
        raise InputError(model, "--instances: " + (f"labels {unknown} are not foreground labels of this model"
                         if unknown else "the model has no lesion label; name them with --instance-labels"))
    return values


def predict_files(plan: Plan, load_predictor: Callable[[], LabelMapPredictor], input_path: str | os.PathLike[str],
                  output_dir: str | os.PathLike[str], *, overwrite: bool = False, instances: bool = False,
                  instance_labels: Sequence[int] | None = None, strict: bool = False,
                  model: str | os.PathLike[str] | None = None, shard: Shard | None = None,
                  settings: Mapping[str, Any] | None = None) -> list[Path]:
    """Predict every case of ``input_path`` (in ``shard``) into ``output_dir`` as ``<case>_seg.<ending>``
    with the :class:`Predictor` that ``load_predictor`` makes for ``plan`` (called once every input to do
    has been checked); returns the label maps of the shard, those finished earlier included. For a model of
    several input channels the inputs are cases of channel files in nnU-Net's layout, ``CASE_0000.nii.gz``,
    ``CASE_0001.nii.gz``, ... (:func:`medseg.inference.cases.collect_cases`) or a manifest's rows, written
    as ``CASE_seg.<ending>`` on the first channel's grid.

    Cases recorded as finished under the same ``settings`` are skipped; every other case is read once and
    checked before the model is loaded, so bad input writes nothing. Each case is recorded when its outputs
    are complete; if a case fails later (or the run is stopped), the cases finished before it stay recorded
    and the same command continues with the rest.

    With ``instances``, an instance map ``<case>_instances.<ending>`` (one id per connected
    component of the lesion labels, or of ``instance_labels``) is written beside each label map.

    Raises
    ------
    InputError
        Bad inputs (see :func:`cohort_cases`, :func:`read_case`: a case with a missing channel file, channels
        on different grids), ``instances`` for a model (``model``, named in the message) without lesion
        labels, unknown ``instance_labels``; with ``strict``, an input the model does not fit; from the
        predictor, bad options.
    BundleError
        From ``load_predictor``: a bad bundle.
    """
    cohort = cohort_cases(plan, input_path, output_dir, shard=shard, overwrite=overwrite, instances=instances,
                          settings=settings)
    output = Path(output_dir)
    values = _instance_values(plan, None if model is None else Path(model), instance_labels) if instances else None
    labels_maps = [item.targets[0] for item in cohort.cases]
    todo = cohort.todo
    if cohort.finished:
        log.info("%d case(s) already finished in %s (recorded in %s); %d to do", len(cohort.finished), output,
                 JOURNAL_FOLDER, len(todo))
    held_cases: list[list[SourceImage] | None] = []
    read_seconds: list[float] = []
    held = 0
    for item in todo:  # each read once: header, pixels (truncation, NaN), grids, and does the model fit?
        clock = time.monotonic()
        sources = read_case(plan, item.case, strict)
        read_seconds.append(time.monotonic() - clock)
        held += sum(s.nbytes for s in sources)
        held_cases.append(sources if held <= HELD_BYTES else None)  # beyond: read again when its turn comes
        del sources
    if not todo:
        return labels_maps

    predictor = load_predictor()
    created_dir = not output.exists()
    done = 0
    try:
        for index, item in enumerate(todo, 1):
            held_sources, held_cases[index - 1] = held_cases[index - 1], None
            log.info("[%d/%d] %s -> %s", index, len(todo), item.case.first.name if len(item.case.files) == 1
                     else f"{item.name} ({len(item.case.files)} channels)", item.targets[0])
            predict_case(plan, predictor, item, cohort.journal, sources=held_sources, strict=strict,
                         instance_values=values, read_seconds=read_seconds[index - 1])
            done += 1
    except BaseException:
        if done:
            log.error("%d of %d case(s) finished and recorded in %s; the same command continues with the rest",
                      done, len(todo), output / JOURNAL_FOLDER)
        else:
            with contextlib.suppress(OSError):
                (output / JOURNAL_FOLDER).rmdir()  # empty: the failed case's records are gone
            if created_dir and output.exists() and not any(output.iterdir()):
                output.rmdir()
        raise
    return labels_maps
