"""Tests of the MONAI preset chains (medseg.transforms): what the network sees, and that it inverts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import Invertd

from medseg.errors import InputError
from medseg.plan import Channel, Intensity, Plan
from medseg.transforms import BodyMask, augmentation, preprocessing

CT = Intensity("ct", a_min=-200.0, a_max=300.0, mean=50.0, std=100.0)


def _plan(intensity: Intensity = CT, labels: dict[int, str] | None = None, dims: int = 3) -> Plan:
    return Plan(dims=dims, modality=intensity.preset, labels=labels or {0: "background", 1: "liver"},
                target_spacing=(2.0, 2.0, 3.0)[:dims], patch_size=(16, 16, 8)[:dims], intensity=intensity)


def _write(path: Path, array_zyx: np.ndarray, spacing: tuple[float, ...], direction: tuple[float, ...]) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture()
def lps_volume(tmp_path: Path) -> tuple[Path, Path]:
    """A body (+100 HU) in air (-1000 HU), stored LPS with 1 x 1.5 x 2.5 mm voxels, and its label map."""
    image = np.full((20, 24, 28), -1000.0, dtype=np.float32)  # (z, y, x)
    image[4:16, 4:20, 4:24] = 100.0
    label = np.zeros(image.shape, dtype=np.uint8)
    label[8:12, 8:16, 8:20] = 1
    lps = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return (_write(tmp_path / "ct.nii.gz", image, (1.0, 1.5, 2.5), lps),
            _write(tmp_path / "ct_label.nii.gz", label, (1.0, 1.5, 2.5), lps))


def test_preprocessing_resamples_to_the_plan_in_ras_and_types_the_outputs(lps_volume: tuple[Path, Path]) -> None:
    image_path, label_path = lps_volume
    data = preprocessing(_plan(), ("image", "label"))({"image": str(image_path), "label": str(label_path)})
    image, label = data["image"], data["label"]
    assert image.dtype == torch.float32 and label.dtype == torch.uint8
    assert image.shape[0] == 1 and image.shape == label.shape
    np.testing.assert_allclose(image.pixdim.numpy(), (2.0, 2.0, 3.0), rtol=1e-5)
    affine = image.affine.numpy()[:3, :3]
    assert np.all(np.diag(affine) > 0), "RAS: every axis points to +R, +A, +S"
    # cropped to the body (margin 2 voxels): far fewer voxels than the 28 x 24 x 20 mm grid at 2 x 2 x 3 mm
    assert image.shape[1] <= 14 and set(np.unique(label.numpy())) == {0, 1}


def test_ct_intensity_is_clipped_and_z_scored_with_the_plan_statistics(lps_volume: tuple[Path, Path]) -> None:
    image_path, _ = lps_volume
    image = preprocessing(_plan(), ("image",), crop=False)({"image": str(image_path)})["image"]
    values = np.unique(np.round(image.numpy(), 4))
    # air clipped at a_min = -200 HU -> (-200 - 50) / 100; body 100 HU -> 0.5 (plus interpolation at edges)
    assert values.min() == pytest.approx(-2.5) and values.max() == pytest.approx(0.5)


def test_mr_intensity_is_z_scored_over_non_zero_voxels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = np.zeros((12, 16, 16), dtype=np.float32)
    array[2:10, 3:13, 3:13] = rng.normal(400.0, 50.0, (8, 10, 10))
    path = _write(tmp_path / "mr.nii.gz", array, (2.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    plan = _plan(Intensity("mr"), dims=3)
    image = preprocessing(plan, ("image",), crop=False)({"image": str(path)})["image"].numpy()
    inside = image[image != 0]
    assert abs(inside.mean()) < 1e-3 and inside.std() == pytest.approx(1.0, abs=1e-2)


def test_preprocessing_inverts_to_the_input_grid(lps_volume: tuple[Path, Path]) -> None:
    image_path, _ = lps_volume
    chain = preprocessing(_plan(), ("image",))
    data = chain({"image": str(image_path)})
    data["pred"] = data["image"].clone()
    inverted = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(data)["pred"]
    assert tuple(inverted.shape[1:]) == (28, 24, 20)  # (x, y, z): the file's index order


def test_body_mask_thresholds() -> None:
    image = torch.tensor([-1000.0, -600.0, -400.0, 50.0])
    assert BodyMask(-500.0)(image).tolist() == [False, False, True, True]
    mr = torch.cat([torch.zeros(100), torch.full((100,), 1000.0)])
    mask = BodyMask(None)(mr)  # 5 % of the 99th percentile
    assert int(mask.sum()) == 100


def test_augmentation_samples_patches_of_the_plan_size_with_both_classes(lps_volume: tuple[Path, Path]) -> None:
    image_path, label_path = lps_volume
    plan = _plan()
    data = preprocessing(plan, ("image", "label"))({"image": str(image_path), "label": str(label_path)})
    samples = augmentation(plan, num_samples=4)(data)
    assert len(samples) == 4
    for sample in samples:
        assert tuple(sample["image"].shape) == (1, *plan.patch_size)
        assert sample["image"].dtype == torch.float32 and sample["label"].dtype == torch.int64
    # class-balanced sampling: the liver appears in some patch
    assert any(int(s["label"].max()) == 1 for s in samples)


MR = Intensity("mr")


def _two_channel_plan(first: Intensity = MR, second: Intensity = MR) -> Plan:
    return Plan(dims=3, modality="MR", labels={0: "background", 1: "tumour"}, target_spacing=(2.0, 2.0, 3.0),
                patch_size=(16, 16, 8), intensity=first, channels=(Channel("T1", first), Channel("T2", second)))


@pytest.fixture()
def two_channels(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A head (T1 about 400, T2 about 2000 on a different scale) in zero background, LPS, 1.5 x 1.5 x 2.5 mm,
    stored as case_0000 / case_0001, and its label map."""
    rng = np.random.default_rng(0)
    shape = (12, 28, 24)  # (z, y, x)
    t1, t2 = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    t1[2:10, 4:24, 4:20] = rng.normal(400.0, 40.0, (8, 20, 16))
    t2[3:11, 6:26, 3:18] = rng.normal(2000.0, 300.0, (8, 20, 15))  # another extent: the crop takes the union
    label = np.zeros(shape, np.uint8)
    label[4:8, 10:16, 8:14] = 1
    lps = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return (_write(tmp_path / "case_0000.nii.gz", t1, (1.5, 1.5, 2.5), lps),
            _write(tmp_path / "case_0001.nii.gz", t2, (1.5, 1.5, 2.5), lps),
            _write(tmp_path / "case.nii.gz", label, (1.5, 1.5, 2.5), lps))


