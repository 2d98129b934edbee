"""Helpers for the PACS tests: a real Orthanc (with its DICOMweb plugin) on free ports of 127.0.0.1.

Tests that need Orthanc, its DICOMweb plugin or dcmtk are skipped when a tool is missing and
CI != "true", and fail under CI=true (scripts/install_system_deps.sh installs them as root).
"""

from __future__ import annotations

import glob
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tests.tools import needs

ORTHANC = shutil.which("Orthanc") or next(iter(glob.glob("/usr/sbin/Orthanc")), None)
DICOMWEB_PLUGIN = next(iter(sorted(glob.glob("/usr/share/orthanc/plugins*/libOrthancDicomWeb.so"))), None)
STORESCU = shutil.which("storescu")
ECHOSCU = shutil.which("echoscu")
OPENSSL = shutil.which("openssl")
ORTHANC_AET = "ORTHANC"
USER, PASSWORD = "medseg", "s3cret-pw"


def missing_tools(*names: str) -> list[str]:
    """The named tools (orthanc, dicomweb, storescu, echoscu, openssl) that are not installed."""
    found = {"orthanc": ORTHANC, "dicomweb": DICOMWEB_PLUGIN, "storescu": STORESCU, "echoscu": ECHOSCU,
             "openssl": OPENSSL}
    return [name for name in names if not found[name]]


def require_tools(*names: str) -> pytest.MarkDecorator:
    """A skipif marker for missing tools; under CI=true the test runs (and fails) instead."""
    missing = missing_tools(*names)
    return needs(not missing, ", ".join(missing))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc; ``rest(...)`` talks to its REST API with the registered user."""

    process: subprocess.Popen
    workdir: Path
    http_port: int
    dicom_port: int
    aet: str = ORTHANC_AET
    auth: tuple[str, str] = (USER, PASSWORD)
    log_path: Path = field(default=Path())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        response = requests.request(method, self.url + path, auth=self.auth, timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through the REST API (POST /instances)."""
        for path in files:
            self.rest("POST", "/instances", data=path.read_bytes(), headers={"Content-Type": "application/dicom"})

    def series_of_study(self, study_uid: str) -> list[dict]:
        """The study's series with their main DICOM tags (empty when the study is unknown)."""
        found = self.rest("POST", "/tools/find", json={"Level": "Series", "Expand": True,
                                                      "Query": {"StudyInstanceUID": study_uid}}).json()
        return found

    def instances_of_modality(self, modality: str) -> list[dict]:
        """Every stored instance whose series has this modality (expanded, with the main tags)."""
        return self.rest("POST", "/tools/find", json={"Level": "Instance", "Expand": True,
                                                      "Query": {"Modality": modality}}).json()

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.rest("GET", f"/instances/{orthanc_id}/file").content

    def clear(self) -> None:
        """Delete every patient (between tests)."""
        for patient in self.rest("GET", "/patients").json():
            self.rest("DELETE", f"/patients/{patient}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_orthanc(workdir: Path, *, modalities: dict[str, tuple[str, str, int]] | None = None,
                  always_allow_store: bool = True, timeout: float = 60.0) -> Orthanc:
    """Start Orthanc with a config in ``workdir``: storage there, HTTP and DICOM on free ports of
    127.0.0.1, HTTP basic authentication (``USER``/``PASSWORD``), remote access off, the DICOMweb
    plugin at ``/dicom-web/``, and ``modalities`` (name -> (AET, host, port)) as known DICOM peers.
    With ``always_allow_store=False`` only those peers may C-STORE into it."""
    assert ORTHANC and DICOMWEB_PLUGIN, "Orthanc and its DICOMweb plugin are required (scripts/install_system_deps.sh)"
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = {
        "Name": "medseg-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "OrthancExplorerEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False,
                     "Host": f"127.0.0.1:{http_port}"},
        "DicomModalities": {name: list(peer) for name, peer in (modalities or {}).items()},
        "DicomAlwaysAllowStore": always_allow_store,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckModalityHost": False,
        "SaveJobs": False,
        "StableAge": 1,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 4,
        "DicomThreadsCount": 2,
        "OverwriteInstances": False,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=workdir, start_new_session=True)
    orthanc = Orthanc(process, workdir, http_port, dicom_port, log_path=log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{orthanc.log_tail()}")
        try:
            if requests.get(orthanc.url + "/system", auth=orthanc.auth, timeout=2).ok:
                plugins = requests.get(orthanc.url + "/plugins", auth=orthanc.auth, timeout=5).json()
                assert "dicom-web" in plugins, plugins
                return orthanc
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            orthanc.stop()
            raise RuntimeError(f"Orthanc did not answer within {timeout} s:\n{orthanc.log_tail()}")
        time.sleep(0.2)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="medseg-test"')
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        proxy.seen.append((self.command, self.path, dict(self.headers)))
        if self.headers.get("Authorization") != f"Bearer {proxy.token}":
            self._reply(401, b'{"error": "invalid bearer token"}', "application/json")
            return
        if proxy.read_only and self.command != "GET":
            self._reply(403, b'{"error": "this token may only read"}', "application/json")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type")}
        response = requests.request(self.command, proxy.target + self.path, data=body or None, headers=headers,
                                    auth=proxy.auth, timeout=60)
        self._reply(response.status_code, response.content,
                    response.headers.get("Content-Type", "application/octet-stream"))

    do_GET = do_POST = _forward

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: BearerProxy


class BearerProxy:
    """An HTTP(S) front end for Orthanc that accepts ``Authorization: Bearer <token>`` (as an OAuth
    gateway in front of a PACS would), records every request's headers and forwards the request to
    Orthanc with its basic-auth user. ``read_only`` refuses everything but GET with 403."""

    def __init__(self, orthanc: Orthanc, token: str, *, certfile: Path | None = None, keyfile: Path | None = None):
        self.target, self.auth, self.token = orthanc.url, orthanc.auth, token
        self.read_only = False
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.proxy = self
        self.scheme = "http"
        if certfile is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile, keyfile)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def dicomweb(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self._server.server_address[1]}/dicom-web"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for IP 127.0.0.1 and its key, made with the openssl command."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([OPENSSL or "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def small_series(out_dir: Path, modality: str = "ct", seed: int = 0, **kwargs) -> list[Path]:
    """A 32 x 32 x 12 phantom (4 x 4 x 8 mm voxels) written as a DICOM series: quick to send and
    to segment. ``kwargs`` go to :func:`medseg.data.synthetic.dicom.write_dicom_series`."""
    from medseg.data.synthetic import Grid
    from medseg.data.synthetic.dicom import phantom_series

    grid = Grid.centred((32, 32, 12), (4.0, 4.0, 8.0), (0.0, 0.0, 0.0))
    files, _, _ = phantom_series(out_dir, modality, seed=seed, grid=grid, **kwargs)
    return files
