"""The (backend, device) pairs that run here, for tests/ops/conftest.py's parametrisation and for tests that
compare every backend inside one test (tests/ops/test_bad_input.py). Import as ``from _backends import ...``
(tests/ is on sys.path, as for _tolerance)."""
from __future__ import annotations

import torch

from distillkit._backend import runnable_backends


def backend_devices() -> list[tuple[str, str]]:
    """Every (backend, device) that runs here: a CPU host gives reference and cpu on CPU tensors and triton under
    TRITON_INTERPRET=1 (tests/conftest.py sets it); a GPU host adds cuda, triton and reference on CUDA tensors."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(b, d) for d in devices for b in runnable_backends(d)]


def backends_on(device: str) -> list[str]:
    """The backends of :func:`backend_devices` on ``device``, fastest first."""
    return [b for b, d in backend_devices() if d == device]
