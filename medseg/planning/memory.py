"""Analytical training cost of a planned DynUNet: memory (activations kept for the backward pass, per
stage, times the batch, plus weights, gradients and momentum) and multiply-accumulates per iteration.

nnU-Net sizes its patches with a count of convolution outputs per stage compared with a reference
measured on a GPU; this model counts the tensors MONAI's DynUNet keeps for the backward pass instead,
so that it can be checked against a measured peak (:mod:`medseg.planning.measure`). Pure arithmetic:
no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medseg.architectures import Topology

__all__ = ["MemoryModel", "activation_elements", "memory_model", "multiply_accumulates", "parameter_count",
           "training_bytes"]

GB = 1024**3

#: Tensors kept per voxel and feature channel for the backward pass, for a stage's block of two
#: convolutions (convolution and normalisation outputs; the in-place LeakyReLU shares the latter):
#: plain, and residual (a third, 1 x 1 x 1 convolution on the shortcut when the stage changes width or
#: resolution, and the sum).
BLOCK_TENSORS = {False: 4, True: 6}
#: A decoder stage adds the transposed convolution's output and the concatenation with the skip (2 C).
UPSAMPLE_TENSORS = 3
#: Per output channel and voxel: logits, softmax, one-hot target, log-softmax and the loss' products.
LOSS_TENSORS = 6
#: Gradient buffers alive at once at full resolution during the backward pass, per feature channel.
GRADIENT_TENSORS = 3
#: Weights, gradients and SGD momentum: bytes per parameter (float32 each).
PARAMETER_BYTES = 12


@dataclass(frozen=True)
class MemoryModel:
    """Bytes per kept activation element (4: float32; 2: float16 under CUDA autocast), a factor for
    what the count leaves out (allocator rounding and caching, convolution workspaces) and a fixed
    amount (the libraries' own buffers). ``name`` says which device and precision it describes."""

    name: str
    activation_bytes: int
    factor: float
    fixed_bytes: int = 0


#: float32 training on the CPU; the factor keeps the estimate above the peak resident memory measured
#: for 64^3 and 96 x 96 x 64 patches (measured/estimate 0.85-0.9 with it), the fixed part above the
#: growth measured for the smallest networks (about 0.2 GB of oneDNN and allocator buffers).
CPU_FLOAT32 = MemoryModel("cpu float32", 4, 1.15, 256 * 1024**2)
#: CUDA with mixed precision (float16 activations); the factor covers the caching allocator, cuDNN
#: workspaces and the float32 tensors of the loss. It is calibrated on nnU-Net's published reference
#: (8 GB for 5.6e8 convolution outputs per patch at batch 2, measured by nnU-Net on GPUs): for 3D
#: U-Nets of 5-6 stages this estimate is 1.0-1.08 times the memory that reference implies, for a
#: 2D U-Net of 8 stages 0.9 times. Not yet checked against a GPU of this project: the planner measures
#: an iteration when it runs on one.
CUDA_MIXED = MemoryModel("cuda mixed precision", 2, 1.35)


def memory_model(device: str) -> MemoryModel:
    """The model for ``cpu`` or ``cuda[:N]`` (CUDA training runs under autocast)."""
    return CUDA_MIXED if device.startswith("cuda") else CPU_FLOAT32


def _stage_voxels(topology: Topology) -> list[int]:
    return [math.prod(size) for size in topology.sizes()]


def activation_elements(topology: Topology, filters: tuple[int, ...], in_channels: int, out_channels: int,
                        res_block: bool = False, deep_supervision: bool = False) -> int:
    """Elements of the tensors one patch keeps for the backward pass (see the module constants),
    with the input patch and, with ``deep_supervision``, the extra heads' outputs and losses."""
    voxels = _stage_voxels(topology)
    block = BLOCK_TENSORS[res_block]
    total = in_channels * voxels[0]
    total += sum(block * f * v for f, v in zip(filters, voxels, strict=True))  # encoder and bottleneck
    total += sum((block + UPSAMPLE_TENSORS) * f * v for f, v in zip(filters[:-1], voxels[:-1], strict=True))
    total += (LOSS_TENSORS * out_channels + GRADIENT_TENSORS * filters[0]) * voxels[0]
    if deep_supervision:
        total += sum(LOSS_TENSORS * out_channels * v for v in voxels[1:-1])
    return total


def parameter_count(topology: Topology, filters: tuple[int, ...], in_channels: int, out_channels: int,
                    res_block: bool = False) -> int:
    """Weights of the DynUNet (convolutions, normalisation scale and shift, transposed convolutions, head)."""
    total, previous = 0, in_channels
    for kernel, stride, f in zip(topology.kernel_sizes, topology.strides, filters, strict=True):
        taps = math.prod(kernel)
        total += previous * f * taps + f * f * taps + 4 * f
        if res_block and (previous != f or any(s != 1 for s in stride)):
            total += previous * f + 2 * f
        previous = f
    for level in range(len(filters) - 2, -1, -1):
        f, deeper, taps = filters[level], filters[level + 1], math.prod(topology.kernel_sizes[level])
        total += deeper * f * math.prod(topology.strides[level + 1])  # transposed convolution
        total += 2 * f * f * taps + f * f * taps + 4 * f
        if res_block:
            total += 2 * f * f + 2 * f
    return total + filters[0] * out_channels + out_channels


def training_bytes(topology: Topology, filters: tuple[int, ...], in_channels: int, out_channels: int, batch: int,
                   model: MemoryModel, res_block: bool = False, deep_supervision: bool = False) -> int:
    """Estimated peak memory of one training iteration (forward, backward, SGD step) in bytes."""
    activations = activation_elements(topology, filters, in_channels, out_channels, res_block, deep_supervision)
    weights = parameter_count(topology, filters, in_channels, out_channels, res_block) * PARAMETER_BYTES
    return int(model.factor * (batch * activations * model.activation_bytes + weights)) + model.fixed_bytes


def multiply_accumulates(topology: Topology, filters: tuple[int, ...], in_channels: int, out_channels: int,
                         batch: int, res_block: bool = False) -> int:
    """Multiply-accumulates of one training iteration (the forward pass' convolutions, times 3 for the
    backward pass): the time model of :mod:`medseg.planning.budget`."""
    voxels = _stage_voxels(topology)
    total, previous = 0, in_channels
    for kernel, f, v in zip(topology.kernel_sizes, filters, voxels, strict=True):
        taps = math.prod(kernel)
        total += (previous * f * taps + f * f * taps + (previous * f if res_block else 0)) * v
        previous = f
    for level in range(len(filters) - 2, -1, -1):
        f, deeper, v = filters[level], filters[level + 1], voxels[level]
        taps = math.prod(topology.kernel_sizes[level])
        total += (deeper * f + 2 * f * f * taps + f * f * taps + (2 * f * f if res_block else 0)) * v
    total += filters[0] * out_channels * voxels[0]
    return 3 * batch * total
