"""One function per ``medseg`` subcommand: call the library, print what the user asked for.

Heavy modules (torch, MONAI) are imported inside each command, so ``medseg --help`` and
``medseg inspect`` of a DICOM folder start without them.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medseg.inference.cases import Shard


def cmd_synth(args: argparse.Namespace) -> int:
    from medseg.data.synthetic import write_dataset

    path = write_dataset(args.out, modality=args.modality, cases=args.cases, seed=args.seed, size=args.size, dims=args.dims,
                         channels=args.channels, regions=args.regions, layout=args.layout)
    print(path)
    return 0


def cmd_convert_msd(args: argparse.Namespace) -> int:
    from medseg.data.msd import convert_msd

    result = convert_msd(args.data, args.out)
    print(result.dataset_json)
    return 0


def _train_options(args: argparse.Namespace):
    from medseg.architectures import NetworkSpec
    from medseg.engines.options import TrainOptions
    from medseg.errors import InputError

    opts = TrainOptions(epochs=args.epochs, max_minutes=args.max_minutes, device=args.device, fold=_single_fold(args.fold),
                        resume=args.resume, val_interval=args.val_interval, seed=args.seed,
                        target_spacing=args.spacing, patch_size=args.patch_size, ct_window=args.ct_window,
                        init_weights=args.init_weights, max_iterations=args.max_iterations,
                        log_every=args.log_every, iterations_per_epoch=args.iterations_per_epoch,
                        mlflow_uri=args.mlflow, previous_stage=args.previous_stage)
    if args.network is not None:
        if args.bundle or args.resume:
            raise InputError(args.bundle or args.out, "--network chooses the network of a new plan; this run's "
                             "configs/plan.json already names its network")
        opts.network = NetworkSpec(args.network)
    if args.batch_size is not None:  # 0 or less is refused by the option checks, never ignored
        opts.batch_size = args.batch_size
    return opts


def _planner_options(args: argparse.Namespace):
    """The planner's options from ``medseg plan`` or ``medseg train --plan auto``."""
    from medseg.planning import PlannerOptions, default_workers

    return PlannerOptions(device=args.device, memory_gb=args.memory_gb,
                          time_budget_hours=getattr(args, "time_budget", None), preset=args.preset or "default",
                          configuration=args.configuration, precision=args.precision or "auto",
                          workers=args.workers if args.workers is not None else default_workers())


def cmd_plan(args: argparse.Namespace) -> int:
    from medseg.bundle.planned import plan_bundle_for

    result = plan_bundle_for(args.data, args.out, _planner_options(args), preprocess=args.preprocess)
    for line in result.summary():
        print(line)
    print(args.out)
    return 0


def train_plan_choice(args: argparse.Namespace) -> str:
    """``--plan`` of ``medseg train``: as given; else ``default`` for an existing bundle, a resumed run or a
    network or patch chosen by hand (``--network``, ``--patch-size``), ``auto`` (the planner) otherwise."""
    if args.plan is not None:
        return str(args.plan)
    by_hand = args.network is not None or args.patch_size is not None
    return "default" if by_hand or args.bundle or args.resume else "auto"


def _train_planner(args: argparse.Namespace):
    """``--plan auto``: the planner's options; ``--plan default``: None (the planner's options refused)."""
    from medseg.errors import InputError

    given = [flag for flag, value in (("--memory-gb", args.memory_gb), ("--preset", args.preset),
                                      ("--configuration", args.configuration), ("--workers", args.workers))
             if value is not None]
    if train_plan_choice(args) != "auto":
        if given:
            raise InputError(None, f"{given[0]} is an option of the planner: add --plan auto")
        return None
    if args.network is not None:
        raise InputError(None, "--network: with --plan auto the planner chooses the network (a DynUNet); leave it "
                         "out or use --plan default")
    return _planner_options(args)


def _single_fold(text: str) -> int:
    """``--fold`` of a single run (``0``-``4``); 0 for ``all`` or a list (each fold gets its own number)."""
    return int(text) if text.strip().isdigit() else 0


