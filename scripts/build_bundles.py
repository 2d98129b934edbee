#!/usr/bin/env python
"""Rebuild the maintained bundles in ``bundles/`` from generated data, on the CPU, as nnU-Net would: planned,
cross-validated, selected and postprocessed on out-of-fold Dice.

For each bundle: ``medseg synth`` a dataset (24 cases: 18 training, 6 held out) -> ``medseg train --fold all``
three times on the same 5-fold split (the planner's 3d_fullres and 2d plans, and the fixed U-Net of ``--plan
default``; ``--minutes`` each fold) -> ``medseg select`` of the three runs (and their pairs) -> the chosen run (or
pair), an ensemble bundle of its folds with the postprocessing that raised the out-of-fold Dice, copied to
``bundles/<name>`` -> ``medseg predict`` + ``medseg evaluate`` of that ensemble (and of fold 0 alone) on the held-out
cases; the figures go into ``configs/metadata.json`` (``eval_metrics``) and ``docs/README.md``. Usage::

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/build_bundles.py --only ct_abdomen_phantom [--work DIR]

``--reuse`` keeps the data and runs already in ``--work`` (``medseg train --fold all`` skips finished folds), so
that a bundle can be rebuilt from the runs of an earlier build.

Training artefacts that are not needed to use the bundle (``preprocessed/``, ``checkpoints/``, ``logs/``, the
pair's out-of-fold predictions) are left out; each fold's ``models/model.pt`` is committed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

BUNDLES = {
    "ct_abdomen_phantom": {
        "modality": "ct", "cases": 24, "seed": 100,
        "description": "3D CT multi-organ segmentation (liver, spleen, kidneys, bone, liver lesions): an ensemble of "
                       "five cross-validation folds, chosen with its postprocessing on out-of-fold Dice, trained on "
                       "medseg's synthetic abdominal CT phantoms.",
    },
    "mr_abdomen_phantom": {
        "modality": "mr", "cases": 24, "seed": 200,
        "description": "3D MR (T1-like) multi-organ segmentation (liver, spleen, kidneys, bone, liver lesions): an "
                       "ensemble of five cross-validation folds, chosen with its postprocessing on out-of-fold Dice, "
                       "trained on medseg's synthetic abdominal MR phantoms (bias field, arbitrary intensity scale, "
                       "Rician noise, axial/coronal/sagittal acquisitions).",
    },
}
#: The runs compared by ``medseg select``: folder name -> extra ``medseg train`` flags.
RUNS = {"3d_fullres": [], "2d": ["--configuration", "2d"], "default": ["--plan", "default"]}
#: What a bundle does not need (training caches and logs, the pair's out-of-fold predictions, resume markers).
LEFT_OUT = shutil.ignore_patterns("preprocessed", "checkpoints", "logs", "ensembles", ".medseg-cases")


def medseg(*args: str, cwd: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "medseg", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)


def build(name: str, spec: dict[str, Any], work: Path, minutes: float, reuse: bool = False) -> dict[str, Any]:
    bundle = ROOT / "bundles" / name
    data, runs = work / f"{name}-data", work / f"{name}-runs"
    if not reuse:
        for folder in (data, runs):
            shutil.rmtree(folder, ignore_errors=True)
    synth = ["synth", "--out", str(data), "--modality", spec["modality"], "--cases", str(spec["cases"]),
             "--seed", str(spec["seed"]), "--size", "96"]
    if not (data / "dataset.json").is_file():
        medseg(*synth)
    for run, flags in RUNS.items():
        # --reuse: a run folder there resumes with its own plan (finished folds are skipped)
        how = ["--resume"] if (runs / run).is_dir() else flags
        medseg("train", "--data", str(data / "dataset.json"), "--out", str(runs / run), "--fold", "all",
               "--max-minutes", f"{minutes:g}", "--seed", "0", "--device", "cpu", *how)
    train_s = {run: _training_seconds(runs / run) for run in RUNS}
    medseg("select", *RUNS, cwd=runs)  # relative names: the records hold no local paths
    chosen = next(runs / run for run in RUNS if (runs / run / "configs" / "selection.json").is_file())
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(chosen, bundle, ignore=LEFT_OUT)
    _scrub(bundle, [f"{runs}/", f"{work}/"])
    held_out = {"ensemble": _evaluate(bundle, data, work / f"{name}-evaluation"),
                "fold_0": _evaluate(bundle / "fold_0", data, work / f"{name}-evaluation-fold0")}
    if (bundle / "configs" / "ensemble.json").is_file():  # a pair: each run's fold 0 alone too
        member = next((bundle / "members").iterdir())
        held_out[f"{member.name} fold_0"] = _evaluate(member / "fold_0", data, work / f"{name}-evaluation-member0")
        held_out["door"] = _evaluate_door(bundle, data, work / f"{name}-evaluation-door")
    source = (f"medseg synthetic {spec['modality'].upper()} phantoms generated by "
              f"`medseg {' '.join(synth[:2])} DATA {' '.join(synth[3:])}` ({spec['cases']} cases: 18 training, "
              "cross-validated in 5 folds, and 6 held-out test cases). No real patient data.")
    meta = _record_metadata(bundle, name, spec["description"], source, held_out["ensemble"], held_out.get("door"))
    write_readme(bundle, name, spec, synth, meta, held_out, train_s, minutes)
    return meta["eval_metrics"]


def _scrub(bundle: Path, prefixes: list[str]) -> None:
    """Make the records' paths relative: no local absolute path goes into the repository."""
    for path in [*bundle.rglob("*.json"), *bundle.rglob("*.csv")]:
        text = original = path.read_text()
        for prefix in prefixes:
            text = text.replace(prefix, "")
        if text != original:
            path.write_text(text)


