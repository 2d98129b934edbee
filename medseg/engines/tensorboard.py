"""TensorBoard event files of a training run, written by MONAI's ``TensorBoardStatsHandler``.

MONAI's handler opens its event file (and creates ``log_dir``) when it is *built*; a bundle config
builds its handlers while it still checks and loads the run's inputs, and a run that fails there must
leave the bundle as it found it. :class:`TensorBoardLog` builds and attaches MONAI's handler when the
engine starts instead, once everything has been checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import TensorBoardStatsHandler

from medseg.engines.distributed import is_main_process

__all__ = ["TensorBoardLog"]


class TensorBoardLog:
    """MONAI's ``TensorBoardStatsHandler`` writing into ``log_dir``, made and attached when the engine
    first starts (an Ignite handler: attach it to a trainer or an evaluator).

    ``tag_name``, ``output_transform`` (default: MONAI's, the first item of the output),
    ``iteration_log`` and ``epoch_log`` are MONAI's arguments; metrics are logged against the
    engine's epoch (an evaluator run by MONAI's ``ValidationHandler`` has the trainer's). Training on
    several processes, only the main process writes.
    """

    def __init__(self, log_dir: str | os.PathLike[str], tag_name: str = "Loss",
                 output_transform: Callable[[Any], Any] | None = None, iteration_log: bool = True,
                 epoch_log: bool = True) -> None:
        self.log_dir = str(log_dir)
        self.options: dict[str, Any] = {"tag_name": tag_name, "iteration_log": iteration_log, "epoch_log": epoch_log}
        if output_transform is not None:
            self.options["output_transform"] = output_transform
        self.handler: TensorBoardStatsHandler | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)

    def _start(self, engine: Engine) -> None:
        if not is_main_process():  # training on several processes: one set of event files, the main process's
            return
        if self.handler is None:  # an evaluator starts at every validation: one writer for all of them
            self.handler = TensorBoardStatsHandler(log_dir=self.log_dir, **self.options)
            self.handler.attach(engine)

    def close(self) -> None:
        """Close the event file (flushes what is buffered)."""
        if self.handler is not None:
            self.handler.close()
