"""nnU-Net v2 as the peer of ``scripts/bench_accuracy.py``: its own virtual environment, the dataset in its raw
layout, a trainer stopped at a wall-clock budget, and its commands run with a fixed number of threads.

Nothing of nnU-Net is imported here: it lives in its own venv and is driven through its console entry points.
The trainer subclass (:data:`TRAINER_SOURCE`) is written into that venv's ``nnunetv2`` package at run time
(:func:`trainer_module_path`), where ``nnUNetv2_train`` and ``nnUNetv2_predict`` look for trainer classes.

torchvision: pip resolves ``timm`` (required by dynamic_network_architectures) to PyPI's torchvision 0.28.0,
which fails to import beside the CPU wheel of torch 2.13.0 ('operator torchvision::nms does not exist').
nnU-Net's plan, preprocess, train and predict path for the default 3d_fullres plans never imports torchvision
(only the timm-based Primus trainers do, and the trainer search stops before them, see
:func:`trainer_module_path`), so the venv keeps torch 2.13.0 + torchvision 0.28.0 and :meth:`Peer.ensure`
checks the modules the benchmark uses instead of torchvision. The working pair, if a later nnU-Net needs
torchvision, is torch 2.14.1 + torchvision 0.29.1 (a CUDA build, 5.5 GB in the venv).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NNUNET_VERSION = "2.8.1"
TORCH_PIN = "torch==2.13.0"
DATASET_ID = 901
TRAINER = "nnUNetTrainerTimeBudget"
CONFIGURATION = "3d_fullres"
TRAINER_SUMMARY = "bench_summary.json"
EPOCH_ITERATIONS = 25  # the trainer's epoch: the learning-rate schedule still spans stock nnU-Net's 1000 x 250

# Runs one nnU-Net console entry point with every CPU count it reads (torch's thread pool on the CPU, default
# process counts) set to MEDSEG_BENCH_THREADS: nnUNetv2_train and nnUNetv2_predict size torch's pool by
# multiprocessing.cpu_count() and ignore OMP_NUM_THREADS.
LAUNCHER = """\
import multiprocessing, os, sys
from importlib.metadata import entry_points
threads = int(os.environ["MEDSEG_BENCH_THREADS"])
multiprocessing.cpu_count = lambda: threads
os.cpu_count = lambda: threads
name = sys.argv[1]
sys.argv = sys.argv[1:]
found = list(entry_points(group="console_scripts", name=name))
if not found:
    sys.exit(f"no console entry point {name!r} in this environment")
