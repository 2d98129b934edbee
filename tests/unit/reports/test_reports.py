"""medseg.reports: structure statistics, overlay figures (orientation!), self-contained HTML, build_report."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medseg.data.synthetic import (
    CT_LABELS,
    Grid,
    sample_anatomy,
    tissue_map,
    write_dataset,
)
from medseg.errors import InputError
from medseg.io.image import Geometry, read_image, to_array
from medseg.reports import (
    STAT_COLUMNS,
    build_report,
    dice_boxplot_png,
    overlay_png,
    render_overlay,
    structure_statistics,
    training_curves_png,
    write_report_html,
)
from medseg.reports.report import guess_modality

NAMES = {k: v for k, v in CT_LABELS.items() if k}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rgb(png: bytes) -> np.ndarray:
    assert png[:8] == PNG_MAGIC
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _coloured(rgb: np.ndarray, threshold: int = 40) -> np.ndarray:
    """Pixels that are clearly not grey (chroma above threshold)."""
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > threshold


def _blue(rgb: np.ndarray) -> np.ndarray:
    """Pixels of label 1 (tab10 blue, filled or outlined): not the yellow orientation letters."""
    return rgb[..., 2] - rgb[..., 0] > 40


def _orange(rgb: np.ndarray) -> np.ndarray:
    """Pixels of label 2 (tab10 orange): red well above green (unlike the yellow letters) and blue."""
    return (rgb[..., 0] - rgb[..., 2] > 40) & (rgb[..., 0] - rgb[..., 1] > 40)


def _crop(rgb: np.ndarray, bbox: tuple[float, float, float, float], inset: int = 2) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in bbox)
    return rgb[y0 + inset : y1 - inset, x0 + inset : x1 - inset]


# --------------------------------------------------------------------------------------------
# structure_statistics
# --------------------------------------------------------------------------------------------


def test_structure_statistics_matches_hand_computation() -> None:
    labels = np.zeros((10, 12, 8), dtype=np.uint8)
    image = np.full(labels.shape, -1000, dtype=np.int16)
    labels[2:5, 3:7, 1:3] = 1  # 3 x 4 x 2 = 24 voxels
    box = np.zeros((3, 4, 2), dtype=np.int16)
    box[...] = 40
    box[:, :, 1] = 60  # half 40 HU, half 60 HU: mean 50, population std 10
    image[2:5, 3:7, 1:3] = box
    labels[8, 10, 6] = 7  # present, not declared: named label_7
    image[8, 10, 6] = 300
    spacing = (0.7, 0.9, 3.0)  # 1.89 mm^3 per voxel

    rows = structure_statistics(labels, image, spacing, {0: "background", 1: "liver", 2: "spleen"}, "HU", case="c1")

    assert [r["label"] for r in rows] == [1, 2, 7]
    assert all(tuple(r) == STAT_COLUMNS for r in rows)
    liver, spleen, other = rows
    assert liver["case"] == "c1" and liver["label_name"] == "liver" and liver["unit"] == "HU"
    assert liver["voxels"] == 24
    assert liver["volume_ml"] == pytest.approx(24 * 0.7 * 0.9 * 3.0 / 1000.0)
    assert liver["mean"] == pytest.approx(50.0)
    assert liver["std"] == pytest.approx(10.0)
    assert (liver["min"], liver["max"]) == (40.0, 60.0)
    # declared but absent: 0 voxels, 0 mL, NaN statistics
    assert spleen["voxels"] == 0 and spleen["volume_ml"] == 0.0
    assert all(math.isnan(spleen[k]) for k in ("mean", "std", "min", "max"))
    assert other["label_name"] == "label_7" and other["voxels"] == 1
    assert other["volume_ml"] == pytest.approx(1.89 / 1000.0)
    assert (other["mean"], other["std"], other["min"], other["max"]) == (300.0, 0.0, 300.0, 300.0)


def test_structure_statistics_empty_map_2d_and_errors() -> None:
    empty = structure_statistics(np.zeros((4, 4, 4), np.uint8), np.ones((4, 4, 4)), (1, 1, 1), {1: "liver"}, "a.u.")
    assert len(empty) == 1 and empty[0]["voxels"] == 0 and empty[0]["volume_ml"] == 0.0
    assert math.isnan(empty[0]["mean"]) and empty[0]["unit"] == "a.u."
    assert structure_statistics(np.zeros((4, 4), np.uint8), np.ones((4, 4)), (1, 1), {}, "HU") == []
    flat = np.zeros((4, 4), np.uint8)
    flat[1, 1] = 1
    (row,) = structure_statistics(flat, np.ones((4, 4)), (1, 1), {}, "HU")
    assert row["voxels"] == 1 and math.isnan(row["volume_ml"])  # a 2D slice has no volume
    with pytest.raises(ValueError, match="shape"):
        structure_statistics(np.zeros((4, 4, 4), np.uint8), np.ones((4, 4, 3)), (1, 1, 1), {}, "HU")
    with pytest.raises(ValueError, match="integers"):
        structure_statistics(np.full((2, 2, 2), 0.5), np.ones((2, 2, 2)), (1, 1, 1), {}, "HU")


def test_guess_modality() -> None:
    assert guess_modality(np.array([-1024.0, 40.0])) == "CT"
    assert guess_modality(np.array([0.0, 812.0])) == "MR"


# --------------------------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------------------------


def test_overlay_png_is_a_png_with_colour_where_the_label_is(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(40, 10, (40, 40, 12)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    # identity-direction (LPS) grid: small x index = patient's right, small y = anterior, large z = superior
    labels[4:14, 2:12, 7:11] = 1
    out = overlay_png(image, labels, (1.0, 1.0, 3.0), NAMES, tmp_path / "case.png", "case", window=(-160, 240))
    assert out == tmp_path / "case.png" and out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["case.png"]  # no temporary left behind
    Image.open(out).verify()

    data, panels = render_overlay(image, labels, (1.0, 1.0, 3.0), NAMES, "case", window=(-160, 240))
    assert data == out.read_bytes()
    assert [(p["label"], p["view"]) for p in panels] == [(1, "axial"), (1, "coronal"), (1, "sagittal")]
    rgb = _rgb(data)
    assert not _blue(rgb[:, : int(panels[0]["bbox"][0]) - 1]).any()  # nothing blue left of the panels
    for panel in panels:
        blue = _blue(_crop(rgb, panel["bbox"]))
        assert blue.sum() > 50, panel["view"]
        rows, cols = np.nonzero(blue)
        # axial: right on the image left, anterior up; coronal: right on the left, superior up;
        # sagittal: anterior on the left, superior up
        assert cols.max() / blue.shape[1] < 0.5, panel["view"]
        assert rows.max() / blue.shape[0] < 0.5, panel["view"]


def test_overlay_keeps_the_physical_aspect_ratio() -> None:
    image = np.zeros((40, 30, 10), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 10:20, 3:6] = 2
    spacing = (1.0, 2.0, 6.0)  # extents: 40 mm (R-L), 60 mm (A-P), 60 mm (S-I)
    _, panels = render_overlay(image, labels, spacing, NAMES, "aspect")
    ratios = {}
    for panel in panels:
        x0, y0, x1, y1 = panel["bbox"]
        ratios[panel["view"]] = (y1 - y0) / (x1 - x0)
    assert ratios["axial"] == pytest.approx(60 / 40, rel=0.03)
    assert ratios["coronal"] == pytest.approx(60 / 40, rel=0.03)
    assert ratios["sagittal"] == pytest.approx(60 / 60, rel=0.03)


def _phantom_on(grid: Grid, anatomy) -> tuple[np.ndarray, np.ndarray]:
    tissue = tissue_map(anatomy, grid).T  # (x, y, z) index order
    liver = (tissue == 3).astype(np.uint8)
    return tissue.astype(np.float32), liver


def test_overlay_orientation_liver_on_image_left_for_lps_ras_and_coronal_grids() -> None:
    anatomy = sample_anatomy(np.random.default_rng(5), 120.0, (0.0, 0.0, 0.0), "ct", 3)
    centre = (0.0, 0.0, anatomy.liver.centre[2])
    lps = Grid.centred((48, 48, 24), (2.5, 2.5, 5.0), centre, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ras = Grid.centred((48, 48, 24), (2.5, 2.5, 5.0), centre, (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    # a coronal acquisition: index axes towards L, I, P
    coronal = Grid.centred((48, 24, 48), (2.5, 5.0, 2.5), centre, (1, 0, 0, 0, 0, 1, 0, -1, 0))
    rendered = []
    for grid in (lps, ras, coronal):
        image, liver = _phantom_on(grid, anatomy)
        assert liver.sum() > 100
        geometry = Geometry(grid.size, grid.spacing, grid.origin, grid.direction)
        rendered.append(render_overlay(image, liver, grid.spacing, NAMES, "phantom", (0, 7), geometry=geometry))
    # the RAS copy is the LPS image flipped: same patient, same voxel centres
    assert np.array_equal(_phantom_on(ras, anatomy)[1], _phantom_on(lps, anatomy)[1][::-1, ::-1, :])

    views = [_rgb(data) for data, _ in rendered]
    for rgb, (_, panels) in zip(views, rendered):
        assert [p["view"] for p in panels] == ["axial", "coronal", "sagittal"]
        for panel in panels[:2]:  # axial and coronal: the liver (patient's right) on the image left
            coloured = _blue(_crop(rgb, panel["bbox"]))
            assert coloured.sum() > 50
            assert (np.nonzero(coloured)[1] / coloured.shape[1]).mean() < 0.45
        axial = _blue(_crop(rgb, panels[0]["bbox"]))  # liver anterior: upper half
        assert (np.nonzero(axial)[0] / axial.shape[0]).mean() < 0.5
    # all three grids show the same pictures
    assert views[0].shape == views[1].shape == views[2].shape
    assert np.mean(views[0] != views[1]) < 0.002
    assert np.mean(views[0] != views[2]) < 0.002
    # no geometry: an identity-direction (LPS) grid (the panel titles differ: positions relative to the origin)
    image, liver = _phantom_on(lps, anatomy)
    data, panels = render_overlay(image, liver, lps.spacing, NAMES, "phantom", (0, 7))
    for panel, reference in zip(panels, rendered[0][1]):
        assert np.array_equal(_crop(_rgb(data), panel["bbox"]), _crop(views[0], reference["bbox"]))


def test_overlay_empty_label_map_and_2d(tmp_path: Path) -> None:
    image = np.linspace(0, 1, 20 * 20 * 6, dtype=np.float32).reshape(20, 20, 6)
    data, panels = render_overlay(image, np.zeros(image.shape, np.uint8), (1, 1, 2), NAMES, "empty")
    assert len(panels) == 3 and all(p["label"] is None for p in panels)
    assert not _blue(_crop(_rgb(data), panels[0]["bbox"])).any()

    labels2d = np.zeros((30, 30), np.uint8)
    labels2d[2:10, 10:20] = 1
    labels2d[20:28, 10:20] = 2
    out = overlay_png(np.ones((30, 30)), labels2d, (1.0, 1.5), NAMES, tmp_path / "slice.png", "2D")
    data = out.read_bytes()
    _, panels = render_overlay(np.ones((30, 30)), labels2d, (1.0, 1.5), NAMES, "2D")
    assert len(panels) == 1
    panel = _crop(_rgb(data), panels[0]["bbox"])
    # label 1 at small x (patient's right, LPS): image left; label 2 at large x: image right
    assert (np.nonzero(_blue(panel))[1] / panel.shape[1]).max() < 0.5
    assert (np.nonzero(_orange(panel))[1] / panel.shape[1]).min() > 0.5
    with pytest.raises(ValueError, match="shape"):
        overlay_png(np.ones((3, 3, 3)), np.ones((3, 3, 2), np.uint8), (1, 1, 1), NAMES, tmp_path / "x.png", "x")
    assert not (tmp_path / "x.png").exists()


def test_dice_boxplot_and_training_curves(tmp_path: Path) -> None:
    box = dice_boxplot_png({"liver": [0.9, 0.95, float("nan")], "lesion": []}, tmp_path / "dice.png")
    curves = training_curves_png([1, 2, 3], [0.9, 0.6, 0.5], [2], [0.7], tmp_path / "curves.png")
    for path in (box, curves):
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert Image.open(path).size[0] > 300
    assert training_curves_png([], [], [], [], tmp_path / "none.png").exists()
    with pytest.raises(ValueError):
        training_curves_png([1, 2], [0.5], [], [], tmp_path / "bad.png")


# --------------------------------------------------------------------------------------------
# HTML and build_report
# --------------------------------------------------------------------------------------------


def _assert_self_contained(text: str) -> list[str]:
    """Check that the page refers to nothing outside itself; return the img sources."""
    sources = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", text)
    for needle in ("http://", "https://", "//", 'src="/', "src='/", "url(", "@import", "file:", "<link"):
        assert needle not in outside, needle
    assert all(h.startswith("#") for h in re.findall(r"\bhref=\"([^\"]*)\"", outside))
    assert "document.body.dataset.imagesLoaded" in outside and "naturalWidth" in outside
    return sources


def test_write_report_html_escapes_and_embeds(tmp_path: Path) -> None:
    png = PNG_MAGIC + b"not really"
    out = write_report_html(tmp_path / "r.html", "T <&>", [{"label": 1, "volume": float("nan")}],
                            [{"case": "a<b>&c", "rows": [{"x": 1.5}], "png": png}])
    text = out.read_text(encoding="utf-8")
    assert "a&lt;b&gt;&amp;c" in text and "a<b>" not in text and "T &lt;&amp;&gt;" in text
    assert '<table class="stats">' in text and "n/a" in text
    assert len(_assert_self_contained(text)) == 1


@pytest.fixture(scope="module")
def ct_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(predictions, images): 3 small CT phantoms, their reference labels renamed <case>_seg.nii.gz."""
    root = tmp_path_factory.mktemp("report")
    write_dataset(root / "data", "ct", cases=4, seed=0, size=48)
    preds = root / "preds"
    preds.mkdir()
    for label in sorted((root / "data" / "labelsTr").iterdir()):
        shutil.copy(label, preds / label.name.replace(".nii.gz", "_seg.nii.gz"))
    return preds, root / "data" / "imagesTr"


