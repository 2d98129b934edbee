#!/usr/bin/env python
"""Cohort inference on this machine: ``medseg predict`` of N phantom CTs serially, as ``--shard I/W`` in W
processes at once (a job array on one machine) and on Ray Data with W workers (``--engine ray``): cases per
minute, peak memory per worker, and whether every mode wrote the serial label maps.

Each worker gets ``--threads`` threads (``OMP_NUM_THREADS``), the serial run too, so the serial row is one
worker's pace and the others show what W workers add. Every run starts a fresh process (reading the bundle,
building the network), as a job would. Memory is the peak proportional set size (``scripts/proc_memory.py``)
of each worker process: the ``medseg predict`` process (serial, shards) or each Ray worker (``ray::`` processes;
Ray's own GCS, raylet and driver are in ``peak_total_gb``).

    .venv/bin/python scripts/bench_cohort.py [--cases 20] [--size 96] [--workers 2] [--threads 1]
        [--modes serial,shards,ray] [--model bundles/ct_abdomen_phantom] [--work DIR] [--json FILE]

``--json FILE`` writes records with ``mode`` ("serial", "shards", "ray"), ``workers``, ``cases``, ``seconds``,
``cases_per_minute``, ``peak_rss_gb_per_worker``, ``peak_total_gb``, ``same_as_serial`` and
``stage_seconds_per_case`` (mean seconds of read, preprocess, infer, write per case, from the completion records).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proc_memory import TreeSampler

ROOT = Path(__file__).resolve().parents[1]
MODES = ("serial", "shards", "ray")


def make_cohort(folder: Path, cases: int, size: int) -> Path:
    """``cases`` CT phantoms of ``size`` voxels in-plane (``medseg synth``: training and test images) in one folder."""
    from medseg.data.synthetic import write_dataset

    dataset = write_dataset(folder / "synth", modality="ct", cases=cases, seed=11, size=size)
    images = folder / "images"
    images.mkdir()
    for sub in ("imagesTr", "imagesTs"):
        for path in sorted((dataset.parent / sub).iterdir()):
            shutil.move(str(path), images / path.name)
    shutil.rmtree(dataset.parent)
    return images


def _run(commands: list[list[str]], env: dict[str, str], log: Path, worker: str | None) -> dict[str, Any]:
    """Start ``commands`` at once, wait for all; seconds, and the peak PSS of the worker processes (each command's
    own process, or its descendants whose command line starts with ``worker``) and of everything together.

    Raises
    ------
    RuntimeError
        A command exited non-zero (with the end of its output).
    """
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        processes = [subprocess.Popen(c, stdout=out, stderr=subprocess.STDOUT, env=env) for c in commands]
        sampler = TreeSampler([p.pid for p in processes], interval=0.5)
        codes = [p.wait() for p in processes]
        seconds = time.monotonic() - started
        sampler.stop()
    if any(codes):
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-12:])
        raise RuntimeError(f"{' '.join(commands[0][:6])} ... exited with {codes}:\n{tail}")
    roots = {p.pid for p in processes}
    workers = [size for pid, (size, line) in sampler.peaks.items()
               if (pid in roots if worker is None else line.startswith(worker))]
    return {"seconds": seconds, "peak_rss_gb_per_worker": max(workers, default=0) / 1024**3,
            "worker_processes": len(workers), "peak_total_gb": sampler.peak_total / 1024**3}


def stage_seconds(folder: Path) -> dict[str, float]:
    """Mean seconds per case of each stage (read, preprocess, infer, write), from the completion records."""
    records = [json.loads(p.read_text(encoding="utf-8")) for p in (folder / ".medseg-cases").glob("*.done.json")]
    stages = sorted({k for r in records for k in r.get("seconds", {})})
    return {k: round(float(np.mean([r["seconds"][k] for r in records if k in r["seconds"]])), 3) for k in stages}


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*_seg.nii.gz"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--size", type=int, default=96, help="phantom size in-plane (voxels)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (OMP_NUM_THREADS)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--model", default=str(ROOT / "bundles" / "ct_abdomen_phantom"))
    parser.add_argument("--work", default=None, help="keep the cohort and outputs here (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or args.cases < 1 or args.workers < 1 or args.threads < 1:
        parser.error(f"unknown mode(s) {unknown}" if unknown else "--cases, --workers and --threads must be >= 1")
    if not (Path(args.model) / "configs").is_dir():
        parser.error(f"{args.model}: not a bundle")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT)}
    medseg = [sys.executable, "-m", "medseg", "--quiet", "predict", "--model", args.model]
    records: list[dict[str, Any]] = []
    try:
        images = make_cohort(work, args.cases, args.size)
        cases = len(list(images.iterdir()))
        serial_labels: dict[str, np.ndarray] | None = None
        for mode in modes:
            out = work / mode
            shutil.rmtree(out, ignore_errors=True)
            common = [*medseg, "--input", str(images), "--output", str(out)]
            if mode == "serial":
                commands, worker, workers = [common], None, 1
            elif mode == "shards":
                commands = [[*common, "--shard", f"{i}/{args.workers}"] for i in range(args.workers)]
                worker, workers = None, args.workers
            else:
                commands = [[*common, "--engine", "ray", "--workers", str(args.workers)]]
                worker, workers = "ray::", args.workers
            print(f"{mode}: {workers} worker(s) x {args.threads} thread(s), {cases} cases ...", flush=True)
            measured = _run(commands, env, work / f"{mode}.log", worker)
            labels = _labels(out)
            if len(labels) != cases:
                raise RuntimeError(f"{mode}: {len(labels)} label maps for {cases} cases")
            if mode == "serial":
                serial_labels = labels
            same = None if serial_labels is None else all(np.array_equal(labels[k], serial_labels[k]) for k in labels)
            record = {"mode": mode, "workers": workers, "threads_per_worker": args.threads, "cases": cases,
                      "size": args.size, "seconds": round(measured["seconds"], 1),
                      "cases_per_minute": round(cases / measured["seconds"] * 60, 2),
                      "peak_rss_gb_per_worker": round(measured["peak_rss_gb_per_worker"], 3),
                      "worker_processes": measured["worker_processes"],
                      "peak_total_gb": round(measured["peak_total_gb"], 3), "same_as_serial": same,
                      "stage_seconds_per_case": stage_seconds(out)}
            records.append(record)
            print(json.dumps(record), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    base = next((r for r in records if r["mode"] == "serial"), None)
    print(f"\n{'mode':<8}{'workers':>8}{'cases/min':>11}{'vs serial':>11}{'peak GB/worker':>16}{'same':>7}")
    for r in records:
        ratio = f"{r['cases_per_minute'] / base['cases_per_minute']:.2f}x" if base else "-"
        print(f"{r['mode']:<8}{r['workers']:>8}{r['cases_per_minute']:>11.2f}{ratio:>11}"
              f"{r['peak_rss_gb_per_worker']:>16.3f}{r['same_as_serial']!s:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