sys.exit(found[0].load()())
"""

TRAINER_SOURCE = '''\
"""Stock nnU-Net v2 training stopped cleanly at a wall-clock budget (written by medseg's scripts/bench_accuracy.py).

MEDSEG_BENCH_MINUTES is the budget, counted from the trainer's creation (network, data loaders, unpacking and
all epochs; not Python's start-up). Epochs are MEDSEG_BENCH_EPOCH_ITERATIONS training iterations (validation
iterations scaled as 250:50) and the number of epochs keeps the stock learning-rate schedule of 1000 epochs of
250 iterations. Before each training or validation step the trainer stops if that step, timed as the previous
one of its kind, would end past the budget; it then saves checkpoint_final.pth (what nnUNetv2_predict loads)
and writes bench_summary.json. The final validation on the fold's cases is skipped: it is not part of the budget
(with MEDSEG_BENCH_VALIDATE=1, for cross-validation, it runs after the budget, as medseg's out-of-fold predictions do).
"""

import json
import os
import random
import time

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

STOCK_EPOCHS, STOCK_ITERATIONS, STOCK_VAL_ITERATIONS = 1000, 250, 50


class BudgetSpent(Exception):
    """Raised before a step that would end past the budget."""


class nnUNetTrainerTimeBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.bench_started = time.monotonic()
        self.bench_budget_s = float(os.environ.get("MEDSEG_BENCH_MINUTES", "30")) * 60.0
        iterations = int(os.environ.get("MEDSEG_BENCH_EPOCH_ITERATIONS", "25"))
        self.num_iterations_per_epoch = iterations
        self.num_val_iterations_per_epoch = max(1, iterations * STOCK_VAL_ITERATIONS // STOCK_ITERATIONS)
        self.num_epochs = max(1, STOCK_EPOCHS * STOCK_ITERATIONS // iterations)
        self.bench_iterations = 0
        self.bench_val_iterations = 0
        self.bench_step_started = {}
        self.bench_step_s = {}
        self.bench_stopped_by = "epochs"

    def bench_check(self, kind):
        now = time.monotonic()
        previous = self.bench_step_started.get(kind)
        if previous is not None:
            self.bench_step_s[kind] = now - previous
        self.bench_step_started[kind] = now
        if now - self.bench_started + self.bench_step_s.get(kind, 0.0) > self.bench_budget_s:
            raise BudgetSpent(kind)

    def on_train_epoch_start(self):
        self.bench_step_started.pop("train", None)
        super().on_train_epoch_start()

    def on_validation_epoch_start(self):
        self.bench_step_started.pop("validation", None)
        super().on_validation_epoch_start()

    def train_step(self, batch: dict) -> dict:
        self.bench_check("train")
        result = super().train_step(batch)
        self.bench_iterations += 1
        return result

    def validation_step(self, batch: dict) -> dict:
        self.bench_check("validation")
        result = super().validation_step(batch)
        self.bench_val_iterations += 1
        return result

    def run_training(self):
        try:
            super().run_training()
        except BudgetSpent:
            self.bench_stopped_by = "time budget"
            self.print_to_log_file(f"time budget of {self.bench_budget_s / 60:g} min reached after "
                                   f"{self.bench_iterations} training iterations")
            self.on_train_end()
        summary = {
            "iterations": self.bench_iterations,
            "validation_iterations": self.bench_val_iterations,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "epochs_completed": self.bench_iterations // self.num_iterations_per_epoch,
            "seconds": round(time.monotonic() - self.bench_started, 1),
            "budget_seconds": self.bench_budget_s,
            "stopped_by": self.bench_stopped_by,
            "threads": torch.get_num_threads(),
        }
        with open(os.path.join(self.output_folder, "bench_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("MEDSEG_BENCH_VALIDATE") == "1":  # cross-validation: the fold's held-out cases
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file("final validation skipped (benchmark: the test cases are predicted instead)")


class nnUNetTrainerFixedIterations(nnUNetTrainer):
    """Small models for medseg's tests: MEDSEG_NNUNET_EPOCHS epochs of MEDSEG_NNUNET_ITERATIONS iterations (bounded
    by iterations, never by time), one validation batch per epoch, no final validation. Seeded (MEDSEG_NNUNET_SEED,
    default 0, plus the fold): the weights' initialisation and the patches drawn (in-process augmentation,
    nnUNet_n_proc_DA=0) repeat from run to run, so a tiny model that learns once learns in every run."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        seed = int(os.environ.get("MEDSEG_NNUNET_SEED", "0")) + (fold if isinstance(fold, int) else 0)  # or "all"
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ.get("MEDSEG_NNUNET_ITERATIONS", "25"))
        self.num_val_iterations_per_epoch = 1
        self.num_epochs = int(os.environ.get("MEDSEG_NNUNET_EPOCHS", "4"))

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (medseg test model)")
'''


class PeerError(Exception):
    """nnU-Net could not be installed or one of its commands failed; the message says which and why."""


@dataclass
class RawDataset:
    """A dataset converted to nnU-Net's raw layout, with the labelled test cases laid out for both systems."""

    folder: Path                # nnUNet_raw/DatasetXXX_Name
    dataset_id: int
    file_ending: str
    training: list[str]         # case identifiers
    test: list[str]
    test_images: Path           # the test images medseg predicts (one file per case, or imagesTs)
    test_labels: Path           # <case><file_ending> reference label maps (both are evaluated against these)
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def images_ts(self) -> Path:
        return self.folder / "imagesTs"


def file_ending(path: Path) -> str:
    """``.nii.gz`` for gzipped NIfTI, else the last suffix (``.nii``, ``.nrrd``, ``.mha``)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _place(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (a copy across file systems); nnU-Net only reads its raw files."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name``: nnU-Net's folder name, the name reduced to letters and digits."""
    cleaned = re.sub(r"[^A-Za-z0-9]", "", name.title()) or "Medseg"
    return f"Dataset{dataset_id:03d}_{cleaned}"


def convert_dataset(datalist: Any, work: Path, dataset_id: int = DATASET_ID) -> RawDataset:
    """Write ``work/nnUNet_raw/DatasetXXX_Name`` (imagesTr/CASE_0000, labelsTr/CASE, imagesTs, labelsTs,
    dataset.json with channel_names, labels, numTraining, file_ending) from a medseg ``Datalist`` (files are
    hard-linked), and ``work/test/{images,labels}`` with the labelled test cases under their medseg names.

    Raises
    ------
    ValueError
        No test case has a reference label map, or the files do not share one file ending.
    """
    tested = [case for case in datalist.test if case.label is not None]
    if not tested:
        raise ValueError(f"{datalist.path}: no test cases with reference label maps (imagesTs/ + labelsTs/); "
                         "both systems are scored on them")
    cases = list(datalist.training) + tested
    endings = {file_ending(p) for case in cases for p in (*_channels(case), case.label)}
    if len(endings) != 1:
        raise ValueError(f"{datalist.path}: images and label maps use several file endings ({', '.join(sorted(endings))}); "
                         "nnU-Net needs one")
    ending = endings.pop()
    folder = work / "nnUNet_raw" / dataset_folder_name(dataset_id, datalist.name)
    for case in datalist.training:
        for index, image in enumerate(_channels(case)):
            _place(image, folder / "imagesTr" / f"{case.name}_{index:04d}{ending}")
        _place(case.label, folder / "labelsTr" / f"{case.name}{ending}")
    single_channel = all(len(_channels(case)) == 1 for case in cases)
    for case in tested:
        for index, image in enumerate(_channels(case)):
            _place(image, folder / "imagesTs" / f"{case.name}_{index:04d}{ending}")
        if single_channel:
            _place(case.image, work / "test" / "images" / f"{case.name}{ending}")
        _place(case.label, folder / "labelsTs" / f"{case.name}{ending}")
        _place(case.label, work / "test" / "labels" / f"{case.name}{ending}")
    labels = {name: int(value) for value, name in sorted(datalist.labels.items())}
    description = {
        "name": datalist.name,
        "channel_names": _channel_names(datalist),
        "labels": labels,
        "numTraining": len(datalist.training),
        "file_ending": ending,
        "description": f"converted from {datalist.path} by medseg's scripts/bench_accuracy.py",
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    # several channels: medseg reads the test cases in nnU-Net's layout (CASE_0000, CASE_0001, ...)
    test_images = work / "test" / "images" if single_channel else folder / "imagesTs"
    return RawDataset(folder, dataset_id, ending, [c.name for c in datalist.training], [c.name for c in tested],
                      test_images, work / "test" / "labels", labels)


def _channels(case: Any) -> tuple[Path, ...]:
    return tuple(getattr(case, "images", None) or (case.image,))


def _channel_names(datalist: Any) -> dict[str, str]:
    """nnU-Net's ``channel_names`` (``CT`` selects its CT normalisation, anything else z-scoring)."""
    names = getattr(datalist, "channel_names", None) or (datalist.modality,)
    return {str(i): str(name) for i, name in enumerate(names)}


def trainer_module_path(site_packages_nnunetv2: Path) -> Path:
    """Where the trainer is written: beside nnU-Net's own ``nnUNetTrainer.py``. nnU-Net searches a folder's
    modules before its subpackages, so the search ends there, before it imports the Primus trainers
    (timm, then torchvision, which does not import beside torch 2.13.0)."""
    return site_packages_nnunetv2 / "training" / "nnUNetTrainer" / f"{TRAINER}.py"


def pinned(cores: frozenset[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that keeps a child process (and its workers) on ``cores`` (None: no pinning)."""
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, cores)


class Peer:
    """nnU-Net v2 in the venv ``venv``, with its folders under ``work`` and ``threads`` CPU threads."""

    def __init__(self, venv: Path, work: Path, threads: int, logs: Path) -> None:
        self.venv, self.work, self.threads, self.logs = venv, work, threads, logs
        self.cores: frozenset[int] | None = None  # the cores its processes are kept on (None: any)
        self.python = venv / "bin" / "python"
        self.version = ""

    # -- installation -------------------------------------------------------------------------------------
    def ensure(self, base_python: str = sys.executable) -> None:
        """Use the venv if nnU-Net imports there, else create it and install nnunetv2 with torch pinned.

        Raises
        ------
        PeerError
            The folder is something else, or the install failed (a venv this call created is removed).
        """
        if self.python.exists() and self._check() is None:
            self.install_trainer()
            return
        created = not self.venv.exists()
        if not created and not self.python.exists():
            raise PeerError(f"{self.venv}: exists but is not a virtual environment (no bin/python)")
        try:
            if created:
                self._call([base_python, "-m", "venv", str(self.venv)], "venv")
            constraints = self.venv / "medseg-constraints.txt"
            constraints.write_text(TORCH_PIN + "\n", encoding="utf-8")
            print(f"installing nnU-Net v2 {NNUNET_VERSION} into {self.venv} ({TORCH_PIN}; a few minutes)", flush=True)
            self._call([str(self.python), "-m", "pip", "install", "-q", "-c", str(constraints),
                        f"nnunetv2=={NNUNET_VERSION}"], "pip-install")
            problem = self._check()
            if problem is not None:
                raise PeerError(f"nnU-Net v2 installed into {self.venv} but does not import: {problem}")
        except PeerError as exc:
            if created:
                shutil.rmtree(self.venv, ignore_errors=True)
            raise PeerError(f"could not install nnU-Net v2 {NNUNET_VERSION} into {self.venv}: {exc}") from None
        self.install_trainer()

    def _check(self) -> str | None:
        code = ("import importlib.metadata as m, torch, nnunetv2.run.run_training, "
                "nnunetv2.inference.predict_from_raw_data, nnunetv2.experiment_planning.plan_and_preprocess_entrypoints;"
                "print(m.version('nnunetv2'), torch.__version__)")
        done = subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, env=self.env())
        if done.returncode != 0:
            return _tail(done.stderr, 3)
        self.version = done.stdout.strip()
        return None

    def install_trainer(self) -> Path:
        """Write :data:`TRAINER_SOURCE` into the venv's nnunetv2 package (replacing an older copy)."""
        done = subprocess.run([str(self.python), "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                              capture_output=True, text=True, env=self.env())
        if done.returncode != 0:
            raise PeerError(f"nnunetv2 does not import in {self.venv}: {_tail(done.stderr, 3)}")
        path = trainer_module_path(Path(done.stdout.strip()))
        path.write_text(TRAINER_SOURCE, encoding="utf-8")
        return path

    # -- commands -----------------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        threads = str(self.threads)
        env.update({
            "nnUNet_raw": str(self.work / "nnUNet_raw"),
            "nnUNet_preprocessed": str(self.work / "nnUNet_preprocessed"),
            "nnUNet_results": str(self.work / "nnUNet_results"),
            "nnUNet_n_proc_DA": threads,  # the planner sizes torch's pool by it; training sets its own (below)
            "nnUNet_def_n_proc": threads,
            "nnUNet_compile": "f",
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "MEDSEG_BENCH_THREADS": threads,
            "MEDSEG_BENCH_EPOCH_ITERATIONS": str(EPOCH_ITERATIONS),
        })
        env.update(extra)
        return env

    def run(self, entry_point: str, *args: str, log: str, **extra_env: str) -> float:
        """Run an nnU-Net console entry point (output to ``logs/<log>.log``); returns its wall-clock seconds.

        Raises
        ------
        PeerError
            It exited non-zero (the message ends with the last lines of its output).
        """
        return self._call([str(self.python), "-c", LAUNCHER, entry_point, *args], log, self.env(**extra_env))

    def _call(self, command: list[str], log: str, env: dict[str, str] | None = None) -> float:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"nnunet-{log}.log"
        started = time.monotonic()
        with open(log_path, "w", encoding="utf-8") as out:
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env or self.env(),
                                   preexec_fn=pinned(self.cores))
        seconds = time.monotonic() - started
        if code != 0:
            text = log_path.read_text(encoding="utf-8", errors="replace")
            shown = " ".join(command[3:5]) if "-c" in command[:3] else " ".join(command[:3])
            raise PeerError(f"{shown} exited with {code}:\n{_tail(text, 8)}")
        return seconds

    # -- the benchmark's steps ----------------------------------------------------------------------------
    def plan_and_preprocess(self, dataset: RawDataset) -> float:
        """``nnUNetv2_plan_and_preprocess -c 3d_fullres`` from a clean preprocessed folder; its seconds."""
        shutil.rmtree(self.work / "nnUNet_preprocessed" / dataset.name, ignore_errors=True)
        n = str(self.threads)
        return self.run("nnUNetv2_plan_and_preprocess", "-d", str(dataset.dataset_id), "-c", CONFIGURATION,
                        "-np", n, "-npfp", n, log="plan_and_preprocess")

    def plan_only(self, dataset: RawDataset) -> tuple[float, float]:
        """``nnUNetv2_extract_fingerprint`` then ``nnUNetv2_plan_experiment``; their seconds."""
        shutil.rmtree(self.work / "nnUNet_preprocessed" / dataset.name, ignore_errors=True)
        fingerprint = self.run("nnUNetv2_extract_fingerprint", "-d", str(dataset.dataset_id), "-np", str(self.threads),
                               log="extract_fingerprint")
        plan = self.run("nnUNetv2_plan_experiment", "-d", str(dataset.dataset_id), log="plan_experiment")
        return fingerprint, plan

    def plans(self, dataset: RawDataset) -> dict[str, Any]:
        path = self.work / "nnUNet_preprocessed" / dataset.name / "nnUNetPlans.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PeerError(f"{path}: nnU-Net's plans could not be read ({exc})") from None

    def train(self, dataset: RawDataset, minutes: float, fold: int = 0,
              validate: bool = False) -> tuple[float, dict[str, Any]]:
        """``nnUNetv2_train ID 3d_fullres FOLD -tr nnUNetTrainerTimeBudget -device cpu``: wall seconds, summary;
        with ``validate`` the fold's held-out cases are predicted after the budget (``fold_K/validation``)."""
        seconds = self.run("nnUNetv2_train", str(dataset.dataset_id), CONFIGURATION, str(fold), "-tr", TRAINER,
                           "-device", "cpu", log=f"train-fold{fold}", MEDSEG_BENCH_MINUTES=repr(float(minutes)),
                           MEDSEG_BENCH_VALIDATE="1" if validate else "0",
                           # augmentation workers beside the training process (0: in it, as medseg's num_workers 0)
                           nnUNet_n_proc_DA=str(self.threads - 1))
        folder = self.fold_folder(dataset, fold)
        path = folder / TRAINER_SUMMARY
        if not path.exists() or not (folder / "checkpoint_final.pth").exists():
            raise PeerError(f"nnUNetv2_train ended without {path.name} and checkpoint_final.pth in {path.parent}")
        if validate and not (folder / "validation" / "summary.json").exists():
            raise PeerError(f"nnUNetv2_train ended without validation/summary.json in {folder}")
        return seconds, json.loads(path.read_text(encoding="utf-8"))

    def model_folder(self, dataset: RawDataset) -> Path:
        return self.work / "nnUNet_results" / dataset.name / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"

    def fold_folder(self, dataset: RawDataset, fold: int = 0) -> Path:
        return self.model_folder(dataset) / f"fold_{fold}"

    def predict(self, dataset: RawDataset, out: Path, tta: bool, folds: Sequence[int] = (0,)) -> float:
        """``nnUNetv2_predict`` of imagesTs with the final checkpoints of ``folds`` (several: their ensemble); its
        seconds."""
        n = str(self.threads)
        args = ["-i", str(dataset.images_ts), "-o", str(out), "-d", str(dataset.dataset_id), "-c", CONFIGURATION,
                "-f", *(str(f) for f in folds), "-tr", TRAINER, "-chk", "checkpoint_final.pth", "-device", "cpu",
                "-npp", n, "-nps", n]
        return self.run("nnUNetv2_predict", *args, *([] if tta else ["--disable_tta"]),
                        log="predict" + ("" if list(folds) == [0] else "-folds"))

    def find_best_configuration(self, dataset: RawDataset, folds: Sequence[int]) -> tuple[float, dict[str, Any]]:
        """``nnUNetv2_find_best_configuration ID -c 3d_fullres -tr TRAINER -f FOLDS``: the out-of-fold Dice of the
        folds' validations and the postprocessing chosen on them (one configuration: nothing to ensemble across);
        its seconds and ``inference_information.json``."""
        seconds = self.run("nnUNetv2_find_best_configuration", str(dataset.dataset_id), "-c", CONFIGURATION,
                           "-tr", TRAINER, "-f", *(str(f) for f in folds), "-np", str(self.threads),
                           "--disable_ensembling", log="find_best_configuration")
        path = self.work / "nnUNet_results" / dataset.name / "inference_information.json"
        try:
            return seconds, json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PeerError(f"{path}: nnU-Net's choice could not be read ({exc})") from None

    def apply_postprocessing(self, pred: Path, out: Path, information: dict[str, Any]) -> float:
        """``nnUNetv2_apply_postprocessing`` of ``pred`` into ``out`` with the choice of
        :meth:`find_best_configuration`; its seconds."""
        best = information["best_model_or_ensemble"]
        return self.run("nnUNetv2_apply_postprocessing", "-i", str(pred), "-o", str(out), "-pp_pkl_file",
                        best["postprocessing_file"], "-np", str(self.threads), "-plans_json", best["some_plans_file"],
                        log="apply_postprocessing")


def voxel_order(values: list[Any], transpose_backward: list[int] | None) -> list[Any]:
    """A per-axis list of nnU-Net's plans in the image's (x, y, z) voxel order. nnU-Net lists axes in its
    transposed array order: ``transpose_backward`` takes them back to SimpleITK's array order (z, y, x),
    which is the voxel order reversed."""
    order = transpose_backward if transpose_backward is not None else list(range(len(values)))
    return [values[i] for i in order][::-1]


def plan_record(plans: dict[str, Any], configuration: str = CONFIGURATION) -> dict[str, Any]:
    """The compared fields of nnU-Net's plans for ``configuration``, spacing and patch in the image's
    (x, y, z) voxel order that medseg's plan uses (:func:`voxel_order`)."""
    config = plans["configurations"][configuration]
    back = plans.get("transpose_backward")
    kwargs = config.get("architecture", {}).get("arch_kwargs", {})
    n_stages = kwargs.get("n_stages") or len(config.get("pool_op_kernel_sizes", [])) or None
    return {
        "configuration": configuration,
        "spacing": [round(float(s), 4) for s in voxel_order(config["spacing"], back)],
        "patch_size": [int(p) for p in voxel_order(config["patch_size"], back)],
        "batch_size": int(config["batch_size"]),
        "n_stages": n_stages,
        "features": list(kwargs.get("features_per_stage", [])),
    }


def tiny_plans(preprocessed: Path, name: str, anisotropic: bool = False, configuration: str = "3d_fullres") -> Path:
    """Small models for tests and benchmarks: nnU-Net's plans (``nnUNetPlans.json`` in ``preprocessed``) with the
    ``configuration``'s network cut to 3 stages of 8-32 features on a 32^3 patch (``2d``: 32^2, batch 8), saved as
    ``<name>.json`` with that configuration only; ``anisotropic`` (3D): the first axis resampled 3.5 x coarser
    (nnU-Net's "separate z" resampling, in-plane spline and nearest along it, both ways) with an 8 x 32 x 32 patch
    (preprocess it with ``nnUNetv2_preprocess -plans_name NAME``)."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = name
    config = plans["configurations"][configuration]
    if configuration == "2d":
        config["patch_size"], config["batch_size"] = [32, 32], 8
        kernels, strides = [[3, 3]] * 3, [[1, 1], [2, 2], [2, 2]]
    else:
        config["patch_size"] = [32, 32, 32]
        kernels, strides = [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    if anisotropic:
        config["spacing"] = [config["spacing"][0] * 3.5, *config["spacing"][1:]]
        config["patch_size"] = [8, 32, 32]
        kernels, strides = [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
        config["data_identifier"] = f"{name}_3d_fullres"
    config["architecture"]["arch_kwargs"].update(
        n_stages=3, features_per_stage=[8, 16, 32], kernel_sizes=kernels, strides=strides,
        n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2])
    plans["configurations"] = {configuration: config}
    path = preprocessed / f"{name}.json"
    path.write_text(json.dumps(plans, indent=2))
    return path


def _tail(text: str, lines: int) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def main(argv: list[str] | None = None) -> int:
    """``python scripts/nnunet_peer.py --install VENV``: create nnU-Net's venv (what ``make test`` does for the
    tests that compare medseg with ``nnUNetv2_predict``); an existing working one is kept."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--install", required=True, metavar="VENV", help="the venv folder")
    args = parser.parse_args(argv)
    venv = Path(args.install).absolute()
    try:
        Peer(venv, venv / "work", 1, venv / "logs").ensure()
    except PeerError as exc:
        print(f"nnunet_peer: error: {exc}", file=sys.stderr)
        return 1
    print(f"nnU-Net v2 ready in {venv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
