#!/usr/bin/env python
"""One nnU-Net v2 model, one 512 x 512 x D CT-like volume: ``nnUNetv2_predict`` vs ``medseg predict`` of the
model imported with ``medseg bundle import-nnunet``, each in its own process with the same threads: end-to-end
seconds (reading, preprocessing, sliding window, export, writing), peak memory of the process and its children
(proportional set size, so pages forked workers share count once; ``peak_rss_gb``), and the agreement of the label
maps.

The model is trained here by nnU-Net itself (``scripts/nnunet_peer.py``: nnU-Net's plans of ``medseg synth`` CT
phantoms with the network cut to 3 stages of 8-32 features, 300 iterations). For ``--classes C`` its last layers
get ``C - 6`` more classes, copies of the background lowered by 2 logits: every class is computed, blended,
resampled and reduced as in a model of C real classes, and the labels stay those of the trained model, so the
agreement is measured on a model that segments something. The volume is a test phantom resampled (linearly) to
512 x 512 x D over the same extent: about 0.25 mm in-plane, so both tools resample the prediction of a ~2.5 mm
model back to a fine grid, where nnU-Net holds every class at the input's resolution (its issue #2912).

    .venv/bin/python scripts/bench_nnunet_predict.py [--classes 15,105] [--depth 120] [--threads 1]
        [--nnunet-venv .venv-nnunet] [--work DIR] [--json FILE]

``--json FILE`` writes records with ``impl`` ("medseg" or "nnunet"), ``classes``, ``shape``, ``seconds``,
``peak_rss_gb``, ``device``, ``threads`` and, for medseg, ``agreement`` (fraction of voxels equal to nnU-Net's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nnunet_peer
from proc_memory import measure

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID, DATASET = 902, "Dataset902_Bench"
TRAINER, PLANS = "nnUNetTrainerFixedIterations", "nnUNetPlansTiny"
SIZE_XY = 512
BACKGROUND_MARGIN = 2.0  # the added classes' logits: the background's minus this
def train_model(peer: nnunet_peer.Peer, work: Path) -> tuple[Path, Path]:
    """nnU-Net's tiny model of the phantoms (fold 0); (model folder, a test image)."""
    from medseg.data.synthetic import write_dataset

    raw = work / "nnUNet_raw" / DATASET
    if not raw.exists():
        write_dataset(raw, modality="ct", cases=8, seed=5, size=48, layout="nnunet")
    model = work / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__3d_fullres"
    if not (model / "fold_0" / "checkpoint_final.pth").exists():
        peer.run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1",
                 log="plan")
        nnunet_peer.tiny_plans(work / "nnUNet_preprocessed" / DATASET, PLANS)
        peer.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-p", PLANS, "-tr", TRAINER, "-device", "cpu",
                 log="train", MEDSEG_NNUNET_EPOCHS="12", MEDSEG_NNUNET_ITERATIONS="25", nnUNet_n_proc_DA="0")
    return model, sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[0]


def with_classes(model: Path, classes: int, out: Path) -> Path:
    """A copy of ``model`` whose network predicts ``classes`` classes (see the module docstring)."""
    import torch

    from medseg.networks.nnunet import CHECKPOINT_GLOBALS

    target = out / model.name
    if target.exists():
        return target
    (target / "fold_0").mkdir(parents=True)
    shutil.copy(model / "plans.json", target / "plans.json")
    dataset = json.loads((model / "dataset.json").read_text())
    trained = len(dataset["labels"])
    for value in range(trained, classes):
        dataset["labels"][f"class_{value}"] = value
    (target / "dataset.json").write_text(json.dumps(dataset, indent=2))
    # the whole checkpoint, to write it back for nnU-Net: weights only, plus the types nnU-Net stores (as medseg reads it)
    with torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
        checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    weights = checkpoint["network_weights"]
    for key in [k for k in weights if ".seg_layers." in k]:
        tensor = weights[key]
        extra = tensor[:1].repeat(classes - trained, *([1] * (tensor.ndim - 1)))
        if key.endswith(".bias"):
            extra = extra - BACKGROUND_MARGIN
        weights[key] = torch.cat([tensor, extra])
    torch.save(checkpoint, target / "fold_0" / "checkpoint_final.pth")
    return target


