#!/usr/bin/env python
"""Where a model's errors lie: on the reference's boundary voxels, near them, or far from any boundary.

For each reference label map in ``--ref`` and its prediction in ``--pred`` (``<case>_seg`` or ``<case>``),
prints the wrong voxels, the share of them that are boundary voxels of the reference (a voxel whose
face neighbour has another label), within 1 and 2 voxels of one, and more than 5 voxels away, and the
share of boundary voxels that are wrong. Errors concentrated on the boundary mean the model finds every
structure and misplaces its surface by a voxel; errors far away are missed or invented structures.

    .venv/bin/python scripts/boundary_errors.py --pred PRED_DIR --ref LABELS_DIR [--json FILE]

Predictions are paired with references and their grids checked as ``medseg evaluate`` does (any image
format medseg reads; ``<case>_0000_seg`` of nnU-Net's layout too). Exit status 2, naming the file, on a
missing folder, a reference without a prediction (or the reverse), an unreadable label map or two grids
that differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.errors import InputError
from medseg.metrics.evaluate import pair_cases, pair_spacings
from medseg.metrics.labelmaps import read_label_map


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", type=Path, required=True, help="folder of predicted label maps")
    parser.add_argument("--ref", type=Path, required=True, help="folder of reference label maps (<case>.nii.gz)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args(argv)
    records = []
    try:
        pairs = pair_cases(args.pred, args.ref)
        pair_spacings(pairs)  # every pair on one grid, checked on the headers before any voxel is read
        for case, pred_path, ref_path in pairs:
            record = {"case": case, **case_errors(read_label_map(pred_path), read_label_map(ref_path))}
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
