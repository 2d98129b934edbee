"""``medseg bundle export``: the trained network as TorchScript or ONNX (verification: :mod:`medseg.bundle.verify`).

:func:`export_bundle` writes the trained network as TorchScript (MONAI ``ckpt_export``:
``torch.jit.script``, with ``metadata.json`` and ``inference.json`` embedded as extra files) or
ONNX (MONAI ``onnx_export`` through torch's dynamo exporter, dynamic batch and spatial axes, the
same two files stored as ONNX ``metadata_props``). Every export is checked against the PyTorch
network on a random patch before it is moved into place (atomically).

It refuses, like ``medseg bundle run``, a bundle whose configs could run code (safe mode,
:mod:`medseg.bundle.safety`) before MONAI parses them, unless ``trust=True``; checkpoints are
always loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medseg.bundle.ensembles import ensemble_folds
from medseg.bundle.monai_calls import INFERENCE_FILE, NET_ID, describe, quiet_monai
from medseg.bundle.runner import weights_only_loads
from medseg.errors import BundleError
from medseg.io.atomic import atomic_path
from medseg.layout import META_FILE, PLAN_FILE, WEIGHTS_FILE
from medseg.networks import build_network, load_weights
from medseg.plan import Plan, load_plan

__all__ = [
    "EXPORT_ATOL",
    "EXPORT_FORMATS",
    "EXPORT_RTOL",
    "ONNX_PACKAGES",
    "export_bundle",
]

log = logging.getLogger(__name__)

#: Export format -> default file name in ``models/``.
EXPORT_FORMATS: dict[str, str] = {"torchscript": "model.ts", "onnx": "model.onnx"}

#: Import name -> pinned requirement of the packages ONNX export needs.
ONNX_PACKAGES: dict[str, str] = {"onnx": "onnx==1.23.2", "onnxscript": "onnxscript==0.7.2",
                                 "onnxruntime": "onnxruntime==1.31.1"}

#: An export must reproduce the PyTorch network within these tolerances (float32 on CPU).
EXPORT_ATOL = 1e-4
EXPORT_RTOL = 1e-4


# --------------------------------------------------------------------------------------------- export


def _require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise BundleError(f"ONNX export needs the packages {', '.join(missing)}: "
                          f"pip install {' '.join(ONNX_PACKAGES[name] for name in missing)}")


def _key_in_ckpt(weights: Path) -> str:
    """``"network"`` for a training checkpoint (``{"network": state, ...}``), else ``""`` (a plain state
    dict), as :func:`medseg.bundle.components.load_weights` reads it."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "network" in state and not any(isinstance(v, torch.Tensor) for v in state.values()):
        return "network"
    return ""


def _export_onnx(filepath: Path, plan: Plan, common: dict[str, Any]) -> str:
    """MONAI ``onnx_export`` with torch's dynamo exporter (``use_trace=True`` hands the module to
    ``torch.onnx.export``; ``dynamo=True`` needs onnxscript); the TorchScript-based exporter
    (``dynamo=False``, deprecated by torch) is the fallback. Returns the exporter used."""
    from monai.bundle import onnx_export

    axes = {0: "batch", **{axis + 2: "xyz"[axis] for axis in range(plan.dims)}}
    errors = []
    for dynamo in (True, False):
        converter_kwargs = {"dynamo": dynamo, "verbose": False, "input_names": ["image"], "output_names": ["pred"],
                            "dynamic_axes": {"image": dict(axes), "pred": dict(axes)}}
        try:
            # batch 2 so that the exporter cannot specialise the batch axis to 1
            onnx_export(filepath=str(filepath), use_trace=True, input_shape=[2, 1, *plan.patch_size],
                        converter_kwargs=converter_kwargs, **common)
            return "dynamo" if dynamo else "torchscript-based"
        except Exception as exc:  # noqa: BLE001 - try the other exporter, report both
            errors.append(f"{'dynamo' if dynamo else 'torchscript-based'} exporter: {describe(exc)}")
            log.warning("ONNX export failed with the %s", errors[-1])
    raise BundleError("; ".join(errors))


def _embed_onnx_metadata(filepath: Path, extra: dict[str, str]) -> None:
    """Store ``metadata.json`` and ``inference.json`` as ONNX ``metadata_props`` (MONAI's ONNX saver
    drops them; TorchScript keeps them as extra files)."""
    import onnx

    model = onnx.load(str(filepath))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in extra]
    del model.metadata_props[:]
    for key, value in [*kept, *extra.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(filepath))


