"""A faster copy of a network for sliding-window inference on the CPU (same weights, same function), and
the C allocator setting that keeps its activations from being mapped and unmapped at every window.

Convolutions. PyTorch sends a 3D convolution to oneDNN only when its input is large enough by a 2D
rule of thumb (``batch x channels x D x H > 20480``, among others); below that it runs ``slow_conv3d``, an
explicit unfold (im2col) plus a matrix product. For one 96 x 96 x 64 window that hits exactly the layers
where it hurts: the first layer of a one-channel CT network (1 -> 8 channels: 32 ms and a 64 MB unfold vs
15 ms in oneDNN) and the deep, small ones (32 -> 32 channels at 24 x 24 x 16: 10.9 vs 1.5 ms), measured on
this project's 2-core AVX-512 machine. :class:`OneDNNConv3d` calls oneDNN directly (the kernels
PyTorch itself uses for the larger layers: outputs equal up to float rounding, bit-equal in most layers).
Convolutions with one or two channels on a side (the first layer, the last layers of a two-class
network) run in channels-last, where oneDNN is several times faster (2 -> 2 channels over two windows:
33 ms NCDHW vs 12 ms NDHWC including both layout conversions); at 8 channels and more NCDHW was as fast
or faster. Transposed convolutions run in channels-last through PyTorch (:class:`ChannelsLast`): in NCDHW
PyTorch took 23 ms for DynUNet's last upsampling (16 -> 8 channels, 48 x 48 x 32 -> 96 x 96 x 64, one
window) vs 6 ms in channels-last including the conversions (MONAI UNet's 32 -> 2: 34 vs 19 ms for two
windows; the small deep ones within 0.3 ms either way).

Allocator. The activations of one 96 x 96 x 64 window are 19-38 MB tensors: glibc serves blocks of
that size with ``mmap`` and returns them with ``munmap``, so every window page-faults its activations
in again (the zero-filling is about a third of a DynUNet forward here: 133 vs 185-210 ms per window).
:func:`retained_heap` raises glibc's mmap and trim thresholds for the duration of an inference, so that
freed activations stay in the heap and are reused by the next window (the resident set then holds one
window's activations between windows, which it reaches during every forward anyway).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from typing import TypeGuard, TypeVar

import torch
from torch import nn

__all__ = ["ChannelsLast", "OneDNNConv3d", "inference_network", "retained_heap"]

_Conv = TypeVar("_Conv", bound=nn.Module)


def _detached_copy(conv: _Conv, channels_last: bool) -> _Conv:
    """A shallow copy of ``conv`` with detached parameters of its own: the 5-D ones copied in channels-last
    layout when ``channels_last``, else sharing the original's storage."""
    new = copy.copy(conv)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    new._parameters = {  # noqa: SLF001 - a new dict: the original keeps its own parameters
        name: p if p is None
        else nn.Parameter(p.detach().contiguous(memory_format=layout) if p.ndim == 5 else p.detach(),
                          requires_grad=False)
        for name, p in conv._parameters.items()  # noqa: SLF001
    }
    return new


class ChannelsLast(nn.Module):
    """Runs a 3D (transposed) convolution in channels-last memory format; input and output in the
    default (contiguous) format. The weights are copied in channels-last layout when wrapping (for
    inference: later changes to the original's weights are not seen; wrap again)."""

    def __init__(self, conv: nn.Conv3d | nn.ConvTranspose3d) -> None:
        super().__init__()
        self.conv = _detached_copy(conv, channels_last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x.contiguous(memory_format=torch.channels_last_3d))
        return out.contiguous()


