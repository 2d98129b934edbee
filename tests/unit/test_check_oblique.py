"""The oblique regridding of scripts/check_oblique.py (the robustness check of the planned recipe):
the grid it makes and what it keeps of the image and the label map."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_oblique.py"
spec = importlib.util.spec_from_file_location("check_oblique", SCRIPT)
assert spec is not None and spec.loader is not None
check_oblique = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_oblique)


def _ball(spacing: tuple[float, float, float] = (1.0, 1.0, 1.5)) -> tuple[sitk.Image, sitk.Image]:
    shape = (30, 40, 40)  # z, y, x
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    distance = np.sqrt(((x - 20) * spacing[0]) ** 2 + ((y - 20) * spacing[1]) ** 2 + ((z - 15) * spacing[2]) ** 2)
    label = sitk.GetImageFromArray((distance < 12).astype(np.uint8))
    image = sitk.GetImageFromArray(np.where(distance < 12, 100.0, -50.0).astype(np.float32))
    for item in (label, image):
        item.SetSpacing(spacing)
        item.SetOrigin((-5.0, 3.0, 7.0))
    return image, label


def test_the_oblique_grid_has_the_spacing_and_the_turned_axes_and_covers_the_image() -> None:
    image, _ = _ball()
    oblique = check_oblique.regrid_oblique(image, 12.0)
    assert oblique.GetSpacing() == pytest.approx((0.9, 1.1, 2.0))
    direction = np.array(oblique.GetDirection()).reshape(3, 3)
    assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-9)
    in_plane = math.degrees(math.acos(direction[0, 0] / math.hypot(direction[0, 0], direction[1, 0])))
    assert in_plane == pytest.approx(12.0, abs=0.01) and abs(direction[2, 2]) < 1  # turned in-plane and tilted
    centre = image.TransformContinuousIndexToPhysicalPoint((20.0, 20.0, 15.0))
    index = oblique.TransformPhysicalPointToContinuousIndex(centre)
    assert all(0 < i < s for i, s in zip(index, oblique.GetSize()))
    assert oblique.GetPixelID() == image.GetPixelID()


def test_the_label_keeps_its_volume_and_the_image_is_interpolated_linearly() -> None:
    image, label = _ball()
    new_label = check_oblique.regrid_oblique(label, 12.0, label=True)
    new_image = check_oblique.regrid_oblique(image, 12.0)
    volume = sitk.GetArrayFromImage(label).sum() * np.prod(label.GetSpacing())
    new_volume = sitk.GetArrayFromImage(new_label).sum() * np.prod(new_label.GetSpacing())
    assert new_volume == pytest.approx(volume, rel=0.03)
    assert set(np.unique(sitk.GetArrayFromImage(new_label))) == {0, 1}
    values = sitk.GetArrayFromImage(new_image)
    edge = (values > -50) & (values < 100)  # interpolated values along the ball's surface
    assert edge.sum() > 100 and values.min() == pytest.approx(-50.0)
    with pytest.raises(ValueError, match="three positive spacings"):
        check_oblique.regrid_oblique(image, 12.0, spacing=(1.0, 1.0))


def test_a_model_is_scored_only_on_a_named_dataset(tmp_path: Path) -> None:
    """--model scores a trained bundle on a dataset's test cases: without --data there is nothing to score."""
    with pytest.raises(SystemExit) as exit_info:
        check_oblique.main(["--work", str(tmp_path / "w"), "--model", str(tmp_path / "bundle")])
    assert exit_info.value.code == 2 and not (tmp_path / "w").exists()
