"""``configs/train.json``: training as the model zoo writes it, with named, overridable parts.

Top-level options (``epochs``, ``val_interval``, ``max_minutes``, ``max_iterations``, ``log_every``,
``fold``, ``learning_rate``, ``batch_size``, ``samples_per_case``, ``min_iterations_per_epoch``,
``iterations_per_epoch``, ``num_workers``, ``mlflow_uri``, ``seed``, ``resume``, ``init_weights``;
the planned recipe adds ``cache_dir``) are what ``medseg train`` sets and
``--epochs 5`` / ``--set epochs=5`` override; the parts are ``network_def``, ``network`` (on the
device, ``--init-weights`` applied), ``loss``, ``optimizer``, ``lr_scheduler``, ``train#preprocessing``,
``train#dataset``, ``train#dataloader``, ``train#inferer``, ``train#handlers``, ``train#trainer``,
``validate#preprocessing``, ``validate#dataset``, ``validate#dataloader``, ``validate#inferer``,
``validate#postprocessing``, ``validate#key_metric``, ``validate#handlers``, ``validate#evaluator``;
``initialize`` checks the options and the metadata and seeds every generator (before anything is
built), ``run`` trains (:func:`medseg.engines.training.run_training`: every part is built, so every
input checked, before it writes), ``finalize`` records the result in the metadata and docs
(:func:`medseg.bundle.training.record_training_run`).

No ``$`` expressions: every computed value comes from a factory on the safe-mode allow list, so the
config runs in safe mode (``medseg train``, ``medseg bundle run``) and with ``python -m monai.bundle run``
alike.

Two recipes (:func:`train_parts`): plans made by the planner (``configuration`` other than ``"custom"``)
train with nnU-Net v2's defaults -- SGD with Nesterov momentum 0.99, learning rate 1e-2, weight decay
3e-5 (AdamW 2e-3 when the plan's time budget allows fewer iterations than SGD needs:
:mod:`medseg.planning.recipe`), polynomial decay stepped per iteration, 250 iterations per epoch, the
plan's batch of one patch per case, batch Dice + cross-entropy with deep supervision, gradients clipped
to norm 12, mixed precision on CUDA (bfloat16 autocast on the CPU where the plan measured it faster),
nnU-Net's augmentation, the preprocessed cases cached on disk (``cache_dir``) and loaded in worker processes;
``"custom"`` plans (the default plan, bundles made before the planner) keep the recipe they were made with
(AdamW 2e-3, per-epoch decay, cases cached in memory).

The ids and references are those of MONAI's train-workflow properties
(``monai.bundle.properties.TrainProperties``); references to nested parts use MONAI's separator ``::``
(``@train::handlers``), which its property check compares literally (overrides may use ``#``).
"""

from __future__ import annotations

from typing import Any

from medseg.errors import BundleError
from medseg.layout import PREVIOUS_PREDICTIONS
from medseg.plan import Plan
from medseg.planning.recipe import OPTIMIZERS, SGD

C = "medseg.bundle.components"

E = "medseg.engines"
#: MLflow tracking handler (does nothing unless ``mlflow_uri`` is set).
_MLFLOW = {"_target_": f"{E}.tracking.MLflowTracking", "tracking_uri": "@mlflow_uri", "plan": "@plan",
           "evaluator": "@validate::evaluator", "bundle_root": "@bundle_root", "options": "@options"}


