"""Writing a synthetic dataset: the MSD layout (``dataset.json`` listing ``imagesTr/``, ``labelsTr/``, ...),
or the nnU-Net v2 raw layout (one file per channel, ``CASE_0000.nii.gz``, cases found by name), with
several co-registered channels and nested regions.

Typical use::

    write_dataset("data/synthetic-ct", modality="ct", cases=16, seed=0)
    write_dataset("data/synthetic-mr2", modality="mr", cases=8, channels=2, regions=True)  # nnU-Net layout
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

from medseg.data.synthetic.contrasts import extra_contrasts, with_contrast
from medseg.data.synthetic.grid import check_dims, check_modality, random_grid
from medseg.data.synthetic.phantom import CT_LABELS, MR_LABELS, make_phantom, render, sample_patient
from medseg.errors import InputError
from medseg.io.itkfiles import itk_writable
from medseg.labels import Region

__all__ = ["LAYOUTS", "REGIONS", "REGION_LABELS", "write_dataset"]

log = logging.getLogger(__name__)

#: Dataset layouts: the Medical Segmentation Decathlon's (cases listed) and nnU-Net v2's raw one (cases named).
LAYOUTS = ("msd", "nnunet")
#: Label-map values of a region-based phantom dataset (``regions=True``), nested like BraTS's labels.
REGION_LABELS: dict[int, str] = {0: "background", 1: "other organ", 2: "liver", 3: "lesion"}
#: The phantom's label (index) -> its value in a region-based dataset: spleen, kidney and bone are "other organ".
_REGION_VALUE = np.array([0, 2, 1, 1, 1, 3], dtype=np.uint8)
#: The regions of a region-based phantom dataset, in painting order (largest first).
REGIONS: tuple[Region, ...] = (Region("organs", (1, 2, 3), 1), Region("liver", (2, 3), 2), Region("lesion", (3,), 3))
_FILE_ENDING = ".nii.gz"


def _msd_json(modality: str, dims: int, seed: int, training: list[str], test: list[str]) -> dict[str, Any]:
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
        "file_ending": _FILE_ENDING,
        "seed": seed,
        "generator": "medseg.data.synthetic",
    }


def _nnunet_json(modality: str, dims: int, seed: int, channel_names: list[str], regions: bool,
                 training: int, test: int) -> dict[str, Any]:
    labels: dict[str, Any]
    if regions:
        labels = {REGION_LABELS[0]: 0, **{r.name: list(r.labels) for r in REGIONS}}
    else:
        labels = {name: value for value, name in (CT_LABELS if modality == "ct" else MR_LABELS).items()}
    what = ("regions organs (liver, spleen, kidneys, vertebral body, lesions) > liver (with its lesions) > "
            "lesion; label maps 1 other organ, 2 liver, 3 lesion" if regions else
            "liver, spleen, kidneys, vertebral body and focal liver lesions")
    data: dict[str, Any] = {
        "name": f"medseg-synthetic-{modality}",
        "description": (f"Synthetic abdominal phantoms ({dims}D, seed {seed}, channels {', '.join(channel_names)}): "
                        f"{what}, on anisotropic, variously oriented grids"),
        "reference": "medseg synthetic phantom",
        "licence": "CC0",
        "tensorImageSize": f"{dims}D",
        "channel_names": {str(k): name for k, name in enumerate(channel_names)},
        "labels": labels,
    }
    if regions:
        data["regions_class_order"] = [r.value for r in REGIONS]
    data.update({"numTraining": training, "numTest": test, "file_ending": _FILE_ENDING, "seed": seed,
                 "generator": "medseg.data.synthetic"})
    return data


def _check_options(modality: str, size: int, cases: int, channels: int, regions: bool, layout: str | None,
                   out_dir: str | os.PathLike[str]) -> str:
    """The layout to write (``None``: MSD for one channel without regions, else nnU-Net)."""
    if int(size) != size or size < 32:
        raise InputError(None, f"size={size!r} is too small; use at least 32 voxels per in-plane axis")
    if int(cases) != cases or cases < 2:
        raise InputError(out_dir, f"need at least 2 cases (one training, one test), got {cases!r}")
    if int(channels) != channels or channels < 1:
        raise InputError(None, f"need at least 1 input channel, got {channels!r}")
    extra_contrasts(modality, int(channels) - 1)  # refuses more channels than contrasts
    if layout is None:
        return "msd" if channels == 1 and not regions else "nnunet"
    if layout not in LAYOUTS:
        raise InputError(None, f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "msd" and (channels > 1 or regions):
        raise InputError(None, "the MSD layout holds one image file and plain labels per case: several channels "
                         "(--channels) and regions (--regions) need the nnU-Net v2 raw layout (--layout nnunet)")
    return layout


def _write(picture: sitk.Image, path: pathlib.Path) -> None:
    with itk_writable(path) as name:  # SimpleITK aborts on non-UTF-8 paths
        sitk.WriteImage(picture, name, True)


def _region_label_map(label: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(_REGION_VALUE[sitk.GetArrayFromImage(label)])
    out.CopyInformation(label)
    return out


def _case(child: np.random.SeedSequence, size: int, dims: int, modality: str, contrasts: tuple[str, ...],
          regions: bool) -> tuple[list[sitk.Image], sitk.Image]:
    """The channel images and label map of one case (channel 0 drawn exactly as a one-channel dataset)."""
    rng = np.random.default_rng(child)
    grid = random_grid(rng, size, dims, modality)
    anatomy = sample_patient(rng, grid, modality)
    image, label = make_phantom(rng, grid, modality, anatomy=anatomy)
    images = [image]
    for contrast, seed in zip(contrasts, child.spawn(len(contrasts)), strict=True):
        contrast_rng = np.random.default_rng(seed)
        images.append(render(with_contrast(anatomy, contrast, contrast_rng), grid, contrast_rng)[0])
    log.debug("case: size %s, spacing %s", grid.size, grid.spacing)
    return images, _region_label_map(label) if regions else label


def write_dataset(out_dir: str | os.PathLike[str], modality: str = "ct", cases: int = 10, seed: int = 0,
                  size: int = 96, dims: int = 3, *, channels: int = 1, regions: bool = False,
                  layout: str | None = None) -> pathlib.Path:
    """Write a synthetic dataset and return the path of its ``dataset.json``.

    Layout ``"msd"`` (the default for one channel without regions): ``dataset.json`` listing
    ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/`` files ``<ct|mr>_<NNN>.nii.gz``. Layout
    ``"nnunet"`` (nnU-Net v2 raw; the default otherwise): ``imagesTr/<ct|mr>_<NNN>_<CCCC>.nii.gz`` (one
    file per channel), ``labelsTr/<ct|mr>_<NNN>.nii.gz``, likewise ``imagesTs/``, ``labelsTs/``, and a
    ``dataset.json`` with ``channel_names``, ``labels``, ``numTraining``, ``file_ending`` and no list.
    Channels after the first are further MR contrasts of the same patient on the same grid
    (:func:`.contrasts.extra_contrasts`). ``regions``: label maps 1 other organ, 2 liver, 3 lesion
    (:data:`REGION_LABELS`) and the nested :data:`REGIONS` organs > liver > lesion.

    The last ``max(1, round(0.25 * cases))`` cases are the test cases. Case i is generated from
    ``SeedSequence(seed).spawn(cases)[i]`` (its further channels from that sequence's children), so a
    seed always gives the same files, and channel 0 the same as a one-channel dataset. Everything is
    written into a temporary folder beside ``out_dir`` that is renamed into place at the end; on
    failure it is removed.

    Raises
    ------
    InputError
        Unknown ``modality`` or ``layout``, ``dims`` not 2 or 3, ``size`` < 32, ``cases`` < 2,
        ``channels`` < 1 or more than there are contrasts, the MSD layout with several channels or
        regions, or ``out_dir`` exists and is not an empty folder.
    """
    modality = check_modality(modality)
    dims = check_dims(dims)
    layout = _check_options(modality, size, cases, channels, regions, layout, out_dir)
    size, cases, seed, channels = int(size), int(cases), int(seed), int(channels)
    contrasts = extra_contrasts(modality, channels - 1)
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)

    n_test = max(1, round(cases * 0.25))
    names = [f"{modality}_{i:03d}" for i in range(cases)]
    training, test = names[: cases - n_test], names[cases - n_test:]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / folder).mkdir()
        for i, child in enumerate(np.random.SeedSequence(seed).spawn(cases)):
            images, label = _case(child, size, dims, modality, contrasts, regions)
            split = "Tr" if i < len(training) else "Ts"
            for k, image in enumerate(images):
                suffix = f"_{k:04d}" if layout == "nnunet" else ""
                _write(image, tmp / f"images{split}" / f"{names[i]}{suffix}{_FILE_ENDING}")
            _write(label, tmp / f"labels{split}" / f"{names[i]}{_FILE_ENDING}")
        if layout == "msd":
            description = _msd_json(modality, dims, seed, [n + _FILE_ENDING for n in training],
                                    [n + _FILE_ENDING for n in test])
        else:
            first = "CT" if modality == "ct" else ("T1" if channels > 1 else "MRI")
            description = _nnunet_json(modality, dims, seed, [first, *contrasts], regions, len(training), len(test))
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
