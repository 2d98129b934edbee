"""nnU-Net v2 networks: rebuilt from a ``plans.json`` architecture through an allow-list, their checkpoints
read without running pickled code, and several folds (with nnU-Net's test-time mirroring) as one network.

The architectures are nnU-Net's own classes from the ``dynamic-network-architectures`` package (the
``medseg[nnunet]`` extra): ``PlainConvUNet`` and ``ResidualEncoderUNet``. Mapping them onto MONAI's
``DynUNet`` would cover only the plain U-Net with two convolutions per stage (DynUNet has one residual
block per stage, nnU-Net's residual encoder several, with another block layout), so the checkpoints load
strictly into the classes that trained them instead. A plans file names its classes by import path
(``network_class_name`` and the ``_kw_requires_import`` arguments): only the paths in
:data:`NETWORK_CLASSES` and :data:`LAYER_CLASSES` are accepted; nothing is imported by a name a file gives.

Checkpoints (``checkpoint_final.pth``) are read with ``torch.load(weights_only=True)`` and, besides what
torch allows there, only the non-tensor types nnU-Net stores (:data:`CHECKPOINT_GLOBALS`: ``torch.device``,
numpy scalars and their dtypes); a checkpoint naming any other Python object is refused.
"""

from __future__ import annotations

import copy
import itertools
import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import BundleError, one_line, printable

__all__ = ["CHECKPOINT_GLOBALS", "LAYER_CLASSES", "NETWORK_CLASSES", "NnUNetCheckpoint", "NnUNetEnsemble",
           "mirror_combinations", "nnunet_network", "read_nnunet_checkpoint"]

_DNA = "dynamic_network_architectures.architectures."
#: The network classes a plans file may name (``architecture.network_class_name``; nnU-Net's reading of plans
#: older than 2.4 names the residual encoder's class in ``residual_unet``, which holds the same class).
NETWORK_CLASSES = (_DNA + "unet.PlainConvUNet", _DNA + "unet.ResidualEncoderUNet",
                   _DNA + "residual_unet.ResidualEncoderUNet")
#: The layer classes a plans file may name for ``conv_op``, ``norm_op``, ``dropout_op`` and ``nonlin``
#: (each by its full module path and by the ``torch.nn.X`` alias nnU-Net's planners also write).
LAYER_CLASSES: dict[str, tuple[str, ...]] = {
    "conv_op": ("Conv1d", "Conv2d", "Conv3d"),
    "norm_op": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"),
    "dropout_op": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d"),
    "nonlin": ("LeakyReLU", "ReLU", "PReLU", "ELU", "GELU"),
}
_LAYER_MODULES = {"conv_op": "conv", "norm_op": ("instancenorm", "batchnorm"), "dropout_op": "dropout",
                  "nonlin": "activation"}
#: Keyword arguments of the two classes (besides input_channels and num_classes) a plans file may set.
_ARCH_KWARGS = frozenset({
    "n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage",
    "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs",
    "nonlin", "nonlin_kwargs", "block", "bottleneck_channels", "stem_channels", "nonlin_first", "deep_supervision",
})
#: Non-tensor types of nnU-Net checkpoints (``init_args.device``; numpy scalars in ``logging`` and ``_best_ema``).
CHECKPOINT_GLOBALS: tuple[Any, ...] = (torch.device, np.dtype,
                                       np._core.multiarray.scalar,  # type: ignore[attr-defined]  # noqa: SLF001
                                       np.dtypes.Float16DType, np.dtypes.Float32DType, np.dtypes.Float64DType,
                                       np.dtypes.Int32DType, np.dtypes.Int64DType, np.dtypes.BoolDType)


def _layer(field: str, path: Any, where: str) -> type[torch.nn.Module] | None:
    """The torch layer class a plans file names for ``field`` (None stays None).

    Raises
    ------
    BundleError
        A name outside :data:`LAYER_CLASSES`.
    """
    if path is None and field == "dropout_op":
        return None
    modules = _LAYER_MODULES[field]
    accepted = {f"torch.nn.{name}" for name in LAYER_CLASSES[field]}
    for module in (modules if isinstance(modules, tuple) else (modules,)):
        accepted |= {f"torch.nn.modules.{module}.{name}" for name in LAYER_CLASSES[field]}
    if not isinstance(path, str) or path not in accepted:
        raise BundleError(f"{where}: architecture '{field}' {path!r} is not one of the layers medseg builds "
                          f"({', '.join(LAYER_CLASSES[field])} of torch.nn)")
    layer: type[torch.nn.Module] = getattr(torch.nn, path.rsplit(".", 1)[1])
    return layer