def _run_export(fmt: str, filepath: Path, x: torch.Tensor) -> torch.Tensor:
    if fmt == "torchscript":
        module = torch.jit.load(str(filepath), map_location="cpu").eval()
        with torch.no_grad():
            out: torch.Tensor = module(x)
            return out
    import onnxruntime

    session = onnxruntime.InferenceSession(str(filepath), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _check_export(fmt: str, filepath: Path, network: torch.nn.Module, plan: Plan) -> float:
    """Max abs difference between the export and the network on a random patch; refuses a mismatch."""
    x = torch.rand(1, 1, *plan.patch_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = network.cpu().eval()(x)
    got = _run_export(fmt, filepath, x)
    if got.shape != want.shape:
        raise BundleError(f"the exported {fmt} model returns shape {tuple(got.shape)}, the network {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if not torch.allclose(got, want, atol=EXPORT_ATOL, rtol=EXPORT_RTOL):
        raise BundleError(f"the exported {fmt} model disagrees with the network (max abs difference {diff:.3g})")
    return diff


def export_bundle(bundle_dir: str | os.PathLike[str], fmt: str, output: str | os.PathLike[str] | None = None,
                  *, trust: bool = False) -> Path:
    """Export the trained network of a bundle as TorchScript or ONNX.

    ``"torchscript"``: MONAI ``ckpt_export`` (``torch.jit.script``) with ``metadata.json`` and
    ``inference.json`` embedded as extra files; default ``models/model.ts``. ``"onnx"``: MONAI
    ``onnx_export`` (torch's dynamo exporter), dynamic batch and spatial axes (input ``image``,
    output ``pred``; spatial sizes must still be multiples of the network's total stride), the same
    two files as ONNX ``metadata_props``; default ``models/model.onnx``. The export is written to a
    temporary name beside ``output``, checked against the PyTorch network on a random patch
    (:data:`EXPORT_ATOL`, :data:`EXPORT_RTOL`) and only then moved into place.

    Parameters
    ----------
    bundle_dir
        The bundle folder, with trained weights in ``models/model.pt``.
    fmt
        ``"torchscript"`` or ``"onnx"``.
    output
        Target file; a name without suffix gets ``.ts`` / ``.onnx``.
    trust
        Skip safe mode (configs that could run code are otherwise refused before MONAI parses them).

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    BundleError
        Unknown format, no bundle, no weights (``... no models/model.pt: train the bundle first``), a fold
        ensemble of ``medseg select`` (export one of its folds),
        weights that do not fit the network, missing ONNX packages (with what to install), a bundle
        refused by safe mode, or a failed or inexact export.
    """
    bundle = Path(bundle_dir)
    key = str(fmt).strip().lower()
    if key not in EXPORT_FORMATS:
        raise BundleError(f"{bundle}: unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle folder")
    weights = bundle / WEIGHTS_FILE
    folds = None if weights.is_file() else ensemble_folds(bundle)
    if folds:
        raise BundleError(f"{bundle}: an ensemble of folds {', '.join(map(str, folds))} (medseg select), not one "
                          f"network: export a fold's bundle, e.g. {bundle / f'fold_{folds[0]}'}")
    if not weights.is_file():
        raise BundleError(f"{bundle}: no {WEIGHTS_FILE.as_posix()}: train the bundle first")
    for needed in (PLAN_FILE, INFERENCE_FILE, META_FILE):
        if not (bundle / needed).is_file():
            raise BundleError(f"{bundle}: no {needed.as_posix()}; is this a medseg bundle (medseg bundle init)?")
    if key == "onnx":
        _require_onnx()
    if not trust:
        from medseg.bundle.safety import check_bundle

        check_bundle(bundle)  # before MONAI parses anything
    plan = load_plan(bundle)
    network = load_weights(build_network(plan), weights)  # a clear BundleError for weights that do not fit
    target = Path(output) if output is not None else bundle / "models" / EXPORT_FORMATS[key]
    if not target.suffix:
        target = target.with_suffix(Path(EXPORT_FORMATS[key]).suffix)

    common: dict[str, Any] = {"net_id": NET_ID, "ckpt_file": str(weights), "meta_file": str(bundle / META_FILE),
              "config_file": str(bundle / INFERENCE_FILE), "key_in_ckpt": _key_in_ckpt(weights),
              "bundle_root": str(bundle.absolute())}
    with atomic_path(target) as tmp:
        try:
            with weights_only_loads(), quiet_monai():
                if key == "torchscript":
                    from monai.bundle import ckpt_export

                    ckpt_export(filepath=str(tmp), **common)
                    how = "torch.jit.script"
                else:
                    how = f"{_export_onnx(tmp, plan, common)} exporter"
                    _embed_onnx_metadata(tmp, {
                        "metadata.json": json.dumps(json.loads((bundle / META_FILE).read_text(encoding="utf-8"))),
                        "inference.json": json.dumps(json.loads((bundle / INFERENCE_FILE).read_text(encoding="utf-8"))),
                    })
            if not tmp.is_file():
                raise BundleError(f"MONAI wrote no {tmp.name}")
            diff = _check_export(key, tmp, network, plan)
        except BundleError as exc:
            raise BundleError(f"{bundle}: {key} export failed: {exc}") from exc
        except Exception as exc:  # any failure of the exporters is a failed export
            raise BundleError(f"{bundle}: {key} export failed: {describe(exc)}") from exc
    log.info("exported %s as %s (%s) to %s; max abs difference to the PyTorch network %.3g",
             bundle, key, how, target, diff)
    return target
