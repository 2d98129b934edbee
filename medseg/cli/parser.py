"""The ``medseg`` argument parser: one function per subcommand adds its options (defaults shown in ``--help``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

from medseg import __version__
from medseg.architectures import ARCHITECTURES
from medseg.cli.commands import (
    cmd_bundle_export,
    cmd_bundle_import_nnunet,
    cmd_bundle_init,
    cmd_bundle_run,
    cmd_bundle_verify,
    cmd_convert_msd,
    cmd_demo,
    cmd_evaluate,
    cmd_inspect,
    cmd_pacs_listen,
    cmd_pacs_run,
    cmd_plan,
    cmd_postprocess,
    cmd_predict,
    cmd_report,
    cmd_select,
    cmd_synth,
    cmd_train,
)

__all__ = [
    "SUBCOMMANDS",
    "HelpFormatter",
    "Subparsers",
    "build_parser",
]


#: What ``parser.add_subparsers()`` returns: each subcommand adds its parser to it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # noqa: SLF001 - no public name


def _positive_list(kind: type[int] | type[float]) -> Callable[[str], tuple[float, ...]]:
    """argparse type for "1.5,1.5,3" (or "1.5x1.5x3"): a tuple of positive ``kind`` values."""
    noun = "integers" if kind is int else "numbers"

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(kind(v) for v in text.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} separated by commas, got {text!r}") from None
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive {noun}, got {text!r}")
        return values

    return parse


_floats = _positive_list(float)
_ints = _positive_list(int)


def _label_mapping(text: str) -> dict[int, int]:
    """argparse type for ``--label-map 6=5,7=5``."""
    from medseg.labels import parse_label_mapping

    try:
        return parse_label_mapping(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hu_window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU, e.g. -160,240, got {text!r}") from None
    if low >= high:
        raise argparse.ArgumentTypeError(f"the window's LOW must be below HIGH, got {text!r}")
    return low, high


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default after its help text, ``(default: 0.5)``.

    Left out where there is nothing to show: flags (default off), options whose help says what
    their absence means (default None), empty lists, and help that already names its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or "%(default)" in text or "default:" in text or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _command(sub: Subparsers, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows defaults (:class:`HelpFormatter`)."""
    return sub.add_parser(name, help=summary, description=summary[:1].upper() + summary[1:] + ".",
                          formatter_class=HelpFormatter)


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _plan_options(p: argparse.ArgumentParser) -> None:
    """The options that shape a new plan (``medseg train`` and ``medseg bundle init``)."""
    p.add_argument("--spacing", type=_floats, default=None, help="target spacing in mm, e.g. 1.5,1.5,3 (default: median)")
    p.add_argument("--patch-size", type=_ints, default=None,
                   help="training patch in voxels, e.g. 96,96,48 (default: from the median image size)")
    p.add_argument("--network", choices=ARCHITECTURES, default=None,
                   help="architecture of a new plan: MONAI UNet, DynUNet (nnU-Net-style topology from the patch and "
                        "spacing), SegResNet, or unet_head (MONAI UNet with a pointwise head, the planner's lean "
                        "network) (default: unet)")
    p.add_argument("--ct-window", type=_hu_window, default=None, metavar="LOW,HIGH",
                   help="clip CT to this HU window, e.g. -160,240 (default: the foreground's 0.5-99.5 percentiles)")


#: The planner's presets and configurations (medseg.planning.options; named here so --help needs no torch).
PRESETS = ("default", "resenc-m", "resenc-l")
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


def _planner_options(p: argparse.ArgumentParser, train: bool) -> None:
    """The planner's options (``medseg plan``; ``medseg train --plan auto``)."""
    when = " (with --plan auto)" if train else ""
    p.add_argument("--memory-gb", type=float, default=None, metavar="G",
                   help=f"memory target of one training iteration in GB{when} (default: the preset's, 8 GB; resenc-l "
                        "24 GB; on the CPU at most half the machine's memory)")
    if not train:
        p.add_argument("--time-budget", type=float, default=None, metavar="HOURS",
                       help="training time to plan for: the width, patch and batch that train long enough in it, "
                            "timed on this machine (default: 1 h with --device cpu, none with --device cuda)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help=f"network preset{when}: plain DynUNet, or residual blocks sized as nnU-Net ResEnc M (8 GB) or "
                        "L (24 GB) (default: default)")
    p.add_argument("--configuration", choices=CONFIGURATIONS, default=None,
                   help=f"configuration to train{when}; 2d of a 3D dataset: a U-Net over single slices along the "
                        "coarsest axis; 3d_cascade_fullres: 3d_fullres fed the label map of a 3d_lowres run too "
                        "(medseg train --previous-stage) (default: 3d_fullres, 2d for 2D data)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"processes reading the cases for the fingerprint{when} (default: the CPU count, at most 4)")
    p.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default=None,
                   help=f"CPU training precision{when}: float32, the forward pass under bfloat16 autocast (about 2.4 x "
                        "faster per iteration on CPUs with AMX: more iterations in the time budget), or auto: bfloat16 "
                        "where a timed iteration is >= 1.25 x faster (default: auto)")


