"""Bundles of models imported from nnU-Net v2: ``configs/nnunet.json`` and the factories their
``configs/inference.json`` names (network, preprocessing, postprocessing).

``configs/nnunet.json`` (written by :mod:`medseg.bundle.nnunet_import`) holds what nnU-Net's
``plans.json`` says about the imported configuration, in nnU-Net's own axis order and terms: the transpose,
target spacing, patch, normalisation per channel with the foreground intensity properties, the resampling
orders, the architecture (rebuilt through the allow-list of :func:`medseg.networks.nnunet.nnunet_network`),
the folds and the mirroring axes. Every field is checked when it is read; the weights are one state dict
per fold, ``models/fold_K.pt``, read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from medseg.errors import BundleError, printable
from medseg.labels import Region

__all__ = ["NNUNET_FILE", "NNUNET_FORMAT", "ImportedModel", "ensemble_network", "fold_weights", "load_imported",
           "nnunet_network", "nnunet_postprocessing", "nnunet_preprocessing", "read_imported", "read_nnunet_file"]

T = TypeVar("T")

NNUNET_FILE = Path("configs") / "nnunet.json"
NNUNET_FORMAT = "medseg-nnunet/1"


def fold_weights(fold: int) -> Path:
    """The weights file of one fold in a bundle: ``models/fold_K.pt``."""
    return Path("models") / f"fold_{fold}.pt"


@dataclass(frozen=True)
class ImportedModel:
    """An imported nnU-Net configuration (``configs/nnunet.json``), checked."""

    preprocessing: Any  # medseg.transforms.nnunet.NnUNetPreprocessing (imported with numpy/MONAI on use)
    architecture: dict[str, Any]
    input_channels: int
    num_outputs: int
    folds: tuple[int, ...]
    mirror_axes: tuple[int, ...]


def _ints(value: Any, what: str, low: int = 0) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low
                                              for v in value):
        raise ValueError(f"'{what}' must be a list of integers >= {low}")
    return tuple(value)


def _numbers(value: Any, what: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           and v > 0 for v in value):
        raise ValueError(f"'{what}' must be a list of positive numbers")
    return tuple(float(v) for v in value)


def _resampling(value: Any, what: str) -> Any:
    from medseg.transforms.nnunet import Resampling

    if not isinstance(value, Mapping) or set(value) - {"order", "order_z", "force_separate_z"}:
        raise ValueError(f"'{what}' must hold order, order_z and force_separate_z only")
    order, order_z, force = value.get("order", 3), value.get("order_z", 0), value.get("force_separate_z")
    if order not in range(6) or order_z not in range(6) or force not in (None, True, False):
        raise ValueError(f"'{what}': orders must be 0-5, force_separate_z true, false or null")
    return Resampling(int(order), int(order_z), force)


def read_imported(data: Any) -> ImportedModel:
    """Check ``configs/nnunet.json`` content.

    Raises
    ------
    ValueError
        Naming the first bad field.
    """
    from medseg.transforms.nnunet import NORMALIZATIONS, NnUNetPreprocessing

    if not isinstance(data, Mapping) or data.get("format") != NNUNET_FORMAT:
        raise ValueError(f"'format' must be {NNUNET_FORMAT!r}")
    forward = _ints(data.get("transpose_forward"), "transpose_forward")
    backward = _ints(data.get("transpose_backward"), "transpose_backward")
    dims = len(forward)
    if dims not in (2, 3) or sorted(forward) != list(range(dims)) or sorted(backward) != list(range(dims)) or \
            [forward[b] for b in backward] != list(range(dims)):
        raise ValueError("'transpose_forward' and 'transpose_backward' must be inverse permutations of the axes")
    spacing = _numbers(data.get("spacing"), "spacing")
    patch = _ints(data.get("patch_size"), "patch_size", 1)
    if len(patch) != len(spacing) or len(patch) not in (dims - 1, dims):
        raise ValueError("'patch_size' and 'spacing' must have one value per axis of the configuration")
    channels = data.get("input_channels")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError("'input_channels' must be a positive integer")
    schemes = data.get("normalization_schemes")
    if not isinstance(schemes, list) or len(schemes) != channels or any(s not in NORMALIZATIONS for s in schemes):
        raise ValueError(f"'normalization_schemes' must give one of {', '.join(NORMALIZATIONS)} per input channel")
    masks = data.get("use_mask_for_norm")
    if not isinstance(masks, list) or len(masks) != channels or any(not isinstance(m, bool) for m in masks):
        raise ValueError("'use_mask_for_norm' must give true or false per input channel")
    properties = data.get("intensity_properties")
    if not isinstance(properties, list) or len(properties) != channels:
        raise ValueError("'intensity_properties' must give the foreground properties of each input channel")
    for number, (scheme, item) in enumerate(zip(schemes, properties)):
        needed = ("mean", "std", "percentile_00_5", "percentile_99_5") if scheme == "CTNormalization" else ()
        if not isinstance(item, Mapping) or any(not isinstance(item.get(k), (int, float)) for k in needed):
            raise ValueError(f"'intensity_properties[{number}]' must hold the numbers {', '.join(needed) or '(any)'}")
    outputs = data.get("num_outputs")
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < 1:
        raise ValueError("'num_outputs' must be a positive integer")
    regions = []
    for number, item in enumerate(data.get("regions") or []):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ValueError(f"'regions[{number}]' must hold name, labels and value")
        regions.append(Region(item["name"], _ints(item.get("labels"), f"regions[{number}].labels", 1),
                              _ints([item.get("value")], f"regions[{number}].value", 1)[0]))
    if regions and len(regions) != outputs:
        raise ValueError("'regions' must give one region per network output")
    folds = _ints(data.get("folds"), "folds")
    if not folds or len(set(folds)) != len(folds):
        raise ValueError("'folds' must list distinct fold numbers")
    mirror = _ints(data.get("mirror_axes", []), "mirror_axes")
    if any(a >= len(patch) for a in mirror):
        raise ValueError("'mirror_axes' must be axes of the patch")
    architecture = data.get("architecture")
    if not isinstance(architecture, Mapping):
        raise ValueError("'architecture' must be an object")
    preprocessing = NnUNetPreprocessing(
        forward, backward, spacing, patch, tuple(schemes), tuple(masks),
        tuple({k: float(v) for k, v in p.items() if isinstance(v, (int, float))} for p in properties),
        _resampling(data.get("resampling_data"), "resampling_data"),
        _resampling(data.get("resampling_probabilities"), "resampling_probabilities"), tuple(regions))
    return ImportedModel(preprocessing, dict(architecture), channels, outputs, folds, mirror)


def read_nnunet_file(bundle_root: str | os.PathLike[str], check: Callable[[Any], T]) -> T:
    """The bundle's ``configs/nnunet.json`` checked by ``check`` (:func:`read_imported`, or for several parts
    :func:`medseg.bundle.nnunet_parts.read_parts`).

    Raises
    ------
    BundleError
        Missing or unreadable file, or a bad field (named by ``check``'s ValueError).
    """
    path = Path(bundle_root) / NNUNET_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{printable(path)}: no such file; is this a bundle imported from nnU-Net?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{printable(path)}: cannot read it ({exc})") from None
    try:
        return check(data)
    except ValueError as exc:
        raise BundleError(f"{printable(path)}: {exc}") from None


def load_imported(bundle_root: str | os.PathLike[str]) -> ImportedModel:
    """The bundle's ``configs/nnunet.json``, checked (:func:`read_nnunet_file` with :func:`read_imported`).

    Raises
    ------
    BundleError
        Missing or unreadable file, or a bad field (named).
    """
    return read_nnunet_file(bundle_root, read_imported)


def ensemble_network(model: ImportedModel, weights: Mapping[int, Path], where: str, tta: bool = True) -> Any:
    """``model``'s folds as one network (:class:`medseg.networks.nnunet.NnUNetEnsemble`), mirrored at test time
    along the checkpoint's axes when ``tta``; each fold's weights (weights only) from ``weights[fold]``, in eval mode.

    Raises
    ------
    BundleError
        A network outside the allow-list (naming ``where``), missing weights or weights that do not fit the
        network.
    """
    from medseg.networks import read_state_dict
    from medseg.networks.nnunet import NnUNetEnsemble
    from medseg.networks.nnunet import nnunet_network as build

    networks = []
    for fold in model.folds:
        network = build(model.architecture, model.input_channels, model.num_outputs, where=where)
        path = weights[fold]
        if not path.is_file():
            raise BundleError(f"{printable(path)}: no such weights file (fold {fold} of {where})")
        try:
            network.load_state_dict(read_state_dict(path), strict=True)
        except Exception as exc:  # any failure means unusable weights
            raise BundleError(f"{printable(path)}: cannot load these weights ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]})") from exc
        networks.append(network)
    return NnUNetEnsemble(networks, model.mirror_axes if tta else ()).eval()


def nnunet_network(bundle_root: str | os.PathLike[str], tta: bool = True, device: Any = "cpu") -> Any:
    """The bundle's folds as one network (:func:`ensemble_network`), weights from ``models/fold_K.pt``.

    Raises
    ------
    BundleError
        A bad ``configs/nnunet.json``, a network outside the allow-list, missing weights or weights that
        do not fit the network.
    """
    root = Path(bundle_root)
    model = load_imported(root)
    return ensemble_network(model, {fold: root / fold_weights(fold) for fold in model.folds},
                            str(root / NNUNET_FILE), tta).to(device)


def nnunet_preprocessing(bundle_root: str | os.PathLike[str]) -> Any:
    """Read an image (one file per input channel) and preprocess it as nnU-Net does
    (:class:`medseg.transforms.nnunet.NnUNetPreprocessd`).

    Raises
    ------
    BundleError
        A bad ``configs/nnunet.json``.
    """
    from monai.transforms import Compose

    from medseg.transforms import load_transforms
    from medseg.transforms.nnunet import NnUNetPreprocessd

    model = load_imported(bundle_root)
    return Compose([*load_transforms(["image"], model.input_channels),
                    NnUNetPreprocessd(keys="image", config=model.preprocessing)])


def nnunet_postprocessing(bundle_root: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None,
                          overwrite: bool = False) -> Any:
    """nnU-Net's export of the inferer's probabilities to a label map on the input's grid
    (:class:`medseg.transforms.nnunet.NnUNetExportd`); with ``output_dir``, written there as ``<case>_seg.<ending>``
    (an existing file refused unless ``overwrite``).

    Raises
    ------
    BundleError
        A bad ``configs/nnunet.json``.
    """
    from monai.transforms import Compose

    from medseg.inference.compose import SaveLabelMapd
    from medseg.transforms.nnunet_export import NnUNetExportd

    model = load_imported(bundle_root)
    regions = model.preprocessing.regions
    highest = max(r.value for r in regions) if regions else model.num_outputs - 1
    steps: list[Any] = [NnUNetExportd(keys="pred", config=model.preprocessing,
                                      dtype="uint8" if highest <= 255 else "uint16")]
    if output_dir is not None:
        steps.append(SaveLabelMapd(keys="pred", output_dir=output_dir, overwrite=overwrite))
    return Compose(steps)
