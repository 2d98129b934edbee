"""``medseg pacs run`` against a real Orthanc with its DICOMweb plugin (QIDO-RS, WADO-RS, STOW-RS).

Orthanc runs with HTTP basic authentication; bearer tokens and TLS are tested through a small HTTPS
front end (tests/integration/orthanc.py: BearerProxy) that checks the token and forwards to Orthanc.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from medseg.cli import main
from tests.integration.orthanc import (
    PASSWORD,
    USER,
    BearerProxy,
    Orthanc,
    free_port,
    require_tools,
    self_signed_certificate,
    small_series,
    start_orthanc,
)

pytestmark = [pytest.mark.pacs, require_tools("orthanc", "dicomweb", "openssl")]
TOKEN = "t0ken-abc.123"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def study(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, set[str]]:
    """A small CT phantom series uploaded to Orthanc: (study UID, series UID, SOP instance UIDs)."""
    files = small_series(tmp_path_factory.mktemp("ct"), "ct", seed=1)
    orthanc.upload(files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    sops = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    return first.StudyInstanceUID, first.SeriesInstanceUID, sops


@pytest.fixture(scope="module")
def proxy(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory):
    """HTTPS + bearer-token front end of Orthanc; yields (proxy, CA bundle)."""
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    server = BearerProxy(orthanc, TOKEN, certfile=cert, keyfile=key)
    yield server, cert
    server.stop()


@pytest.fixture()
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Python's temporary folder redirected, to see what ``pacs run`` leaves behind."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["pacs", "run", *args])
    out, err = capsys.readouterr()
    return code, out, err


def printed_uids(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def assert_seg_in_study(orthanc: Orthanc, study_uid: str, series_uid: str, sops: set[str], uids: dict[str, str]) -> None:
    """QIDO-RS finds the printed SEG series in the study, and the SEG references every source instance."""
    session = requests.Session()
    session.auth = orthanc.auth
    client = DICOMwebClient(orthanc.dicomweb, session=session)
    segs = client.search_for_series(study_uid, search_filters={"Modality": "SEG"})
    assert uids["SeriesInstanceUID"] in [s["0020000E"]["Value"][0] for s in segs]
    seg = client.retrieve_instance(study_uid, uids["SeriesInstanceUID"], uids["SOPInstanceUID"])
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study_uid
    assert seg.SeriesInstanceUID != series_uid
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series_uid
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == sops
    assert len(seg.SegmentSequence) >= 1


def test_round_trip_basic_auth(orthanc: Orthanc, study, untrained_run: Path, tmp_path: Path, temp_root: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """QIDO finds the CT series, WADO retrieves it, the SEG is stored by STOW in the same study;
    --output keeps a copy; no temporary files are left."""
    study_uid, series_uid, sops = study
    code, out, err = run(capsys, "--url", orthanc.dicomweb, "--study", study_uid, "--model", str(untrained_run),
                         "--username", USER, "--password", PASSWORD, "--output", str(tmp_path / "copy"))
    assert code == 0, err
    uids = printed_uids(out)
    assert_seg_in_study(orthanc, study_uid, series_uid, sops, uids)
    copy = tmp_path / "copy" / f"{uids['SOPInstanceUID']}.dcm"
    assert pydicom.dcmread(copy).SOPInstanceUID == uids["SOPInstanceUID"]
    assert list(temp_root.iterdir()) == []
    assert PASSWORD not in err and "Phantom" not in err and "PHANTOM001" not in err


def test_round_trip_with_models_imported_from_nnunet(orthanc: Orthanc, study, imported_runs: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``pacs run`` with a bundle of two nnU-Net models merged into one label map (TotalSegmentator's layout): the
    SEG is stored in the study, its segments named by the merged labels."""
    study_uid, series_uid, sops = study
    code, out, err = run(capsys, "--url", orthanc.dicomweb, "--study", study_uid, "--model",
                         str(imported_runs["parts"]), "--username", USER, "--password", PASSWORD)
    assert code == 0, err
    uids = printed_uids(out)
    assert_seg_in_study(orthanc, study_uid, series_uid, sops, uids)
    session = requests.Session()
    session.auth = orthanc.auth
    seg = DICOMwebClient(orthanc.dicomweb, session=session).retrieve_instance(
        study_uid, uids["SeriesInstanceUID"], uids["SOPInstanceUID"])
    assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"liver", "spleen", "kidney"}


