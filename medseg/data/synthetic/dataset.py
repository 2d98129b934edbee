"""Writing a synthetic dataset in the MSD layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``, ...

Typical use::

    write_dataset("data/synthetic-ct", modality="ct", cases=16, seed=0)
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.data.synthetic.grid import check_dims, check_modality, random_grid
from medseg.data.synthetic.phantom import CT_LABELS, MR_LABELS, make_phantom
from medseg.errors import InputError
from medseg.io.itkfiles import itk_writable

__all__ = ["write_dataset"]

log = logging.getLogger(__name__)


def _dataset_json(modality: str, dims: int, seed: int, training: list[str], test: list[str]) -> dict[str, Any]:
    channel = "CT" if modality == "ct" else "MRI"
    labels = CT_LABELS if modality == "ct" else MR_LABELS
    return {
        "name": f"medseg-synthetic-{modality}",
        "description": (f"Synthetic abdominal {channel} phantoms ({dims}D, seed {seed}): liver, spleen, kidneys, "
                        "vertebral body and focal liver lesions on anisotropic, variously oriented grids"),
        "reference": "medseg synthetic phantom",
        "licence": "CC0",
        "tensorImageSize": f"{dims}D",
        "modality": {"0": channel},
        "channel_names": {"0": channel},
        "labels": {str(k): v for k, v in labels.items()},
        "numTraining": len(training),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in training],
        "test": [f"./imagesTs/{n}" for n in test],
        "file_ending": ".nii.gz",
        "seed": seed,
        "generator": "medseg.data.synthetic",
    }


def write_dataset(out_dir: str | os.PathLike[str], modality: str = "ct", cases: int = 10, seed: int = 0,
                  size: int = 96, dims: int = 3) -> pathlib.Path:
    """Write an MSD-style synthetic dataset and return the path of its ``dataset.json``.

    Layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/`` with
    files ``<ct|mr>_<NNN>.nii.gz``; the last ``max(1, round(0.25 * cases))`` cases are the
    test cases. Case i is generated from ``SeedSequence(seed).spawn(cases)[i]``, so a seed
    always gives the same files. Everything is written into a temporary folder beside
    ``out_dir`` that is renamed into place at the end; on failure it is removed.

    Raises
    ------
    InputError
        Unknown ``modality``, ``dims`` not 2 or 3, ``size`` < 32, ``cases`` < 2, or
        ``out_dir`` exists and is not an empty folder.
    """
    modality = check_modality(modality)
    dims = check_dims(dims)
    if int(size) != size or size < 32:
        raise InputError(None, f"size={size!r} is too small; use at least 32 voxels per in-plane axis")
    if int(cases) != cases or cases < 2:
        raise InputError(out_dir, f"need at least 2 cases (one training, one test), got {cases!r}")
    size, cases, seed = int(size), int(cases), int(seed)
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)

    n_test = max(1, round(cases * 0.25))
    names = [f"{modality}_{i:03d}.nii.gz" for i in range(cases)]
    training, test = names[: cases - n_test], names[cases - n_test:]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / folder).mkdir()
        for i, child in enumerate(np.random.SeedSequence(seed).spawn(cases)):
            rng = np.random.default_rng(child)
            grid = random_grid(rng, size, dims, modality)
            image, label = make_phantom(rng, grid, modality)
            split = "Tr" if i < len(training) else "Ts"
            for picture, folder in ((image, f"images{split}"), (label, f"labels{split}")):
                with itk_writable(tmp / folder / names[i]) as name:  # SimpleITK aborts on non-UTF-8 paths
                    sitk.WriteImage(picture, name, True)
            log.debug("case %s: size %s, spacing %s", names[i], grid.size, grid.spacing)
        description = _dataset_json(modality, dims, seed, training, test)
        (tmp / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise InputError(out, f"could not move the dataset into place ({exc.strerror or exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d synthetic %s cases (%d training, %d test) to %s", cases, modality.upper(),
             len(training), len(test), out)
    return out / "dataset.json"
