"""Test-suite set-up: on a machine without a GPU the Triton backend runs under the CPU interpreter.

TRITON_INTERPRET must be set before triton decorates any kernel, hence here, before collection.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from distillkit._backend import backends  # noqa: E402

# Tests iterate over distillkit._backend.runnable_backends(device): every backend that can run here.


def pytest_report_header(config):
    return ["distillkit backends: " + ", ".join(f"{k}={'yes' if ok else 'no'}" for k, (ok, _) in backends().items())]


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models gain nothing from a second one, OpenMP spin-waits
    stall when other jobs share the two cores, and the world's recorded numbers were taken with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seeded_global_generators():
    """Every test starts from the same global random state, so inputs drawn without an explicit generator
    do not depend on which tests ran before (a test's result must not change with the order or selection)."""
    import random

    random.seed(0)
    torch.manual_seed(0)
    yield
