#!/usr/bin/env python
"""A real 1 mm MR task from the MNI152 template that the nilearn wheel ships: grey and white matter.

nilearn's wheel carries the ICBM 2009a symmetric T1 template (197 x 233 x 189 voxels, 1 mm) with grey- and
white-matter probability maps (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted``).
Each case is the template moved by its own random rigid-plus-scaling transform (rotation up to
``--rotate`` degrees, scaling 0.92-1.08 per axis, shift up to 6 mm) and a smooth elastic displacement (up to
about 3 mm), with a smooth multiplicative bias field (+-20 %) and Gaussian noise (3 % of the brain's mean);
the label map is the argmax of background, grey and white matter after the same warp (linear
interpolation of the maps). The images are on the template's field of view, at 1 mm (or ``--spacing``).
The MSD ``dataset.json`` (with ``training`` and labelled ``test`` cases in imagesTs/labelsTs) is what
``medseg train`` and ``scripts/bench_accuracy.py`` read.

    .venv/bin/python scripts/mni_dataset.py --nilearn PATH --out DIR [--cases 20] [--test 5] [--seed 0]
        [--rotate 10] [--spacing 1]

``PATH`` is the nilearn wheel (``pip download nilearn --no-deps``), an unpacked wheel or an installed
``nilearn`` package folder; nothing is downloaded here.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

MAPS = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
DATA = "nilearn/datasets/data/"
LABELS = {"0": "background", "1": "grey_matter", "2": "white_matter"}


class DatasetError(Exception):
    """The template could not be found or read."""


def read_template(source: Path) -> dict[str, nib.Nifti1Image]:
    """The T1 template and the two tissue maps from a nilearn wheel, unpacked wheel or package folder.

    Raises
    ------
    DatasetError
        ``source`` missing, or without the three MNI152 files, or a file that is not NIfTI.
    """
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    images: dict[str, nib.Nifti1Image] = {}
    for key, name in MAPS.items():
        try:
            if source.is_file():
                with zipfile.ZipFile(source) as wheel:
                    data = wheel.read(DATA + name)
            else:
                candidates = [source / DATA / name, source / "datasets" / "data" / name, source / name]
                found = next((p for p in candidates if p.is_file()), None)
                if found is None:
                    raise DatasetError(f"{source}: no {name} (give the nilearn wheel or its unpacked folder)")
                data = found.read_bytes()
            images[key] = nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"{source}: not a nilearn wheel with {name} ({exc})") from None
        except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as exc:
            raise DatasetError(f"{source}: {name} could not be read ({exc})") from None
    return images


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], grid: int, amplitude: float) -> np.ndarray:
    """A smooth random field of about ``amplitude`` (cubic upsampling of a coarse random grid)."""
    coarse = rng.uniform(-1.0, 1.0, size=(grid,) * len(shape))
    zoom = [s / grid for s in shape]
    field = ndimage.zoom(coarse, zoom, order=3)[tuple(slice(0, s) for s in shape)]
    return field * amplitude


def output_shape(template_shape: tuple[int, ...], spacing: float) -> tuple[int, ...]:
    """The case grid for an isotropic ``spacing`` in mm over the template's 1 mm field of view."""
    return tuple(int(np.floor((n - 1) / spacing)) + 1 for n in template_shape)