def _train_parts(planned: bool, plan: Plan | None = None) -> dict[str, Any]:
    """``train#...``: the training data, inferer, handlers and MONAI's ``SupervisedTrainer``."""
    schedule = {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False}
    handlers = [
        {**schedule, "epoch_level": False} if planned else schedule,
        {"_target_": "ValidationHandler", "validator": "@validate::evaluator", "interval": "@val_interval",
         "epoch_level": True},
        *([{"_target_": f"{E}.parts.GradientClipping", "max_norm": 12.0}] if planned else []),
        {"_target_": f"{E}.tensorboard.TensorBoardLog", "log_dir": "@log_dir", "tag_name": "train_loss",
         "output_transform": {"_target_": "monai.handlers.from_engine", "keys": ["loss"], "first": True}},
        {"_target_": f"{E}.records.RunRecorder", "bundle_root": "@bundle_root", "network": "@network",
         "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "evaluator": "@validate::evaluator",
         "plan": "@plan", "resume": "@resume_point"},
        {"_target_": f"{E}.progress.ProgressLogger", "pace": "@pace", "evaluator": "@validate::evaluator",
         "plan": "@plan", "every": "@log_every", "val_interval": "@val_interval",
         "max_iterations": "@max_iterations", "max_minutes": "@max_minutes", "optimizer": "@optimizer"},
        _MLFLOW,
        {"_target_": f"{E}.budget.RunBudget", "pace": "@pace", "evaluator": "@validate::evaluator",
         "val_interval": "@val_interval", "max_iterations": "@max_iterations", "max_minutes": "@max_minutes"},
    ]
    items: dict[str, Any] = {"_target_": f"{E}.data.case_items", "split": "@split", "part": "training",
                             **_previous(plan)}
    loader: dict[str, Any] = {"_target_": "DataLoader", "dataset": "@train::dataset", "batch_size": "@batch_size",
                              "shuffle": True, "num_workers": "@num_workers",
                              "drop_last": {"_target_": f"{E}.data.drop_last", "dataset": "@train::dataset",
                                            "batch_size": "@batch_size"}}
    dataset: dict[str, Any]
    if planned:
        dataset = {"_target_": f"{E}.data.preprocessed_dataset", "data": items, "transform": "@train::preprocessing",
                   "plan": "@plan", "cache_dir": "@cache_dir", "part": "training"}
        loader["persistent_workers"] = {"_target_": f"{E}.data.has_workers", "num_workers": "@num_workers"}
    else:
        dataset = {"_target_": "CacheDataset", "data": items, "transform": "@train::preprocessing", "cache_rate": 1.0,
                   "num_workers": 2, "progress": False}
    return {
        "preprocessing": {"_target_": f"{E}.data.training_transforms", "plan": "@plan",
                          "samples_per_case": "@samples_per_case"},
        "dataset": dataset,
        "dataloader": loader,
        "epoch_length": {"_target_": f"{E}.data.epoch_length", "dataloader": "@train::dataloader",
                         "minimum": "@min_iterations_per_epoch", "resume": "@resume_point",
                         "iterations": "@iterations_per_epoch"},
        "inferer": ({"_target_": f"{E}.parts.training_inferer", "plan": "@plan", "device": "@device"} if planned
                    else {"_target_": "SimpleInferer"}),
        "handlers": handlers,
        "trainer": {"_target_": "SupervisedTrainer", "device": "@device", "max_epochs": "@epochs",
                    "epoch_length": "@train::epoch_length", "train_data_loader": "@train::dataloader",
                    "network": "@network", "optimizer": "@optimizer", "loss_function": "@loss",
                    "inferer": "@train::inferer", "train_handlers": "@train::handlers", "amp": _amp(planned)},
    }


def _previous(plan: Plan | None) -> dict[str, Any]:
    """``case_items``' ``previous`` for a cascade stage: the previous stage's out-of-fold label maps, kept in the
    bundle (``previous/predictions``); nothing for other plans."""
    if plan is None or not plan.previous_stage:
        return {}
    return {"previous": {"_target_": f"{C}.bundle_path", "bundle_root": "@bundle_root",
                         "parts": list(PREVIOUS_PREDICTIONS.parts)}}


def _amp(planned: bool) -> Any:
    """MONAI's ``amp``: on CUDA for the planned recipe (:func:`medseg.engines.parts.mixed_precision`), off otherwise."""
    return {"_target_": f"{E}.parts.mixed_precision", "device": "@device"} if planned else False


def _validate_parts(plan: Plan | None) -> dict[str, Any]:
    """``validate#...``: sliding-window validation scored by MONAI's ``MeanDice`` (per-case details kept), over the
    plan's windows (:attr:`~medseg.plan.Plan.window_size`: a network over slices gets thick windows that do not
    overlap along the slice axis)."""
    planned = plan is not None and plan.planned
    overlap = 0.25 if plan is None else plan.window_overlap(0.25)
    sigma = 0.125 if plan is None else plan.window_sigma_scale()
    plan_value = f"{E}.parts.plan_value"
    items: dict[str, Any] = {"_target_": f"{E}.data.case_items", "split": "@split", "part": "validation",
                             **_previous(plan)}
    dataset: dict[str, Any]
    if planned:
        dataset = {"_target_": f"{E}.data.preprocessed_dataset", "data": items, "transform": "@validate::preprocessing",
                   "plan": "@plan", "cache_dir": "@cache_dir", "part": "validation"}
    else:
        dataset = {"_target_": "CacheDataset", "data": items, "transform": "@validate::preprocessing",
                   "cache_rate": 1.0, "num_workers": 2, "progress": False}
    return {
        "preprocessing": {"_target_": "medseg.transforms.preprocessing", "plan": "@plan", "keys": ["image", "label"]},
        "dataset": dataset,
        "dataloader": {"_target_": "DataLoader", "dataset": "@validate::dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer",
                    "roi_size": {"_target_": plan_value, "plan": "@plan", "field": "window_size"},
                    "sw_batch_size": {"_target_": plan_value, "plan": "@plan", "field": "sw_batch_size"},
                    "overlap": list(overlap) if isinstance(overlap, tuple) else overlap, "mode": "gaussian",
                    **({"sigma_scale": list(sigma)} if isinstance(sigma, tuple) else {})},
        "postprocessing": {"_target_": f"{E}.parts.validation_postprocessing", "plan": "@plan"},
        "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": False,
                                         "output_transform": {"_target_": "monai.handlers.from_engine",
                                                              "keys": ["pred", "label"]},
                                         "save_details": True}},
        "handlers": [{"_target_": f"{E}.tensorboard.TensorBoardLog", "log_dir": "@log_dir", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@validate::dataloader",
                      "network": "@network", "inferer": "@validate::inferer", "postprocessing": "@validate::postprocessing",
                      "key_val_metric": "@validate::key_metric", "val_handlers": "@validate::handlers",
                      "amp": _amp(planned)},
    }