def test_wrong_password(orthanc: Orthanc, study, untrained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--url", orthanc.dicomweb, "--study", study[0], "--model", str(untrained_run),
                         "--username", USER, "--password", "not-the-password")
    assert code != 0 and out == ""
    assert f"medseg: error: {orthanc.dicomweb}: HTTP 401" in err and "authentication failed" in err
    assert "Traceback" not in err and "not-the-password" not in err


def test_unknown_study(orthanc: Orthanc, untrained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--url", orthanc.dicomweb, "--study", "1.2.3.4.5.6", "--model", str(untrained_run),
                       "--username", USER, "--password", PASSWORD)
    assert code != 0
    assert "study 1.2.3.4.5.6 not found" in err and orthanc.dicomweb in err


def test_connection_refused(untrained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    code, _, err = run(capsys, "--url", url, "--study", "1.2.3", "--model", str(untrained_run))
    assert code != 0
    assert f"{url}: cannot connect" in err and "connection refused" in err and "Traceback" not in err


def test_bad_model_fails_before_any_request(proxy, study, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, cert = proxy
    server.seen.clear()
    code, _, err = run(capsys, "--url", server.dicomweb, "--study", study[0], "--model", str(tmp_path / "no-run"),
                       "--token", TOKEN, "--ca-bundle", str(cert))
    assert code == 2 and "no-run: no such bundle or run folder" in err
    assert server.seen == []


def test_several_series_need_a_choice(orthanc: Orthanc, untrained_run: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Two image series in a study and no --series: the error lists both; --series picks one that
    must belong to the study."""
    study_uid = pydicom.uid.generate_uid()
    series = []
    for number, modality in enumerate(("ct", "mr"), 1):
        files = small_series(tmp_path / modality, modality, seed=2, study_uid=study_uid, series_number=number)
        orthanc.upload(files)
        series.append(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    auth = ["--username", USER, "--password", PASSWORD]
    code, _, err = run(capsys, "--url", orthanc.dicomweb, "--study", study_uid, "--model", str(untrained_run), *auth)
    assert code == 2
    assert "2 image series, choose one with --series" in err and all(uid in err for uid in series)
    code, _, err = run(capsys, "--url", orthanc.dicomweb, "--study", study_uid, "--model", str(untrained_run),
                       "--series", "1.2.3.999", *auth)
    assert code == 2 and "series 1.2.3.999 is not in study" in err


def test_bearer_token_over_verified_tls(proxy, study, untrained_run: Path, orthanc: Orthanc,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--token is sent as 'Authorization: Bearer' on every request; the private CA is trusted only
    through --ca-bundle."""
    server, cert = proxy
    study_uid, series_uid, sops = study
    server.seen.clear()
    code, out, err = run(capsys, "--url", server.dicomweb, "--study", study_uid, "--model", str(untrained_run),
                         "--token", TOKEN, "--ca-bundle", str(cert))
    assert code == 0, err
    methods = {method for method, _, _ in server.seen}
    assert methods == {"GET", "POST"}  # QIDO + WADO, then STOW
    assert all(headers.get("Authorization") == f"Bearer {TOKEN}" for _, _, headers in server.seen)
    assert_seg_in_study(orthanc, study_uid, series_uid, sops, printed_uids(out))
    assert TOKEN not in err


def test_tls_verified_by_default(proxy, study, untrained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, _ = proxy
    code, _, err = run(capsys, "--url", server.dicomweb, "--study", study[0], "--model", str(untrained_run),
                       "--token", TOKEN)
    assert code != 0
    assert f"{server.dicomweb}: TLS error" in err and "certificate verify failed" in err and "--ca-bundle" in err
    # --no-verify gets past TLS: the (wrong) token is then refused by the server
    code, _, err = run(capsys, "--url", server.dicomweb, "--study", study[0], "--model", str(untrained_run),
                       "--token", "wrong", "--no-verify")
    assert code != 0 and "HTTP 401" in err and "authentication failed" in err


def test_refused_store_leaves_nothing(proxy, study, untrained_run: Path, temp_root: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A token that may read but not write: retrieval and inference succeed, STOW-RS gets 403; the
    error names the step and the temporary series and SEG are removed."""
    server, cert = proxy
    server.read_only = True
    try:
        code, out, err = run(capsys, "--url", server.dicomweb, "--study", study[0], "--model", str(untrained_run),
                             "--token", TOKEN, "--ca-bundle", str(cert))
    finally:
        server.read_only = False
    assert code != 0 and out == ""
    assert "HTTP 403" in err and "while storing the SEG" in err
    assert list(temp_root.iterdir()) == []