def warped_case(template: dict[str, np.ndarray], rng: np.random.Generator, rotate: float,
                spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One case on a grid of ``spacing`` mm: the template under a random transform, bias and noise; its
    label map (uint8)."""
    source = template["t1"].shape
    shape = output_shape(source, spacing)
    angles = np.deg2rad(rng.uniform(-rotate, rotate, size=3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
        rotation = rotation @ r
    matrix = rotation @ np.diag(rng.uniform(0.92, 1.08, size=3))
    centre = (np.array(source) - 1) / 2  # template voxels (1 mm)
    shift = rng.uniform(-6.0, 6.0, size=3)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) * spacing for s in shape], indexing="ij"))
    coords = np.einsum("ij,j...->i...", matrix.astype(np.float32), grid - centre[:, None, None, None].astype(np.float32))
    coords += (centre + shift)[:, None, None, None].astype(np.float32)
    for axis in range(3):
        coords[axis] += _smooth_field(rng, shape, 6, 3.0).astype(np.float32)  # mm = template voxels
    del grid
    moved = {key: ndimage.map_coordinates(volume.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
             for key, volume in template.items()}
    gm, wm = moved["gm"] / 255.0, moved["wm"] / 255.0
    label = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.uint8)
    bias = np.exp(_smooth_field(rng, shape, 4, 0.2)).astype(np.float32)
    image = moved["t1"] * bias
    brain = image[label > 0]
    image = image + rng.normal(0.0, 0.03 * float(brain.mean()), size=shape).astype(np.float32)
    return np.clip(image, 0, None).astype(np.float32), label


def write_dataset(source: Path, out: Path, cases: int, test: int, seed: int, rotate: float,
                  spacing: float = 1.0) -> Path:
    """Write the dataset (see the module docstring) into ``out``, which must not exist; its dataset.json.

    Raises
    ------
    DatasetError
        Bad counts, ``out`` exists, the template cannot be read.
    """
    if not 0 < test < cases:
        raise DatasetError(f"--test {test} must be at least 1 and fewer than --cases {cases}")
    if not 0.3 <= spacing <= 4.0:
        raise DatasetError(f"--spacing {spacing}: choose 0.3-4 mm")
    if out.exists():
        raise DatasetError(f"{out}: exists; choose a new folder")
    images = read_template(source)
    affine = images["t1"].affine.copy()
    affine[:3, :3] = affine[:3, :3] * spacing  # the same field of view on a grid of `spacing` mm
    template = {key: np.asarray(image.dataobj) for key, image in images.items()}
    rng = np.random.default_rng(seed)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (partial / folder).mkdir(parents=True)
        training, tests = [], []
        for index in range(cases):
            image, label = warped_case(template, rng, rotate, spacing)
            split = "Ts" if index >= cases - test else "Tr"
            name = f"mni_{index:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), partial / f"images{split}" / name)
            nib.save(nib.Nifti1Image(label, affine), partial / f"labels{split}" / name)
            if split == "Tr":
                training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            else:
                tests.append(f"./imagesTs/{name}")
            print(f"case {index + 1}/{cases}", flush=True)
        description = {
            "name": "mni152-tissue", "tensorImageSize": "3D",
            "description": ("Grey and white matter of the MNI152 ICBM 2009a symmetric T1 template (nilearn wheel), "
                            f"{cases} randomly warped, bias-corrupted and noisy copies at {spacing:g} mm (seed {seed})"),
            "reference": "ICBM 2009a nonlinear symmetric template (Fonov et al. 2009, 2011), as shipped by nilearn",
            "licence": "see the ICBM 2009a template's licence (McConnell Brain Imaging Centre)",
            "modality": {"0": "MR"}, "channel_names": {"0": "T1"}, "labels": LABELS,
            "numTraining": len(training), "numTest": len(tests), "training": training, "test": tests,
            "file_ending": ".nii.gz", "seed": seed, "generator": "scripts/mni_dataset.py",
        }
        (partial / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out / "dataset.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nilearn", required=True, type=Path, help="the nilearn wheel, unpacked wheel or package")
    parser.add_argument("--out", required=True, type=Path, help="the dataset folder to write (must not exist)")
    parser.add_argument("--cases", type=int, default=20, help="cases in all (default: 20)")
    parser.add_argument("--test", type=int, default=5, help="of which labelled test cases (default: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rotate", type=float, default=10.0, help="largest rotation per axis, degrees (default: 10)")
    parser.add_argument("--spacing", type=float, default=1.0,
                        help="isotropic voxel spacing in mm over the template's field of view (default: 1; 0.7 gives "
                             "281 x 333 x 270 voxels, a large-volume dataset)")
    args = parser.parse_args(argv)
    try:
        path = write_dataset(args.nilearn, args.out, args.cases, args.test, args.seed, args.rotate, args.spacing)
    except DatasetError as exc:
        print(f"mni_dataset: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
