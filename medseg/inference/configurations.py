"""Ensembles across configurations: models of one task trained on different plans (a 2d and a 3d_fullres
configuration, other spacings or patches), combined in the input's grid.

Each member (a :class:`~medseg.inference.predictor.Predictor`, itself maybe a fold ensemble) preprocesses the
image its own way and predicts probabilities in its own grid, in bounded memory (its sliding window streams
blocks; large outputs wait on disk in float16). Then, one class at a time, each member's probability of that
class is resampled to the input's grid (the inversion of its own preprocessing,
:meth:`~medseg.inference.inferer.InvertPredictiond.native_channel`) and the members' mean is reduced: argmax
over the classes as they come (first maximum on ties), or for a region-based task each region painted where the
mean sigmoid exceeds 0.5. Memory in the input grid is therefore one class of every member plus the running
maximum and the label map, never the classes x volume of any member. Postprocessing rules chosen for the
ensemble (:mod:`medseg.inference.postprocess`) are applied to the label map last.

The label map equals the argmax of the mean of the members' probability maps each resampled to the input grid
(nnU-Net's ensembles average the resampled probabilities too).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import InputError, MedsegError
from medseg.inference.postprocess import LargestComponentsd, PostprocessingRules
from medseg.inference.predictor import LoadedImage, Predictor
from medseg.io.image import SourceImage, label_map_dtype

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

__all__ = ["ConfigurationEnsemble"]


class ConfigurationEnsemble:
    """Several predictors of one task, each with its own plan, as one predictor (module docstring); the same
    ``load`` / ``infer`` / ``write`` as :class:`~medseg.inference.predictor.Predictor`, so
    :func:`medseg.inference.cohort.predict_files` and :func:`medseg.inference.series.predict_series` take it.

    Raises
    ------
    ValueError
        No member, or members whose labels, regions or input channels differ (they do not segment one task).
    """

    def __init__(self, members: Sequence[Predictor], rules: PostprocessingRules | None = None) -> None:
        if not members:
            raise ValueError("a configuration ensemble needs at least one member")
        first = members[0].plan
        for member in members[1:]:
            plan = member.plan
            if (dict(plan.labels) != dict(first.labels) or tuple(plan.regions) != tuple(first.regions)
                    or [c.name for c in plan.input_channels] != [c.name for c in first.input_channels]):
                raise ValueError(f"members of one ensemble must share labels, regions and input channels: "
                                 f"{plan.configuration} ({_task(plan)}) vs {first.configuration} ({_task(first)})")
        self.members = list(members)
        self.rules = rules
        for member in self.members:
            if member.output == "labels":
                member.output = "auto"  # probabilities in memory, or on disk when large: never labels

    @property
    def plan(self) -> Any:
        """The first member's plan (the task's labels, the checks of an input)."""
        return self.members[0].plan

    def load(self, image: SourceImage | sitk.Image | str | os.PathLike[str]
             | Sequence[SourceImage | sitk.Image | str | os.PathLike[str]], name: str = "image") -> LoadedImage:
        """Preprocess one image for every member (read once).

        Raises
        ------
        InputError
            As :meth:`Predictor.load`.
        """
        first = self.members[0].load(image, name)
        sources = list(first.channels) or [first.source]
        loaded = [first] + [member.load(sources if len(sources) > 1 else sources[0], name)
                            for member in self.members[1:]]
        return LoadedImage(first.source, {"members": [item.data for item in loaded]}, first.channels)

    def infer(self, loaded: LoadedImage) -> np.ndarray:
        """Label map (index order of the input) of an input :meth:`load` returned (module docstring).

        Raises
        ------
        InputError
            NaN/Inf voxels, or not enough memory (as :meth:`Predictor.infer`).
        """
        import torch

        from medseg.inference.inferer import InvertPredictiond

        where = loaded.source.path or loaded.source.name
        datas = loaded.data["members"]
        inverters = []
        try:
            with torch.inference_mode():
                for member, data in zip(self.members, datas, strict=True):
                    data["pred"] = member.inferer(data["image"][None].to(member.device), member.network)[0].cpu()
                    inverters.append(InvertPredictiond(keys="pred", transform=member.preprocessing,
                                                       orig_keys="image", regions=member.plan.regions))
        except InputError as exc:
            if exc.path is not None:
                raise
            raise InputError(where, exc.problem) from exc
        labels = self._reduce(inverters, datas)
        if self.rules is not None and self.rules.changes_anything:
            labels = LargestComponentsd(keys="pred", rules=self.rules)({"pred": labels[None]})["pred"][0]
        result = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels)
        if tuple(result.shape) != loaded.geometry.size:
            raise MedsegError(f"{where}: internal error, the ensemble's label map has shape {result.shape}, "
                              f"input has {loaded.geometry.size}")
        return result.astype(label_map_dtype(self.plan.num_classes - 1))

    def _reduce(self, inverters: list[Any], datas: list[dict[str, Any]]) -> torch.Tensor:
        """The label map of the members' mean probabilities in the input grid, one class at a time."""
        import torch

        from medseg.inference.inferer import label_map_by_class

        def mean(c: int) -> torch.Tensor:
            total: torch.Tensor | None = None
            for inverter, data in zip(inverters, datas, strict=True):
                native = inverter.native_channel(data, "pred", c)[0].as_subclass(torch.Tensor)
                total = native if total is None else total.add_(native)
            assert total is not None
            return total.div_(len(self.members))

        return label_map_by_class(int(datas[0]["pred"].shape[0]), mean, self.plan.regions)

    def lesion_labels(self) -> list[int]:
        """Labels written as instances by ``--instances`` (the first member's)."""
        return self.members[0].lesion_labels()

    def write(self, labels: np.ndarray, source: SourceImage | str | os.PathLike[str], output_path: Any,
              instances_path: Any = None, instance_labels: Sequence[int] | None = None,
              min_lesion_ml: float = 0.0) -> Any:
        """As :meth:`Predictor.write`."""
        return self.members[0].write(labels, source, output_path, instances_path, instance_labels, min_lesion_ml)

    def describe(self) -> str:
        """The members' configurations, e.g. ``2d + 3d_fullres``."""
        return " + ".join(str(member.plan.configuration) for member in self.members)


def _task(plan: Any) -> str:
    return json.dumps({"labels": {str(k): v for k, v in sorted(plan.labels.items())},
                       "channels": [c.name for c in plan.input_channels]})
