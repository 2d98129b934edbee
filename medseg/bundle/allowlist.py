"""The safe-mode allow list: every class and function a bundle config may name with ``_target_``.

Each entry was reviewed for what it reads, writes, imports and executes when MONAI instantiates or
calls it with arguments from an untrusted config, and records that review in ``review``. Arguments that
name files or folders are listed (``writes``/``reads``/``data``) and confined by
:mod:`medseg.bundle.confinement` to the bundle and the folders the user named; arguments that become
part of a file name are listed in ``names`` (one path component, no separators); arguments that would
import or run something named by a string are pinned to literal values in ``fixed``.

Anything not listed here is refused in safe mode. To add a target: read its source (and that of what it
passes its arguments on to), classify every argument, write the review note, and run
``tests/unit/test_bundle_allowlist.py``, which fails for an entry whose file-like arguments are not classified.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Vetted:
    """One reviewed ``_target_``.

    Attributes
    ----------
    name
        Public dotted name; the object it resolves to is what is allowed (any spelling MONAI resolves
        to the same object is accepted).
    review
        What it reads, writes, imports and executes, and why that is safe with the rules below.
    writes, reads, data
        Arguments naming files or folders it writes, files it loads (weights, plans) and data it reads;
        each must resolve inside the bundle or a folder the user named on the command line.
    names
        Arguments that become part of a file name: a single path component (no ``/``, ``\\``, ``..``).
    fixed
        Arguments restricted to these literal values (e.g. a reader named by a string, which MONAI would
        otherwise import from any module).
    extra
        Keyword arguments taken through ``**kwargs`` that were reviewed; ``("*",)``: any (the target
        forwards them to reviewed numeric code only).
    reviewed
        Arguments whose names look file- or import-related but were checked and are neither.
    path_result
        A factory whose result is a path under its ``writes``/``reads``/``data`` arguments and ``names``
        (e.g. ``bundle_path``); where it is passed to a file argument it is confined like a literal.
    """

    name: str
    review: str
    writes: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    fixed: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    reviewed: tuple[str, ...] = ()
    path_result: bool = False

    @property
    def paths(self) -> tuple[str, ...]:
        """Every argument that names a file or folder."""
        return self.writes + self.reads + self.data


_PURE_TRANSFORM = ("array/tensor computation on the data dictionary in memory; reads and writes no files, "
                   "imports nothing by name, runs no code given as text")
_PURE_NETWORK = ("torch.nn.Module built from numeric hyper-parameters and layer names (norm_name, act_name) looked up "
                 "in MONAI's fixed layer factories (Norm/Act/Dropout/Conv, a KeyError for unknown names, nothing "
                 "imported); no pretrained weights downloaded or read, no file access")
_PURE_LOSS = "tensor loss computed in memory from numeric options; no file access, nothing imported by name"
_PURE_METRIC = "metric accumulated in memory from predictions and labels; no file access, nothing imported by name"
_OPTIMIZER = ("optimiser or learning-rate schedule over the parameters it is given; numeric options only, "
              "no file access")
_NO_COMPILE = {"compile": (False,), "compile_kwargs": (None,)}
_ENGINE = ("Ignite engine loop over a data loader calling the network, inferer, handlers and post-processing "
           "it is given (all vetted config items); no file access of its own (a literal list as data loader is "
           "confined like a data list). torch.compile is pinned off (its options reach the inductor code generator)")
_READERS = (None, "NibabelReader", "ITKReader", "PydicomReader", "NrrdReader", "PILReader", "NumpyReader")
_WRITERS = (None, "NibabelWriter", "ITKWriter", "PILWriter")
_LOADER_KWARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn", "pin_memory", "drop_last",
                  "timeout", "worker_init_fn", "multiprocessing_context", "generator", "prefetch_factor",
                  "persistent_workers", "pin_memory_device", "in_order")
_READER_KWARGS = ("channel_dim", "as_closest_canonical", "squeeze_non_spatial_dims", "series_name",
                  "reverse_indexing", "series_meta", "affine_lps_to_ras", "mmap", "to_gpu", "npz_keys")

_C = "medseg.bundle.components"
_I = "medseg.inference.compose"

ALLOWED_TARGETS: tuple[Vetted, ...] = (
    # --- medseg's own factories (what medseg bundles name) ----------------------------------------
    Vetted(f"{_C}.load_plan", "reads configs/plan.json under bundle_root with json.loads and validates it; "
                              "no writes, no imports", reads=("bundle_root",)),
    Vetted(f"{_C}.bundle_path", "joins bundle_root and the path parts into a string; touches no file",
           reads=("bundle_root",), names=("parts",), path_result=True),
    Vetted(f"{_C}.load_weights", "reads a state dict with torch.load(weights_only=True) (pickled code refused) "
                                 "into the given network; no writes", reads=("path",)),
    Vetted(f"{_C}.fold_ensemble", "reads configs/plan.json and models/model.pt of the fold_K folders (K: integers "
                                  "0-4) under bundle_root, the weights with torch.load(weights_only=True), into "
                                  "networks built from the plan; no writes", reads=("bundle_root",)),
    Vetted(f"{_C}.postprocessing_rules", "reads configs/postprocessing.json under bundle_root with json.loads and "
                                         "checks every key and value (largest-component steps only); no writes",
           reads=("bundle_root",)),
    Vetted(f"{_C}.image_list", "lists image files (by ending) in dataset_dir/subdir, grouped into cases by "
                               "their channel suffix for a plan of several channels; reads no file contents, "
                               "writes nothing", data=("dataset_dir",), names=("subdir",), path_result=True),
    Vetted(f"{_C}.labels_folder", "joins dataset_dir and subdir and checks that the folder exists; reads no "
                                  "file contents, writes nothing", data=("dataset_dir",), names=("subdir",),
           path_result=True),
    Vetted(f"{_I}.sliding_window_inferer", "builds medseg's SlabInferer from numeric options; no file access "
                                           "(large probability maps go to an unlinked temporary file)"),
    Vetted(f"{_I}.inference_postprocessing", "inverts the preprocessing in memory, applies the largest-component "
                                             "rules object it may be given (no file access), and writes one label map "
                                             "per input as <case>_seg.<ending> (name from the input file's stem) "
                                             "into output_dir, refusing an existing file unless overwrite is "
                                             "true", writes=("output_dir",)),
    Vetted("medseg.bundle.nnunet.nnunet_network",
           "reads configs/nnunet.json under bundle_root (json.loads, checked), builds nnU-Net's PlainConvUNet or "
           "ResidualEncoderUNet from an allow-list of class and layer names (nothing imported by a name the file "
           "gives) and reads models/fold_K.pt there with torch.load(weights_only=True); no writes",
           reads=("bundle_root",)),
    Vetted("medseg.bundle.nnunet.nnunet_preprocessing",
           "reads configs/nnunet.json under bundle_root (json.loads, checked); returns a MONAI transform chain "
           "(medseg's fixed readers, then nnU-Net's crop, normalisation and resampling in memory); no writes",
           reads=("bundle_root",)),
    Vetted("medseg.bundle.nnunet.nnunet_postprocessing",
           "reads configs/nnunet.json under bundle_root (json.loads, checked); exports the probabilities to a label "
           "map in memory and writes one label map per input as <case>_seg.<ending> into output_dir, refusing an "
           "existing file unless overwrite is true", reads=("bundle_root",), writes=("output_dir",)),
    Vetted("medseg.bundle.nnunet_parts.nnunet_parts_network",
           "reads configs/nnunet.json under bundle_root (json.loads, checked), builds each part's nnU-Net networks "
           "from the same allow-list as nnunet_network and reads models/part_P/fold_K.pt there with "
           "torch.load(weights_only=True); no writes", reads=("bundle_root",)),
    Vetted("medseg.bundle.nnunet_parts.nnunet_parts_preprocessing",
           "reads configs/nnunet.json under bundle_root (json.loads, checked); returns medseg's fixed readers; "
           "no writes", reads=("bundle_root",)),
    Vetted("medseg.bundle.nnunet_parts.nnunet_parts_inferer",
           "reads configs/nnunet.json under bundle_root (json.loads, checked); builds one SlabInferer and nnU-Net's "
           "preprocessing and export (in memory) per part, from numeric options; no writes", reads=("bundle_root",)),
    Vetted("medseg.bundle.nnunet_parts.nnunet_parts_postprocessing",
           "writes the merged label map of each input as <case>_seg.<ending> into output_dir, refusing an existing "
           "file unless overwrite is true; reads nothing", writes=("output_dir",)),
    Vetted(f"{_C}.run_engine", "calls engine.run() on an already vetted engine; nothing else"),
    Vetted(f"{_C}.score_predictions", "reads the label maps in predictions_dir and labels_dir (paired by case "
                                      "name) and writes metrics.csv, summary.json, lesions.csv and "
                                      "dice_boxplot.png into output_dir; nothing imported or run by name",
           data=("predictions_dir", "labels_dir"), writes=("output_dir",)),
    Vetted(f"{_C}.evaluate_bundle", "predicts dataset_dir's test images with the bundle's own inference.json "
                                    "(checked in safe mode; weights_only) and writes predictions, metrics.csv and "
                                    "summary.json into output_dir", reads=("bundle_root",), data=("dataset_dir",),
           writes=("output_dir",)),
    Vetted("medseg.networks.build_network", "MONAI network from the plan's numeric network spec; no file access",
           reviewed=()),
    Vetted("medseg.transforms.preprocessing", "MONAI transform chain (LoadImaged with medseg's fixed readers, "
                                              "spacing, orientation, intensity) from the plan; no file access "
                                              "when built"),
    Vetted("medseg.plan.NetworkSpec", "dataclass of numeric network hyper-parameters; no file access; name picks "
                                      "one of medseg's fixed architectures", reviewed=("name",)),
    # --- medseg's training (configs/train.json) ---------------------------------------------------
    Vetted("medseg.engines.options.TrainOptions", "dataclass of training options (numbers, flags, the device name); "
                                                  "holds init_weights as a path that InitialWeights reads; no "
                                                  "file access", reads=("init_weights",)),
    Vetted("medseg.engines.options.check_options", "checks the option values and that the device exists; no file "
                                                   "access, nothing imported"),
    Vetted("medseg.bundle.training.check_trainable", "reads configs/metadata.json under bundle_root with json.loads "
                                                     "and checks its version and changelog; no writes",
           reads=("bundle_root",)),
    Vetted("medseg.bundle.training.record_training_run",
           "reads train_summary.json, configs/plan.json and configs/metadata.json under bundle_root (json.loads) "
           "and rewrites configs/metadata.json and docs/README.md there (atomically); nothing else",
           writes=("bundle_root",)),
    Vetted("medseg.engines.progress.Pace", "a clock timing the run in memory (clock: a callable returning seconds, "
                                           "which a config can only fill with a vetted item); no file access"),
    Vetted("medseg.engines.data.training_datalist", "reads dataset_dir's dataset.json (or imagesTr/ + labelsTr/) and "
                                                    "the headers of the images it names, to check them; no writes",
           data=("dataset_dir",)),
    Vetted("medseg.engines.data.training_split", "splits the checked cases into training and validation; with "
                                                 "resume reads split.json under bundle_root (json.loads); no writes",
           reads=("bundle_root",)),
    Vetted("medseg.engines.data.case_items", "lists the image and label file names of the split's cases (from the "
                                             "dataset training_datalist checked) as a data list; with previous (a "
                                             "cascade stage) lists the label-map file names in that folder; no writes",
           reads=("previous",), fixed={"part": ("training", "validation")}),
    Vetted("medseg.engines.data.training_transforms", "MONAI transform chain (medseg's preprocessing and "
                                                      "augmentation presets) from the plan; no file access when built"),
    Vetted("medseg.engines.data.drop_last", "compares the dataset's length with the batch size; nothing else"),
    Vetted("medseg.engines.data.epoch_length", "the loader's length, a minimum, a fixed length and the resumed "
                                               "run's epoch length; no file access"),
    Vetted("medseg.engines.data.preprocessed_dataset",
           "MONAI PersistentDataset over the data list with vetted transforms: writes each case's deterministic "
           "transform result as <hash>.pt (torch.save, via a temporary folder) under cache_dir/<plan key>/<part>/ "
           "and reads such files back with torch.load(weights_only=True) (pickled code refused); the data list's "
           "files are read by the vetted transforms", writes=("cache_dir",), data=("data",),
           fixed={"part": ("training", "validation")}),
    Vetted("medseg.engines.data.worker_count", "counts the CPU cores this process may use; nothing else"),
    Vetted("medseg.engines.data.has_workers", "compares a worker count with 0; nothing else"),
    Vetted("medseg.engines.loss.segmentation_loss", _PURE_LOSS + " (Dice + cross-entropy of the plan's outputs, "
                                                                 "deep supervision, ignore label)"),
    Vetted("medseg.engines.parts.validation_postprocessing", "MONAI transform chain turning a validation case's "
                                                             "prediction and label into one-hot label maps of the "
                                                             "plan's classes in memory; no file access"),
    Vetted("medseg.engines.parts.mixed_precision", "tells whether a device name is a CUDA device; nothing else"),
    Vetted("medseg.engines.parts.training_inferer", "returns MONAI's SimpleInferer, or one running the forward pass "
                                                    "under bfloat16 autocast on the CPU, as the plan's precision says; "
                                                    "no file access"),
    Vetted("medseg.engines.parts.GradientClipping", "Ignite handler clipping the gradient norm of the trainer's "
                                                    "optimiser after each backward pass in memory; no file access"),
    Vetted("medseg.engines.tracking.MLflowTracking",
           "Ignite handler, inactive when tracking_uri is null; else MONAI's MLFlowHandler logging the plan's "
           "parameters, the epoch losses and the validation Dice: for a local folder into tracking_uri/mlruns.db "
           "(SQLite) and tracking_uri/mlruns/ (confined like any written folder), for an http(s) URI to that "
           "tracking server over the network (numbers and plan fields only: no images, no file contents); other "
           "URI schemes refused; bundle_root only names the run; experiment_name is an MLflow name, no path",
           writes=("tracking_uri",), reviewed=("bundle_root", "experiment_name")),
    Vetted("medseg.engines.weights.InitialWeights", "reads one state dict with torch.load(weights_only=True) "
                                                    "(pickled code and TorchScript refused); no writes",
           reads=("path",)),
    Vetted("medseg.engines.weights.initial_network", "moves the network to the device and copies matching tensors "
                                                     "of already read InitialWeights into it; no file access"),
    Vetted("medseg.engines.weights.resume_point", "with resume, reads checkpoints/last.pt under bundle_root with "
                                                  "torch.load(weights_only=True) into network, optimiser and "
                                                  "schedule; no writes", reads=("bundle_root",)),
    Vetted("medseg.engines.parts.parameters", "returns the network's parameters as a list; nothing else"),
    Vetted("medseg.engines.parts.poly_lr_schedule", _OPTIMIZER),
    Vetted("medseg.engines.parts.plan_value", "returns one attribute of the plan, pinned to numeric ones (a free "
                                              "name could return a method such as Plan.save)",
           fixed={"field": ("patch_size", "window_size", "sw_batch_size", "num_classes", "batch_size")}),
    Vetted("medseg.engines.records.RunRecorder",
           "Ignite handler writing checkpoints/last.pt, models/model.pt (torch.save of state dicts), history.json "
           "and curves.png under bundle_root, each atomically; with resume reads history.json there",
           writes=("bundle_root",)),
    Vetted("medseg.engines.progress.ProgressLogger", "Ignite handler logging progress and validations through the "
                                                     "standard logging module (and a tqdm bar on a terminal); no "
                                                     "file access"),
    Vetted("medseg.engines.budget.RunBudget", "Ignite handler stopping the trainer at an iteration count or a time "
                                              "budget (probing one validation case in memory); no file access"),
    Vetted("medseg.engines.tensorboard.TensorBoardLog",
           "makes MONAI's TensorBoardStatsHandler writing TensorBoard event files (fixed names) into log_dir when "
           "the engine starts; output_transform is a callable, which can only be a vetted config item",
           writes=("log_dir",), reviewed=("tag_name",)),
    Vetted("medseg.engines.training.run_training",
           "runs the vetted trainer and evaluator, writes split.json, train_summary.json and (without a validated "
           "model) models/model.pt under bundle_root atomically; on an early failure removes only what it created "
           "there", writes=("bundle_root",)),
    # --- training on several processes (configs/multi_gpu_train.json) --------------------------------
    Vetted("medseg.engines.distributed.init_distributed",
           "joins the torch.distributed process group torchrun describes in the environment (backend fixed: gloo "
           "on the CPU, nccl on CUDA; the rendezvous address comes from the environment, not the config); no "
           "file access, nothing imported by name", reviewed=("timeout_minutes",)),
    Vetted("medseg.engines.distributed.close_distributed", "waits for the other processes and leaves the process "
                                                          "group; nothing else"),
    Vetted("medseg.engines.distributed.rank_device", "maps a device name to this process's device (cuda:LOCAL_RANK); "
                                                    "nothing else"),
    Vetted("medseg.engines.distributed.rank_seed", "adds the process's rank to a seed; nothing else"),
    Vetted("medseg.engines.distributed.data_parallel", "wraps the network in torch's DistributedDataParallel "
                                                      "(gradients averaged over the processes in memory); no file "
                                                      "access"),
    Vetted("medseg.engines.distributed.training_sampler", "sampler giving this process its share of the dataset's "
                                                         "indices, reshuffled each pass; no file access"),
    Vetted("medseg.engines.distributed.validation_sampler", "MONAI DistributedSampler over the validation "
                                                           "indices, in order; no file access"),
    Vetted("medseg.engines.distributed.ReplicaCheck", "Ignite handler comparing a SHA-256 of the network's weights "
                                                     "across the processes after each epoch (all_gather_object of "
                                                     "the hex strings) and stopping training if they differ; no "
                                                     "file access"),
    Vetted("monai.utils.set_determinism", "seeds the random generators of Python, NumPy, torch and MONAI; "
                                          "additional_settings (functions called with the seed) pinned to null",
           fixed={"additional_settings": (None,)}),
    # --- networks ------------------------------------------------------------------------------
    *(Vetted(f"monai.networks.nets.{n}", _PURE_NETWORK) for n in (
        "UNet", "BasicUNet", "BasicUNetPlusPlus", "SegResNetDS", "AttentionUnet", "VNet", "HighResNet")),
    Vetted("monai.networks.nets.DynUNet", _PURE_NETWORK, reviewed=("norm_name", "act_name")),
    Vetted("monai.networks.nets.SegResNet", _PURE_NETWORK, reviewed=("norm_name",)),
    Vetted("monai.networks.nets.UNETR", _PURE_NETWORK + "; save_attn keeps attention maps in memory",
           reviewed=("save_attn", "norm_name")),
    Vetted("monai.networks.nets.SwinUNETR", _PURE_NETWORK + "; use_checkpoint is gradient checkpointing (memory), "
                                                            "hyena_l_cache a sequence length, dropout_path_rate "
                                                            "stochastic depth: none is a file",
           reviewed=("use_checkpoint", "hyena_l_cache", "dropout_path_rate", "norm_name")),
    Vetted("torch.nn.Identity", "returns its input; ignores its arguments", extra=("*",)),
    Vetted("torch.nn.Softmax", _PURE_TRANSFORM),
    *(Vetted(f"torch.{n}", _PURE_TRANSFORM + " (a C builtin: keyword arguments such as dim go to the kernel)",
             extra=("*",)) for n in ("softmax", "sigmoid", "argmax")),
    Vetted("torch.nn.Sigmoid", _PURE_TRANSFORM),
    # --- losses ----------------------------------------------------------------------------------
    *(Vetted(f"monai.losses.{n}", _PURE_LOSS) for n in (
        "DiceLoss", "DiceCELoss", "DiceFocalLoss", "GeneralizedDiceLoss", "FocalLoss", "TverskyLoss",
        "DeepSupervisionLoss")),
    # --- optimisers and schedules ----------------------------------------------------------------
    *(Vetted(n, _OPTIMIZER) for n in (
        "torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD", "monai.optimizers.Novograd",
        "torch.optim.lr_scheduler.PolynomialLR", "torch.optim.lr_scheduler.StepLR",
        "torch.optim.lr_scheduler.CosineAnnealingLR", "monai.optimizers.WarmupCosineSchedule")),
    # --- transforms ------------------------------------------------------------------------------
    Vetted("monai.transforms.LoadImaged",
           "reads the image files named by the data list (confined where the data list is a literal or a vetted "
           "factory); the reader is pinned to MONAI's built-in readers because a reader string not among them "
           "is imported with pydoc.locate; reader keyword arguments reviewed (allow_pickle is refused by the "
           "field rules)", fixed={"reader": _READERS}, extra=_READER_KWARGS, reviewed=("meta_key_postfix",)),
    *(Vetted(f"monai.transforms.{n}", _PURE_TRANSFORM) for n in (
        "EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged", "ScaleIntensityd",
        "NormalizeIntensityd", "RandCropByPosNegLabeld", "RandCropByLabelClassesd", "RandSpatialCropd", "RandFlipd",
        "RandRotate90d", "RandScaleIntensityd", "RandGaussianNoised", "RandGaussianSmoothd", "EnsureTyped",
        "CastToTyped", "KeepLargestConnectedComponentd", "Compose", "CopyItemsd", "DeleteItemsd", "SqueezeDimd",
        "EnsureType", "Lambdad")),
    Vetted("monai.transforms.RandAffined", _PURE_TRANSFORM + "; cache_grid keeps the sampling grid in memory",
           reviewed=("cache_grid",)),
    Vetted("monai.transforms.RandShiftIntensityd", _PURE_TRANSFORM + "; meta_key_postfix names a dict key",
           reviewed=("meta_key_postfix",)),
    Vetted("monai.transforms.Invertd", _PURE_TRANSFORM + " (applies the recorded inverse of vetted transforms); "
                                       "meta_key_postfix names a dict key", reviewed=("meta_key_postfix",)),
    Vetted("monai.transforms.ConcatItemsd", _PURE_TRANSFORM + "; name is the output key", reviewed=("name",)),
    Vetted("monai.transforms.CropForegroundd", _PURE_TRANSFORM + "; **pad_kwargs go to numpy/torch padding",
           extra=("*",)),
    Vetted("monai.transforms.SpatialPadd", _PURE_TRANSFORM + "; keyword arguments go to numpy/torch padding",
           extra=("*",)),
    *(Vetted(f"monai.transforms.{n}", _PURE_TRANSFORM + "; keyword arguments go to torch.softmax/argmax/one_hot",
             extra=("*",)) for n in ("Activationsd", "AsDiscreted", "Activations", "AsDiscrete")),
    Vetted("monai.transforms.SaveImaged",
           "writes each image as output_dir/<input stem>/<stem>_<postfix><ext>; data_root_dir is pinned to '' "
           "(a relative sub-folder could climb out of output_dir), the writer to MONAI's built-in writers "
           "(a writer string not among them is imported with pydoc.locate), folder_layout and "
           "output_name_formatter to None (they decide the path)", writes=("output_dir",),
           names=("output_postfix", "output_ext"),
           fixed={"data_root_dir": ("",), "writer": _WRITERS, "folder_layout": (None,),
                  "output_name_formatter": (None,)},
           reviewed=("meta_key_postfix", "separate_folder", "output_format", "savepath_in_metadict")),
    # --- inferers ---------------------------------------------------------------------------------
    Vetted("monai.inferers.SlidingWindowInferer", "sliding-window inference in memory; cache_roi_weight_map keeps "
                                                  "the blending weights in memory", reviewed=("cache_roi_weight_map",)),
    Vetted("monai.inferers.SimpleInferer", "calls the network on the batch; nothing else"),
    # --- metrics and handlers -----------------------------------------------------------------------
    *(Vetted(f"monai.metrics.{n}", _PURE_METRIC) for n in (
        "DiceMetric", "HausdorffDistanceMetric", "SurfaceDistanceMetric", "MeanIoU")),
    Vetted("monai.handlers.MeanDice", _PURE_METRIC + "; save_details keeps per-case values in engine state",
           reviewed=("save_details",)),
    Vetted("monai.handlers.HausdorffDistance", _PURE_METRIC + "; save_details keeps per-case values in engine state",
           reviewed=("save_details",)),
    Vetted("monai.handlers.from_engine", "returns a function picking keys from the engine output; no file access"),
    Vetted("monai.handlers.StatsHandler",
           "logs loss and metrics through the standard logging module to the logger called name (tag_name labels "
           "the loss); it opens no "
           "file (a file handler would have to be passed as logger_handler, and no handler class is allowed); "
           "the print loggers are callables, which can only be vetted config items",
           reviewed=("name", "tag_name", "key_var_format", "epoch_print_logger", "iteration_print_logger")),
    Vetted("monai.handlers.TensorBoardStatsHandler",
           "writes TensorBoard event files (fixed names) into log_dir; summary_writer pinned to None so the "
           "writer is created here, inside log_dir; the event writers are callables, which can only be vetted "
           "config items", writes=("log_dir",), fixed={"summary_writer": (None,)},
           reviewed=("tag_name", "epoch_event_writer", "iteration_event_writer")),
    Vetted("monai.handlers.CheckpointSaver",
           "writes <file_prefix>_<name>_<n>.pt state dicts into save_dir (ignite DiskSaver joins save_dir and the "
           "file name, so every file-name part must be one path component); name is the logger name",
           writes=("save_dir",), names=("file_prefix", "final_filename", "key_metric_filename", "key_metric_name"),
           reviewed=("save_dict", "name", "save_final", "save_key_metric", "key_metric_n_saved",
                     "key_metric_save_state", "save_interval", "n_saved")),
    Vetted("monai.handlers.CheckpointLoader",
           "reads a checkpoint with torch.load; medseg bundle run forces weights_only=True "
           "(TORCH_FORCE_WEIGHTS_ONLY_LOAD), so pickled code is refused; name is the logger name",
           reads=("load_path",), reviewed=("load_dict", "name")),
    Vetted("monai.handlers.ValidationHandler", "runs the vetted validator every N epochs (exec_at_start: also "
                                               "before the first); no file access", reviewed=("exec_at_start",)),
    Vetted("monai.handlers.LrScheduleHandler", "steps a vetted LR scheduler; name is the logger name",
           reviewed=("name",)),
    Vetted("monai.handlers.EarlyStopHandler", "stops training when a vetted score function stops improving; "
                                              "no file access"),
    # --- engines and data ---------------------------------------------------------------------------
    Vetted("monai.engines.SupervisedTrainer", _ENGINE, fixed=_NO_COMPILE, data=("train_data_loader",)),
    Vetted("monai.engines.SupervisedEvaluator", _ENGINE, fixed=_NO_COMPILE, data=("val_data_loader",)),
    Vetted("monai.data.Dataset", "applies vetted transforms to the items of its data list in memory; the data "
                                 "list's file names are confined like any path", data=("data",)),
    Vetted("monai.data.CacheDataset", "like Dataset, caching transformed items in memory (not on disk)",
           data=("data",), reviewed=("cache_num", "cache_rate", "copy_cache", "runtime_cache")),
    Vetted("monai.data.DataLoader", "torch DataLoader over a vetted dataset; keyword arguments reviewed (callables "
                                    "can only be vetted config items)", data=("dataset",), extra=_LOADER_KWARGS),
    Vetted("monai.data.list_data_collate", "collates a list of dictionaries into a batch in memory"),
    Vetted("monai.data.decollate_batch", "splits a batch into a list in memory"),
)
"""Every target safe mode lets a bundle name (see :class:`Vetted`)."""


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@functools.lru_cache(maxsize=1)
def allowed_objects() -> dict[int, tuple[Any, Vetted]]:
    """``id(object) -> (object, entry)`` for every allow-listed target (imports the trusted modules once).

    Raises
    ------
    ImportError, AttributeError
        If an allow-listed name no longer exists (a library upgrade): a defect of this list, caught by its tests.
    """
    table: dict[int, tuple[Any, Vetted]] = {}
    for entry in ALLOWED_TARGETS:
        obj = _resolve(entry.name)
        table[id(obj)] = (obj, entry)
    return table


def vetted(obj: Any) -> Vetted | None:
    """The allow-list entry of ``obj`` (compared by identity), or None."""
    found = allowed_objects().get(id(obj))
    return None if found is None or found[0] is not obj else found[1]


def allowlist_markdown() -> str:
    """``docs/safe_mode.md``: the allow list as a table (name, review, argument rules)."""
    lines = [
        "# Safe mode: the allow list",
        "",
        "Generated from `medseg/bundle/allowlist.py` (`python -m medseg.bundle.allowlist > docs/safe_mode.md`);",
        "`tests/unit/test_bundle_allowlist.py` fails when the two differ. A bundle run without `--trust` may",
        "name only these classes and functions with `_target_` (any spelling that resolves to the same object).",
        "File and folder arguments must resolve inside the bundle or a path given on the command line;",
        "file-name parts must be one path component; pinned arguments take only the values shown.",
        "",
        "| target | review | files written | files read | data read | file-name parts | pinned |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in ALLOWED_TARGETS:
        pinned = "; ".join(f"{k}: {', '.join('null' if v is None else repr(v) for v in vs)}"
                           for k, vs in entry.fixed.items())
        cells = [f"`{entry.name}`", entry.review.replace("|", "\\|"), ", ".join(entry.writes), ", ".join(entry.reads),
                 ", ".join(entry.data), ", ".join(entry.names), pinned]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(allowlist_markdown(), end="")
