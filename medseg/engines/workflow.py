"""The parts of a training run: everything checked and loaded first (:func:`prepare_run`, no writes),
then MONAI's Ignite engines (:func:`build_evaluator`, :func:`build_trainer`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, MeanDice, TensorBoardStatsHandler, ValidationHandler, from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import AsDiscreted, Compose
from monai.utils import set_determinism

from medseg.bundle.create import read_trainable_metadata
from medseg.data.datalist import Case, Datalist, split_cases
from medseg.engines.records import TrainingHistory
from medseg.engines.weights import ResumePoint, apply_matching_weights, load_resume_checkpoint
from medseg.errors import BundleError, InputError
from medseg.networks import build_network
from medseg.plan import Plan
from medseg.transforms import augmentation, preprocessing

if TYPE_CHECKING:
    from medseg.engines.training import TrainOptions

log = logging.getLogger("medseg.engines.training")

METRIC = "val_mean_dice"


@dataclass
class PreparedRun:
    """A training run with every input checked and loaded, nothing written yet."""

    run_dir: Path
    plan: Plan
    datalist: Datalist
    opts: TrainOptions
    device: torch.device
    train_cases: list[Case]
    val_cases: list[Case]
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    transfer: dict[str, list[str]] | None
    resume: ResumePoint | None
    history: TrainingHistory
    train_loader: DataLoader
    val_loader: DataLoader
    epoch_length: int

    def split_json(self) -> str:
        return json.dumps({"fold": self.opts.fold, "training": [c.name for c in self.train_cases],
                           "validation": [c.name for c in self.val_cases]}, indent=2) + "\n"


def _resumed_split(run_dir: Path, datalist: Datalist) -> tuple[list[Case], list[Case]]:
    split_file = run_dir / "split.json"
    if not split_file.exists():
        raise BundleError(f"{split_file}: no training to resume in this bundle")
    try:
        split = json.loads(split_file.read_text(encoding="utf-8"))
        names = [str(n) for n in split["training"]], [str(n) for n in split["validation"]]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"{split_file}: not a training split ({type(exc).__name__})") from exc
    by_name = {c.name: c for c in datalist.training}
    missing = [n for n in names[0] + names[1] if n not in by_name]
    if missing:
        raise InputError(datalist.path, f"cases of the run being resumed are missing: {', '.join(missing)}")
    return [by_name[n] for n in names[0]], [by_name[n] for n in names[1]]


def _loaders(plan: Plan, opts: TrainOptions, train_cases: list[Case],
             val_cases: list[Case]) -> tuple[DataLoader, DataLoader]:
    keys = ("image", "label")
    pre = preprocessing(plan, keys)
    workers = min(2, os.cpu_count() or 1)
    log.info("loading %d training and %d validation cases", len(train_cases), len(val_cases))
    train_ds = CacheDataset([{"image": str(c.image), "label": str(c.label)} for c in train_cases],
                            Compose(list(pre.transforms) + list(augmentation(plan, opts.samples_per_case).transforms)),
                            cache_rate=1.0, num_workers=workers, progress=False)
    val_ds = CacheDataset([{"image": str(c.image), "label": str(c.label)} for c in val_cases], pre,
                          cache_rate=1.0, num_workers=workers, progress=False)
    train_loader = DataLoader(train_ds, batch_size=opts.batch_size, shuffle=True, num_workers=opts.num_workers,
                              persistent_workers=opts.num_workers > 0, drop_last=len(train_ds) > opts.batch_size)
    return train_loader, DataLoader(val_ds, batch_size=1, num_workers=0)


def prepare_run(run_dir: Path, plan: Plan, datalist: Datalist, opts: TrainOptions, device: torch.device,
                network: torch.nn.Module | None, init: tuple[Path, Mapping[str, Any]] | None,
                new_bundle: bool) -> PreparedRun:
    """Check and load every input of a run -- split, bundle metadata, the ``--init-weights`` state
    (``init``, from :func:`~medseg.engines.weights.read_init_weights`) against the network, the
    ``--resume`` checkpoint and history, the images -- without writing anything.

    Raises
    ------
    InputError
        Unusable ``--init-weights``, cases of a resumed run missing, a resumed run already past
        ``--epochs`` / ``--max-iterations``, invalid ``--fold``.
    BundleError
        Unreadable ``split.json``, ``history.json``, checkpoint or bundle metadata.
    """
    set_determinism(seed=opts.seed)
    if opts.resume:
        train_cases, val_cases = _resumed_split(run_dir, datalist)
    else:
        train_cases, val_cases = split_cases(datalist.training, opts.fold)
    history = TrainingHistory.load(run_dir) if opts.resume else TrainingHistory()
    if not new_bundle:
        read_trainable_metadata(run_dir)  # recording the result after training must not fail

    network = (network if network is not None else build_network(plan)).to(device)
    transfer = apply_matching_weights(network, *init) if init is not None else None
    optimizer = torch.optim.AdamW(network.parameters(), lr=opts.learning_rate, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: (1 - min(epoch, opts.epochs - 1) / opts.epochs) ** 0.9)
    resume = None
    if opts.resume:
        last = run_dir / "checkpoints" / "last.pt"
        resume = load_resume_checkpoint(last, network, optimizer, scheduler)
        if resume.epoch >= opts.epochs:
            raise InputError(last, f"already trained {resume.epoch} epochs; pass a larger --epochs to continue")
        if opts.max_iterations is not None and resume.iteration >= opts.max_iterations:
            raise InputError(last, f"already trained {resume.iteration} iterations; pass a larger --max-iterations")

    train_loader, val_loader = _loaders(plan, opts, train_cases, val_cases)
    epoch_length = max(len(train_loader), opts.min_iterations_per_epoch)
    if resume is not None and resume.epoch_length and resume.epoch_length != epoch_length:
        log.info("keeping the resumed run's %d iterations per epoch (this dataset and batch size give %d)",
                 resume.epoch_length, epoch_length)
        epoch_length = resume.epoch_length
    return PreparedRun(run_dir, plan, datalist, opts, device, train_cases, val_cases, network, optimizer, scheduler,
                       transfer, resume, history, train_loader, val_loader, epoch_length)


def build_evaluator(run: PreparedRun) -> SupervisedEvaluator:
    """Sliding-window validation scored by MONAI's ``MeanDice`` (foreground labels; per-case details kept)."""
    plan = run.plan
    return SupervisedEvaluator(
        device=run.device,
        val_data_loader=run.val_loader,
        network=run.network,
        inferer=SlidingWindowInferer(roi_size=plan.patch_size, sw_batch_size=plan.sw_batch_size, overlap=0.25,
                                     mode="gaussian"),
        postprocessing=Compose([AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=plan.num_classes)]),
        key_val_metric={METRIC: MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]),
                                         save_details=True)},
    )