def _add_plan(sub: Subparsers) -> None:
    p = _command(sub, "plan", "plan a bundle for a dataset, nnU-Net style: fingerprint, configurations, network, "
                              "patch and batch for the memory and time you have")
    p.add_argument("--data", required=True, help="dataset.json (MSD or nnU-Net v2 raw layout), or its folder")
    p.add_argument("--out", required=True, help="new bundle folder (configs/plan.json, fingerprint.json, plans.json, ...)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: the device planned for (a CUDA plan can be "
                                                   "made on a machine without one; its memory is then not measured)")
    _planner_options(p, train=False)
    p.add_argument("--preprocess", action="store_true",
                   help="also preprocess fold 0's cases into BUNDLE/preprocessed/ (resampled, normalised, in --workers "
                        "processes), as nnUNetv2_plan_and_preprocess does; else training does it on first use")
    p.set_defaults(func=cmd_plan)


def _add_synth(sub: Subparsers) -> None:
    p = _command(sub, "synth", "write a synthetic CT or MR dataset (MSD or nnU-Net v2 raw layout)")
    p.add_argument("--out", required=True, help="new folder for dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/")
    p.add_argument("--modality", choices=["ct", "mr"], default="ct", type=str.lower, help="imaging modality")
    p.add_argument("--cases", type=int, default=10, help="number of cases (a quarter become test cases)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    p.add_argument("--size", type=int, default=96, help="in-plane matrix size in voxels")
    p.add_argument("--dims", type=int, choices=[2, 3], default=3, help="2D slices or 3D volumes")
    p.add_argument("--channels", type=int, default=1,
                   help="input channels per case: the modality, then further MR contrasts of the same patient "
                        "(T1, T2, FLAIR, PD) on the same grid (at most 4)")
    p.add_argument("--regions", action="store_true",
                   help="nested regions organs > liver > lesion (nnU-Net region-based labels, regions_class_order)")
    p.add_argument("--layout", choices=["msd", "nnunet"], default=None, type=str.lower,
                   help="msd: dataset.json lists the cases; nnunet: nnU-Net v2 raw layout, CASE_0000.nii.gz per channel "
                        "(default: msd for one channel without regions, else nnunet, which those need)")
    p.set_defaults(func=cmd_synth)


def _add_convert_msd(sub: Subparsers) -> None:
    p = _command(sub, "convert-msd", "convert an MSD dataset (multi-channel cases as 4D NIfTI files) to the nnU-Net v2 raw "
                 "layout, one file per channel, as nnUNetv2_convert_MSD_dataset does")
    p.add_argument("--data", required=True, help="the MSD dataset.json, or its folder (only read)")
    p.add_argument("--out", required=True, help="new folder for dataset.json, imagesTr/CASE_0000.nii.gz ..., labelsTr/, "
                   "imagesTs/ (and labelsTs/)")
    p.set_defaults(func=cmd_convert_msd)


def _add_train(sub: Subparsers) -> None:
    p = _command(sub, "train", "train a U-Net (or --network, or the planner's DynUNet with --plan auto) on a dataset "
                 "(the run folder is a MONAI bundle)")
    p.add_argument("--data", required=True, help="dataset.json (MSD or nnU-Net v2 raw layout), or its folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="new run folder (a bundle is written there), or an existing one with --resume")
    where.add_argument("--bundle", help="train an existing bundle in place (from medseg bundle init) with its plan")
    p.add_argument("--init-weights", default=None, metavar="PATH",
                   help="transfer learning: start from the matching tensors of a bundle, run folder or .pt file "
                        "(default: random initialisation)")
    p.add_argument("--previous-stage", default=None, metavar="RUN",
                   help="--configuration 3d_cascade_fullres: the cross-validation run (--fold all) of 3d_lowres whose "
                        "out-of-fold label maps this stage takes as inputs (copied into each fold's previous/) (default: none)")
    p.add_argument("--epochs", type=int, default=100, help="number of epochs")
    p.add_argument("--max-iterations", type=int, default=None, metavar="N",
                   help="stop after N iterations in total, counted across --resume (with --epochs: whichever comes "
                        "first) (default: no limit)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget for the whole run in minutes: data loading, training and the final validation "
                        "(training stops early enough for it; Python start-up, a few seconds, is not counted; a "
                        "sudden slow-down can still overrun it a little) (default: no time limit)")
    p.add_argument("--log-every", type=int, default=10, metavar="N",
                   help="log a progress line (epoch, iteration, loss, elapsed, ETA) every N iterations and at each "
                        "epoch end")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N; with --fold all or a list, several separated by commas (cuda:0,cuda:1; "
                        "cpu,cpu) train the folds in parallel, one process per device (the plan is made for the first)")
    p.add_argument("--fold", default="0",
                   help="validation fold 0-4 of the 5-fold split of the training cases; 'all' or a list such as 0,2 "
                        "trains those folds of one plan into RUN_DIR/fold_K, predicts each fold's held-out cases "
                        "(RUN_DIR/cv/predictions) and writes RUN_DIR/cv_summary.json (--max-minutes: per fold)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument("--val-interval", type=int, default=5, help="validate every N epochs")
    p.add_argument("--seed", type=int, default=0, help="random seed of the split, sampling and initialisation")
    p.add_argument("--batch-size", type=int, default=None, help="patches per iteration (default: the plan's)")
    p.add_argument("--plan", choices=["default", "auto"], default=None,
                   help="plan of a new run: auto (the planner of medseg plan, for --device and the --max-minutes "
                        "budget) or default (a U-Net, or --network, with a patch of at most 64 x 64 x 32) (default: "
                        "auto, or default when --network or --patch-size chooses the network or patch by hand)")
    p.add_argument("--iterations-per-epoch", type=int, default=None, metavar="N",
                   help="fixed epoch length (default: the bundle's train.json: 250 for planned plans, else the "
                        "loader's batches, at least 20)")
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help="track the run in MLflow: a tracking server (http://, https://) or a local folder (path or "
                        "file:// URI; the run goes into FOLDER/mlruns.db); needs pip install 'medseg[mlflow]' "
                        "(default: no tracking)")
    _plan_options(p)
    _planner_options(p, train=True)
    p.set_defaults(func=cmd_train)


def _add_predict(sub: Subparsers) -> None:
    p = _command(sub, "predict", "segment images; label maps in the input's own geometry and format")
    p.add_argument("--model", required=True, help="run folder written by medseg train, or a bundle")
    p.add_argument("--input", required=True,
                   help="an image file or a folder of them (.nii, .nii.gz, .nrrd, .mha, .mhd), a manifest .csv (header "
                        "case,image or case,image_0000,image_0001,...; paths relative to it), or a DICOM folder / DICOMDIR")
    p.add_argument("--output", required=True,
                   help="folder for <case>_seg.<ext> label maps (or the DICOM outputs); each finished case is recorded "
                        "in OUTPUT/.medseg-cases/, so the same command started again skips finished cases")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="predict only share I of N (0 <= I < N) of the cases sorted by name: job arrays, e.g. "
                        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT (default: all; under torchrun, the "
                        "rank's share RANK/WORLD_SIZE)")
    _device(p)
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default: the plan's)")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", action="store_true", default=None,
                     help="test-time mirroring: average each window with its flips along every spatial axis (1 + dims "
                          "passes; a model imported from nnU-Net: its own mirroring, on by default)")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="no test-time mirroring")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: the network under autocast (about 2x faster on AVX-512 BF16 CPUs; check agreement)")
    p.add_argument("--strict", action="store_true",
                   help="refuse (exit 2, nothing written) an input the model does not fit: another modality (DICOM "
                        "Modality, or intensities unlike the training data's) or a voxel spacing more than 2x off the "
                        "model's; without it these are warnings")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--instances", action="store_true",
                   help="also write <case>_instances.<ext>: one id per connected lesion (lesion/tumour labels)")
    p.add_argument("--instance-labels", type=_ints, default=None, metavar="L1,L2",
                   help="labels to split into instances (default: labels named lesion, tumour, ...)")
    p.add_argument("--format", choices=["nifti", "dicom-seg", "rtstruct"], default="nifti",
                   help="DICOM input: <name>_seg.nii.gz in the series geometry (nifti), <name>_seg.dcm "
                        "(DICOM SEG) or <name>_rtstruct.dcm (RT structure set); <name>: series description or UID")
    p.add_argument("--series-uid", default=None, metavar="UID",
                   help="DICOM input: segment the series with this UID (default: the only candidate)")
    p.add_argument("--modality", default=None, type=str.upper, metavar="CT|MR",
                   help="DICOM input: only series of this modality (default: any)")
    p.add_argument("--min-slices", type=int, default=1, metavar="N",
                   help="DICOM input: only series with at least N slices")
    p.add_argument("--series-description", default=None, metavar="REGEX",
                   help="DICOM input: only series whose description matches this regular expression (default: any)")
    p.add_argument("--engine", choices=["serial", "ray"], default="serial",
                   help="serial: one case after the other in this process; ray: a Ray Data job (CPU tasks read and "
                        "check the cases, --workers actors predict them), needs pip install 'medseg[ray]'")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="--engine ray: a running Ray cluster, e.g. auto on one of its nodes or HEAD:6379 (default: "
                        "RAY_ADDRESS, else a local Ray of --workers CPUs plus one)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="--engine ray: predictor actors, each loading the model once (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="--engine ray: GPUs per actor, e.g. 1 or 0.5 (default: 0, CPU; > 0 predicts on cuda)")
    p.set_defaults(func=cmd_predict)


