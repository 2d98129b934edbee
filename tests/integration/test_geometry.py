"""Predictions come back in the input's own geometry, and line up with the anatomy in world space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.cli import main
from medseg.data.synthetic import Grid, render, sample_anatomy
from medseg.inference.predictor import Predictor
from medseg.io.image import Geometry, read_geometry, to_array
from medseg.plan import Intensity, NetworkSpec, Plan

ORGANS = {1: "liver", 2: "spleen", 3: "kidney", 4: "bone"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    return np.asarray(sitk.VersorTransform(axis, np.deg2rad(degrees)).GetMatrix()).reshape(3, 3)


def oblique_grid(centre: np.ndarray) -> Grid:
    """Non-RAS (R-P-I flips), oblique (17 degrees), anisotropic (1.7 x 1.9 x 3.1 mm)."""
    flips = np.diag([-1.0, 1.0, -1.0])  # LPS world: index x -> Right, y -> Posterior, z -> Inferior
    direction = rotation((0.3, 0.2, 0.93), 17.0) @ flips
    return Grid.centred((72, 66, 40), (1.7, 1.9, 3.1), centre, direction.ravel())


def ras_grid(centre: np.ndarray) -> Grid:
    return Grid.centred((80, 80, 56), (1.6, 1.6, 2.2), centre, np.diag([-1.0, -1.0, 1.0]).ravel())


def write_case(anatomy, grid: Grid, folder: Path, name: str, ext: str, seed: int) -> tuple[Path, Path]:
    image, label = render(anatomy, grid, np.random.default_rng(seed), "ct")
    folder.mkdir(parents=True, exist_ok=True)
    image_path, label_path = folder / f"{name}{ext}", folder / f"{name}_label{ext}"
    sitk.WriteImage(image, str(image_path), useCompression=True)
    sitk.WriteImage(label, str(label_path), useCompression=True)
    return image_path, label_path


def resample_nearest(moving: Path, reference: Path) -> np.ndarray:
    """Resample a label map onto another file's grid through world space (nearest neighbour)."""
    ref = sitk.ReadImage(str(reference))
    out = sitk.Resample(sitk.ReadImage(str(moving)), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return to_array(out)


class OracleNetwork(torch.nn.Module):
    """Returns logits whose argmax is the rounded input value: fed a label map as its "image", a
    perfect segmenter. Isolates the geometry of the pipeline (orientation, resampling, crop,
    inversion) from the quality of a trained model."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.register_buffer("values", torch.arange(classes, dtype=torch.float32).view(1, classes, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.values) ** 2)


@pytest.fixture(scope="module")
def anatomy():
    rng = np.random.default_rng(11)
    return sample_anatomy(rng, 120.0, (5.0, -12.0, 40.0), "ct", 3)


@pytest.mark.parametrize("output", ["probabilities", "disk", "labels"])
def test_oracle_prediction_is_written_in_input_geometry(tmp_path: Path, anatomy, output: str) -> None:
    """With a perfect network the whole preprocessing -> inference -> inversion path must hand back
    each structure, voxel for voxel aligned, in the oblique non-RAS input grid: probabilities inverted
    in memory, from disk one class at a time (what many-class models get), or the label map nearest."""
    grid = oblique_grid(np.array([5.0, -12.0, 40.0]))
    _, label_path = write_case(anatomy, grid, tmp_path, "case", ".nrrd", 0)
    label_image = sitk.ReadImage(str(label_path))
    ref = to_array(label_image)
    plan = Plan(dims=3, modality="CT", labels={0: "background", 1: "structure"}, target_spacing=(1.5, 1.5, 2.0),
                patch_size=(48, 48, 32), intensity=Intensity("ct", a_min=0.0, a_max=1.0, mean=0.0, std=1.0),
                network=NetworkSpec())
    predictor = Predictor(plan, OracleNetwork(2).eval(), torch.device("cpu"), overlap=0.5, output=output)
    for number, name in {**ORGANS, 5: "lesion"}.items():
        # the structure's mask is the input image: a perfect segmenter must give it back in place
        mask = sitk.Cast(label_image == number, sitk.sitkFloat32)
        image_path = tmp_path / f"{name}.nrrd"
        sitk.WriteImage(mask, str(image_path))
        out = predictor.predict_file(image_path, tmp_path / "out" / f"{name}_seg.nrrd")
        assert read_geometry(out).mismatch(read_geometry(label_path)) is None
        pred = to_array(sitk.ReadImage(str(out)))
        assert pred.dtype == np.uint8 and pred.shape == ref.shape
        assert dice(pred == 1, ref == number) > 0.9, name
        # a one-voxel shift along any axis would cost far more than resampling blur does
        for axis in range(3):
            assert dice(np.roll(pred, 1, axis) == 1, ref == number) < dice(pred == 1, ref == number)


@pytest.mark.slow
def test_trained_prediction_non_ras_oblique_lines_up_and_matches_ras(tmp_path: Path, trained_run: Path, anatomy) -> None:
    """Same patient on an oblique non-RAS anisotropic NRRD grid and on a RAS NIfTI grid: each
    prediction is written in its input's exact geometry, lines up with its own label map, and the
    two agree in world space."""
    centre = np.array([5.0, -12.0, 40.0])
    oblique_image, oblique_label = write_case(anatomy, oblique_grid(centre), tmp_path / "in", "oblique", ".nrrd", 1)
    ras_image, _ = write_case(anatomy, ras_grid(centre), tmp_path / "in", "ras", ".nii.gz", 2)
    out_dir = tmp_path / "out"
    for image in (oblique_image, ras_image):
        assert main(["predict", "--model", str(trained_run), "--input", str(image), "--output", str(out_dir)]) == 0

    oblique_pred_path = out_dir / "oblique_seg.nrrd"
    ras_pred_path = out_dir / "ras_seg.nii.gz"
    assert Geometry.of(sitk.ReadImage(str(oblique_pred_path))).mismatch(read_geometry(oblique_image)) is None
    assert read_geometry(ras_pred_path).mismatch(read_geometry(ras_image)) is None
    oblique_pred = to_array(sitk.ReadImage(str(oblique_pred_path)))
    assert np.issubdtype(oblique_pred.dtype, np.integer)

    truth = to_array(sitk.ReadImage(str(oblique_label)))
    for number, name in ORGANS.items():
        chance = 2 * (truth == number).mean()  # Dice of a random map with the same label fraction is ~ that
        score = dice(oblique_pred == number, truth == number)
        assert score > 0.6 and score > 10 * chance, f"{name}: Dice {score:.3f} vs label"

    ras_on_oblique = resample_nearest(ras_pred_path, oblique_image)
    for number, name in ORGANS.items():
        agreement = dice(oblique_pred == number, ras_on_oblique == number)
        assert agreement > 0.8, f"{name}: oblique and RAS predictions disagree in world space (Dice {agreement:.3f})"
