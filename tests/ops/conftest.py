"""One ``(backend, device)`` parametrisation for every op test, built from the backends that run here.

A test that takes both ``backend`` and ``device`` arguments (and does not parametrise them itself) runs once per
pair: on a CPU host reference and cpu on CPU tensors, and triton on CPU tensors under TRITON_INTERPRET=1 (which
tests/conftest.py sets); on a GPU host reference and cpu on CPU tensors, and cuda, triton and reference on CUDA
tensors. Narrow it with markers:

    @pytest.mark.backends("cpu", "triton", "cuda")   only these backends (e.g. the fused ones)
    @pytest.mark.devices("cpu")                      only these devices (e.g. value checks, CPU-only)
    @pytest.mark.no_interpreter                      not triton under the CPU interpreter (too slow to add anything)

The ``interpreted`` fixture tells a test that it runs triton in the CPU interpreter, to keep its shapes small.
"""
from __future__ import annotations

import pytest
import torch
from _backends import backend_devices


def pytest_configure(config):
    for line in ("backends(*names): run only these backends of the (backend, device) parametrisation",
                 "devices(*names): run only on these devices of the (backend, device) parametrisation",
                 "no_interpreter: leave out triton under the CPU interpreter"):
        config.addinivalue_line("markers", line)


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "backend" not in names or "device" not in names:
        return
    if any({"backend", "device"} & set(_argnames(m)) for m in metafunc.definition.iter_markers("parametrize")):
        return
    only = metafunc.definition.get_closest_marker("backends")
    on = metafunc.definition.get_closest_marker("devices")
    no_interp = metafunc.definition.get_closest_marker("no_interpreter") is not None
    pairs = [(b, d) for b, d in backend_devices()
             if (only is None or b in only.args) and (on is None or d in on.args)
             and not (no_interp and b == "triton" and d == "cpu")]
    # as a mark (not metafunc.parametrize): the root conftest's parametrised `device` fixture then steps aside
    metafunc.definition.add_marker(pytest.mark.parametrize(("backend", "device"), pairs,
                                                           ids=[f"{b}-{d}" for b, d in pairs]))


def _argnames(mark) -> list[str]:
    args = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
    return [a.strip() for a in args.split(",")] if isinstance(args, str) else list(args)


@pytest.fixture
def interpreted(backend, device) -> bool:
    """True when this case runs triton in the CPU interpreter (slow: keep shapes small)."""
    return backend == "triton" and torch.device(device).type == "cpu"
