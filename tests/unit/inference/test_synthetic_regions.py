"""End to end on ``medseg synth --channels 2 --regions``: the plan the dataset gives, its training items and
preprocessing, validation scoring the painted label map, and prediction of the nnU-Net test folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from medseg.data.datalist import load_datalist, validate_datalist
from medseg.data.synthetic import write_dataset
from medseg.engines.data import Split, case_items
from medseg.inference.cohort import predict_files
from medseg.inference.compose import validation_postprocessing
from medseg.inference.predictor import Predictor
from medseg.networks import build_network
from medseg.plan import NetworkSpec, make_plan
from medseg.transforms import label_map_to_regions, preprocessing


def test_a_synthetic_two_channel_region_dataset_trains_validates_and_predicts(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "data", "ct", cases=4, seed=0, size=32, channels=2, regions=True)
    datalist = load_datalist(dataset)
    plan = make_plan(datalist, validate_datalist(datalist), network=NetworkSpec(name="dynunet", filters=(4, 8, 8, 8)))
    assert plan.num_channels == 2 and plan.input_channels[0].intensity.preset == "ct"
    assert len(plan.regions) == 3 and plan.num_outputs == 3

    # training side: both channel files of a case stacked; the regions of its label map, painted back, are it
    items = case_items(Split(0, datalist.training[:1], []))
    assert isinstance(items[0]["image"], list) and len(items[0]["image"]) == 2
    data = preprocessing(plan, ("image", "label"))(items[0])
    assert data["image"].shape[0] == 2 and data["label"].shape[0] == 1
    label = data["label"]
    logits = label_map_to_regions(label, plan.regions) * 20.0 - 10.0  # a perfect region network's output
    scored = validation_postprocessing(plan)({"pred": logits, "label": label})
    assert torch.equal(scored["pred"], scored["label"]) and scored["pred"].shape[0] == plan.num_classes
    assert int(scored["label"][1:].sum()) > 0  # foreground is scored

    # prediction: the test cases' channel files grouped into cases, label maps on each case's grid
    torch.manual_seed(0)
    network = build_network(plan).eval()
    images = dataset.parent / "imagesTs"
    written = predict_files(plan, lambda: Predictor(plan, network, torch.device("cpu")), images, tmp_path / "out")
    assert [p.name for p in written] == [f"{c.name}_seg.nii.gz" for c in datalist.test]
    for path, case in zip(written, datalist.test):
        out, first = sitk.ReadImage(str(path)), sitk.ReadImage(str(case.images[0]))
        assert out.GetSize() == first.GetSize() and out.GetOrigin() == first.GetOrigin()
        assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) <= set(plan.labels)
