"""Memory of a process tree from /proc, for the benchmarks (Linux only).

Proportional set size (PSS, /proc/PID/smaps_rollup): a page shared by N processes counts 1/N in each, so
forked workers are not counted twice as a sum of resident sizes would. :class:`TreeSampler` samples a
command's whole tree in a thread and keeps the peak of the sum and the peak of each process.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

#: Seconds between two samples: reading smaps_rollup walks the page tables of a large process (tens of
#: milliseconds for 13 GB, with its memory map locked), so sampling often would slow the process measured.
SAMPLE_SECONDS = 1.0


def family(root: int) -> set[int]:
    """``root`` and every process below it (children, their children, ...) alive now."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    members, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in members} - members
        grew, members = bool(more), members | more
    return members


def pss(pid: int) -> int:
    """Bytes of proportional set size of ``pid`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def command_line(pid: int) -> str:
    """The command line of ``pid`` (arguments joined by spaces; "" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def tree_memory(root: int) -> int:
    """Bytes of memory of ``root`` and every process below it: the sum of their PSS."""
    return sum(pss(pid) for pid in family(root))


class TreeSampler:
    """Samples the tree of each of ``roots`` every :data:`SAMPLE_SECONDS` until :meth:`stop`: ``peak_total`` (bytes,
    the largest sum over all trees at one time) and ``peaks`` (pid -> (largest PSS, command line))."""

    def __init__(self, roots: list[int], interval: float = SAMPLE_SECONDS) -> None:
        self.roots, self.interval = roots, interval
        self.peak_total = 0
        self.peaks: dict[int, tuple[int, str]] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            total = 0
            for pid in set().union(*(family(root) for root in self.roots)):
                size = pss(pid)
                total += size
                if size > self.peaks.get(pid, (0, ""))[0]:  # the command line now: Ray workers rename themselves
                    self.peaks[pid] = (size, command_line(pid) or self.peaks.get(pid, (0, ""))[1])
            self.peak_total = max(self.peak_total, total)
            self._done.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self._done.set()
        self._thread.join()


def measure(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``command``; (wall seconds, peak memory in GB of it and its children: :func:`tree_memory`, sampled every
    :data:`SAMPLE_SECONDS`).

    Raises
    ------
    RuntimeError
        It exited non-zero (with the end of its output).
    """
    with open(log, "w", encoding="utf-8") as out:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler([process.pid])
        code = process.wait()
        seconds = time.monotonic() - started
        sampler.stop()
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-8:])
        raise RuntimeError(f"{' '.join(command[:4])} exited with {code}:\n{tail}")
    return seconds, sampler.peak_total / 1024**3