_LABELS_HELP = ("label names: a bundle or run folder, its configs/plan.json, a dataset.json (full, or holding only "
                "\"labels\"; MSD {\"1\": \"liver\"} or nnU-Net {\"liver\": 1}) or a bundle's metadata.json")


def _add_evaluate(sub: Subparsers) -> None:
    p = _command(sub, "evaluate", "Dice, HD95 and more per case and label")
    p.add_argument("--pred", required=True, help="folder of predicted label maps (<case>_seg.<ext> or <case>.<ext>)")
    p.add_argument("--ref", required=True, help="folder of reference label maps (<case>.<ext>)")
    p.add_argument("--labels", default=None, help=_LABELS_HELP + " (default: the values found, named label_<n>)")
    p.add_argument("--label-map", type=_label_mapping, default=None, metavar="PRED=REF,...",
                   help="rename prediction values before comparing, e.g. 6=5,7=5 when the model splits reference "
                        "label 5 in two (default: none)")
    p.add_argument("--out", required=True, help="folder for metrics.csv and summary.json")
    p.add_argument("--nsd-tolerance-mm", type=float, default=1.0, help="normalised surface Dice tolerance (mm)")
    p.add_argument("--lesion-labels", type=_ints, default=None, metavar="L1,L2",
                   help="labels evaluated lesion by lesion into lesions.csv (default: labels named lesion, tumour, ...)")
    p.add_argument("--lesion-min-ml", type=float, default=0.0, help="ignore connected components below this volume")
    p.set_defaults(func=cmd_evaluate)