def ct_like_volume(source: Path, depth: int, out: Path) -> Path:
    """``source`` resampled linearly to 512 x 512 x ``depth`` over the same extent (a CT-like input)."""
    from scipy import ndimage

    path = out / "ctbench_0000.nii.gz"
    if path.exists():
        return path
    image = nib.load(source)
    data = np.asarray(image.dataobj, dtype=np.float32)
    shape = (SIZE_XY, SIZE_XY, depth)
    zoom = [n / o for n, o in zip(shape, data.shape)]
    big = ndimage.zoom(data, zoom, order=1, mode="nearest", grid_mode=True).astype(np.int16)
    affine = image.affine.copy()
    affine[:3, :3] = affine[:3, :3] / np.asarray(zoom)
    out.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(big, affine), path)
    return path


def agreement(ours: Path, theirs: Path) -> float:
    a, b = np.asarray(nib.load(ours).dataobj), np.asarray(nib.load(theirs).dataobj)
    if a.shape != b.shape:
        raise RuntimeError(f"{ours}: shape {a.shape}, nnU-Net's {b.shape}")
    return float((a == b).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="15,105", help="class counts, comma-separated (default: 15,105)")
    parser.add_argument("--depth", type=int, default=120, help="slices of the 512 x 512 volume (default: 120)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each tool (default: 1)")
    parser.add_argument("--nnunet-venv", default=str(ROOT / ".venv-nnunet"), help="nnU-Net's venv (made if missing)")
    parser.add_argument("--work", default=None, help="work folder, kept (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args(argv)
    classes = [int(c) for c in args.classes.split(",") if c.strip()]
    work = Path(args.work).absolute() if args.work else Path(tempfile.mkdtemp(prefix="bench-nnunet-"))
    peer = nnunet_peer.Peer(Path(args.nnunet_venv).absolute(), work, args.threads, work / "logs")
    records: list[dict[str, Any]] = []
    try:
        peer.ensure()
        model, test_image = train_model(peer, work)
        volume = ct_like_volume(test_image, args.depth, work / "input")
        shape = list(nib.load(volume).shape)
        threads = str(args.threads)
        medseg_env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        for count in classes:
            variant = with_classes(model, count, work / f"model-{count}")
            theirs, ours, bundle = work / f"nnunet-{count}", work / f"medseg-{count}", work / f"bundle-{count}"
            for folder in (theirs, ours, bundle):
                shutil.rmtree(folder, ignore_errors=True)
            seconds, rss = measure([str(peer.python), "-c", nnunet_peer.LAUNCHER, "nnUNetv2_predict_from_modelfolder",
                                    "-i", str(volume.parent), "-o", str(theirs), "-m", str(variant), "-f", "0",
                                    "--disable_tta", "-npp", "1", "-nps", "1", "-device", "cpu"],
                                   peer.env(), work / "logs" / f"nnunet-{count}.log")
            records.append({"impl": "nnunet", "classes": count, "shape": shape, "seconds": round(seconds, 1),
                            "peak_rss_gb": round(rss, 2), "device": "cpu", "threads": args.threads})
            subprocess.run([sys.executable, "-m", "medseg", "bundle", "import-nnunet", str(variant), "--out",
                            str(bundle)], check=True, env=medseg_env, capture_output=True)
            seconds, rss = measure([sys.executable, "-m", "medseg", "predict", "--model", str(bundle), "--input",
                                    str(volume), "--output", str(ours), "--no-tta"], medseg_env,
                                   work / "logs" / f"medseg-{count}.log")
            fraction = agreement(ours / "ctbench_0000_seg.nii.gz", theirs / "ctbench.nii.gz")
            records.append({"impl": "medseg", "classes": count, "shape": shape, "seconds": round(seconds, 1),
                            "peak_rss_gb": round(rss, 2), "device": "cpu", "threads": args.threads,
                            "agreement": round(fraction, 6)})
            nn, ms = records[-2], records[-1]
            print(f"{count:>4} classes {'x'.join(map(str, shape))}: nnU-Net {nn['seconds']:.1f} s "
                  f"{nn['peak_rss_gb']:.2f} GB | medseg {ms['seconds']:.1f} s {ms['peak_rss_gb']:.2f} GB | "
                  f"speed {nn['seconds'] / ms['seconds']:.2f} x, memory {ms['peak_rss_gb'] / nn['peak_rss_gb']:.3f} "
                  f"of nnU-Net's, agreement {fraction:.5f}", flush=True)
    except (RuntimeError, OSError, subprocess.CalledProcessError, nnunet_peer.PeerError) as exc:
        print(f"bench_nnunet_predict: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.json and records:
            Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
