"""Tests of plan derivation and persistence (medseg.plan)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.datalist import load_datalist, validate_datalist
from medseg.data.synthetic import CT_LABELS, write_dataset
from medseg.errors import BundleError
from medseg.io.image import Geometry
from medseg.labels import Region
from medseg.plan import (
    PLAN_FORMAT,
    Channel,
    Intensity,
    NetworkSpec,
    Plan,
    make_plan,
    ras_extent,
    ras_spacing,
)


def _geometry(direction_columns: np.ndarray, spacing, size=(4, 5, 6)) -> Geometry:
    """Geometry whose direction matrix has the given columns (world LPS direction of each index axis)."""
    d = len(spacing)
    return Geometry(tuple(size[:d]), tuple(float(s) for s in spacing), tuple([10.0, -20.0, 30.0][:d]),
                    tuple(float(v) for v in np.asarray(direction_columns).ravel()))


def test_ras_spacing_of_permuted_axes() -> None:
    # index axis 0 -> S (+z), axis 1 -> R (-x in LPS), axis 2 -> A (-y in LPS)
    matrix = np.zeros((3, 3))
    matrix[2, 0], matrix[0, 1], matrix[1, 2] = 1.0, -1.0, -1.0
    geometry = _geometry(matrix, (3.0, 0.7, 1.1))
    np.testing.assert_allclose(ras_spacing(geometry), (0.7, 1.1, 3.0))
    np.testing.assert_allclose(ras_extent(geometry), (0.7 * 5, 1.1 * 6, 3.0 * 4))


def test_ras_spacing_ignores_flips_and_small_obliquity() -> None:
    angle = np.radians(12.0)
    c, s = np.cos(angle), np.sin(angle)
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    geometry = _geometry(tilt @ np.diag([-1.0, 1.0, -1.0]), (0.8, 0.9, 2.5))  # RPI, tilted
    np.testing.assert_allclose(ras_spacing(geometry), (0.8, 0.9, 2.5))


def test_ras_spacing_2d_swapped_axes() -> None:
    # index axis 0 -> posterior (+y), axis 1 -> left (+x)
    geometry = _geometry(np.array([[0.0, 1.0], [1.0, 0.0]]), (0.5, 2.0))
    np.testing.assert_allclose(ras_spacing(geometry), (2.0, 0.5))


def _expected_ras_spacing(path: Path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    matrix = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.empty(3)
    for index_axis in range(3):
        spacing[int(np.argmax(np.abs(matrix[:, index_axis])))] = image.GetSpacing()[index_axis]
    return spacing


@pytest.fixture(scope="module")
def ct_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("plan")
    datalist = load_datalist(write_dataset(root / "ct", "ct", cases=4, seed=0, size=32))
    return datalist, make_plan(datalist, validate_datalist(datalist))


def test_make_plan_target_spacing_is_median_ras_spacing(ct_plan: tuple) -> None:
    datalist, plan = ct_plan
    spacings = np.stack([_expected_ras_spacing(c.image) for c in datalist.training])
    np.testing.assert_allclose(plan.target_spacing, np.median(spacings, axis=0), rtol=1e-5)
    assert plan.dims == 3 and plan.axcodes == "RAS"
    assert plan.labels == CT_LABELS and plan.num_classes == 6 and plan.modality == "CT"


def test_make_plan_patch_size(ct_plan: tuple) -> None:
    _, plan = ct_plan
    assert len(plan.patch_size) == 3
    for size, cap in zip(plan.patch_size, (64, 64, 32)):
        assert size % 16 == 0 and 16 <= size <= cap
    # 32 voxels in-plane resampled at the median spacing: about 32 voxels
    assert plan.patch_size[:2] == (32, 32)


def test_make_plan_ct_intensity(ct_plan: tuple) -> None:
    _, plan = ct_plan
    intensity = plan.intensity
    assert intensity.preset == "ct"
    assert -100.0 < intensity.a_min < 60.0  # lowest foreground: hypodense lesion / blurred borders
    assert 300.0 < intensity.a_max < 1500.0  # bone
    assert intensity.a_min < intensity.mean < intensity.a_max
    assert 10.0 < intensity.std < intensity.a_max - intensity.a_min


def test_make_plan_overrides(ct_plan: tuple) -> None:
    datalist, _ = ct_plan
    geometries = validate_datalist(datalist)
    spec = NetworkSpec(channels=(8, 16), strides=(2,))
    plan = make_plan(datalist, geometries, target_spacing=(1.0, 1.5, 3.0), patch_size=(48, 48, 16), network=spec)
    assert plan.target_spacing == (1.0, 1.5, 3.0) and plan.patch_size == (48, 48, 16) and plan.network == spec
    with pytest.raises(ValueError, match="3 values"):
        make_plan(datalist, geometries, target_spacing=(1.0, 1.0))


def test_make_plan_plans_the_chosen_network(ct_plan: tuple) -> None:
    """A DynUNet gets its topology from the patch and spacing; a patch the network cannot take is refused."""
    datalist, _ = ct_plan
    geometries = validate_datalist(datalist)
    plan = make_plan(datalist, geometries, target_spacing=(1.0, 1.0, 3.0), patch_size=(48, 48, 16),
                     network=NetworkSpec("dynunet"))
    assert plan.network.level_strides[:2] == ((1, 1, 1), (2, 2, 1))  # thick slices: in-plane pooling first
    assert all(p % d == 0 for p, d in zip(plan.patch_size, plan.network.patch_divisors(3)))
    with pytest.raises(ValueError, match=r"'patch_size' \(\[48, 48, 20\]\) must be a multiple of \[8, 8, 8\]"):
        make_plan(datalist, geometries, patch_size=(48, 48, 20), network=NetworkSpec("segresnet"))
    with pytest.raises(ValueError, match="patch size needs 3 values"):
        make_plan(datalist, geometries, patch_size=(48, 48))


def test_make_plan_ct_window(ct_plan: tuple) -> None:
    """A fixed HU window replaces the percentiles; mean/std come from the clipped foreground."""
    datalist, _ = ct_plan
    geometries = validate_datalist(datalist)
    intensity = make_plan(datalist, geometries, ct_window=(-160.0, 240.0)).intensity
    assert (intensity.a_min, intensity.a_max) == (-160.0, 240.0)
    assert 40.0 < intensity.mean < 240.0  # foreground: liver 100, spleen 130, kidney 180, bone clipped at 240
    with pytest.raises(ValueError, match="increasing"):
        make_plan(datalist, geometries, ct_window=(240.0, -160.0))


def test_make_plan_mr(tmp_path: Path) -> None:
    datalist = load_datalist(write_dataset(tmp_path / "mr", "mr", cases=2, seed=0, size=32))
    plan = make_plan(datalist, validate_datalist(datalist))
    assert plan.modality == "MR" and plan.intensity == Intensity("mr")


def _plan() -> Plan:
    return Plan(
        dims=3,
        modality="CT",
        labels=dict(CT_LABELS),
        target_spacing=(0.8, 0.8, 2.5),
        patch_size=(64, 64, 32),
        intensity=Intensity("ct", -57.5, 512.0, 140.25, 146.0),
        network=NetworkSpec(channels=(8, 16, 32), strides=(2, 2), dropout=0.1),
        overlap=0.25,
    )


def test_plan_save_load_round_trip(tmp_path: Path) -> None:
    plan = _plan()
    path = plan.save(tmp_path / "run" / "plan.json")
    assert path == tmp_path / "run" / "plan.json"
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]
    data = json.loads(path.read_text())
    assert data["format"] == PLAN_FORMAT and data["labels"]["1"] == "liver"
    loaded = Plan.load(path)
    assert loaded == plan
    assert isinstance(loaded.target_spacing, tuple) and isinstance(loaded.network.channels, tuple)
    assert all(isinstance(k, int) for k in loaded.labels)


def test_load_missing_plan(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such file"):
        Plan.load(tmp_path / "plan.json")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        "42",
        json.dumps({"format": "other-plan/9"}),
        json.dumps({"format": PLAN_FORMAT}),  # missing keys
        "\udcff",  # not UTF-8 once written with surrogateescape
    ],
    ids=["invalid-json", "list", "number", "unknown-format", "missing-keys", "not-utf8"],
)
def test_load_malformed_plan(tmp_path: Path, text: str) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(BundleError) as excinfo:
        Plan.load(path)
    assert str(excinfo.value).startswith(str(path))


def test_load_plan_with_wrong_field_types(tmp_path: Path) -> None:
    data = _plan().to_json()
    data["intensity"] = {"preset": "ct", "unknown": 1}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="not a valid medseg plan"):
        Plan.load(path)


def test_load_plan_with_labels_as_list(tmp_path: Path) -> None:
    data = _plan().to_json()
    data["labels"] = ["background", "liver"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="not a valid medseg plan"):
        Plan.load(path)


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("target_spacing", "abc", "'target_spacing' must be a list of 3 positive numbers"),
    ("target_spacing", [1.0, 0.0, 2.0], "'target_spacing' must be a list of 3 positive numbers"),
    ("target_spacing", [1.0, 1.0], "'target_spacing' must be a list of 3"),
    ("patch_size", ["64", "64", "32"], "'patch_size' must be a list of 3 positive integers"),
    ("patch_size", [64, 64, 32.5], "'patch_size' must be a list of 3 positive integers"),
    ("labels", ["background", "liver"], "'labels' must be a JSON object"),
    ("labels", {"0": "background", "one": "liver"}, "'labels' must map label values"),
    ("labels", {"1": "liver"}, "must name label 0"),
    ("dims", "3", "'dims' must be 2 or 3"),
    ("modality", None, "'modality' must be a non-empty string"),
    ("intensity", "ct", "'intensity' must be a JSON object"),
    ("overlap", 1.0, "'overlap' must be a number in [0, 1)"),
    ("sw_batch_size", True, "'sw_batch_size' must be an integer >= 1"),
    ("network", {"channels": [8, "16"], "strides": [2]}, "'network.channels' must be a list of positive integers"),
    ("network", {"name": "vnet"}, "'network.name' must be \"unet\" or \"dynunet\" or \"segresnet\""),
    ("network", {"name": "unet", "filters": [8, 16]}, "'network.filters' is not a setting of the unet network"),
    ("network", {"name": "segresnet", "channels": [8, 16]}, "'network.channels' is not a setting of the segresnet"),
    ("network", {"channels": [8, 16, 32]}, "'network.strides' must have one value fewer than 'network.channels'"),
    ("network", {"name": "dynunet", "kernel_sizes": [[3, 3]] * 3, "level_strides": [[1, 1]] * 3},
     "'network.kernel_sizes' must be a list of levels, each a list of 3 values 1, 3, 5 or 7"),
    ("network", {"name": "dynunet", "kernel_sizes": [[3, 3, 3]] * 3, "level_strides": [[2, 2, 2]] * 3},
     "'network.level_strides' must start with a level of strides 1"),
    ("network", {"name": "dynunet", "kernel_sizes": [[3, 3, 3]] * 3}, "'network.level_strides' is missing"),
    ("network", {"name": "dynunet", "kernel_sizes": [[3, 3, 3]] * 3, "level_strides": [[1, 1, 1]] * 4},
     "'network.kernel_sizes' must have one entry per level"),
    ("network", {"name": "dynunet", "filters": [8, 16]}, "'network.filters' must have one entry per level"),
    ("network", {"name": "dynunet", "kernel_sizes": [[3, 3, 3]] * 2, "level_strides": [[1, 1, 1], [2, 2, 2]],
                 "filters": [8, 16]}, "'network.level_strides' must have at least 3 levels"),
    ("network", {"name": "dynunet", "res_block": "yes"}, "'network.res_block' must be true or false"),
    ("network", {"name": "dynunet", "norm": "group"}, "'network.norm' must be \"instance\" or \"batch\""),
    ("network", {"name": "segresnet", "blocks_down": [1, 2], "blocks_up": [1, 1]},
     "'network.blocks_up' must have one value fewer than 'network.blocks_down'"),
    ("network", {"name": "segresnet", "init_filters": 0}, "'network.init_filters' must be an integer >= 1"),
    ("network", {"channels": [4, 8, 16, 32, 64, 128, 256], "strides": [2] * 6},
     "'patch_size' ([64, 64, 32]) must be a multiple of [64, 64, 64] per axis for the unet network"),
    ("network", {"name": "dynunet", "kernel_sizes": [[3, 3, 3]] * 3, "level_strides": [[1, 1, 1], [2, 2, 2], [1, 1, 3]]},
     "'network.level_strides' must be a list of levels, each a list of 3 values 1 or 2"),
    ("patch_size", [64, 64, 30], "'patch_size' ([64, 64, 30]) must be a multiple of [4, 4, 4] per axis for the unet"),
    ("spacing", "abc", "unknown field 'spacing'"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_load_plan_names_the_file_and_the_bad_field(tmp_path: Path, field: str, value: object, fragment: str) -> None:
    """Wrong types reached Spacingd or the network as an "internal error" (exit 1) before; now the plan is refused."""
    data = _plan().to_json()
    data[field] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError) as excinfo:
        Plan.load(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: not a valid medseg plan: ") and fragment in message, message
    assert "\n" not in message


def test_load_plan_ct_intensity_must_be_usable(tmp_path: Path) -> None:
    data = _plan().to_json()
    data["intensity"] = dict(data["intensity"], std=0.0)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"'intensity\.std' must be positive"):
        Plan.load(path)


@pytest.mark.parametrize("bundle", ["ct_abdomen_phantom", "mr_abdomen_phantom"])
def test_maintained_bundle_plans_load(bundle: str) -> None:
    """The checks accept every plan medseg writes: the shipped CT (window statistics) and MR (nulls) bundles."""
    plan = Plan.load(Path(__file__).parents[2] / "bundles" / bundle / "configs" / "plan.json")
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_from_json_accepts_the_in_memory_form_of_to_json() -> None:
    """to_json() keeps tuples (dataclasses.asdict); from_json takes them as JSON lists."""
    plan = _plan()
    assert Plan.from_json(plan.to_json()) == plan


def _multichannel_region_plan() -> Plan:
    t1, flair = Intensity("mr"), Intensity("mr")
    return Plan(dims=3, modality="MR", labels={0: "background", 1: "whole tumour", 2: "tumour core", 3: "enhancing"},
                target_spacing=(1.0, 1.0, 1.0), patch_size=(32, 32, 32), intensity=t1,
                channels=(Channel("T1", t1), Channel("FLAIR", flair)),
                regions=(Region("whole tumour", (1, 2, 3), 1), Region("tumour core", (2, 3), 2),
                         Region("enhancing", (3,), 3)),
                ignore_label=4, configuration="3d_fullres", batch_size=2, planning={"device": "cpu"})


def test_multichannel_region_plan_round_trip(tmp_path: Path) -> None:
    plan = _multichannel_region_plan()
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    assert loaded.num_channels == 2 and [c.name for c in loaded.input_channels] == ["T1", "FLAIR"]
    assert loaded.num_outputs == 3 and loaded.num_classes == 4
    assert loaded.regions[1].labels == (2, 3) and loaded.ignore_label == 4


def test_one_channel_plan_has_one_input_channel() -> None:
    plan = _plan()
    assert plan.num_channels == 1 and plan.input_channels[0].name == "CT"
    assert plan.num_outputs == plan.num_classes


@pytest.mark.parametrize(("change", "fragment"), [
    ({"regions": [{"name": "wt", "labels": [1, 2, 3], "value": 1}]}, "'regions' must paint each non-zero value"),
    ({"regions": [{"name": "wt", "labels": ["a"], "value": 1}]}, "'regions[0].labels'"),
    ({"ignore_label": 2}, "'ignore_label' (2) must not be a value of 'labels'"),
    ({"ignore_label": "x"}, "'ignore_label' must be null or a label value"),
    ({"channels": [{"name": "T1", "intensity": {"preset": "ct"}}]}, "'channels[0].intensity.a_min'"),
    ({"configuration": "4d"}, "'configuration' must be"),
])
def test_region_and_channel_fields_are_checked(tmp_path: Path, change: dict, fragment: str) -> None:
    data = _multichannel_region_plan().to_json()
    data.update(change)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=re.escape(fragment)):
        Plan.load(path)
