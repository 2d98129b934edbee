"""Prediction with a model of two input channels and three sigmoid region outputs: the label map painted
from the regions on the input grid, the same on every path (plain, bounded-memory head, on disk, mirrored),
nnU-Net's channel files grouped into cases, and what is refused (a missing channel, a DICOM series)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd

from medseg.errors import InputError
from medseg.inference.cases import collect_cases
from medseg.inference.cohort import predict_files
from medseg.inference.compose import validation_postprocessing
from medseg.inference.inferer import InvertPredictiond, SlabInferer
from medseg.inference.predictor import Predictor
from medseg.inference.series import predict_series
from medseg.inference.sliding import slab_sliding_window
from medseg.labels import Region
from medseg.networks import build_network, split_pointwise_head
from medseg.plan import Channel, Intensity, NetworkSpec, Plan
from medseg.transforms import preprocessing, regions_to_label_map

LABELS = {0: "background", 1: "edema", 2: "necrosis", 3: "enhancing tumour"}
# nnU-Net's BraTS order: whole tumour painted 1 (edema), core over it 2, enhancing over both 3
REGIONS = (Region("whole tumour", (1, 2, 3), 1), Region("tumour core", (2, 3), 2), Region("enhancing tumour", (3,), 3))
SHAPE_XYZ = (28, 24, 20)


def region_plan(ignore_label: int | None = None) -> Plan:
    mr = Intensity("mr")
    return Plan(3, "MR", dict(LABELS), (2.0, 2.0, 2.0), (16, 16, 16), mr, NetworkSpec(name="dynunet", filters=(4, 8, 16)),
                overlap=0.5, channels=(Channel("T1", mr), Channel("FLAIR", mr)), regions=REGIONS,
                ignore_label=ignore_label)


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    """A random 2-channel DynUNet with 3 region outputs, its head's bias set so that each region's logit is
    positive on about half of the voxels (all four label values appear)."""
    torch.manual_seed(0)
    net = build_network(region_plan()).eval()
    head = net.output_block.conv.conv  # DynUNet's 1 x 1 x 1 output convolution
    with torch.no_grad():
        logits = net(torch.randn(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(3)))
        head.bias -= logits.flatten(2).median(dim=2).values[0]
        head.bias += torch.tensor([0.6, 0.0, -0.6])  # nested-like: whole tumour largest, enhancing smallest
    return net


def write_channels(folder: Path, case: str, seed: int = 0, origin: tuple[float, float, float] = (5.0, -3.0, 2.0),
                   channels: tuple[int, ...] = (0, 1)) -> list[Path]:
    """``case_0000.nii.gz`` ... : two MR-like channels on one LPS grid of 1.5 x 1.5 x 2 mm."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for channel in channels:
        array = np.zeros(SHAPE_XYZ[::-1], np.float32)  # (z, y, x)
        array[3:17, 4:20, 4:24] = rng.normal(300.0 * (channel + 1), 40.0, (14, 16, 20))
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.5, 1.5, 2.0))
        image.SetOrigin(origin)
        path = folder / f"{case}_{channel:04d}.nii.gz"
        sitk.WriteImage(image, str(path))
        paths.append(path)
    return paths


def reference_label_map(plan: Plan, network: torch.nn.Module, files: list[Path]) -> torch.Tensor:
    """MONAI alone: preprocessing, MONAI's Gaussian sliding window, sigmoid, linear inversion, regions painted."""
    chain = preprocessing(plan, ("image",))
    data = chain({"image": [str(f) for f in files]})
    with torch.no_grad():
        logits = sliding_window_inference(data["image"][None], plan.patch_size, 2, network, plan.overlap,
                                          mode="gaussian")[0]
    data["pred"] = torch.sigmoid(logits)
    native = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(data)["pred"]
    return regions_to_label_map(torch.as_tensor(native), REGIONS)[0]


