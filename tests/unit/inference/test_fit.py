"""Does the model fit the input? medseg.inference.fit against the shipped bundles' plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.inference.fit import fit_problems, intensity_problem, modality_problem, spacing_problem
from medseg.io.image import Geometry
from medseg.plan import Plan

BUNDLES = Path(__file__).resolve().parents[3] / "bundles"
CT_PLAN = Plan.load(BUNDLES / "ct_abdomen_phantom" / "configs" / "plan.json")  # 1.28 x 1.28 x 2.57 mm, HU
MR_PLAN = Plan.load(BUNDLES / "mr_abdomen_phantom" / "configs" / "plan.json")  # 1.38 x 1.44 x 1.41 mm


def _ct(shape: tuple[int, ...] = (40, 40, 20)) -> np.ndarray:
    """Air around a soft-tissue body, in HU."""
    image = np.full(shape, -1000, np.int16)
    image[8:32, 8:32, :] = 40
    return image


def _mr(shape: tuple[int, ...] = (40, 40, 20)) -> np.ndarray:
    """Signal >= 0 (noise outside the body), arbitrary units."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 20, shape).astype(np.float32)
    image[8:32, 8:32, :] = 600
    return image


def _grid(spacing: tuple[float, float, float]) -> Geometry:
    # identity direction (LPS): index axes x, y, z lie along the L-R, P-A and I-S axes, in that order
    return Geometry((40, 40, 20), spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_a_ct_model_on_ct_and_an_mr_model_on_mr_fit() -> None:
    assert fit_problems(CT_PLAN, _grid((1.3, 1.3, 2.5)), _ct()) == []
    assert fit_problems(MR_PLAN, _grid((1.4, 1.4, 1.4)), _mr()) == []
    assert fit_problems(CT_PLAN, _grid((0.7, 0.7, 1.5)), _ct()) == []  # within 2x, finer
    assert fit_problems(CT_PLAN, _grid((1.3, 1.3, 2.5)), _ct(), modality="CT") == []


def test_a_ct_model_on_mr_intensities_and_an_mr_model_on_ct_intensities() -> None:
    problem = intensity_problem(CT_PLAN, _mr())
    assert problem is not None and "do not look like CT" in problem and "trained on CT" in problem
    stored_without_rescale = _ct().astype(np.int32) + 1024  # 0..1064: a CT whose rescale was lost
    assert intensity_problem(CT_PLAN, stored_without_rescale) is not None
    problem = intensity_problem(MR_PLAN, _ct())
    assert problem is not None and "look like CT" in problem and "trained on MR" in problem
    ringing = _mr()
    ringing[0, 0, :3] = -800  # a few negative voxels in an MR image are not a CT
    assert intensity_problem(MR_PLAN, ringing) is None


def test_nan_voxels_do_not_hide_the_statistics() -> None:
    image = _mr()
    image[0] = np.nan
    assert intensity_problem(CT_PLAN, image) is not None


@pytest.mark.parametrize(("spacing", "axis", "how"), [
    ((1.3, 1.3, 6.0), "S", "coarser"),  # 6 / 2.57 = 2.3x
    ((3.0, 1.3, 2.5), "R", "coarser"),
    ((0.5, 0.5, 2.5), "R", "finer"),  # 1.28 / 0.5 = 2.6x
])
def test_spacing_more_than_twice_off_along_any_axis(spacing: tuple[float, float, float], axis: str, how: str) -> None:
    problem = spacing_problem(CT_PLAN, _grid(spacing))
    assert problem is not None and f"{how} along {axis}" in problem and "target spacing 1.28 x 1.28 x 2.57 mm" in problem


def test_an_mr_model_on_a_3_mm_ct_reports_both_problems() -> None:
    problems = fit_problems(MR_PLAN, _grid((3.0, 3.0, 3.0)), _ct())
    assert len(problems) == 2
    assert "look like CT" in problems[0] and "coarser" in problems[1]


def test_dicom_modality_tag_is_compared_and_replaces_the_intensity_check() -> None:
    assert modality_problem(CT_PLAN, "MR") == "the series is MR (DICOM Modality) but the model was trained on CT"
    assert modality_problem(CT_PLAN, "CT") is None and modality_problem(CT_PLAN, "") is None
    assert modality_problem(CT_PLAN, "PT") is None  # only CT and MR are compared
    problems = fit_problems(CT_PLAN, _grid((1.3, 1.3, 2.5)), _mr(), modality="MR")
    assert problems == ["the series is MR (DICOM Modality) but the model was trained on CT"]  # one problem, one line
