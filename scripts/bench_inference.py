#!/usr/bin/env python
"""Sliding-window inference: medseg's SlabInferer vs MONAI's ``sliding_window_inference``.

Each (implementation, class count) runs in its own process, on the same network (random weights:
speed and memory do not depend on the weights), window, overlap, window batch and volume
(512 x 512 x D, float32). ``--network unet`` is MONAI's UNet (last layer a 3x3x3 convolution: medseg
blends its class logits); ``--network dynunet`` an nnU-Net-like DynUNet (last layer a 1x1x1
convolution: medseg blends its 8 feature channels and applies the head to each finished block).
Reported per run: wall time of the inference (argmax included), voxels per second, peak resident
memory, and the resident memory after loading the model and the input (``baseline_rss_gb``); memory is
compared as peak minus baseline. MONAI is not started where its buffers cannot fit in the memory
available: ``fits`` is false and ``needed_gb`` is what it would allocate (C x volume float32 output plus
its count map). medseg refuses by itself, up front, when its buffer cannot fit.

``--models 1,5`` also runs medseg on ensembles of K copies of the network (different random weights;
:class:`medseg.networks.ensemble.ModelEnsemble` inferred with ``SlabInferer(members=K)``, probabilities
averaged block by block), records with ``models``; MONAI runs single models only. ``--ensemble-buffer-mb M``
gives the ensembles (not the single model) a buffer budget of M MiB instead of the inferer's (220 MiB on the CPU;
records ``buffer_mib``). The summary prints each
ensemble's time and memory above baseline against medseg's single model in the same run.

    .venv/bin/python scripts/bench_inference.py [--network unet|dynunet] [--depth 400]
                                                [--classes 2,15,105] [--models 1,5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

SIZE_XY = 512


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024**3


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return float("inf")


def monai_needed_gb(classes: int, shape: tuple[int, ...]) -> float:
    voxels = 1
    for s in shape:
        voxels *= s
    return (classes + 1) * voxels * 4 / 1024**3  # output buffer + count map, float32


def build_network(name: str, classes: int):
    """The benchmarked networks (random weights): MONAI's UNet, whose last layer is a 3x3x3 convolution
    (medseg blends its logits), and an nnU-Net-like DynUNet, whose last layer is a 1x1x1 convolution
    (medseg blends its 8 full-resolution feature channels and applies the head per finished slab)."""
    from monai.networks.nets import DynUNet, UNet

    if name == "unet":
        return UNet(3, 1, classes, (16, 32, 64, 128), (2, 2, 2), num_res_units=1, norm="instance").eval()
    if name == "dynunet":
        return DynUNet(3, 1, classes, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[8, 16, 32, 64],
                       norm_name="instance").eval()
    raise SystemExit(f"unknown network {name!r} (unet, dynunet)")


def worker(impl: str, classes: int, args: argparse.Namespace, models: int = 1) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (SIZE_XY, SIZE_XY, args.depth)
    network = build_network(args.network, classes)
    if models > 1:
        from medseg.networks.ensemble import ModelEnsemble

        network = ModelEnsemble([network, *(build_network(args.network, classes) for _ in range(models - 1))])
    volume = torch.randn(1, 1, *shape)
    baseline = _rss_gb()
    precision = args.precision if impl == "medseg" else "float32"
    record: dict[str, Any] = {"impl": impl, "network": args.network, "classes": classes, "shape": list(shape),
                              "device": "cpu",
                              "precision": precision, "baseline_rss_gb": round(baseline, 3), "fits": True,
                              "roi": list(args.roi), "overlap": args.overlap, "sw_batch_size": args.sw_batch_size,
                              "models": models}
    buffer_bytes = None
    if models > 1 and args.ensemble_buffer_mb is not None:
        buffer_bytes = int(args.ensemble_buffer_mb * (1 << 20))
        record["buffer_mib"] = args.ensemble_buffer_mb
    started = time.perf_counter()
    with torch.inference_mode():
        if impl == "monai":
            from monai.inferers import sliding_window_inference

            logits = sliding_window_inference(volume, args.roi, args.sw_batch_size, network, args.overlap,
                                              mode="gaussian")
            labels = torch.argmax(logits, dim=1)
        else:
            from medseg.inference.inferer import SlabInferer

            inferer = SlabInferer(args.roi, classes, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                  output="labels", precision=precision, members=models, buffer_bytes=buffer_bytes)
            labels = inferer(volume, network)
    seconds = time.perf_counter() - started
    voxels = shape[0] * shape[1] * shape[2]
    record.update(seconds=round(seconds, 2), mvox_per_s=round(voxels / seconds / 1e6, 3),
                  peak_rss_gb=round(_peak_rss_gb(), 3), label_voxels=int(labels.numel()))
    return record


def agreement(bundle: str, precision: str, cases: int = 4) -> dict[str, Any]:
    """Fraction of voxels whose label under ``precision`` equals float32's, for a trained bundle on
    ``cases`` test phantoms (seed 7) written in the bundle's modality, predicted through ``Predictor``."""
    import tempfile
    from pathlib import Path

    from medseg.data.synthetic import write_dataset
    from medseg.inference.predictor import Predictor

    reference = Predictor.from_run(bundle)
    other = Predictor.from_run(bundle, precision=precision)
    same = total = 0
    foreground_same = foreground = 0
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "phantoms", modality=reference.plan.modality.lower(), cases=cases * 4,
                             seed=7).parent
        images = sorted((data / "imagesTs").iterdir())
        for image in images:
            a, b = reference.predict_array(image), other.predict_array(image)
            same, total = same + int((a == b).sum()), total + a.size
            mask = (a > 0) | (b > 0)
            foreground_same, foreground = foreground_same + int((a[mask] == b[mask]).sum()), foreground + int(mask.sum())
    return {"impl": "medseg", "precision": precision, "model": bundle, "cases": len(images),
            "agreement_vs_float32": round(same / total, 6),
            "foreground_agreement_vs_float32": round(foreground_same / max(foreground, 1), 6)}