def _evaluate_door(bundle: Path, data: Path, out: Path) -> dict[str, Any]:
    """The held-out cases through the bundle's MONAI door (``configs/evaluate.json``: its own folds only)."""
    shutil.rmtree(out, ignore_errors=True)
    medseg("bundle", "run", str(bundle), "--config", "evaluate", "--set", f"dataset_dir={data}",
           "--set", f"output_dir={out}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def _training_seconds(run: Path) -> float:
    """The run's training time: its folds' ``train_summary.json`` seconds (also for folds an earlier build trained)."""
    return sum(float(json.loads(p.read_text())["seconds"]) for p in sorted(run.glob("fold_*/train_summary.json")))


def _evaluate(model: Path, data: Path, out: Path) -> dict[str, Any]:
    """The held-out cases predicted by ``medseg predict --model MODEL`` (a pair bundle runs both runs' folds there;
    its MONAI door runs its own folds only) and scored by ``medseg evaluate``."""
    shutil.rmtree(out, ignore_errors=True)
    medseg("-q", "predict", "--model", str(model), "--input", str(data / "imagesTs"), "--output", str(out / "predictions"))
    medseg("evaluate", "--pred", str(out / "predictions"), "--ref", str(data / "labelsTs"), "--labels", str(model),
           "--out", str(out))
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def _record_metadata(bundle: Path, name: str, description: str, source: str,
                     summary: dict[str, Any], door: dict[str, Any] | None = None) -> dict[str, Any]:
    meta_path = bundle / "configs" / "metadata.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    metrics = {"mean_dice_test": round(summary["mean_dice_foreground"], 4)}
    for entry in summary["labels"].values():
        metrics[f"dice_{entry['name']}"] = round(entry["dice"]["mean"], 4)
        if entry["hd95_mm"]["mean"] is not None:
            metrics[f"hd95_mm_{entry['name']}"] = round(entry["hd95_mm"]["mean"], 2)
    if door is not None:  # a pair: what the MONAI door (this run's own folds) scores
        metrics["mean_dice_test_monai_door"] = round(door["mean_dice_foreground"], 4)
    metrics.update({k: v for k, v in meta["eval_metrics"].items() if k.startswith("oof_")})
    meta.update(name=name, description=description, data_source=source, eval_metrics=metrics)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _figure(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_readme(bundle: Path, name: str, spec: dict[str, Any], synth: list[str], meta: dict[str, Any],
                 held_out: dict[str, dict[str, Any]], train_s: dict[str, float], minutes: float) -> None:
    plan = json.loads((bundle / "configs" / "plan.json").read_text())
    cv = json.loads((bundle / "cv_summary.json").read_text())
    selection = json.loads((bundle / "configs" / "selection.json").read_text())
    pair_rules = bundle / "configs" / "ensemble_postprocessing.json"  # a pair's rules, chosen on the pair's predictions
    rules = json.loads((pair_rules if pair_rules.is_file() else bundle / "configs" / "postprocessing.json").read_text())
    test, fold0 = held_out["ensemble"], held_out["fold_0"]

    def row(k: str, v: dict[str, Any]) -> str:
        code, meaning = (v["snomed"]["code"], v["snomed"]["meaning"]) if v["snomed"] else ("-", "")
        label = test["labels"][k]
        return (f"| {k} | {v['name']} | {code} ({meaning}) | {label['dice']['mean']:.3f} | "
                f"{_figure(label['hd95_mm']['mean'], 2)} | {fold0['labels'][k]['dice']['mean']:.3f} | "
                f"{cv['overall']['dice'][v['name']]:.3f} | {_figure(cv['overall']['hd95'][v['name']], 2)} |")

    rows = "\n".join(row(k, v) for k, v in meta["segments"].items())
    folds = "\n".join(f"| {k} | {f['cases']} | {f['mean_dice']:.3f} | "
                      + " | ".join(f"{f['dice'][n]:.3f}" for n in cv["overall"]["dice"]) + " |"
                      for k, f in sorted(cv["folds"].items()))
    compared = "\n".join(f"| {r['run']} | {r['configuration']} | {r['oof_mean_dice']:.4f} |" for r in selection["runs"])
    compared += "".join(f"\n| pair: {' + '.join(p['runs'])} | both, probabilities averaged | {p['oof_mean_dice']:.4f} "
                        f"(postprocessed {p['oof_mean_dice_postprocessed']:.4f}) |" for p in selection["pairs"])
    chosen = selection["chosen"]
    evidence = rules["evidence"]["mean_dice"]
    classes = plan["num_classes"] if "num_classes" in plan else len(plan["labels"])
    intensity = plan["intensity"]
    clip = (f" (clip {round(intensity['a_min'], 1)} to {round(intensity['a_max'], 1)} HU, z-score)"
            if intensity["preset"] == "ct" else " (z-score on non-zero voxels)")
    summaries = [json.loads((bundle / f"fold_{k}" / "train_summary.json").read_text()) for k in range(5)]
    iterations = [int(s["iterations"]) for s in summaries]
    rel = bundle.relative_to(ROOT)
    door = held_out.get("door")
    pair_note = ("" if "members" not in chosen or door is None else
                 f"\nThe chosen pair's other run is copied into `members/`; `medseg predict` runs the pair. The MONAI "
                 f"door (`python -m monai.bundle run` with `configs/inference.json`, `medseg bundle run`) runs this "
                 f"run's own folds only ({chosen['bundle_door']}): held-out mean Dice "
                 f"{door['mean_dice_foreground']:.3f} there (`medseg bundle run {rel} --config evaluate --set "
                 f"dataset_dir=DATA --set output_dir=EVAL`).\n")
    others = {k: v for k, v in held_out.items() if k not in ("ensemble", "fold_0", "door")}
    other_line = "".join(f", {k.replace('_', ' ')} alone {v['mean_dice_foreground']:.3f}" for k, v in others.items())
    members = [str(m) for m in chosen.get("members", [])]
    what = (f"the pair {' + '.join(members)}, five folds each, probabilities averaged" if members
            else "the five folds' ensemble")
    plans = {run: json.loads(p.read_text()) for run in RUNS
             if (p := (bundle if run == chosen["run"] else bundle / "members" / run) / "configs" / "plan.json").is_file()}
    model_lines = "\n".join(
        f"- `{run}`: " + (f"a 2D `{p['network']['name']}` over slices (3D plan, slice axis {p['patch_size'].index(1)})"
                          if p.get("configuration") == "2d" and p["dims"] == 3 else
                          f"{p['dims']}D `{p['network']['name']}`")
        + f", configuration `{p.get('configuration')}`, patch {p['patch_size']}, batch {p.get('batch_size')}"
        for run, p in plans.items())
    text = f"""# {name}

{spec['description']}

**Research and demonstration only; not for clinical use.** It has only ever seen synthetic phantoms.

## Data
{meta['data_source']}

Reproduce the data: `medseg {' '.join(synth[:2])} DATA {' '.join(synth[3:])}`.

## Labels and measured metrics
Held-out test cases ({test['cases']}), `medseg predict --model {rel} --input DATA/imagesTs --output PRED` then
`medseg evaluate --pred PRED --ref DATA/labelsTs --labels {rel} --out EVAL` ({what}, with the postprocessing),
against fold 0 alone (`medseg predict --model {rel}/fold_0 ...`) and the out-of-fold figures of this run's
cross-validation (each of the 18 training cases predicted by the fold that held it out, no postprocessing;
`cv_summary.json`):

| value | segment | SNOMED CT | test Dice | test HD95 (mm) | test Dice, fold 0 alone | out-of-fold Dice | out-of-fold HD95 (mm) |
|---|---|---|---|---|---|---|---|
{rows}

Mean Dice over foreground labels: test **{test['mean_dice_foreground']:.3f}** ({chosen['run']} fold 0 alone
{fold0['mean_dice_foreground']:.3f}{other_line}); out-of-fold {cv['overall']['mean_dice']:.3f} for this run alone,
{chosen['oof_mean_dice_postprocessed']:.3f} for the chosen model with its postprocessing.

## Cross-validation and selection
Per fold (out-of-fold cases, Dice):

| fold | cases | mean | {' | '.join(cv['overall']['dice'])} |
|---|---|---|{'---|' * len(cv['overall']['dice'])}
{folds}

`medseg select` compared, on the same split, the planner's 3d_fullres and 2d runs (the 2d one a 2D U-Net over
slices), the fixed U-Net of `--plan default` and each pair of them (out-of-fold mean Dice):

| run | configuration | out-of-fold mean Dice |
|---|---|---|
{compared}

Chosen: **{' + '.join(members) if members else chosen['run']}** ({chosen['configuration']}), folds
{', '.join(map(str, chosen['folds']))} as one ensemble (probabilities averaged block by block); postprocessing:
{chosen['postprocessing']} (out-of-fold mean Dice {evidence['none']:.4f} without, {evidence['chosen']:.4f} with it;
`configs/postprocessing.json`, every alternative's figures in it; `configs/selection.json`).
{pair_note}
## Model
{model_lines}

{classes} output channels; five folds per run (`fold_0` ... `fold_4`, each a bundle of its own).
Preprocessing (`configs/plan.json`): orientation RAS, spacing {[round(s, 3) for s in plan['target_spacing']]} mm,
intensity preset `{intensity['preset']}`{clip}.
Sliding-window inference over each run's patch (a 2d run's windows are a training batch of slices thick),
Gaussian blending, each run's folds averaged in one pass (bounded memory); a pair's runs resampled to the input's
grid and averaged; predictions are written in the input's grid.

## Training
```sh
medseg train --data DATA/dataset.json --out runs/3d_fullres --fold all --max-minutes {minutes:g} --seed 0
medseg train --data DATA/dataset.json --out runs/2d --configuration 2d --fold all --max-minutes {minutes:g} --seed 0
medseg train --data DATA/dataset.json --out runs/default --plan default --fold all --max-minutes {minutes:g} --seed 0
cd runs && medseg select 3d_fullres 2d default          # the chosen run (or pair) becomes this bundle
```
Trained on one CPU core (`OMP_NUM_THREADS=1`), {minutes:g} min per fold: {', '.join(map(str, iterations))}
iterations in folds 0-4 of this run; the runs' folds trained for {', '.join(f"{k} {v / 60:.1f}" for k, v in train_s.items())}
min in all (`train_summary.json`). The whole bundle is rebuilt by
`OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/build_bundles.py --only {name} --minutes {minutes:g}`.

## Inference
```sh
medseg predict --model {rel} --input IMAGE_OR_FOLDER --output OUT
python -m monai.bundle run --config_file {rel}/configs/inference.json \\
    --meta_file {rel}/configs/metadata.json --bundle_root {rel} \\
    --dataset_dir DATA --output_dir OUT        # reads DATA/imagesTs (or DATA itself)
medseg bundle run {rel} --set dataset_dir=DATA --set output_dir=OUT
```
Inputs: NIfTI, NRRD or MetaImage {plan['modality']} volumes, any orientation and spacing.
"""
    (bundle / "docs" / "README.md").write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUNDLES), action="append")
    parser.add_argument("--work", default="/tmp/medseg-bundles", help="folder for generated data, runs and evaluations")
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget of each fold (default: 3)")
    parser.add_argument("--reuse", action="store_true", help="keep the data and runs already in --work")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for name in args.only or sorted(BUNDLES):
        print(name, build(name, BUNDLES[name], work, args.minutes, args.reuse), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
