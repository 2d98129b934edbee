"""Measured training iterations of a planned network: seconds per iteration and peak memory of a forward
pass, a backward pass and an SGD step with MONAI's DiceCE loss on random data at the planned patch and
batch, as :func:`medseg.networks.build_network` builds the network.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (under autocast, as CUDA training runs); on the
CPU the growth of the peak resident memory (Linux ``VmHWM``, reset first) of a fresh process, measured
from before the network is built (:func:`probe_in_fresh_process`), so that neither memory this process
freed earlier (and its allocator kept) nor anything before counts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from medseg.architectures import NetworkSpec
from medseg.networks import build_network
from medseg.plan import Intensity, Plan

__all__ = ["Probe", "ProbeRequest", "probe", "probe_in_fresh_process"]


@dataclass(frozen=True)
class ProbeRequest:
    """A network and what one training iteration feeds it."""

    network: NetworkSpec
    patch_size: tuple[int, ...]
    batch_size: int
    in_channels: int
    out_channels: int
    device: str = "cpu"

    def plan(self) -> Plan:
        """A plan that builds this network (labels 0..out_channels-1, unit spacing)."""
        dims = len(self.patch_size)
        return Plan(dims, "probe", {v: f"label_{v}" for v in range(self.out_channels)}, (1.0,) * dims,
                    self.patch_size, Intensity("mr"), self.network,
                    channels=(), batch_size=self.batch_size)


@dataclass(frozen=True)
class Probe:
    """Seconds of the fastest timed iteration, and the peak memory in bytes (None where not measurable)."""

    seconds: float
    peak_bytes: int | None


def _rss_bytes() -> int | None:
    """The resident memory of this process now (Linux), else None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak_rss() -> None:
    """Start the peak resident memory afresh (Linux: ``VmHWM``). ``ru_maxrss`` cannot be reset, and a
    spawned process inherits its parent's (the kernel keeps it across fork and exec)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")


def _peak_rss_bytes() -> int | None:
    """The peak resident memory since :func:`_reset_peak_rss` (Linux), else the process' ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def probe(request: ProbeRequest, steps: int = 2, warmup: int = 1, min_seconds: float = 1.0,
          max_steps: int = 5) -> Probe:
    """Run ``warmup`` untimed and at least ``steps`` timed training iterations of ``request`` here (more,
    up to ``max_steps``, until ``min_seconds`` have been timed); the fastest counts, so that another
    process taking the CPU for a moment does not make the machine look slower than it is.

    The peak is measured on CUDA, and on the CPU as the growth of this process' peak resident memory
    from before the network is built (meaningful in a fresh process only: see
    :func:`probe_in_fresh_process`).
    """
    device = torch.device(request.device)
    cuda = device.type == "cuda"
    if not cuda:
        _reset_peak_rss()
    rss_before = None if cuda else _rss_bytes()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    network = build_network(request.plan()).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    # as in training (medseg.engines.loss): a DynUNet with deep-supervision heads stacks their outputs on dim 1
    loss_function = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    generator = torch.Generator().manual_seed(0)
    shape = (request.batch_size, request.in_channels, *request.patch_size)
    image = torch.randn(shape, generator=generator).to(device)
    label = torch.randint(0, request.out_channels, (request.batch_size, 1, *request.patch_size),
                          generator=generator).to(device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
    times: list[float] = []
    step = 0
    while step < warmup + max(1, steps) or (sum(times) < min_seconds and len(times) < max_steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            output = network(image)
            outputs = list(torch.unbind(output, dim=1)) if output.dim() == label.dim() + 1 else output
            loss = loss_function(outputs, label)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
        step += 1
    if cuda:
        peak: int | None = int(torch.cuda.max_memory_allocated(device) - allocated_before)
        del network, optimizer, image, label, loss, output, outputs
        torch.cuda.empty_cache()  # the caching allocator keeps nothing of the probe for training
    else:
        peak_rss = _peak_rss_bytes()
        peak = None if rss_before is None or peak_rss is None else max(0, peak_rss - rss_before)
    return Probe(min(times) if times else float("nan"), peak)


def _fresh_probe(request: ProbeRequest, steps: int, warmup: int, threads: int) -> Probe:
    torch.set_num_threads(threads)
    return probe(request, steps, warmup, min_seconds=0.0)


def probe_in_fresh_process(request: ProbeRequest, steps: int = 1, warmup: int = 0) -> Probe:
    """:func:`probe` in a new (spawned) process with this process' torch threads, so that the peak
    resident memory it reports belongs to the measured iterations alone (``steps`` iterations, no
    more: one shows the peak)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_fresh_probe, request, steps, warmup, torch.get_num_threads()).result()