def test_build_report_writes_everything(ct_set: tuple[Path, Path], tmp_path: Path) -> None:
    preds, images = ct_set
    out = tmp_path / "out"
    summary = build_report(preds, images, out, labels=NAMES)
    cases = ["ct_000", "ct_001", "ct_002"]
    assert summary.cases == 3 and summary.case_names == tuple(cases) and summary.modality == "CT"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["structures.csv", "structures.json", "report.html", *(f"{c}.png" for c in cases)])
    for case in cases:
        assert (out / f"{case}.png").read_bytes()[:8] == PNG_MAGIC

    with open(out / "structures.csv", newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        assert tuple(next(reader)) == STAT_COLUMNS
        rows = list(reader)
    assert len(rows) == 3 * 5  # every case x every declared label
    assert {(r[0], int(r[1])) for r in rows} == {(c, k) for c in cases for k in NAMES}
    liver = [r for r in rows if r[2] == "liver"]
    assert all(r[9] == "HU" and float(r[3]) > 0 and 60 < float(r[5]) < 140 for r in liver)

    document = json.loads((out / "structures.json").read_text(encoding="utf-8"))
    assert document["columns"] == list(STAT_COLUMNS) and len(document["rows"]) == 15
    assert document["labels"]["1"]["name"] == "liver" and document["labels"]["1"]["cases_present"] == 3
    assert summary.labels == document["labels"]
    assert summary.files.html == out.resolve() / "report.html" and summary.out_dir == out.resolve()
    assert [p.name for p in summary.files.png] == [f"{c}.png" for c in cases]

    text = (out / "report.html").read_text(encoding="utf-8")
    sources = _assert_self_contained(text)
    assert len(sources) == 3 and text.count("<img") == 3
    assert all(case in text for case in cases)
    assert text.count('<table class="stats">') == 4  # summary + one per case


def test_build_report_default_labels_and_modality(ct_set: tuple[Path, Path], tmp_path: Path) -> None:
    preds, images = ct_set
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(preds / "ct_001_seg.nii.gz", one / "ct_001.nii.gz")  # plain <case>.<ext> also pairs
    summary = build_report(one, images, tmp_path / "out", modality="MR")
    assert summary.case_names == ("ct_001",) and summary.modality == "MR"
    assert [e["name"] for e in summary.labels.values()] == [f"label_{k}" for k in range(1, 6)]
    assert all(e["unit"] == "a.u." for e in summary.labels.values())
    with pytest.raises(ValueError, match="modality"):
        build_report(one, images, tmp_path / "out2", modality="PET")


def _write_like(source: Path, target: Path, *, spacing_scale: float = 1.0, as_float: float | None = None) -> None:
    image = sitk.ReadImage(str(source))
    if as_float is not None:
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        array.flat[0] = as_float
        copy = sitk.GetImageFromArray(array)
        copy.CopyInformation(image)
        image = copy
    image.SetSpacing(tuple(s * spacing_scale for s in image.GetSpacing()))
    sitk.WriteImage(image, str(target), True)


@pytest.mark.parametrize("problem", ["geometry", "missing image", "non-integer", "no folder", "no predictions"])
def test_build_report_errors_leave_no_output(ct_set: tuple[Path, Path], tmp_path: Path, problem: str) -> None:
    preds_src, images_src = ct_set
    preds, images = tmp_path / "preds", tmp_path / "images"
    shutil.copytree(preds_src, preds)
    shutil.copytree(images_src, images)
    bad = preds / "ct_001_seg.nii.gz"
    if problem == "geometry":
        _write_like(preds_src / bad.name, bad, spacing_scale=1.1)
        expected = "grid does not match"
    elif problem == "missing image":
        (images / "ct_001.nii.gz").unlink()
        expected = "no image for this prediction"
    elif problem == "non-integer":
        _write_like(preds_src / bad.name, bad, as_float=0.5)
        expected = "non-integer value 0.5"
    elif problem == "no folder":
        shutil.rmtree(images)
        bad, expected = images, "no such file or folder"
    else:
        shutil.rmtree(preds)
        preds.mkdir()
        bad, expected = preds, "no image files"
    out = tmp_path / "out"
    with pytest.raises(InputError) as caught:
        build_report(preds, images, out, labels=NAMES)
    assert caught.value.path == str(bad)
    assert expected in caught.value.problem
    assert not out.exists()


def test_overlay_of_a_96_voxel_ct_case_stays_small(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", "ct", cases=2, seed=1, size=96)
    image = read_image(tmp_path / "data" / "imagesTs" / "ct_001.nii.gz")
    labels = read_image(tmp_path / "data" / "labelsTs" / "ct_001.nii.gz")
    geometry = Geometry.of(image)
    data, panels = render_overlay(to_array(image), to_array(labels), geometry.spacing, NAMES, "ct_001",
                                  (-160, 240), geometry=geometry)
    assert len(panels) == 3 * 5
    assert len(data) < 300_000


@pytest.mark.parametrize("source", ["labels_only", "bundle", "dataset"])
def test_cli_report_takes_labels_from_any_source(ct_set: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str], source: str) -> None:
    """A dataset.json holding only "labels" (no modality, no training list) names the structures as
    well as a bundle folder or a full dataset.json does."""
    from medseg.cli import main

    preds, images = ct_set
    labels_only = tmp_path / "labels.json"
    labels_only.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "bone": 4,
                                                  "lesion": 5}}))
    path = {"labels_only": labels_only, "bundle": Path(__file__).resolve().parents[3] / "bundles" / "ct_abdomen_phantom",
            "dataset": images.parent / "dataset.json"}[source]
    out = tmp_path / "out"
    assert main(["--quiet", "report", "--pred", str(preds), "--images", str(images), "--out", str(out),
                 "--labels", str(path)]) == 0, capsys.readouterr().err
    document = json.loads((out / "structures.json").read_text(encoding="utf-8"))
    assert [document["labels"][str(k)]["name"] for k in range(1, 6)] == ["liver", "spleen", "kidney", "bone", "lesion"]


def test_report_refuses_nan_in_a_nifti_prediction(ct_set: tuple[Path, Path], tmp_path: Path) -> None:
    """SimpleITK reads NaN voxels of a NIfTI file as 0 (background): the report must not measure that."""
    preds_src, images = ct_set
    preds = tmp_path / "preds"
    preds.mkdir()
    source = preds_src / "ct_000_seg.nii.gz"
    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[array == 1] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    sitk.WriteImage(bad, str(preds / source.name))
    with pytest.raises(InputError, match="NaN") as excinfo:
        build_report(preds, images, tmp_path / "out")
    assert str(excinfo.value).startswith(str(preds / source.name))
    assert not (tmp_path / "out").exists()
