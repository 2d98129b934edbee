"""MLflow tracking of a training run through MONAI's ``MLFlowHandler`` (``medseg train --mlflow URI``).

:class:`MLflowTracking` is the handler ``configs/train.json`` names in ``train#handlers``; it does
nothing unless ``mlflow_uri`` is set. It logs the plan and the run's options as parameters, and per
epoch the mean training loss and the learning rate (trainer) and each validation's mean Dice
(evaluator, at the trainer's epoch), in one MLflow run named after the run folder.

Where: a tracking server (``http://`` or ``https://``), or a local folder (a path or a ``file:`` URI),
where the run goes into ``FOLDER/mlruns.db`` (MLflow's SQLite store; MONAI's handler refuses MLflow's
retired file store) with artifacts under ``FOLDER/mlruns/``. Needs the ``mlflow`` extra
(``pip install medseg[mlflow]``: mlflow-skinny with SQLAlchemy and Alembic for the SQLite store).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ignite.engine import Engine, Events

from medseg.engines.distributed import is_main_process
from medseg.errors import InputError
from medseg.plan import Plan

__all__ = ["MLflowTracking", "check_tracking", "tracking_location"]

#: Schemes of a tracking server (anything else must be a local folder).
SERVER_SCHEMES = ("http", "https")
EXPERIMENT = "medseg"


def tracking_location(uri: str, file_uri: bool = True) -> str:
    """A server URI as it is, a local folder (a path, or with ``file_uri`` a ``file:`` URI) as an absolute path.

    ``medseg train`` turns ``--mlflow file:///...`` into a path before it reaches the config, where a
    ``file:`` URI is refused (``file_uri=False``): safe mode confines a written folder given as a path,
    and would take a URI for a relative path.

    Raises
    ------
    InputError
        Another scheme (e.g. ``sqlite:``, ``s3:``; ``file:`` without ``file_uri``): name a folder or a
        tracking server instead.
    """
    parsed = urlparse(uri)
    if parsed.scheme in SERVER_SCHEMES:
        return uri
    if parsed.scheme == "file" and file_uri:
        return os.path.abspath(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:" is a Windows drive
        raise InputError(None, f"--mlflow takes a tracking server (http:// or https://) or a local folder, got {uri!r}")
    return os.path.abspath(os.path.expanduser(uri))


def check_tracking(uri: str | None) -> None:
    """Check ``--mlflow`` before anything is written: a usable location and MLflow installed.

    Raises
    ------
    InputError
        A location :func:`tracking_location` refuses, or MLflow (or its SQLite store for a local
        folder) not installed.
    """
    if uri is None:
        return
    if not isinstance(uri, str) or not uri:
        raise InputError(None, f"--mlflow must be a folder or a tracking server URI, got {uri!r}")
    location = tracking_location(uri)
    needed = ["mlflow"] + ([] if urlparse(location).scheme in SERVER_SCHEMES else ["sqlalchemy", "alembic"])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(None, f"--mlflow needs {', '.join(missing)}: pip install 'medseg[mlflow]'")


def _store(location: str) -> tuple[str, str | None]:
    """MLflow's tracking URI and artifact location for :func:`tracking_location`'s result."""
    if urlparse(location).scheme in SERVER_SCHEMES:
        return location, None
    folder = Path(location)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'mlruns.db').as_posix()}", (folder / "mlruns").resolve().as_uri()


def plan_parameters(plan: Plan, options: Any = None) -> dict[str, Any]:
    """The parameters logged for a run: the plan's (spacing, patch, network, labels, ...) and the options'."""
    data = plan.to_json()
    params: dict[str, Any] = {
        "configuration": plan.configuration, "dims": plan.dims, "modality": plan.modality,
        "target_spacing": list(plan.target_spacing), "patch_size": list(plan.patch_size),
        "plan_batch_size": plan.batch_size, "network": json.dumps(data["network"]), "labels": json.dumps(data["labels"]),
        "channels": plan.num_channels, "regions": len(plan.regions), "ignore_label": plan.ignore_label,
    }
    if options is not None:
        for key in ("epochs", "learning_rate", "batch_size", "samples_per_case", "iterations_per_epoch", "fold",
                    "seed", "max_minutes", "max_iterations", "device"):
            params[key] = getattr(options, key, None)
    return params


class MLflowTracking:
    """Track a run in MLflow (see the module docstring): an Ignite handler for the trainer. It attaches
    MONAI's ``MLFlowHandler`` to the trainer (the run, named after the ``bundle_root`` folder, starts
    with the trainer and is closed when it completes); the evaluator's metrics are logged into the same
    run through that handler's client, the final validation included. Nothing happens without
    ``tracking_uri``.

    Raises
    ------
    InputError
        (when attached) A location :func:`check_tracking` refuses.
    """

    def __init__(self, tracking_uri: str | None, plan: Plan, evaluator: Engine,
                 bundle_root: str | os.PathLike[str] = "medseg", options: Any = None,
                 experiment_name: str = EXPERIMENT) -> None:
        self.tracking_uri, self.plan, self.evaluator, self.options = tracking_uri, plan, evaluator, options
        self.run_name = Path(os.path.abspath(bundle_root)).name or "medseg"
        self.experiment_name = experiment_name
        self.handler: Any = None
        self.run_id: str | None = None
        self._losses: list[float] = []

    def attach(self, trainer: Engine) -> None:
        if self.tracking_uri is None or not is_main_process():  # several training processes: the main one logs
            return
        check_tracking(self.tracking_uri)
        from monai.handlers import MLFlowHandler  # needs mlflow, an optional extra

        uri, artifacts = _store(tracking_location(self.tracking_uri, file_uri=False))
        self.handler = MLFlowHandler(tracking_uri=uri, experiment_name=self.experiment_name, run_name=self.run_name,
                                     artifact_location=artifacts, iteration_log=False, epoch_logger=self._log_epoch,
                                     experiment_param=plan_parameters(self.plan, self.options),
                                     close_on_complete=True)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._add_loss)
        self.handler.attach(trainer)
        trainer.add_event_handler(Events.STARTED, self._started)
        self.evaluator.add_event_handler(Events.COMPLETED, lambda evaluator: self._log_validation(evaluator, trainer))

    def _started(self, _: Engine) -> None:
        self.run_id = self.handler.cur_run.info.run_id

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is not None:
            for key, value in metrics.items():
                self.handler.client.log_metric(self.run_id, key, float(value), step=step)

    def _add_loss(self, trainer: Engine) -> None:
        output: Any = trainer.state.output
        first = output[0] if isinstance(output, (list, tuple)) and output else output
        loss = first.get("loss") if isinstance(first, dict) else None
        if loss is not None:
            self._losses.append(float(loss))

    def _log_epoch(self, trainer: Engine) -> None:
        metrics: dict[str, float] = {}
        if self._losses:
            metrics["train_loss"] = sum(self._losses) / len(self._losses)
        optimizer = getattr(trainer, "optimizer", None)
        if optimizer is not None:
            metrics["learning_rate"] = float(optimizer.param_groups[0]["lr"])
        self._log(metrics, trainer.state.epoch)
        self._losses = []

    def _log_validation(self, evaluator: Engine, trainer: Engine) -> None:
        metrics = {k: v for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
        self._log(metrics, trainer.state.epoch)
