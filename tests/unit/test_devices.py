"""Device names (``--device``): what is refused, with what message, before anything runs (the CUDA side simulated:
the machines that run the suite have no GPU)."""

from __future__ import annotations

import pytest
import torch

from medseg.devices import resolve_device
from medseg.errors import InputError


def test_cpu_and_unknown_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="--device must be cpu or cuda, got 'gpu'"):
        resolve_device("gpu")


@pytest.mark.parametrize(("name", "message"), [
    ("cuda:2", "--device cuda:2: this machine has 2 CUDA device(s), cuda:0-cuda:1"),
    ("cuda:x", "--device must be cpu, cuda or cuda:N, got 'cuda:x'"),
])
def test_a_cuda_device_the_machine_lacks_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(InputError) as raised:
        resolve_device(name)
    assert str(raised.value) == message


def test_cuda_without_cuda_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="CUDA is not available on this machine; use --device cpu"):
        resolve_device("cuda:0")