def _add_select(sub: Subparsers) -> None:
    p = _command(sub, "select", "choose among cross-validation runs on out-of-fold Dice and make the best one's folds "
                 "an ensemble bundle with the postprocessing that helps")
    p.add_argument("runs", nargs="+", metavar="RUN", help="cross-validation run folders (medseg train --fold all), "
                                                          "one per configuration")
    p.set_defaults(func=cmd_select)


def _add_postprocess(sub: Subparsers) -> None:
    p = _command(sub, "postprocess", "keep the largest connected components a rules file names, in every label map of a folder")
    p.add_argument("--pred", required=True, help="folder of predicted label maps (left untouched)")
    p.add_argument("--out", required=True, help="folder for the postprocessed label maps, same names and grids "
                                                "(must not hold files of those names)")
    p.add_argument("--rules", required=True,
                   help="rules file (configs/postprocessing.json of a bundle), or a bundle folder holding one")
    p.set_defaults(func=cmd_postprocess)


def _add_report(sub: Subparsers) -> None:
    p = _command(sub, "report", "volumes, intensity statistics, overlays and an HTML report of predictions")
    p.add_argument("--pred", required=True, help="folder of predicted label maps (<case>_seg.<ext>)")
    p.add_argument("--images", required=True, help="folder of the images (<case>.<ext>)")
    p.add_argument("--out", required=True, help="folder for structures.csv/json, <case>.png and report.html")
    p.add_argument("--labels", default=None, help=_LABELS_HELP + " (default: the values found, named label_<n>)")
    p.add_argument("--modality", choices=["CT", "MR"], type=str.upper, default=None,
                   help="intensity unit and overlay window (default: CT if the image holds values below -500 HU, else MR)")
    p.set_defaults(func=cmd_report)