def test_two_channels_are_stacked_resampled_together_and_normalised_each_on_its_own(
        two_channels: tuple[Path, Path, Path]) -> None:
    t1, t2, label_path = two_channels
    data = preprocessing(_two_channel_plan(), ("image", "label"))({"image": [str(t1), str(t2)], "label": str(label_path)})
    image, label = data["image"], data["label"]
    assert image.shape[0] == 2 and label.shape[0] == 1 and image.shape[1:] == label.shape[1:]
    np.testing.assert_allclose(image.pixdim.numpy(), (2.0, 2.0, 3.0), rtol=1e-5)
    for channel in image.numpy():  # each channel z-scored on its own non-zero voxels, whatever its scale
        inside = channel[channel != 0]
        assert abs(inside.mean()) < 1e-3 and inside.std() == pytest.approx(1.0, abs=1e-2)
    # the body crop is the union of both channels' bodies: every non-zero voxel of each channel is kept
    whole = preprocessing(_two_channel_plan(), ("image",), crop=False)({"image": [str(t1), str(t2)]})["image"]
    assert [int((c != 0).sum()) for c in image] == [int((c != 0).sum()) for c in whole]
    assert image.shape[1:] != whole.shape[1:]


def test_a_ct_channel_keeps_its_own_window_beside_an_mr_channel(two_channels: tuple[Path, Path, Path]) -> None:
    t1, t2, _ = two_channels
    plan = _two_channel_plan(CT, Intensity("mr"))
    image = preprocessing(plan, ("image",), crop=False)({"image": [str(t1), str(t2)]})["image"].numpy()
    # channel 0 as CT: 0 and about 400 "HU" clipped to [-200, 300] then (v - 50) / 100
    assert image[0].min() == pytest.approx(-0.5) and image[0].max() == pytest.approx(2.5)
    inside = image[1][image[1] != 0]
    assert abs(inside.mean()) < 1e-3


def test_two_channel_preprocessing_inverts_to_the_input_grid(two_channels: tuple[Path, Path, Path]) -> None:
    t1, t2, _ = two_channels
    chain = preprocessing(_two_channel_plan(), ("image",))
    data = chain({"image": [str(t1), str(t2)]})
    data["pred"] = data["image"][:1].clone()
    inverted = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(data)["pred"]
    assert tuple(inverted.shape) == (1, 24, 28, 12)  # (x, y, z): the files' index order


def test_channels_on_different_grids_are_refused_naming_the_file(two_channels: tuple[Path, Path, Path],
                                                                  tmp_path: Path) -> None:
    t1, _, _ = two_channels
    moved = sitk.ReadImage(str(t1))
    moved.SetOrigin((14.0, -5.0, 3.0))
    other = tmp_path / "case_0001_moved.nii.gz"
    sitk.WriteImage(moved, str(other))
    with pytest.raises(Exception) as caught:
        preprocessing(_two_channel_plan(), ("image",))({"image": [str(t1), str(other)]})
    error = caught.value if isinstance(caught.value, InputError) else caught.value.__cause__
    assert isinstance(error, InputError) and Path(str(error.path)) == other
    assert "origin" in str(error) and "case_0000.nii.gz" in str(error)


def test_a_lone_file_for_a_two_channel_plan_is_refused(two_channels: tuple[Path, Path, Path]) -> None:
    t1, _, _ = two_channels
    with pytest.raises(Exception) as caught:
        preprocessing(_two_channel_plan(), ("image",))({"image": str(t1)})
    error = caught.value if isinstance(caught.value, InputError) else caught.value.__cause__
    assert isinstance(error, InputError) and Path(str(error.path)) == t1
    assert "1 channel(s) read, the model takes 2" in str(error)
