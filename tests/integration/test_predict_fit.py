"""`medseg predict` on inputs the model does not fit (modality, spacing), and its stderr on bad input.

A CT model on an MR image, an MR model on a 3 mm CT: a warning per problem naming the file, and
with ``--strict`` exit 2, one error line, nothing written. A truncated image: the error is the
only line on stderr (no progress line before it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.data.synthetic import Grid, make_phantom

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
CT_BUNDLE, MR_BUNDLE = BUNDLES / "ct_abdomen_phantom", BUNDLES / "mr_abdomen_phantom"


def _phantom(path: Path, modality: str, spacing: tuple[float, float, float], size: tuple[int, int, int]) -> Path:
    """A synthetic abdomen (CT in HU, or MR) on an axial grid of the given spacing, centred at the origin."""
    grid = Grid.centred(size, spacing, (0.0, 0.0, 0.0))
    image, _ = make_phantom(np.random.default_rng(5), grid, modality)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def mr_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MR phantom at 1.3 x 1.3 x 2.5 mm: the CT bundle's spacing, so only the modality is wrong."""
    return _phantom(tmp_path_factory.mktemp("fit") / "mr_case.nii.gz", "mr", (1.3, 1.3, 2.5), (96, 96, 48))


@pytest.fixture(scope="module")
def ct_3mm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT phantom at 3 mm isotropic: for the MR bundle (1.4 mm) both the modality and the spacing are off."""
    return _phantom(tmp_path_factory.mktemp("fit") / "ct_3mm.nii.gz", "ct", (3.0, 3.0, 3.0), (44, 44, 40))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_ct_model_on_an_mr_image_warns_naming_the_file(mr_image: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["predict", "--model", str(CT_BUNDLE), "--input", str(mr_image), "--output", str(out)]) == 0
    err = _lines(capsys.readouterr().err)
    warnings = [line for line in err if " W medseg." in line]
    assert len(warnings) == 1, err
    assert f"{mr_image}: intensities do not look like CT in Hounsfield units" in warnings[0]
    assert (out / "mr_case_seg.nii.gz").is_file()


def test_ct_model_on_an_mr_image_with_strict_is_refused(mr_image: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["predict", "--model", str(CT_BUNDLE), "--input", str(mr_image), "--output", str(out), "--strict"]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"medseg: error: {mr_image}: intensities do not look like CT"), err
    assert "--strict" in err[0]
    assert not out.exists()


def test_mr_model_on_a_3mm_ct_warns_twice_and_strict_refuses(ct_3mm: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "strict"
    assert main(["predict", "--model", str(MR_BUNDLE), "--input", str(ct_3mm), "--output", str(out), "--strict"]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "look like CT" in err[0] and "coarser" in err[0] and "target spacing" in err[0], err
    assert not out.exists()

    out = tmp_path / "warn"
    assert main(["predict", "--model", str(MR_BUNDLE), "--input", str(ct_3mm), "--output", str(out)]) == 0
    warnings = [line for line in _lines(capsys.readouterr().err) if " W medseg." in line]
    assert len(warnings) == 2 and all(str(ct_3mm) in w for w in warnings), warnings
    assert "look like CT" in warnings[0] and "2.2x coarser along R" in warnings[1]  # 3 / 1.38 mm


def test_ct_model_on_an_mr_dicom_series_names_the_modality(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.data.synthetic.dicom import phantom_series

    phantom_series(tmp_path / "mr_series", "mr", seed=2, size=48)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(CT_BUNDLE), "--input", str(tmp_path / "mr_series"), "--output", str(out),
                 "--strict"]) == 2
    err = _lines(capsys.readouterr().err)
    assert [line for line in err if " I medseg." not in line] == err[-1:], err  # after the series summary: the error
    assert err[-1].startswith(f"medseg: error: {tmp_path / 'mr_series'}: series ")
    assert "the series is MR (DICOM Modality) but the model was trained on CT" in err[-1]
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".nii", ".nrrd"])
def test_a_truncated_image_gets_one_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   suffix: str) -> None:
    """Without --quiet: no "[1/1] ..." progress line before the error, which stays the one line."""
    image = _phantom(tmp_path / f"case{suffix}", "ct", (1.3, 1.3, 2.5), (64, 64, 32))
    data = image.read_bytes()
    image.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    assert main(["predict", "--model", str(CT_BUNDLE), "--input", str(image), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    err = _lines(captured.err)
    assert len(err) == 1 and err[0].startswith(f"medseg: error: {image}"), err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()