def test_predict_image_paints_the_regions_on_the_input_grid(network: torch.nn.Module, tmp_path: Path) -> None:
    files = write_channels(tmp_path, "case")
    plan = region_plan()
    labels = Predictor(plan, network, torch.device("cpu")).predict_image([sitk.ReadImage(str(f)) for f in files])
    assert labels.shape == SHAPE_XYZ and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}  # the plan's region values, nothing else
    reference = reference_label_map(plan, network, files).numpy()
    assert (labels == reference).mean() > 0.999


@pytest.mark.parametrize("mirror_axes", [(), (2,)])
def test_the_bounded_memory_head_path_paints_the_same_label_map(network: torch.nn.Module,
                                                                mirror_axes: tuple[int, ...]) -> None:
    x = torch.randn(1, 2, 24, 20, 18, generator=torch.Generator().manual_seed(1))
    common = dict(roi_size=(16, 16, 16), num_classes=3, overlap=0.5, mirror_axes=mirror_axes, regions=REGIONS,
                  probabilities_in_memory=True)
    plain = slab_sliding_window(x, network=network, **common)
    body, head, features = split_pointwise_head(network)  # type: ignore[misc]
    bounded = slab_sliding_window(x, network=body, head=head, feature_channels=features, **common)
    assert plain.buffer_channels == 3 and bounded.buffer_channels == features
    assert (plain.labels == bounded.labels).double().mean() > 0.9999
    assert set(torch.unique(plain.labels).tolist()) <= {0, 1, 2, 3}
    # the probabilities are the sigmoids per region, and the label map paints them in order
    probabilities = torch.from_numpy(plain.probabilities)
    assert probabilities.shape == (3, 24, 20, 18) and probabilities.min() >= 0 and probabilities.max() <= 1
    assert torch.equal(regions_to_label_map(probabilities, REGIONS)[0], plain.labels)
    np.testing.assert_allclose(bounded.probabilities, plain.probabilities, atol=1e-4)


def test_every_inferer_output_inverts_to_the_same_region_label_map(network: torch.nn.Module, tmp_path: Path) -> None:
    files = write_channels(tmp_path, "case")
    plan = region_plan()
    chain = preprocessing(plan, ("image",))
    maps = {}
    for output in ("probabilities", "disk", "labels"):
        data = chain({"image": [str(f) for f in files]})
        inferer = SlabInferer(plan.patch_size, 3, output=output, regions=REGIONS)
        data["pred"] = inferer(data["image"][None], network)[0]
        inverted = InvertPredictiond(keys="pred", transform=chain, regions=REGIONS)(data)["pred"]
        maps[output] = torch.as_tensor(inverted)[0].numpy()
        assert maps[output].shape == SHAPE_XYZ
    assert (maps["disk"] == maps["probabilities"]).mean() > 0.998  # float16 on disk: a few voxels at 0.5
    assert set(np.unique(maps["labels"]).tolist()) <= {0, 1, 2, 3}  # painted, then nearest-neighbour resampled
    with pytest.raises(ValueError, match="3 regions for 4 output channels"):
        SlabInferer(plan.patch_size, 4, regions=REGIONS)


def test_predict_files_reads_nnunet_channel_files_as_cases(network: torch.nn.Module, tmp_path: Path) -> None:
    inputs = tmp_path / "imagesTs"
    write_channels(inputs, "BRATS_001", seed=1)
    write_channels(inputs, "BRATS_002", seed=2, origin=(-7.0, 4.0, 1.0))
    plan = region_plan()
    written = predict_files(plan, lambda: Predictor(plan, network, torch.device("cpu")), inputs, tmp_path / "out")
    assert [p.name for p in written] == ["BRATS_001_seg.nii.gz", "BRATS_002_seg.nii.gz"]
    for path, origin in zip(written, [(5.0, -3.0, 2.0), (-7.0, 4.0, 1.0)]):
        out = sitk.ReadImage(str(path))
        assert out.GetSize() == SHAPE_XYZ and out.GetOrigin() == pytest.approx(origin)  # the input's grid
        assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) <= {0, 1, 2, 3}
    # one channel file given: its case, its channels found beside it
    assert [c.files for c in collect_cases(inputs / "BRATS_002_0001.nii.gz", plan)] == [
        (inputs / "BRATS_002_0000.nii.gz", inputs / "BRATS_002_0001.nii.gz")]