class OneDNNConv3d(nn.Module):
    """A ``Conv3d`` (zero padding given as numbers) run by oneDNN whatever its size, in channels-last when
    ``channels_last``; input and output in the default (contiguous) format. Inputs that are not float32
    CPU tensors, and any call under autocast (oneDNN's entry point is not autocast-aware), go through the
    convolution module as usual. In channels-last the weights are copied when wrapping (for inference:
    wrap again after training); otherwise they share the original's storage (detached).

    Raises
    ------
    ValueError
        ``conv`` has its padding given by name (``"same"``, ``"valid"``).
    """

    def __init__(self, conv: nn.Conv3d, channels_last: bool) -> None:
        super().__init__()
        if isinstance(conv.padding, str):
            raise ValueError(f"OneDNNConv3d needs the padding as numbers, got {conv.padding!r}")
        self.channels_last = channels_last
        self.conv = _detached_copy(conv, channels_last)
        self.args = (tuple(conv.padding), tuple(conv.stride), tuple(conv.dilation), conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            if self.channels_last:
                out: torch.Tensor = conv(x.contiguous(memory_format=torch.channels_last_3d))
                return out.contiguous()
            plain: torch.Tensor = conv(x)
            return plain
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = torch.mkldnn_convolution(x, conv.weight, conv.bias, *self.args)
        return out.contiguous() if self.channels_last else out


def _thin(module: nn.Conv3d, thin_channels: int) -> bool:
    return min(module.in_channels, module.out_channels) <= thin_channels


def _onednn_ready(module: nn.Module) -> TypeGuard[nn.Conv3d]:
    return (
        type(module) is nn.Conv3d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)  # (a ContextProp to the type checker, a bool when read)
    )


def inference_network(network: nn.Module, thin_channels: int = 2) -> nn.Module:
    """``network`` in eval mode with its 3D convolutions run by oneDNN (:class:`OneDNNConv3d`), in
    channels-last where they have at most ``thin_channels`` input or output channels; its transposed
    convolutions in channels-last (:class:`ChannelsLast`).

    The original module tree is not modified: containers on the path to a wrapped layer are
    shallow-copied, every other module is shared (and switched to eval mode); the wrapped layers hold
    copies of their weights. A network without 3D convolutions is returned as it is.
    """
    return _wrap(network, int(thin_channels)).eval()


def _wrap(module: nn.Module, thin_channels: int) -> nn.Module:
    if _onednn_ready(module):
        return OneDNNConv3d(module, channels_last=_thin(module, thin_channels))
    if isinstance(module, nn.ConvTranspose3d) and module.weight.ndim == 5:
        return ChannelsLast(module)
    children = {}
    for name, child in module._modules.items():  # noqa: SLF001 - a plain walk over the children
        if child is not None and not isinstance(child, (ChannelsLast, OneDNNConv3d)):
            new = _wrap(child, thin_channels)
            if new is not child:
                children[name] = new
    if not children:
        return module
    fast = copy.copy(module)
    fast._modules = {**module._modules, **children}  # noqa: SLF001 - a new dict: the original keeps its own
    return fast


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_RETAINED = 1 << 30  # blocks up to 1 GiB come from the heap; the heap keeps up to 1 GiB free at its top
# glibc's own defaults adapt between 128 KiB and these (its dynamic threshold stops once set by hand)
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_lock = threading.Lock()
_active = 0  # retained_heap blocks open now


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


@contextlib.contextmanager
def retained_heap() -> Iterator[None]:
    """Within the block, glibc keeps freed blocks of up to 1 GiB in the heap instead of unmapping them
    (see the module docstring); afterwards the thresholds are set to 32 MiB (mmap) and 64 MiB (trim),
    the ceiling glibc's own adaptive thresholds reach, and the free heap is returned to the system.

    Nothing is changed where the C library is not glibc or where the user tuned malloc through the
    environment (``MALLOC_*_`` or ``GLIBC_TUNABLES``). Process-wide while it lasts: other threads
    allocating at the same time are served the same way; nested or concurrent blocks restore the
    thresholds when the last one ends.
    """
    global _active
    libc = None if any(k in os.environ for k in _USER_SETTINGS) else _glibc()
    if libc is None:
        yield
        return
    with _lock:  # nested or concurrent inferences: the first sets, the last restores
        if _active == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _RETAINED)
            libc.mallopt(_M_TRIM_THRESHOLD, _RETAINED)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
                libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
                libc.malloc_trim(0)
