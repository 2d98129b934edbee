"""report.html opened from disk in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.reports import build_report
from tests.tools import needs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--virtual-time-budget=5000"]

pytestmark = [
    pytest.mark.browser,
    needs(CHROMIUM, "chromium"),
]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None, "chromium is required in CI: scripts/install_system_deps.sh installs it"
    profile = tmp_path / "profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, ct_dataset: Path) -> Path:
    """A report of the reference label maps (as if they were predictions) of three phantoms."""
    preds = tmp_path_factory.mktemp("preds")
    for ref in (ct_dataset.parent / "labelsTs").iterdir():
        shutil.copy(ref, preds / ref.name.replace(".nii.gz", "_seg.nii.gz"))
    out = tmp_path_factory.mktemp("report")
    labels = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "bone", 5: "lesion"}
    build_report(preds, ct_dataset.parent / "imagesTs", out, labels=labels)
    return out / "report.html"


def test_tables_and_images_render(tmp_path: Path, report: Path) -> None:
    """The DOM after load: every table row is there and every embedded PNG decoded (the page's
    own script records `loaded/total` in body[data-images-loaded])."""
    result = _chromium(tmp_path, "--dump-dom", report.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert match, dom[:2000]
    loaded, total = int(match.group(1)), int(match.group(2))
    assert total == 3 and loaded == total
    assert dom.count("<table") >= 2
    for name in ("liver", "spleen", "kidney", "bone", "lesion"):
        assert name in dom


def test_screenshot_shows_overlays(tmp_path: Path, report: Path) -> None:
    """A screenshot of the page holds the overlay colours, not just text on white."""
    shot = tmp_path / "page.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(shot)))[..., :3].astype(int)
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    assert (saturation > 60).mean() > 0.002, "no coloured overlay pixels rendered"
    assert np.std(pixels) > 20