def run_one(impl: str, classes: int, args: argparse.Namespace, models: int = 1) -> dict[str, Any]:
    shape = (SIZE_XY, SIZE_XY, args.depth)
    base = {"impl": impl, "network": args.network, "classes": classes, "shape": list(shape), "device": "cpu",
            "precision": args.precision if impl == "medseg" else "float32", "seconds": None, "mvox_per_s": None,
            "peak_rss_gb": None, "baseline_rss_gb": None, "models": models}
    if impl == "monai":
        # MONAI allocates its buffers during the run: not started where they cannot fit (medseg refuses
        # by itself, up front, when its slab buffer cannot)
        needed = monai_needed_gb(classes, shape)
        if needed + 2.0 > _available_gb():
            return {**base, "fits": False, "needed_gb": round(needed, 2)}
    cmd = [sys.executable, __file__, "--worker", impl, "--classes", str(classes), "--depth", str(args.depth),
           "--roi", ",".join(map(str, args.roi)), "--overlap", str(args.overlap), "--network", args.network,
           "--sw-batch-size", str(args.sw_batch_size), "--threads", str(args.threads), "--precision", args.precision,
           "--models", str(models)]
    if args.ensemble_buffer_mb is not None:
        cmd += ["--ensemble-buffer-mb", str(args.ensemble_buffer_mb)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {**base, "fits": False, "error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=400, help="slices of the 512 x 512 x D volume")
    parser.add_argument("--classes", default="2,15,105")
    parser.add_argument("--roi", default="96,96,64")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--impls", default="monai,medseg")
    parser.add_argument("--network", default="unet", help="unet (MONAI UNet) or dynunet (1x1x1 head)")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                        help="medseg's precision (MONAI always runs float32)")
    parser.add_argument("--agreement", default=None, metavar="BUNDLE",
                        help="also report the argmax agreement of --precision against float32 with this trained "
                             "bundle on synthetic phantoms of its modality")
    parser.add_argument("--models", default="1", help="ensemble sizes K run by medseg, e.g. 1,5 (default: 1)")
    parser.add_argument("--ensemble-buffer-mb", type=float, default=None,
                        help="medseg's buffer budget in MiB for ensembles (--models above 1; default: the inferer's, "
                             "220 MiB on the CPU, a single model's 96 MiB): a larger one sweeps fewer strips, "
                             "computing fewer windows twice")
    parser.add_argument("--json", default=None, help="write the records to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.roi = tuple(int(v) for v in args.roi.split(","))
    sizes = sorted({int(k) for k in args.models.split(",") if k})
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"--models takes ensemble sizes >= 1, got {args.models!r}")
    if args.worker:
        print(json.dumps(worker(args.worker, int(args.classes), args, sizes[0])))
        return 0
    records = []
    for classes in (int(c) for c in args.classes.split(",") if c):
        for impl in args.impls.split(","):
            for models in sizes if impl == "medseg" else [1]:
                record = run_one(impl, classes, args, models)
                records.append(record)
                print(json.dumps(record), flush=True)
    print(f"\n{'classes':>7} {'impl':>7} {'models':>6} {'seconds':>8} {'Mvox/s':>7} {'peak-baseline GB':>17} {'fits':>5}")
    for r in records:
        extra = r["peak_rss_gb"] - r["baseline_rss_gb"] if r.get("peak_rss_gb") is not None else None
        print(f"{r['classes']:>7} {r['impl']:>7} {r.get('models', 1):>6} {r.get('seconds') or '-':>8} "
              f"{r.get('mvox_per_s') or '-':>7} "
              f"{'-' if extra is None else f'{extra:.2f}':>17} {r['fits']!s:>5}"
              + ("" if r["fits"] else f"  (needs {r.get('needed_gb')} GB)"))
    by = {(r["impl"], r["classes"]): r for r in records if r.get("models", 1) == 1}
    for r in records:
        one = by.get(("medseg", r["classes"]))
        if r.get("models", 1) > 1 and one and one.get("seconds") and r.get("seconds"):
            print(f"classes {r['classes']}: medseg ensemble of {r['models']} vs one model: time "
                  f"{r['seconds'] / one['seconds']:.2f}x, memory above baseline "
                  f"{(r['peak_rss_gb'] - r['baseline_rss_gb']) / (one['peak_rss_gb'] - one['baseline_rss_gb']):.3f}x")
    for classes in sorted({r["classes"] for r in records}):
        m, s = by.get(("monai", classes)), by.get(("medseg", classes))
        if m and s and m.get("seconds") and s.get("seconds"):
            mem_m = m["peak_rss_gb"] - m["baseline_rss_gb"]
            mem_s = s["peak_rss_gb"] - s["baseline_rss_gb"]
            print(f"classes {classes}: speed medseg/MONAI {m['seconds'] / s['seconds']:.2f}x, "
                  f"memory medseg/MONAI {mem_s / mem_m:.3f}")
    if args.agreement:
        record = agreement(args.agreement, args.precision)
        records.append(record)
        print(f"{args.precision} vs float32 with {args.agreement}: argmax agreement "
              f"{record['agreement_vs_float32']:.4%} of voxels, {record['foreground_agreement_vs_float32']:.4%} of "
              f"foreground voxels ({record['cases']} phantoms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
