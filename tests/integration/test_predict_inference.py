"""`medseg predict` through medseg's sliding-window inferer: test-time mirroring, the two inversions, bundles,
and each input read once."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.inference.predictor import Predictor
from medseg.io.image import read_geometry, to_array


def _first_test_image(ct_dataset: Path) -> Path:
    return sorted((ct_dataset.parent / "imagesTs").iterdir())[0]


def test_tta_runs_in_the_input_geometry_and_changes_the_prediction(tmp_path: Path, ct_dataset: Path,
                                                                   untrained_run: Path) -> None:
    image = _first_test_image(ct_dataset)
    plain, mirrored = tmp_path / "plain", tmp_path / "tta"
    assert main(["predict", "--model", str(untrained_run), "--input", str(image), "--output", str(plain)]) == 0
    assert main(["predict", "--model", str(untrained_run), "--input", str(image), "--output", str(mirrored),
                 "--tta"]) == 0
    (a,), (b,) = list(plain.glob("*_seg.*")), list(mirrored.glob("*_seg.*"))
    assert read_geometry(b).mismatch(read_geometry(image)) is None
    # random weights are not mirror-symmetric: averaging the flipped passes must change some voxels
    assert not np.array_equal(to_array(sitk.ReadImage(str(a))), to_array(sitk.ReadImage(str(b))))


def test_bfloat16_prediction_on_a_trained_model_nearly_equals_float32(tmp_path: Path, ct_dataset: Path,
                                                                      trained_run: Path) -> None:
    image = _first_test_image(ct_dataset)
    out = tmp_path / "bf16"
    assert main(["predict", "--model", str(trained_run), "--input", str(image), "--output", str(out),
                 "--precision", "bfloat16"]) == 0
    (written,) = list(out.glob("*_seg.*"))
    assert read_geometry(written).mismatch(read_geometry(image)) is None
    bf16 = to_array(sitk.ReadImage(str(written)))
    fp32 = Predictor.from_run(trained_run).predict_array(image)
    foreground = (bf16 > 0) | (fp32 > 0)
    assert (bf16[foreground] == fp32[foreground]).mean() > 0.97


def test_class_by_class_inversion_from_disk_equals_the_in_memory_inversion(tmp_path: Path, ct_dataset: Path,
                                                                           trained_run: Path) -> None:
    """What a many-class model on a large CT gets (float16 probabilities on disk, inverted one class at a
    time) is the in-memory inversion's answer; nearest-neighbour inversion of the label map is close
    but measurably different (why "auto" never picks it)."""
    image = _first_test_image(ct_dataset)
    results = {}
    for output in ("probabilities", "disk", "labels"):
        predictor = Predictor.from_run(trained_run)
        predictor.output = output
        results[output] = predictor.predict_array(image)
    a, b, c = results["probabilities"], results["disk"], results["labels"]
    assert a.shape == b.shape == c.shape == read_geometry(image).size
    assert (a == b).mean() > 0.9999  # float16 storage may flip a voxel at a near-tie
    foreground = (a > 0) | (c > 0)
    assert 0.8 < (a[foreground] == c[foreground]).mean() < 0.9999
    assert not list(Path(tempfile.gettempdir()).glob("medseg-probs-*"))  # nothing left behind


class _ReadCounter:
    """Counts how an input file is read: ITK header reads and whole-image reads, nibabel loads, and the
    bytes decompressed from it through gzip."""

    def __init__(self, monkeypatch, path: Path) -> None:
        import gzip

        import nibabel

        self.path = str(path)
        self.headers = self.itk_reads = self.nibabel_loads = self.decompressed = 0
        counter = self
        info, execute, read_image = (sitk.ImageFileReader.ReadImageInformation, sitk.ImageFileReader.Execute,
                                     sitk.ReadImage)
        gz_read, gz_readinto, nib_load = gzip.GzipFile.read, gzip.GzipFile.readinto, nibabel.load

        def header(reader, *args, **kwargs):
            counter.headers += reader.GetFileName() == counter.path
            return info(reader, *args, **kwargs)

        def whole(reader, *args, **kwargs):
            counter.itk_reads += reader.GetFileName() == counter.path
            return execute(reader, *args, **kwargs)

        def read_itk(name, *args, **kwargs):
            counter.itk_reads += str(name) == counter.path
            return read_image(name, *args, **kwargs)

        def load(name, *args, **kwargs):
            counter.nibabel_loads += str(name) == counter.path
            return nib_load(name, *args, **kwargs)

        def read(stream, *args, **kwargs):
            data = gz_read(stream, *args, **kwargs)
            counter.decompressed += len(data) if stream.name == counter.path else 0
            return data

        def readinto(stream, buffer):
            n = gz_readinto(stream, buffer)
            counter.decompressed += n if stream.name == counter.path else 0
            return n

        monkeypatch.setattr(sitk.ImageFileReader, "ReadImageInformation", header)
        monkeypatch.setattr(sitk.ImageFileReader, "Execute", whole)
        monkeypatch.setattr(sitk, "ReadImage", read_itk)
        monkeypatch.setattr(nibabel, "load", load)
        monkeypatch.setattr(nibabel.loadsave, "load", load)
        monkeypatch.setattr(gzip.GzipFile, "read", read)
        monkeypatch.setattr(gzip.GzipFile, "readinto", readinto)


@pytest.mark.parametrize("instances", [False, True], ids=["labels", "instances"])
def test_predict_reads_a_nifti_input_once(tmp_path: Path, ct_dataset: Path, untrained_run: Path,
                                          monkeypatch: pytest.MonkeyPatch, instances: bool) -> None:
    """One .nii.gz input (checked, predicted, written, with --instances twice): its header is read once
    and its pixel data decompressed once; nothing reads it again, not even the writer."""
    import gzip

    image = tmp_path / "scan.nii.gz"
    shutil.copy(_first_test_image(ct_dataset), image)
    with gzip.open(image, "rb") as stream:
        size = len(stream.read())
    counter = _ReadCounter(monkeypatch, image)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(untrained_run), "--input", str(image), "--output", str(out),
                 *(["--instances"] if instances else [])]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".medseg-cases", "scan_instances.nii.gz", "scan_seg.nii.gz"][
        :: 1 if instances else 2], "the outputs and the completion records, nothing else"
    assert counter.headers == 1, "header read more than once"
    assert counter.itk_reads == 0 and counter.nibabel_loads == 0, "the file was read again"
    assert size <= counter.decompressed <= size + 1024, f"decompressed {counter.decompressed} bytes of {size}"