def nnunet_network(architecture: Mapping[str, Any], input_channels: int, num_outputs: int,
                   where: str = "plans.json") -> torch.nn.Module:
    """The network of a plans configuration's ``architecture`` (``network_class_name``, ``arch_kwargs``,
    ``_kw_requires_import``) with ``input_channels`` inputs and ``num_outputs`` outputs, without deep
    supervision (the inference network; training-only heads stay in the checkpoint's state dict, unused).

    Raises
    ------
    BundleError
        ``where`` names the file: a class or layer outside the allow-lists, an unknown argument, arguments the
        class refuses, or ``dynamic-network-architectures`` not installed.
    """
    name = architecture.get("network_class_name")
    if name not in NETWORK_CLASSES:
        raise BundleError(f"{where}: network class {name!r} is not one medseg builds "
                          f"({', '.join(sorted({n.rsplit('.', 1)[1] for n in NETWORK_CLASSES}))})")
    kwargs = architecture.get("arch_kwargs")
    if not isinstance(kwargs, Mapping):
        raise BundleError(f"{where}: architecture 'arch_kwargs' must be an object")
    unknown = sorted(set(kwargs) - _ARCH_KWARGS)
    if unknown:
        raise BundleError(f"{where}: unknown architecture argument(s) {', '.join(map(repr, unknown))}")
    arguments = dict(kwargs)
    for field in LAYER_CLASSES:
        if field in arguments:
            arguments[field] = _layer(field, arguments[field], where)
    if "block" in arguments:  # ResidualEncoderUNet: BasicBlockD or BottleneckD, by path
        arguments["block"] = _residual_block(arguments["block"], where)
    arguments["deep_supervision"] = False
    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError:
        raise BundleError(f"{where}: nnU-Net networks need the dynamic-network-architectures package: "
                          "pip install 'medseg[nnunet]'") from None
    network_class = getattr(unet, str(name).rsplit(".", 1)[1])
    try:
        network: torch.nn.Module = network_class(input_channels=input_channels, num_classes=num_outputs, **arguments)
    except Exception as exc:  # noqa: BLE001 - the class's own checks of its arguments, whatever they raise
        raise BundleError(f"{where}: cannot build {network_class.__name__} from its arguments "
                          f"({type(exc).__name__}: {one_line(exc, 200)})") from None
    return network


def _residual_block(path: Any, where: str) -> Any:
    from dynamic_network_architectures.building_blocks import residual

    names = {"BasicBlockD", "BottleneckD"}
    if isinstance(path, str) and path.rsplit(".", 1)[-1] in names and \
            path.rsplit(".", 1)[0] in ("", "dynamic_network_architectures.building_blocks.residual"):
        return getattr(residual, path.rsplit(".", 1)[-1])
    raise BundleError(f"{where}: architecture 'block' {path!r} is not BasicBlockD or BottleneckD")


@dataclass(frozen=True)
class NnUNetCheckpoint:
    """What medseg takes from an nnU-Net checkpoint: the network's state dict and the mirroring axes its
    trainer allows at inference (None: it records none), with the trainer's name and its last epoch."""

    weights: dict[str, torch.Tensor]
    mirror_axes: tuple[int, ...] | None
    trainer: str
    epoch: int | None


def read_nnunet_checkpoint(path: str | os.PathLike[str]) -> NnUNetCheckpoint:
    """Read an nnU-Net v2 checkpoint (``fold_K/checkpoint_final.pth``) without running pickled code.

    Raises
    ------
    BundleError
        Missing or unreadable file, a checkpoint naming Python objects outside :data:`CHECKPOINT_GLOBALS`
        (a pickle payload), or one without ``network_weights`` as a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{printable(path)}: no such checkpoint")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
            warnings.filterwarnings("ignore", message=".*TorchScript archive", category=UserWarning)
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global, a class or a module
        found = re.search(r"GLOBAL ([\w.]+)|got (<class '[\w.]+'>)", str(exc))
        detail = f" ({found.group(1) or found.group(2)})" if found else ""
        raise BundleError(f"{printable(path)}: refused: the checkpoint holds Python objects other than tensors, numbers, "
                          f"strings and the types nnU-Net stores{detail}; loading it could run code") from None
    except Exception as exc:  # noqa: BLE001 - anything else: not a checkpoint
        raise BundleError(f"{printable(path)}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                          f"{one_line(exc, 200)})") from None
    weights = content.get("network_weights") if isinstance(content, Mapping) else None
    if not isinstance(weights, Mapping) or not weights or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise BundleError(f"{printable(path)}: not an nnU-Net checkpoint (no 'network_weights' of tensors)")
    axes = content.get("inference_allowed_mirroring_axes")
    mirror: tuple[int, ...] | None = None
    if axes is not None:
        if not isinstance(axes, (list, tuple)) or not all(isinstance(a, int) and 0 <= a < 3 for a in axes):
            raise BundleError(f"{printable(path)}: 'inference_allowed_mirroring_axes' must be a list of axes 0-2")
        mirror = tuple(int(a) for a in axes)
    trainer = content.get("trainer_name")
    epoch = content.get("current_epoch")
    return NnUNetCheckpoint(dict(weights), mirror, trainer if isinstance(trainer, str) else "",
                            epoch if isinstance(epoch, int) else None)


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """nnU-Net's test-time mirroring: every non-empty combination of the spatial ``axes`` (1, 2 or 3 of them:
    1, 3 or 7 mirrored passes besides the plain one), as tensor dimensions of a ``(B, C, *spatial)`` batch."""
    dims = [a + 2 for a in axes]
    return [c for k in range(1, len(dims) + 1) for c in itertools.combinations(dims, k)]


def _last_layer(network: torch.nn.Module) -> Any:
    """An nnU-Net network's last layer: the 1 x 1 (x 1) convolution of its full-resolution decoder stage."""
    decoder: Any = network.decoder
    return decoder.seg_layers[-1]