def build_trainer(run: PreparedRun, evaluator: SupervisedEvaluator, loss: torch.nn.Module | None) -> SupervisedTrainer:
    """MONAI's ``SupervisedTrainer`` (DiceCE loss unless given) with LR schedule, validation every
    ``val_interval`` epochs and TensorBoard logs in ``run_dir/logs`` (created here)."""
    tb_dir = str(run.run_dir / "logs")
    trainer = SupervisedTrainer(
        device=run.device,
        max_epochs=run.opts.epochs,
        epoch_length=run.epoch_length,
        train_data_loader=run.train_loader,
        network=run.network,
        optimizer=run.optimizer,
        loss_function=loss if loss is not None else DiceCELoss(to_onehot_y=True, softmax=True),
        inferer=SimpleInferer(),
        train_handlers=[
            LrScheduleHandler(lr_scheduler=run.scheduler, print_lr=False),
            ValidationHandler(validator=evaluator, interval=run.opts.val_interval, epoch_level=True),
            TensorBoardStatsHandler(log_dir=tb_dir, tag_name="train_loss",
                                    output_transform=from_engine(["loss"], first=True)),
        ],
    )
    TensorBoardStatsHandler(log_dir=tb_dir, output_transform=lambda x: None,
                            global_epoch_transform=lambda epoch: trainer.state.epoch).attach(evaluator)
    if run.resume is not None:
        trainer.state.epoch = run.resume.epoch
        trainer.state.iteration = run.resume.iteration
        trainer.state.max_epochs = run.opts.epochs
        trainer.state.epoch_length = run.epoch_length
    return trainer


def iteration_loss(engine: Any) -> float:
    """The loss of the iteration just completed (MONAI decollates the output into a list of dicts)."""
    return float(engine.state.output[0]["loss"])