def _add_inspect(sub: Subparsers) -> None:
    p = _command(sub, "inspect", "list the DICOM series in a folder / DICOMDIR / file: UIDs, geometry, problems")
    p.add_argument("path", help="a folder tree of DICOM files, a DICOMDIR, a DICOM file, or a NIfTI/NRRD/MHA image")
    p.add_argument("--decode", action="store_true", help="also decode every frame and report files that fail")
    p.set_defaults(func=cmd_inspect)


def _add_bundle(sub: Subparsers) -> None:
    p = _command(sub, "bundle", "MONAI bundles: init, run, verify, export, import-nnunet")
    bsub = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    b = _command(bsub, "init", "create a bundle for a dataset (modality, labels, spacing from the data)")
    b.add_argument("--data", required=True, help="dataset.json (MSD or nnU-Net v2 raw layout), or its folder")
    b.add_argument("--out", required=True, help="new bundle folder")
    b.add_argument("--name", default=None, help="bundle name (default: the --out folder's name)")
    b.add_argument("--description", default=None,
                   help="one-sentence description (default: \"<dims>D <U-Net|DynUNet|SegResNet> segmentation bundle "
                        "created by medseg\")")
    b.add_argument("--data-source", default=None,
                   help="what the bundle is trained on, metadata data_source (default: the dataset's name, path and "
                        "number of training cases)")
    _plan_options(b)
    b.set_defaults(func=cmd_bundle_init)
    b = _command(bsub, "run", "run a bundle config (model-zoo layout), safe mode unless --trust")
    b.add_argument("bundle", help="bundle folder")
    b.add_argument("--config", default="inference", help="config name in configs/")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config id, e.g. --set dataset_dir=DATA --set epochs=5 (repeatable)")
    b.add_argument("--trust", action="store_true", help="run configs with $ expressions and any _target_ (untrusted code!)")
    b.set_defaults(func=cmd_bundle_run)
    b = _command(bsub, "verify", "check metadata and network input/output against the configs")
    b.add_argument("bundle", help="bundle folder")
    _device(b)
    b.set_defaults(func=cmd_bundle_verify)
    b = _command(bsub, "export", "export the trained network as TorchScript or ONNX")
    b.add_argument("bundle", help="bundle folder")
    b.add_argument("--format", required=True, choices=["torchscript", "onnx"], help="export format")
    b.add_argument("--out", default=None, help="output file (default: models/model.ts or models/model.onnx)")
    b.set_defaults(func=cmd_bundle_export)
    b = _command(bsub, "import-nnunet", "import an nnU-Net v2 trained-model folder as a medseg bundle")
    b.add_argument("model_dir", metavar="MODEL_DIR", nargs="+",
                   help="nnU-Net results folder TRAINER__PLANS__CONFIGURATION (dataset.json, plans.json, fold_K/); "
                        "several: the parts of one model (TotalSegmentator's layout), merged into one label map")
    b.add_argument("--out", required=True, help="new bundle folder")
    b.add_argument("--configuration", default=None,
                   help="plans configuration, e.g. 3d_fullres or 2d (default: from the folder name)")
    b.add_argument("--folds", default=None, metavar="K,K,...",
                   help="folds to ensemble, e.g. 0,1,2,3,4 (default: every fold_K with the checkpoint)")
    b.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold_K/")
    b.add_argument("--segments", default=None, metavar="CODES.json",
                   help="segment codes for DICOM SEG: {\"liver\": {\"code\": \"10200004\", \"scheme\": \"SCT\", "
                        "\"meaning\": \"Liver\"}} by label name or value (default: medseg's table; others none)")
    b.add_argument("--class-map", default=None, metavar="MAP.json",
                   help="with several MODEL_DIRs: the merged label values by name, {\"1\": \"spleen\", ...} or "
                        "{\"spleen\": 1, ...} (default: numbered in folder order)")
    b.set_defaults(func=cmd_bundle_import_nnunet)


