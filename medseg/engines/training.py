"""Training with MONAI's Ignite engines: ``SupervisedTrainer`` + ``SupervisedEvaluator`` and handlers.

Run folder written by :func:`train` (a MONAI bundle, see :mod:`medseg.bundle.create`)::

    RUN_DIR/configs/               plan.json, metadata.json, train/inference/evaluate.json, logging.conf
    RUN_DIR/models/model.pt        network state dict of the best validation epoch
    RUN_DIR/checkpoints/last.pt    state dicts of network, optimiser, LR schedule and trainer (for --resume)
    RUN_DIR/logs/                  TensorBoard event files
    RUN_DIR/split.json             training / validation case names
    RUN_DIR/train_summary.json     epochs, best validation Dice, time, why training stopped
    RUN_DIR/history.json, curves.png   loss per epoch and validation Dice (updated at each validation)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import TimeLimit
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    LrScheduleHandler,
    MeanDice,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import AsDiscreted, Compose
from monai.utils import set_determinism

from medseg.bundle.components import load_plan, read_state_dict
from medseg.data.datalist import (
    Case,
    Datalist,
    load_datalist,
    split_cases,
    validate_datalist,
)
from medseg.errors import BundleError, InputError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.image import case_name, list_images
from medseg.networks import build_network
from medseg.plan import NetworkSpec, Plan
from medseg.transforms import augmentation, preprocessing

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Options of :func:`train` (the ``medseg train`` flags)."""

    epochs: int = 100
    max_minutes: float | None = None
    device: str = "cpu"
    fold: int = 0
    resume: bool = False
    val_interval: int = 5
    learning_rate: float = 2e-3
    batch_size: int = 2
    samples_per_case: int = 2
    #: an epoch is at least this many iterations (small datasets would otherwise give tiny epochs)
    min_iterations_per_epoch: int = 20
    num_workers: int = 0
    seed: int = 0
    target_spacing: tuple[float, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    ct_window: tuple[float, float] | None = None
    init_weights: str | None = None
    network: NetworkSpec = field(default_factory=NetworkSpec)


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``.

    Raises
    ------
    InputError
        If CUDA is asked for and not available, or the name is unknown.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {name}: CUDA is not available on this machine; use --device cpu")
        return torch.device(name)
    raise InputError(None, f"--device must be cpu or cuda, got {name!r}")


class RunCheckpoints:
    """Saves ``checkpoints/last.pt`` after every epoch and ``models/model.pt`` on a new best validation
    Dice, each atomically (a crash mid-write never leaves a corrupt checkpoint for ``--resume``)."""

    def __init__(self, run_dir: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, trainer: Engine, metric: str) -> None:
        self.run_dir = run_dir
        self.network, self.optimizer, self.scheduler, self.trainer = network, optimizer, scheduler, trainer
        self.metric = metric
        self.best_metric = -1.0
        self.best_epoch = 0

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def model_path(self) -> Path:
        return self.run_dir / "models" / "model.pt"

    def save_last(self, engine: Engine) -> None:
        state = {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "trainer": {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                        "epoch_length": engine.state.epoch_length, "max_epochs": engine.state.max_epochs},
            "best": {"metric": self.best_metric, "epoch": self.best_epoch},
        }
        with atomic_path(self.last_path) as tmp:
            torch.save(state, tmp)

    def save_best(self, evaluator: Engine) -> None:
        value = float(evaluator.state.metrics.get(self.metric, float("nan")))
        if value == value and value > self.best_metric:  # NaN-safe
            self.best_metric, self.best_epoch = value, self.trainer.state.epoch
            with atomic_path(self.model_path) as tmp:
                torch.save(self.network.state_dict(), tmp)
            log.info("new best validation Dice %.4f at epoch %d -> %s", value, self.best_epoch, self.model_path)

    def load(self) -> dict[str, Any]:
        """Restore network, optimiser, schedule and trainer state from ``last.pt``.

        Raises
        ------
        BundleError
            If the checkpoint is missing or unreadable.
        """
        if not self.last_path.exists():
            raise BundleError(f"{self.last_path}: no checkpoint to resume from")
        try:
            state = torch.load(self.last_path, map_location="cpu", weights_only=True)
            self.network.load_state_dict(state["network"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["lr_scheduler"])
        except Exception as exc:  # noqa: BLE001 - any failure means the checkpoint is unusable
            raise BundleError(f"{self.last_path}: cannot resume from this checkpoint ({exc})") from exc
        self.best_metric = float(state["best"]["metric"])
        self.best_epoch = int(state["best"]["epoch"])
        return state["trainer"]


@dataclass
class TrainingHistory:
    """Loss per epoch and validation mean Dice, saved as ``history.json`` and drawn as ``curves.png``
    (after every validation and at the end of training)."""

    epochs: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_epochs: list[int] = field(default_factory=list)
    val_dice: list[float] = field(default_factory=list)
    _pending: list[float] = field(default_factory=list, repr=False)

    def add_loss(self, value: float) -> None:
        self._pending.append(value)

    def end_epoch(self, epoch: int) -> float:
        loss = float(sum(self._pending) / len(self._pending)) if self._pending else float("nan")
        self._pending.clear()
        self.epochs.append(epoch)
        self.losses.append(loss)
        return loss

    def add_validation(self, epoch: int, dice: float, run_dir: Path) -> None:
        if self.val_epochs and self.val_epochs[-1] == epoch:  # the final validation repeats an epoch
            self.val_dice[-1] = dice
        else:
            self.val_epochs.append(epoch)
            self.val_dice.append(dice)
        self.save(run_dir)

    def save(self, run_dir: Path) -> None:
        from medseg.reports.figures import training_curves_png

        data = {"epoch": self.epochs, "loss": self.losses, "val_epoch": self.val_epochs, "val_mean_dice": self.val_dice}
        atomic_write_text(run_dir / "history.json", json.dumps(data, indent=1) + "\n")
        training_curves_png(self.epochs, self.losses, self.val_epochs, self.val_dice, run_dir / "curves.png")

    @classmethod
    def load(cls, run_dir: Path) -> TrainingHistory:
        path = run_dir / "history.json"
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(list(data["epoch"]), list(data["loss"]), list(data["val_epoch"]), list(data["val_mean_dice"]))


def load_matching_weights(network: torch.nn.Module, source: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Transfer learning: copy every tensor of ``source`` whose name and shape match ``network``.

    ``source`` is a state-dict file, a training checkpoint, or a bundle / run folder (its
    ``models/model.pt``). Loaded with ``weights_only=True``. Returns ``{"loaded": [...], "skipped": [...]}``
    (skipped: network tensors absent from the source or of another shape).

    Raises
    ------
    InputError
        Missing source, unreadable file, or no tensor that fits.
    """
    path = Path(source)
    if path.is_dir():
        path = path / "models" / "model.pt"
    if not path.exists():
        raise InputError(path, "no such weights file for --init-weights")
    try:
        state = read_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - pickled code or a corrupt file: refuse either way
        raise InputError(path, f"not a loadable state dict ({type(exc).__name__})") from exc
    own = network.state_dict()
    loaded = [k for k, v in own.items() if k in state and isinstance(state[k], torch.Tensor) and state[k].shape == v.shape]
    skipped = [k for k in own if k not in loaded]
    if not loaded:
        raise InputError(path, "no tensor matches this network (different architecture?)")
    network.load_state_dict({**own, **{k: state[k] for k in loaded}})
    log.info("--init-weights %s: loaded %d tensors, skipped %d%s", path, len(loaded), len(skipped),
             f" ({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})" if skipped else "")
    return {"loaded": loaded, "skipped": skipped}


def training_datalist(dataset_dir: str | os.PathLike[str], plan: Plan) -> Datalist:
    """The training cases of ``dataset_dir``: a ``dataset.json`` file, a folder holding one, or a
    folder with ``imagesTr/`` and ``labelsTr/`` (paired by file name; labels from the plan).

    Raises
    ------
    InputError
        No dataset found, or dataset labels that differ from the plan's.
    """
    root = Path(dataset_dir)
    if root.is_file() or (root / "dataset.json").exists():
        datalist = load_datalist(root)
        if datalist.labels != plan.labels:
            raise InputError(datalist.path, f"labels {datalist.labels} differ from the bundle's {plan.labels}")
        return datalist
    images, labels = root / "imagesTr", root / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise InputError(root, "no dataset.json and no imagesTr/ + labelsTr/ folders")
    cases = []
    for image in list_images(images):
        label = labels / image.name
        if not label.exists():
            raise InputError(image, f"no label map {label.name} in {labels}")
        cases.append(Case(case_name(image), image, label))
    return Datalist(root / "dataset.json", root.name, plan.modality, dict(plan.labels), cases, [])


def train(data: str | os.PathLike[str], run_dir: str | os.PathLike[str], options: TrainOptions | None = None,
          bundle: bool = False) -> dict[str, Any]:
    """Train on an MSD dataset: write a bundle for it into ``run_dir`` (plan derived from the data),
    then train it with :func:`train_bundle`. With ``bundle=True``, ``run_dir`` is an existing
    bundle (``medseg bundle init``) whose plan is used as it is.

    Returns the training summary (also written to ``train_summary.json``).

    Raises
    ------
    InputError
        Invalid dataset (see :func:`medseg.data.datalist.validate_datalist`), a non-empty run
        folder without ``--resume``, an unavailable device.
    BundleError
        ``--resume`` with a missing or unreadable checkpoint, ``bundle=True`` without a plan.
    """
    from medseg.bundle.create import init_bundle

    opts = options or TrainOptions()
    run_dir = Path(run_dir)
    _check_options(opts)
    if bundle or opts.resume:
        plan = load_plan(run_dir)  # raises BundleError if this is not a bundle
        if not opts.resume and (run_dir / "models" / "model.pt").exists():
            raise InputError(run_dir / "models" / "model.pt", "this bundle is already trained; pass --resume to "
                             "continue, or train a copy (its weights would be replaced)")
        datalist = training_datalist(data, plan)
        validate_datalist(datalist)
    else:
        try:
            _, datalist, plan = init_bundle(data, run_dir, opts.target_spacing, opts.patch_size, opts.network,
                                            opts.ct_window)
        except InputError as exc:
            if exc.path == str(run_dir):  # say how to continue a run instead
                raise InputError(run_dir, "exists and is not empty; choose a new --out folder or pass --resume") from exc
            raise
    return _train_validated(run_dir, plan, datalist, opts)


def _check_options(opts: TrainOptions) -> torch.device:
    """Raises InputError for an unavailable device or fewer than one epoch; returns the device."""
    if opts.epochs < 1:
        raise InputError(None, f"--epochs must be at least 1, got {opts.epochs}")
    return resolve_device(opts.device)


def train_bundle(bundle_root: str | os.PathLike[str], dataset_dir: str | os.PathLike[str],
                 options: TrainOptions | None = None, network: torch.nn.Module | None = None,
                 loss: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train the network of a bundle (its ``configs/plan.json``) on ``dataset_dir``; the entry point
    of ``configs/train.json`` and of ``medseg train``. Writes ``models/model.pt`` (best validation
    Dice), ``checkpoints/last.pt``, ``logs/``, ``split.json`` and ``train_summary.json`` in the bundle.

    Raises
    ------
    InputError
        Invalid dataset, bad options, unavailable device, ``--init-weights`` that do not fit.
    BundleError
        Missing plan; ``resume`` without a usable checkpoint.
    """
    opts = options or TrainOptions()
    _check_options(opts)
    plan = load_plan(bundle_root)
    datalist = training_datalist(dataset_dir, plan)
    validate_datalist(datalist)
    return _train_validated(Path(bundle_root), plan, datalist, opts, network, loss)


def _train_validated(run_dir: Path, plan: Plan, datalist: Datalist, opts: TrainOptions,
                     network: torch.nn.Module | None = None, loss: torch.nn.Module | None = None) -> dict[str, Any]:
    """The training run itself, on a dataset already validated against the bundle's plan."""
    device = resolve_device(opts.device)
    set_determinism(seed=opts.seed)
    split_file = run_dir / "split.json"
    if opts.resume:
        if not split_file.exists():
            raise BundleError(f"{split_file}: no training to resume in this bundle")
        split = json.loads(split_file.read_text())
        by_name = {c.name: c for c in datalist.training}
        missing = [n for n in split["training"] + split["validation"] if n not in by_name]
        if missing:
            raise InputError(datalist.path, f"cases of the run being resumed are missing: {', '.join(missing)}")
        train_cases = [by_name[n] for n in split["training"]]
        val_cases = [by_name[n] for n in split["validation"]]
    else:
        train_cases, val_cases = split_cases(datalist.training, opts.fold)
        atomic_write_text(split_file, json.dumps(
            {"fold": opts.fold, "training": [c.name for c in train_cases], "validation": [c.name for c in val_cases]},
            indent=2) + "\n")
    log.info("training on %d cases, validating on %d (fold %d)", len(train_cases), len(val_cases), opts.fold)

    keys = ("image", "label")
    pre = preprocessing(plan, keys)
    train_ds = CacheDataset([{"image": str(c.image), "label": str(c.label)} for c in train_cases],
                            Compose(list(pre.transforms) + list(augmentation(plan, opts.samples_per_case).transforms)),
                            cache_rate=1.0, num_workers=min(2, os.cpu_count() or 1), progress=False)
    val_ds = CacheDataset([{"image": str(c.image), "label": str(c.label)} for c in val_cases], pre,
                          cache_rate=1.0, num_workers=min(2, os.cpu_count() or 1), progress=False)
    train_loader = DataLoader(train_ds, batch_size=opts.batch_size, shuffle=True, num_workers=opts.num_workers,
                              persistent_workers=opts.num_workers > 0, drop_last=len(train_ds) > opts.batch_size)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=0)
    epoch_length = max(len(train_loader), opts.min_iterations_per_epoch)

    network = (network if network is not None else build_network(plan)).to(device)
    transfer = load_matching_weights(network, opts.init_weights) if opts.init_weights and not opts.resume else None
    optimizer = torch.optim.AdamW(network.parameters(), lr=opts.learning_rate, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: (1 - min(epoch, opts.epochs - 1) / opts.epochs) ** 0.9)
    num_classes = plan.num_classes
    metric_name = "val_mean_dice"
    tb_dir = str(run_dir / "logs")

    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=network,
        inferer=SlidingWindowInferer(roi_size=plan.patch_size, sw_batch_size=plan.sw_batch_size, overlap=0.25, mode="gaussian"),
        postprocessing=Compose([AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=num_classes)]),
        key_val_metric={metric_name: MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[StatsHandler(name="medseg.validation", output_transform=lambda x: None, iteration_log=False)],
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=opts.epochs,
        epoch_length=epoch_length,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss if loss is not None else DiceCELoss(to_onehot_y=True, softmax=True),
        inferer=SimpleInferer(),
        train_handlers=[
            LrScheduleHandler(lr_scheduler=scheduler, print_lr=False),
            ValidationHandler(validator=evaluator, interval=opts.val_interval, epoch_level=True),
            StatsHandler(name="medseg.train", tag_name="train_loss", output_transform=from_engine(["loss"], first=True),
                         iteration_log=lambda engine, event: event % 50 == 0, epoch_log=False),
            TensorBoardStatsHandler(log_dir=tb_dir, tag_name="train_loss", output_transform=from_engine(["loss"], first=True)),
        ],
    )
    for name in ("medseg.train", "medseg.validation"):  # MONAI's get_logger adds its own handler: use ours
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    TensorBoardStatsHandler(log_dir=tb_dir, output_transform=lambda x: None,
                            global_epoch_transform=lambda epoch: trainer.state.epoch).attach(evaluator)
    checkpoints = RunCheckpoints(run_dir, network, optimizer, scheduler, trainer, metric_name)
    evaluator.add_event_handler(Events.COMPLETED, checkpoints.save_best)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoints.save_last)
    if sys.stderr.isatty():
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=from_engine(["loss"], first=True))

    history = TrainingHistory.load(run_dir) if opts.resume else TrainingHistory()

    def log_epoch(engine: Engine) -> None:
        loss = history.end_epoch(engine.state.epoch)
        log.info("epoch %d/%d  loss %.4f  lr %.2e  %.1fs elapsed", engine.state.epoch, engine.state.max_epochs,
                 loss, optimizer.param_groups[0]["lr"], time.monotonic() - started)

    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda engine: history.add_loss(float(engine.state.output[0]["loss"])))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, log_epoch)
    evaluator.add_event_handler(Events.COMPLETED, lambda engine: history.add_validation(
        trainer.state.epoch, float(engine.state.metrics.get(metric_name, float("nan"))), run_dir))

    stopped = {"by_time": False}

    def final_validation(engine: Engine) -> None:
        if engine.state.epoch % opts.val_interval != 0 or stopped["by_time"]:
            evaluator.run(engine.state.epoch)

    trainer.add_event_handler(Events.COMPLETED, final_validation)

    if opts.resume:
        state = checkpoints.load()
        trainer.state.epoch = state["epoch"]
        trainer.state.iteration = state["iteration"]
        trainer.state.max_epochs = opts.epochs
        trainer.state.epoch_length = epoch_length
        log.info("resuming from epoch %d (best validation Dice so far %.4f)", state["epoch"], checkpoints.best_metric)
        if state["epoch"] >= opts.epochs:
            raise InputError(checkpoints.last_path, f"already trained {state['epoch']} epochs; pass a larger --epochs to continue")

    started = time.monotonic()
    if opts.max_minutes is not None:
        limit = TimeLimit(max(1, int(opts.max_minutes * 60)))

        def time_check(engine: Engine) -> None:
            before = engine.should_terminate
            limit(engine)
            if engine.should_terminate and not before:
                stopped["by_time"] = True
                log.info("time budget of %.1f min reached at epoch %d; stopping", opts.max_minutes, engine.state.epoch)

        trainer.add_event_handler(Events.ITERATION_COMPLETED, time_check)
    trainer.run()
    elapsed = time.monotonic() - started
    if not checkpoints.model_path.exists():  # no validation happened (e.g. stopped in the first epoch)
        with atomic_path(checkpoints.model_path) as tmp:
            torch.save(network.state_dict(), tmp)

    history.save(run_dir)
    summary = {
        "epochs_completed": trainer.state.epoch,
        "iterations": trainer.state.iteration,
        "best_val_mean_dice": checkpoints.best_metric if checkpoints.best_metric >= 0 else None,
        "best_epoch": checkpoints.best_epoch,
        "seconds": round(elapsed, 1),
        "stopped_by_time_budget": stopped["by_time"],
        "init_weights": None if transfer is None else {"source": str(opts.init_weights), "loaded": len(transfer["loaded"]),
                                                       "skipped": transfer["skipped"]},
        "device": str(device),
        "options": {k: v for k, v in asdict(opts).items() if k != "network"},
    }
    atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    log.info("training done: %d epochs in %.0fs, best validation Dice %.4f (epoch %d); model: %s",
             trainer.state.epoch, elapsed, checkpoints.best_metric, checkpoints.best_epoch, checkpoints.model_path)
    return summary
