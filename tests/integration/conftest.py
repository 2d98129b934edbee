"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.dimse import LISTENER_AET
from tests.integration.orthanc import Orthanc, start_orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A real Orthanc that accepts C-STOREs only from the listener's AE title: where the DIMSE listener
    forwards its SEGs (``test_pacs_dicomweb.py`` defines its own, with DICOMweb users and TLS)."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), always_allow_store=False,
                           modalities={"medseg": (LISTENER_AET, "127.0.0.1", 104)})
    yield server
    server.stop()
