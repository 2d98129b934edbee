#!/usr/bin/env python
"""Where a model's errors lie: on the reference's boundary voxels, near them, or far from any boundary.

For each reference label map in ``--ref`` and its prediction in ``--pred`` (``<case>_seg`` or ``<case>``),
prints the wrong voxels, the share of them that are boundary voxels of the reference (a voxel whose
face neighbour has another label), within 1 and 2 voxels of one, and more than 5 voxels away, and the
share of boundary voxels that are wrong. Errors concentrated on the boundary mean the model finds every
structure and misplaces its surface by a voxel; errors far away are missed or invented structures.

    .venv/bin/python scripts/boundary_errors.py --pred PRED_DIR --ref LABELS_DIR [--json FILE]

Exit status 2, naming the file, when a folder, a prediction or a readable label map is missing, or the
two grids differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SUFFIXES = (".nii.gz", ".nii")


class InputError(Exception):
    """A folder, prediction or label map that cannot be used."""


def boundary(labels: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of another label (both sides of every label change)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        change = np.diff(labels, axis=axis) != 0
        before = [slice(None)] * labels.ndim
        after = [slice(None)] * labels.ndim
        before[axis], after[axis] = slice(0, -1), slice(1, None)
        edge[tuple(before)] |= change
        edge[tuple(after)] |= change
    return edge


def case_errors(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Counts and shares of the wrong voxels by their distance (voxels) to the reference's boundary."""
    wrong = pred != ref
    edge = boundary(ref)
    distance = ndimage.distance_transform_edt(~edge)[wrong]
    count = int(wrong.sum())
    share = (lambda mask: round(float(mask.mean()), 4)) if count else (lambda mask: 0.0)
    return {"wrong_voxels": count, "on_boundary": share(distance == 0), "within_1": share(distance <= 1),
            "within_2": share(distance <= 2), "beyond_5_voxels": int((distance > 5).sum()),
            "boundary_voxels": int(edge.sum()),
            "boundary_wrong": round(float(wrong[edge].mean()), 4) if edge.any() else 0.0}


def _read(path: Path) -> np.ndarray:
    try:
        return np.asarray(nib.load(str(path)).dataobj).astype(np.int32)
    except Exception as error:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: not a readable label map ({error})") from error


def _prediction(folder: Path, case: str) -> Path:
    for stem in (f"{case}_seg", case):
        for suffix in SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    raise InputError(f"{folder}: no prediction for case {case} ({case}_seg.nii.gz or {case}.nii.gz)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", type=Path, required=True, help="folder of predicted label maps")
    parser.add_argument("--ref", type=Path, required=True, help="folder of reference label maps (<case>.nii.gz)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args(argv)
    records = []
    try:
        for folder in (args.pred, args.ref):
            if not folder.is_dir():
                raise InputError(f"{folder}: no such folder")
        refs = sorted(p for p in args.ref.iterdir() if p.name.endswith(SUFFIXES))
        if not refs:
            raise InputError(f"{args.ref}: no .nii.gz or .nii label maps")
        for ref_path in refs:
            case = ref_path.name.removesuffix(".gz").removesuffix(".nii")
            pred_path = _prediction(args.pred, case)
            pred, ref = _read(pred_path), _read(ref_path)
            if pred.shape != ref.shape:
                raise InputError(f"{pred_path}: grid {pred.shape} differs from the reference's {ref.shape}")
            record = {"case": case, **case_errors(pred, ref)}
            records.append(record)
            print(" ".join(f"{key} {value}" for key, value in record.items()), flush=True)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