def test_a_case_with_a_missing_channel_file_is_refused_by_name(network: torch.nn.Module, tmp_path: Path) -> None:
    inputs = tmp_path / "imagesTs"
    write_channels(inputs, "BRATS_001")
    write_channels(inputs, "BRATS_002", channels=(0,))
    plan = region_plan()

    def never() -> Predictor:
        raise AssertionError("the model is loaded only once every input is checked")

    with pytest.raises(InputError, match=r"case BRATS_002: missing channel file\(s\) BRATS_002_0001.nii.gz \(FLAIR\)"):
        predict_files(plan, never, inputs, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    write_channels(inputs, "BRATS_003", channels=(0, 1, 2))
    with pytest.raises(InputError, match="channel 0002 of case BRATS_003, but the model takes 2 input channels") as info:
        collect_cases(inputs, plan)
    assert Path(str(info.value.path)).name == "BRATS_003_0002.nii.gz"
    (inputs / "BRATS_003_0002.nii.gz").rename(inputs / "scan.nii.gz")
    (inputs / "BRATS_002_0000.nii.gz").unlink()
    with pytest.raises(InputError, match=r"not named CASE_NNNN\.nii\.gz"):
        collect_cases(inputs, plan)


def test_channels_on_different_grids_are_refused_before_the_model_loads(network: torch.nn.Module,
                                                                       tmp_path: Path) -> None:
    inputs = tmp_path / "imagesTs"
    write_channels(inputs, "case")
    moved = write_channels(tmp_path / "other", "case", origin=(9.0, -3.0, 2.0))[1]
    moved.replace(inputs / "case_0001.nii.gz")
    with pytest.raises(InputError, match=r"not on the grid of the case's first channel case_0000\.nii\.gz: origin") as info:
        predict_files(region_plan(), lambda: pytest.fail("model loaded"), inputs, tmp_path / "out")
    assert Path(str(info.value.path)).name == "case_0001.nii.gz"


def test_a_dicom_series_is_refused_for_a_multi_channel_model(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"takes 2 input channels \(T1, FLAIR\) and a DICOM series is one image"):
        predict_series(region_plan(), lambda: pytest.fail("model loaded"), tmp_path, tmp_path, tmp_path / "out")


def test_validation_postprocessing_scores_the_painted_label_map_and_skips_the_ignore_label() -> None:
    logits = torch.tensor([[[[5.0, 5.0, 5.0, -5.0]]], [[[-5.0, 5.0, 5.0, -5.0]]], [[[-5.0, -5.0, 5.0, -5.0]]]])
    label = torch.tensor([[[[1, 2, 9, 0]]]])  # 9: ignored
    out = validation_postprocessing(region_plan(ignore_label=9))({"pred": logits, "label": label})
    assert out["pred"].shape == (4, 1, 1, 4) and out["label"].shape == (4, 1, 1, 4)
    assert out["pred"].argmax(0).flatten().tolist() == [1, 2, 0, 0]  # painted 1, 2, (3 ignored -> 0), 0
    assert out["label"].argmax(0).flatten().tolist() == [1, 2, 0, 0]
    softmax = validation_postprocessing(Plan(3, "CT", {0: "background", 1: "liver"}, (1.0,) * 3, (16,) * 3,
                                             Intensity("ct", -100.0, 200.0, 50.0, 30.0)))
    two = softmax({"pred": torch.tensor([[[[1.0, -1.0]]], [[[0.0, 0.0]]]]), "label": torch.tensor([[[[0, 1]]]])})
    assert two["pred"].argmax(0).flatten().tolist() == [0, 1] and two["label"].shape == (2, 1, 1, 2)