def _optimizer(plan: Plan, params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """The learning rate and ``optimizer`` part of a planned plan: the optimiser it names
    (``planning["optimizer"]``, settings from :data:`medseg.planning.recipe.OPTIMIZERS`), nnU-Net's SGD
    for a plan that records none.

    Raises
    ------
    BundleError
        ``planning.optimizer.name`` is not one of :data:`~medseg.planning.recipe.OPTIMIZERS`.
    """
    chosen = plan.planning.get("optimizer") or SGD
    name = chosen.get("name") if isinstance(chosen, dict) else None
    settings = OPTIMIZERS.get(str(name))
    if settings is None:
        raise BundleError(f"plan.json: 'planning.optimizer.name' must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    options = {key: value for key, value in settings.items() if key not in ("name", "learning_rate")}
    return float(settings["learning_rate"]), {"_target_": f"torch.optim.{settings['name']}", "params": params,
                                              "lr": "@learning_rate", **options}


def _recipe(plan: Plan | None) -> dict[str, Any]:
    """The recipe's options, loss, optimiser and learning-rate schedule (see the module docstring)."""
    params = {"_target_": f"{E}.parts.parameters", "network": "@network"}
    schedule = {"_target_": f"{E}.parts.poly_lr_schedule", "optimizer": "@optimizer", "epochs": "@epochs", "power": 0.9}
    if plan is None or not plan.planned:
        return {
            "learning_rate": 0.002, "batch_size": 2, "samples_per_case": 2, "iterations_per_epoch": None,
            "num_workers": 0,
            "loss": {"_target_": f"{E}.loss.segmentation_loss", "plan": "@plan", "batch_dice": False,
                     "include_background": True},
            "optimizer": {"_target_": "torch.optim.AdamW", "params": params, "lr": "@learning_rate",
                          "weight_decay": 1e-5},
            "lr_scheduler": schedule,
        }
    learning_rate, optimizer = _optimizer(plan, params)
    return {
        "learning_rate": learning_rate,
        "batch_size": {"_target_": f"{E}.parts.plan_value", "plan": "@plan", "field": "batch_size"},
        "samples_per_case": 1, "iterations_per_epoch": 250,
        "num_workers": {"_target_": f"{E}.data.worker_count"},
        "cache_dir": {"_target_": f"{C}.bundle_path", "bundle_root": "@bundle_root", "parts": ["preprocessed"]},
        "loss": {"_target_": f"{E}.loss.segmentation_loss", "plan": "@plan", "batch_dice": True},
        "optimizer": optimizer,
        "lr_scheduler": {**schedule, "epoch_length": "@iterations_per_epoch", "max_iterations": "@max_iterations",
                         "pace": "@pace", "max_minutes": "@max_minutes"},
    }


def train_parts(plan: Plan | None = None) -> dict[str, Any]:
    """``configs/train.json`` without the keys every config shares (``bundle_root``, ``dataset_dir``,
    ``device``, ``plan``, ``network_def``: :func:`medseg.bundle.create.train_config` adds them), with
    the planned recipe for a ``plan`` made by the planner, else the recipe of ``"custom"`` plans."""
    planned = plan is not None and plan.planned
    options = ("epochs", "val_interval", "max_minutes", "max_iterations", "log_every", "device", "fold", "resume",
               "learning_rate", "batch_size", "samples_per_case", "min_iterations_per_epoch", "iterations_per_epoch",
               "num_workers", "mlflow_uri", "seed", "init_weights")
    recipe = _recipe(plan)
    return {
        "epochs": 100,
        "val_interval": 5,
        "max_minutes": None,
        "max_iterations": None,
        "log_every": 10,
        "fold": 0,
        **{key: recipe.pop(key) for key in ("learning_rate", "batch_size", "samples_per_case")},
        "min_iterations_per_epoch": 20,
        **{key: recipe.pop(key) for key in ("iterations_per_epoch", "num_workers")},
        "mlflow_uri": None,
        "seed": 0,
        "resume": False,
        "init_weights": None,
        **({"cache_dir": recipe.pop("cache_dir")} if planned else {}),
        "options": {"_target_": f"{E}.options.TrainOptions", **{key: f"@{key}" for key in options}},
        "pace": {"_target_": f"{E}.progress.Pace"},
        "log_dir": {"_target_": f"{C}.bundle_path", "bundle_root": "@bundle_root", "parts": ["logs"]},
        "datalist": {"_target_": f"{E}.data.training_datalist", "dataset_dir": "@dataset_dir", "plan": "@plan"},
        "split": {"_target_": f"{E}.data.training_split", "datalist": "@datalist", "bundle_root": "@bundle_root",
                  "fold": "@fold", "resume": "@resume"},
        "initial_weights": {"_target_": f"{E}.weights.InitialWeights", "path": "@init_weights"},
        "network": {"_target_": f"{E}.weights.initial_network", "network": "@network_def", "device": "@device",
                    "weights": "@initial_weights"},
        **recipe,  # loss, optimizer, lr_scheduler
        "resume_point": {"_target_": f"{E}.weights.resume_point", "bundle_root": "@bundle_root", "network": "@network",
                         "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "resume": "@resume",
                         "epochs": "@epochs", "max_iterations": "@max_iterations"},
        "train": _train_parts(planned, plan),
        "validate": _validate_parts(plan),
        "initialize": [
            {"_target_": f"{E}.options.check_options", "options": "@options"},
            {"_target_": "medseg.bundle.training.check_trainable", "bundle_root": "@bundle_root"},
            {"_target_": "monai.utils.set_determinism", "seed": "@seed"},
            "@pace",
        ],
        "run": [{"_target_": f"{E}.training.run_training", "trainer": "@train::trainer",
                 "evaluator": "@validate::evaluator", "split": "@split", "bundle_root": "@bundle_root",
                 "pace": "@pace", "options": "@options", "initial_weights": "@initial_weights",
                 "datalist": "@datalist"}],
        "finalize": [{"_target_": "medseg.bundle.training.record_training_run", "bundle_root": "@bundle_root"}],
    }


def multi_gpu_parts() -> dict[str, Any]:
    """``configs/multi_gpu_train.json``: training on several processes, layered on ``configs/train.json``
    as the model zoo does (``--config_file "['configs/train.json','configs/multi_gpu_train.json']"``
    under ``torchrun``; ``medseg train`` picks it when started by ``torchrun``).

    It overrides named parts only (:mod:`medseg.engines.distributed`): ``initialize`` joins the process
    group (``gloo`` on the CPU, ``nccl`` on CUDA) and seeds each process with ``seed + rank``; each
    process trains on its own device (``rank_device``: ``cuda:LOCAL_RANK``) a DDP-wrapped
    ``network`` (``ddp_network``, the trainer's; evaluator, optimiser and checkpoints keep ``network``,
    which shares its parameters) with its share of the training cases (``train#sampler``, the loader's
    ``shuffle`` off, ``drop_last`` judged on the share) and validates its share of the validation cases
    (``validate#sampler``; MONAI's ``MeanDice`` gathers every process's cases); ``+train#handlers`` adds
    a check that all processes hold the same weights after each epoch; ``finalize`` leaves the group.
    Only the main process writes (the writing handlers check it themselves).
    """
    rank_device = "@rank_device"
    return {
        "rank_device": {"_target_": f"{E}.distributed.rank_device", "device": "@device"},
        "rank_seed": {"_target_": f"{E}.distributed.rank_seed", "seed": "@seed"},
        "network#device": rank_device,
        "ddp_network": {"_target_": f"{E}.distributed.data_parallel", "network": "@network", "device": rank_device},
        "train#sampler": {"_target_": f"{E}.distributed.training_sampler", "dataset": "@train#dataset",
                          "seed": "@seed"},
        "train#dataloader#sampler": "@train#sampler",
        "train#dataloader#shuffle": False,
        "train#dataloader#drop_last#dataset": "@train#sampler",
        "train#trainer#network": "@ddp_network",
        "train#trainer#device": rank_device,
        "+train#handlers": [{"_target_": f"{E}.distributed.ReplicaCheck", "network": "@network"}],
        "validate#sampler": {"_target_": f"{E}.distributed.validation_sampler", "dataset": "@validate#dataset"},
        "validate#dataloader#sampler": "@validate#sampler",
        "validate#evaluator#device": rank_device,
        "+initialize": [
            {"_target_": f"{E}.distributed.init_distributed", "device": "@device"},
            {"_target_": "monai.utils.set_determinism", "seed": "@rank_seed"},
        ],
        "+finalize": [{"_target_": f"{E}.distributed.close_distributed"}],
    }