def _cross_validation(args: argparse.Namespace) -> int:
    """``medseg train --fold all`` (or a list): :func:`medseg.bundle.crossval.train_folds`."""
    from medseg.bundle.crossval import parse_folds, train_folds
    from medseg.errors import InputError

    folds = parse_folds(args.fold)
    if args.bundle:
        raise InputError(args.bundle, "--fold all trains one bundle per fold into a new --out folder, not --bundle")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(None, "--fold all starts its own processes (--device cuda:0,cuda:1: folds in parallel); "
                               "under torchrun train one --fold at a time")
    devices = [device.strip() for device in args.device.split(",")]
    args.device = devices[0]  # the plan is made for the first device; each fold trains on the one it is given
    summary = train_folds(args.data, args.out, folds, _train_options(args), planner=_train_planner(args),
                          devices=devices)
    for fold, entry in summary["folds"].items():
        print(f"fold {fold}: {entry['cases']} held-out case(s), mean Dice {entry['mean_dice']}")
    overall = summary["overall"]
    print(f"cross-validation ({overall['cases']} out-of-fold cases): mean Dice {overall['mean_dice']}  "
          f"-> {os.path.join(args.out, 'cv_summary.json')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from medseg.bundle.training import train  # writes the bundle, then runs its configs/train.json
    from medseg.engines.distributed import is_main_process
    from medseg.errors import InputError

    if not args.fold.strip().isdigit():
        return _cross_validation(args)
    if not 0 <= int(args.fold) < 5:
        raise InputError(None, f"--fold must be between 0 and 4, got {args.fold}")
    if "," in args.device:
        raise InputError(None, f"--device {args.device}: several devices train the folds of --fold all (or a list) in "
                               "parallel; one fold trains on one device (several processes: torchrun)")
    target = args.bundle or args.out
    planner = _train_planner(args)
    summary = train(args.data, target, _train_options(args), bundle=bool(args.bundle), planner=planner)
    if not is_main_process():  # torchrun: one line for the run, from the main process
        return 0
    best = summary["best_val_mean_dice"]
    print(f"model: {os.path.join(target, 'models', 'model.pt')}  best validation mean Dice: "
          f"{'n/a' if best is None else f'{best:.3f}'}")
    return 0


def _predict_shard(text: str | None, device: str) -> tuple[Shard | None, str]:
    """``--shard`` as a :class:`Shard`; without it, under ``torchrun`` (``WORLD_SIZE`` > 1), the rank's share
    ``RANK/WORLD_SIZE`` and, for ``--device cuda``, the rank's own GPU ``cuda:LOCAL_RANK``."""
    from medseg.inference.cases import Shard, parse_shard

    if text is not None:
        return parse_shard(text), device
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None, device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    return Shard(rank, world), (f"cuda:{local}" if device == "cuda" else device)


def _predict_engine(args: argparse.Namespace) -> Callable[..., list[Path]]:
    """``medseg predict``'s function of image files for ``--engine``: the serial one, or Ray Data's with
    ``--ray-address``, ``--workers`` and ``--gpus-per-worker`` (the same arguments)."""
    from medseg.bundle.pipeline import predict
    from medseg.errors import InputError
    from medseg.io.dicom import is_dicom_input

    if args.engine == "serial":
        given = [flag for flag, value, default in (("--ray-address", args.ray_address, None), ("--workers", args.workers, 1),
                                                   ("--gpus-per-worker", args.gpus_per_worker, 0.0)) if value != default]
        if given:
            raise InputError(None, f"{', '.join(given)} needs --engine ray")
        return predict
    from medseg.bundle.ray_predict import predict_ray
    from medseg.inference.ray_engine import RayOptions

    if is_dicom_input(args.input):
        raise InputError(args.input, "--engine ray needs image files or a manifest as --input, not a DICOM series")
    return functools.partial(predict_ray, ray_options=RayOptions(address=args.ray_address, workers=args.workers,
                                                                 gpus_per_worker=args.gpus_per_worker))


def cmd_predict(args: argparse.Namespace) -> int:
    from medseg.bundle.pipeline import InferenceOptions, predict_dicom
    from medseg.errors import InputError
    from medseg.io.dicom import is_dicom_input

    predict = _predict_engine(args)
    shard, device = _predict_shard(args.shard, args.device)
    options = InferenceOptions(device=device, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                               tta=args.tta, precision=args.precision)
    selection = {"--series-uid": args.series_uid, "--modality": args.modality,
                 "--series-description": args.series_description,
                 "--min-slices": args.min_slices if args.min_slices != 1 else None}
    if is_dicom_input(args.input):
        if shard is not None:
            raise InputError(args.input, f"--shard {shard} (or torchrun's ranks) needs image files or a manifest as "
                                         "--input, not a DICOM series")
        if args.instances or args.instance_labels is not None:
            raise InputError(args.input, "--instances is not supported for DICOM input")
        outputs = predict_dicom(args.model, args.input, args.output, options, fmt=args.format,
                                series_uid=args.series_uid, modality=args.modality, min_slices=args.min_slices,
                                description=args.series_description, overwrite=args.overwrite, strict=args.strict)
    else:
        given = [flag for flag, value in selection.items() if value is not None]
        if args.format != "nifti" or given:
            what = f"--format {args.format}" if args.format != "nifti" else ", ".join(given)
            raise InputError(args.input, f"{what} needs a DICOM folder or file as --input")
        outputs = predict(args.model, args.input, args.output, options, overwrite=args.overwrite,
                          instances=args.instances or args.instance_labels is not None,
                          instance_labels=args.instance_labels, strict=args.strict, shard=shard)
    for path in outputs:
        print(path)
    return 0


def _labels_from(path: str | None) -> dict[int, str] | None:
    """Label names from ``--labels`` (any source :func:`medseg.labels.read_label_names` reads)."""
    if path is None:
        return None
    from medseg.labels import read_label_names

    return read_label_names(path)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.errors import InputError
    from medseg.reports.evaluation import evaluate_folders

    if not 0 <= args.nsd_tolerance_mm < float("inf"):
        raise InputError(None, f"--nsd-tolerance-mm must be a finite value >= 0, got {args.nsd_tolerance_mm}")
    if not 0 <= args.lesion_min_ml < float("inf"):
        raise InputError(None, f"--lesion-min-ml must be a finite value >= 0, got {args.lesion_min_ml}")
    summary = evaluate_folders(args.pred, args.ref, args.out, labels=_labels_from(args.labels),
                               nsd_tolerance_mm=args.nsd_tolerance_mm, lesion_labels=args.lesion_labels,
                               lesion_min_volume_ml=args.lesion_min_ml, label_map=args.label_map)
    for number, entry in summary["labels"].items():
        dice = entry["dice"]["mean"]
        print(f"{number:>4} {entry['name']:<20} Dice {'n/a' if dice is None else f'{dice:.3f}'}")
    for number, entry in summary.get("lesions", {}).items():
        f1, ldice = entry["f1"]["mean"], entry["lesion_dice"]["mean"]
        print(f"{number:>4} {entry['name']:<20} lesions TP {entry['tp']} FP {entry['fp']} FN {entry['fn']}  "
              f"F1 {f1:.3f}  lesion-wise Dice {ldice:.3f}")
    mean = summary["mean_dice_foreground"]
    print(f"mean Dice: {'n/a' if mean is None else f'{mean:.3f}'}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from medseg.bundle.selection import select_runs

    selection = select_runs(args.runs)
    for run in selection["runs"]:
        print(f"{run['run']}: {run['configuration']}, folds {run['folds']}, out-of-fold mean Dice {run['oof_mean_dice']}")
    for pair in selection.get("pairs", []):
        print(f"{' + '.join(pair['runs'])}: out-of-fold mean Dice {pair['oof_mean_dice']:.5f}")
    chosen = selection["chosen"]
    what = (f"ensemble of {' and '.join(chosen['members'])}, folds {chosen['folds']} each" if chosen.get("members")
            else f"ensemble of folds {chosen['folds']}")
    print(f"chosen: {chosen['run']} ({what}; postprocessing: {chosen['postprocessing']}; "
          f"out-of-fold mean Dice {chosen['oof_mean_dice_postprocessed']}); predict with medseg predict --model "
          f"{chosen['run']}")
    return 0


def cmd_postprocess(args: argparse.Namespace) -> int:
    from medseg.inference.postprocess import postprocess_folder, read_rules
    from medseg.layout import POSTPROCESSING_FILE

    rules_path = Path(args.rules)
    if rules_path.is_dir():  # a bundle: its configs/postprocessing.json
        rules_path = rules_path / POSTPROCESSING_FILE
    rules = read_rules(rules_path)
    written = postprocess_folder(args.pred, args.out, rules)
    what = ", ".join(filter(None, ["largest component of the foreground" if rules.foreground_largest_component else "",
                                   *(f"largest component of label {v}" for v in rules.largest_component_labels)]))
    print(f"{len(written)} label map(s) -> {args.out} ({what or 'no change: the rules keep no step'})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from medseg.reports import build_report

    build_report(args.pred, args.images, args.out, labels=_labels_from(args.labels), modality=args.modality)
    print(os.path.join(args.out, "report.html"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from medseg.errors import DicomError

    if os.path.isfile(args.path):  # NIfTI / NRRD / MetaImage: its grid (medseg.io.image: no torch or MONAI)
        from medseg.io.image import image_suffix, read_geometry

        if image_suffix(args.path):
            geometry = read_geometry(args.path)
            print(f"{args.path}: {geometry.dims}D image, size {' x '.join(map(str, geometry.size))}, spacing "
                  f"{' x '.join(f'{s:.6g}' for s in geometry.spacing)} mm, origin "
                  f"({', '.join(f'{o:.6g}' for o in geometry.origin)}) mm (LPS), direction "
                  f"({', '.join(f'{d:.6g}' for d in geometry.direction)})")
            return 0
    from medseg.io.dicom import inspect_lines, scan_dicom  # DICOM headers: pydicom only, no torch or MONAI

    scan = scan_dicom(args.path)
    lines, failures = inspect_lines(scan, decode=args.decode)
    print("\n".join(lines))
    if failures:
        raise DicomError(args.path, f"{failures} file(s) could not be decoded (listed above)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medseg.demo import run_demo

    result = run_demo(args.out, minutes=args.minutes, cases=args.cases, seed=args.seed, device=args.device,
                      epochs=args.epochs, plan=args.plan)
    print(f"mean Dice: {result['mean_dice']:.3f}")
    return 0


def cmd_bundle_init(args: argparse.Namespace) -> int:
    from medseg.architectures import NetworkSpec
    from medseg.bundle.create import init_bundle

    bundle, _, _ = init_bundle(args.data, args.out, args.spacing, args.patch_size, ct_window=args.ct_window,
                               network=NetworkSpec(args.network) if args.network else None, name=args.name,
                               description=args.description, data_source=args.data_source)
    print(bundle)
    return 0


def cmd_bundle_run(args: argparse.Namespace) -> int:
    from medseg.bundle.runner import parse_overrides, run_bundle

    run_bundle(args.bundle, args.config, parse_overrides(args.set), trust=args.trust)
    return 0


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    from medseg.bundle.verify import verify_bundle

    for line in verify_bundle(args.bundle, device=args.device):
        print(line)
    print(f"{args.bundle}: verified")
    return 0


def cmd_bundle_export(args: argparse.Namespace) -> int:
    from medseg.bundle.export import export_bundle

    print(export_bundle(args.bundle, args.format, args.out))
    return 0


def cmd_bundle_import_nnunet(args: argparse.Namespace) -> int:
    from medseg.bundle.nnunet_import import import_nnunet
    from medseg.errors import InputError

    folds = None
    if args.folds is not None:
        try:
            folds = [int(f) for f in args.folds.split(",") if f.strip()]
        except ValueError:
            raise InputError(None, f"--folds must be fold numbers separated by commas, got {args.folds!r}") from None
    print(import_nnunet(args.model_dir, args.out, configuration=args.configuration, folds=folds,
                        checkpoint=args.checkpoint, segments=args.segments, class_map=args.class_map))
    return 0


def cmd_pacs_run(args: argparse.Namespace) -> int:
    from medseg.pacs.dicomweb import make_session, run_study

    password, token = args.password, args.token
    if password is None and args.username is not None:
        password = os.environ.get("MEDSEG_PACS_PASSWORD")
    if token is None and args.username is None:
        token = os.environ.get("MEDSEG_PACS_TOKEN")
    session = make_session(username=args.username, password=password, token=token, verify=not args.no_verify,
                           ca_bundle=args.ca_bundle)
    result = run_study(args.url, args.study, args.model, series_uid=args.series, modality=args.modality,
                       session=session, output=args.output, device=args.device)
    print(f"SOPInstanceUID={result.seg_sop_instance_uid}")
    print(f"SeriesInstanceUID={result.seg_series_instance_uid}")
    if result.seg_copy is not None:
        print(result.seg_copy)
    return 0


def cmd_pacs_listen(args: argparse.Namespace) -> int:
    from medseg.errors import InputError
    from medseg.pacs.listener import Destination, Listener, ListenerConfig

    if not 0 < args.port < 65536:
        raise InputError(None, f"--port {args.port}: expected 1-65535")
    if not 0 <= args.idle_seconds < float("inf"):
        raise InputError(None, f"--idle-seconds must be a finite value >= 0, got {args.idle_seconds}")
    config = ListenerConfig(port=args.port, ae_title=args.ae_title, model=args.model,
                            forward=Destination.parse(args.forward), allow=tuple(args.allow),
                            storage=args.storage, idle_seconds=args.idle_seconds, bind=args.bind, device=args.device)
    Listener(config).serve_forever()
    return 0