def _add_pacs(sub: Subparsers) -> None:
    p = _command(sub, "pacs", "PACS: segment a study over DICOMweb, or listen for DICOM C-STORE")
    psub = p.add_subparsers(dest="pacs_command", metavar="ACTION", required=True)
    b = _command(psub, "run", "DICOMweb: fetch a study's series (QIDO/WADO-RS), segment, store the SEG (STOW-RS)")
    b.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    b.add_argument("--study", required=True, metavar="STUDY_UID", help="StudyInstanceUID")
    b.add_argument("--model", required=True, help="run folder or bundle")
    b.add_argument("--series", default=None, metavar="SERIES_UID",
                   help="series to segment (default: the study's only image series)")
    b.add_argument("--modality", default=None, help="only consider series of this modality, e.g. CT (default: any)")
    b.add_argument("--username", default=None, help="HTTP basic authentication user (default: none)")
    b.add_argument("--password", default=None,
                   help="HTTP basic authentication password (default: $MEDSEG_PACS_PASSWORD)")
    b.add_argument("--token", default=None, help="bearer token (default: $MEDSEG_PACS_TOKEN)")
    tls = b.add_mutually_exclusive_group()
    tls.add_argument("--no-verify", action="store_true", help="do not verify the server's TLS certificate (unsafe)")
    tls.add_argument("--ca-bundle", default=None, metavar="FILE",
                     help="verify TLS against this CA bundle (PEM; default: the system's)")
    b.add_argument("--output", default=None, metavar="DIR", help="also keep a copy of the SEG in this folder (default: none)")
    _device(b)
    b.set_defaults(func=cmd_pacs_run)
    b = _command(psub, "listen", "DIMSE storage SCP: segment each received series, C-STORE the SEG onward")
    b.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    b.add_argument("--ae-title", required=True, metavar="AET", help="this listener's AE title (the called AE)")
    b.add_argument("--model", required=True, help="run folder or bundle")
    b.add_argument("--forward", required=True, metavar="AET@HOST:PORT", help="where the SEGs are sent by C-STORE")
    b.add_argument("--allow", action="append", default=[], metavar="CALLING_AET",
                   help="accept associations only from this calling AE title (repeatable; default: any)")
    b.add_argument("--storage", default="medseg-listener", metavar="DIR",
                   help="folder for received instances, quarantine, SEGs and journal.sqlite")
    b.add_argument("--idle-seconds", type=float, default=30.0, metavar="N",
                   help="segment a series once every association that delivered to it has ended and no instance "
                        "of it arrived for N seconds; later instances give a revision SEG")
    b.add_argument("--bind", default="0.0.0.0", metavar="ADDRESS", help="address to listen on (0.0.0.0: all)")
    _device(b)
    b.set_defaults(func=cmd_pacs_listen)


def _add_demo(sub: Subparsers) -> None:
    p = _command(sub, "demo", "synthetic CT -> train -> predict -> evaluate, ending with 'mean Dice: ...'")
    p.add_argument("--out", default="medseg-demo", help="demo folder (replaced if it holds an earlier demo)")
    p.add_argument("--epochs", type=int, default=30,
                   help="training epochs at most (250 iterations each with a planned plan, 20 with the default plan)")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="training time budget including the final validation, which the plan is made for; 0: none")
    p.add_argument("--plan", choices=["auto", "default"], default=None,
                   help="auto: the planner chooses network, patch and batch for the device and --minutes; default: "
                        "the fixed small U-Net (default: auto, or default with --minutes 0)")
    p.add_argument("--cases", type=int, default=16, help="number of synthetic cases")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _device(p)
    p.set_defaults(func=cmd_demo)


#: One function per subcommand adds its parser, in the order ``medseg --help`` lists them.
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _add_synth, _add_convert_msd, _add_plan, _add_train, _add_predict, _add_evaluate, _add_select, _add_postprocess,
    _add_report, _add_inspect, _add_bundle, _add_pacs, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``medseg`` argument parser: global options, then one subparser per command (:data:`SUBCOMMANDS`)."""
    parser = argparse.ArgumentParser(prog="medseg", description="Medical-image segmentation with MONAI.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and medseg's debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser
