"""An ensemble across configurations (issue 15, item 3): members of other spacings and patches, each predicting in
its own grid, combined in the input's grid class by class; equal to averaging the members' probability maps
resampled to the input grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd

from medseg.inference.configurations import ConfigurationEnsemble
from medseg.inference.postprocess import PostprocessingRules, apply_rules
from medseg.inference.predictor import Predictor
from medseg.networks import build_network
from medseg.plan import Intensity, NetworkSpec, Plan
from medseg.transforms import preprocessing

LABELS = {0: "background", 1: "liver", 2: "spleen"}
CT = Intensity("ct", -100.0, 300.0, 50.0, 60.0)


def _plan(spacing: tuple[float, float, float], patch: tuple[int, int, int], labels: dict[int, str] = LABELS) -> Plan:
    return Plan(3, "CT", dict(labels), spacing, patch, CT, NetworkSpec(name="dynunet", filters=(4, 8, 16)), overlap=0.5)


def _member(spacing: tuple[float, float, float], patch: tuple[int, int, int], seed: int) -> Predictor:
    plan = _plan(spacing, patch)
    torch.manual_seed(seed)
    network = build_network(plan).eval()
    return Predictor(plan, network, torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT-like image on an oblique-free LPS grid of 1.5 x 1.5 x 2 mm, 30 x 26 x 18 voxels."""
    rng = np.random.default_rng(0)
    array = rng.normal(0.0, 80.0, (18, 26, 30)).astype(np.float32)  # (z, y, x)
    array[4:14, 6:20, 5:25] += 120.0
    itk = sitk.GetImageFromArray(array)
    itk.SetSpacing((1.5, 1.5, 2.0))
    itk.SetOrigin((4.0, -7.0, 11.0))
    path = tmp_path_factory.mktemp("ct") / "case.nii.gz"
    sitk.WriteImage(itk, str(path))
    return path


def _native_probabilities(member: Predictor, path: Path) -> torch.Tensor:
    """MONAI alone: the member's preprocessing, MONAI's Gaussian sliding window, softmax, and MONAI's linear
    inversion of all classes at once, to the input grid."""
    chain = preprocessing(member.plan, ("image",))
    data = chain({"image": str(path)})
    with torch.no_grad():
        logits = sliding_window_inference(data["image"][None], member.plan.patch_size, 2, member.network, 0.5,
                                          mode="gaussian")[0]
    data["pred"] = MetaTensor(torch.softmax(logits, 0), meta=data["image"].meta)
    native = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(data)["pred"]
    return torch.as_tensor(native)


def test_members_of_other_grids_average_their_probabilities_in_the_input_grid(image: Path) -> None:
    members = [_member((2.0, 2.0, 2.0), (16, 16, 16), 1), _member((3.0, 3.0, 2.5), (16, 16, 8), 2)]
    ensemble = ConfigurationEnsemble(members)
    labels = ensemble.infer(ensemble.load(image))
    assert labels.shape == (30, 26, 18) and labels.dtype == np.uint8
    mean = torch.stack([_native_probabilities(m, image) for m in members]).mean(0)
    reference = mean.argmax(0).numpy()
    assert len(np.unique(reference)) == 3  # every class somewhere: the test can tell them apart
    assert (labels == reference).mean() >= 0.999
    # not simply one member's answer
    alone = [m.predict_array(image) for m in members]
    assert all((labels != one).any() for one in alone)


def test_one_member_is_that_predictor_and_rules_come_last(image: Path) -> None:
    member = _member((2.0, 2.0, 2.0), (16, 16, 16), 3)
    own = member.predict_array(image)
    alone = ConfigurationEnsemble([member])
    np.testing.assert_array_equal(alone.infer(alone.load(image)), own)
    rules = PostprocessingRules(foreground_largest_component=True, largest_component_labels=(1, 2))
    with_rules = ConfigurationEnsemble([member], rules)
    np.testing.assert_array_equal(with_rules.infer(with_rules.load(image)), apply_rules(own, rules))


def test_members_of_another_task_are_refused() -> None:
    first = _member((2.0, 2.0, 2.0), (16, 16, 16), 1)
    other_plan = _plan((2.0, 2.0, 2.0), (16, 16, 16), {0: "background", 1: "liver"})
    other = Predictor(other_plan, build_network(other_plan).eval(), torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match="share labels"):
        ConfigurationEnsemble([first, other])
    with pytest.raises(ValueError, match="at least one member"):
        ConfigurationEnsemble([])
