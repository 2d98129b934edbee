"""Measured training iterations of a planned network: seconds per iteration and peak memory of a forward
pass, a backward pass and an SGD step with MONAI's DiceCE loss on random data at the planned patch and
batch, as :func:`medseg.networks.build_network` builds the network; and the seconds a patch's data
cost: its case read back from the cache (:func:`case_load_seconds`), cut and augmented by the planned
training chain (:func:`augmentation_seconds`), which an iteration pays too when the data are loaded in
the training process (:func:`iteration_seconds`).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (under autocast, as CUDA training runs); on the
CPU the growth of the peak resident memory (Linux ``VmHWM``, reset first) of a fresh process, measured
from before the network is built (:func:`probe_in_fresh_process`), so that neither memory this process
freed earlier (and its allocator kept) nor anything before counts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from monai.data import MetaTensor
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.transforms import Compose

from medseg.architectures import NetworkSpec
from medseg.networks import build_network
from medseg.plan import Channel, Intensity, Plan
from medseg.transforms.augment import enlarged_patch, nnunet_augmentation, sampling_preparation

__all__ = ["Probe", "ProbeRequest", "augmentation_seconds", "case_load_seconds", "iteration_seconds", "probe",
           "probe_in_fresh_process"]

#: Patches cut and augmented by :func:`augmentation_seconds` (after one untimed): enough draws that the
#: random transforms (the spatial one, p 0.36, costs most) come in near their probabilities.
AUGMENTATION_SAMPLES = 12


@dataclass(frozen=True)
class ProbeRequest:
    """A network and what one training iteration feeds it."""

    network: NetworkSpec
    patch_size: tuple[int, ...]
    batch_size: int
    in_channels: int
    out_channels: int
    device: str = "cpu"
    spacing: tuple[float, ...] | None = None
    precision: str = "float32"  # on the CPU "bfloat16": the forward pass under bfloat16 autocast, as training runs it

    def plan(self) -> Plan:
        """A plan that builds this network (``in_channels`` input channels, labels 0..out_channels-1; at ``spacing``,
        unit spacing if None: the spacing decides which axes the augmentation rotates and scales)."""
        dims = len(self.patch_size)
        spacing = self.spacing if self.spacing is not None else (1.0,) * dims
        channels = tuple(Channel(f"channel_{c}", Intensity("mr")) for c in range(self.in_channels))
        return Plan(dims, "probe", {v: f"label_{v}" for v in range(self.out_channels)}, tuple(spacing),
                    self.patch_size, Intensity("mr"), self.network,
                    channels=channels if self.in_channels > 1 else (), batch_size=self.batch_size)


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


def _loss(loss_function: Any, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The training loss of a network output (a DynUNet with deep-supervision heads stacks them on dim 1)."""
    outputs = list(torch.unbind(output, dim=1)) if output.dim() == label.dim() + 1 else output
    loss: torch.Tensor = loss_function(outputs, label)
    return loss


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
    autocast: Any = contextlib.nullcontext()
    if cuda:
        autocast = torch.autocast("cuda", dtype=torch.float16)
    elif request.precision == "bfloat16":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    times: list[float] = []
    step = 0
    while step < warmup + max(1, steps) or (sum(times) < min_seconds and len(times) < max_steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            output = network(image)
            if cuda:
                loss = _loss(loss_function, output, label)
        if not cuda:  # the loss in float32 outside autocast, as training computes it on the CPU
            loss = _loss(loss_function, output.float(), label)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
        step += 1
    if cuda:
        peak: int | None = int(torch.cuda.max_memory_allocated(device) - allocated_before)
        del network, optimizer, image, label, loss, output
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


def _synthetic_case(plan: Plan, shape: tuple[int, ...], channels: int) -> dict[str, MetaTensor]:
    """A preprocessed case of ``shape``: noise in every channel, and each foreground class a band of
    the central box (half the shape along each axis) of the label map."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((channels, *shape), generator=generator)
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    box = [slice(n // 4, n // 4 + max(1, n // 2)) for n in shape]
    classes = max(1, plan.num_classes - 1)
    start, width = box[0].start, max(1, (box[0].stop - box[0].start) // classes)
    for value in range(1, plan.num_classes):
        first = start + (value - 1) * width
        region: tuple[int | slice, ...] = (0, slice(first, first + width), *box[1:])
        label[region] = value
    return {"image": MetaTensor(image), "label": MetaTensor(label)}


def augmentation_seconds(plan: Plan, case_shape: tuple[float, ...], channels: int = 1,
                         samples: int = AUGMENTATION_SAMPLES) -> float:
    """Mean seconds to cut and augment one training patch of ``plan`` with nnU-Net's augmentation
    (:func:`~medseg.transforms.augment.nnunet_augmentation`, seeded: the same draws every time; the light recipe
    that short budgets then get costs less, so the estimate errs on the side of fewer iterations) from a
    synthetic preprocessed case of ``case_shape`` voxels (the median image at the plan's spacing; at
    most twice the enlarged patch along an axis: cutting does not depend on the rest). Reading the
    cached case from disk is not included.

    Raises
    ------
    ValueError
        ``samples`` below 1.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    enlarged = enlarged_patch(plan)
    shape = tuple(max(int(p), min(int(round(n)), 2 * int(e))) for n, p, e in zip(case_shape, plan.patch_size, enlarged))
    case = Compose(sampling_preparation(plan))(_synthetic_case(plan, shape, channels))
    chain = nnunet_augmentation(plan, 1)
    chain.set_random_state(seed=0)
    chain(dict(case))  # untimed: first calls build caches
    started = time.perf_counter()
    for _ in range(samples):
        chain(dict(case))
    return (time.perf_counter() - started) / samples


def case_load_seconds(case_shape: tuple[float, ...], channels: int = 1, probe_voxels: int = 1 << 22) -> float:
    """Seconds to read one preprocessed case of ``case_shape`` voxels back from the cache (what
    ``PersistentDataset`` does for every patch: ``torch.load`` of the image in float32 and the label
    map), timed on a case of at most ``probe_voxels`` written to a temporary file (fastest of three
    reads, the file in the page cache as a training run's cases are) and scaled by the voxel count."""
    voxels = max(1, int(math.prod(max(1.0, float(n)) for n in case_shape)))
    timed = min(voxels, probe_voxels)
    case = {"image": torch.zeros((channels, timed), dtype=torch.float32), "label": torch.zeros((1, timed), dtype=torch.uint8)}
    with tempfile.TemporaryDirectory(prefix="medseg-probe-") as folder:
        path = os.path.join(folder, "case.pt")
        torch.save(case, path)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            torch.load(path, weights_only=True)
            times.append(time.perf_counter() - started)
    return min(times) * voxels / timed


def iteration_seconds(network_seconds: float, data_seconds: float, workers: int) -> float:
    """Seconds of one training iteration from its two parts: the network's forward, backward and step,
    and the batch's data (``data_seconds``: its cases read, its patches cut and augmented). With no loader workers the
    training process does both, one after the other; with ``workers`` processes the data are prepared
    alongside, and the slower side sets the pace."""
    if workers <= 0:
        return network_seconds + data_seconds
    return max(network_seconds, data_seconds / workers)