class _Body(torch.nn.Module):
    """The features before an nnU-Net network's last 1 x 1 (x 1) convolution."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        body = copy.copy(network)
        original: Any = network.decoder
        decoder = copy.copy(original)
        decoder._modules = dict(original._modules)  # noqa: SLF001 - a new dict: the original keeps its own
        layers = list(original.seg_layers)
        decoder._modules["seg_layers"] = torch.nn.ModuleList([*layers[:-1], torch.nn.Identity()])  # noqa: SLF001
        body._modules = {**network._modules, "decoder": decoder}  # noqa: SLF001
        self.network = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.network(x)
        return out


class NnUNetEnsemble(torch.nn.Module):
    """The mean of the logits of several nnU-Net networks (folds), each averaged over nnU-Net's test-time
    mirroring (:func:`mirror_combinations` of ``mirror_axes``; none: no mirroring) -- what
    ``nnUNetv2_predict`` computes for every window before blending. Linear in the logits, so it equals
    nnU-Net's blending of each fold's and each mirror's windows separately.

    It ends in a pointwise head (:meth:`pointwise_split`): the features of all folds side by side, and one
    1 x 1 (x 1) convolution holding each fold's last layer divided by the number of folds. 2D networks (nnU-Net's
    2d configuration) also take 3D windows of one slice, so that a 3D image is predicted slice by slice.
    """

    def __init__(self, networks: Sequence[torch.nn.Module], mirror_axes: Sequence[int] = (),
                 planar: bool | None = None) -> None:
        super().__init__()
        if not networks:
            raise ValueError("an ensemble needs at least one network")
        self.folds = torch.nn.ModuleList(networks)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.planar = isinstance(_last_layer(networks[0]), torch.nn.Conv2d) if planar is None else planar

    def _mirrored(self, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One network's output averaged over the mirrored passes; a 2D network over ``(B, C, 1, H, W)`` windows
        (nnU-Net's 2d configuration on a 3D image, one slice per window) sees ``(B, C, H, W)``."""
        sliced = self.planar and x.ndim == 5
        if sliced:
            if x.shape[2] != 1:
                raise ValueError(f"a 2D nnU-Net network takes windows of one slice, got {tuple(x.shape[2:])}")
            x = x[:, :, 0]
        out: torch.Tensor = network(x)
        combinations = mirror_combinations(self.mirror_axes)
        for dims in combinations:
            out = out + torch.flip(network(torch.flip(x, dims)), dims)
        out = out / (len(combinations) + 1)
        return out.unsqueeze(2) if sliced else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self._mirrored(self.folds[0], x)
        for network in list(self.folds)[1:]:
            total = total + self._mirrored(network, x)
        return total / len(self.folds)

    def pointwise_split(self) -> tuple[torch.nn.Module, torch.nn.Module, int]:
        """``(body, head, F)`` with ``self(x) == head(body(x))`` (see :func:`medseg.networks.split_pointwise_head`)."""
        heads: list[Any] = [_last_layer(network) for network in self.folds]
        # the blocks a head sees have the windows' dimensions: 3D for a 2D network run slice by slice
        conv_class = torch.nn.Conv3d if self.planar else type(heads[0])
        features = sum(int(h.in_channels) for h in heads)
        head: Any = conv_class(features, int(heads[0].out_channels), kernel_size=1)
        with torch.no_grad():
            weight = torch.cat([h.weight for h in heads], dim=1) / len(heads)
            head.weight.copy_(weight.unsqueeze(2) if self.planar else weight)
            head.bias.copy_(torch.stack([h.bias for h in heads]).mean(dim=0))
        head = head.to(heads[0].weight.device).eval()
        body = _EnsembleBody([_Body(network) for network in self.folds], self.mirror_axes, self.planar)
        return body, head, features


class _EnsembleBody(NnUNetEnsemble):
    """The folds' mirrored features concatenated along the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._mirrored(network, x) for network in self.folds], dim=1)
