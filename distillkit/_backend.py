"""Which backends exist on this machine, and why not.

Backends, in order of preference for automatic choice:
  cuda       distillkit._C built with CUDA, and a CUDA device present
  triton     triton imports, and a CUDA device is present or TRITON_INTERPRET=1 (the CPU interpreter)
  cpu        distillkit._C (C++ CPU kernels)
  reference  eager PyTorch, always

Automatic choice looks at the device of the op's tensors: CUDA tensors go cuda > triton > reference,
CPU tensors go cpu > reference (the Triton interpreter is never chosen automatically: it is a test
vehicle, not a fast path). ``DISTILLKIT_BACKEND`` sets the default for every op; an op's ``backend=``
argument overrides it. A backend asked for by name that cannot run raises ``BackendUnavailable``
naming the reason; a missing extension is reported here, on use, never at import.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable

import torch

from distillkit._errors import InputError

BACKENDS = ("cuda", "triton", "cpu", "reference")
_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (after `pip install torch==<your version>`)"
)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op here; the message says why."""


@functools.lru_cache(maxsize=None)
def _load_extension():
    """Returns (module or None, reason)."""
    try:
        from distillkit import _C  # noqa: F401
    except ImportError as exc:
        return None, f"distillkit._C is not built ({exc}); {_BUILD_HINT}"
    return _C, "built"


def extension():
    """The compiled extension module; raises BackendUnavailable with the build hint if it is missing."""
    mod, reason = _load_extension()
    if mod is None:
        raise BackendUnavailable(reason)
    return mod


def _gpu_present() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising at import
        return None, f"triton does not import ({exc.__class__.__name__}: {exc})"
    return triton, f"triton {triton.__version__}"


def _cuda_status() -> tuple[bool, str]:
    mod, reason = _load_extension()
    if mod is None:
        return False, reason
    if not mod.with_cuda():
        return False, "distillkit._C was built without CUDA (CPU torch or no nvcc at build time)"
    if not _gpu_present():
        return False, "no CUDA device present"
    return True, f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"


def _triton_status() -> tuple[bool, str]:
    gpu, interp = _gpu_present(), triton_interpret()
    if not gpu and not interp:
        return False, "no CUDA device present and TRITON_INTERPRET is not set"
    mod, reason = _triton_import()
    if mod is None:
        return False, reason
    return True, reason + (" (interpreter, TRITON_INTERPRET=1)" if interp else "")


def _cpu_status() -> tuple[bool, str]:
    mod, reason = _load_extension()
    if mod is None:
        return False, reason
    return True, f"C++ kernels, {torch.get_num_threads()} threads"


def backends() -> dict[str, tuple[bool, str]]:
    """{name: (available, reason)} for every backend, in order of preference."""
    return {
        "cuda": _cuda_status(),
        "triton": _triton_status(),
        "cpu": _cpu_status(),
        "reference": (True, f"eager PyTorch {torch.__version__}"),
    }


_STATUS = {"cuda": _cuda_status, "triton": _triton_status, "cpu": _cpu_status,
           "reference": lambda: (True, "eager PyTorch")}


def _fits_device(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "cuda" and device.type != "cuda":
        return False, f"tensors are on {device}, the cuda backend needs CUDA tensors"
    if name == "cpu" and device.type != "cpu":
        return False, f"tensors are on {device}, the cpu backend needs CPU tensors"
    if name == "triton":
        if device.type == "cpu" and not triton_interpret():
            return False, "tensors are on cpu; triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return False, f"tensors are on {device}"
    return True, ""


def select_backend(op: str, device: torch.device, backend: str | None = None,
                   implemented: Iterable[str] = BACKENDS) -> str:
    """Picks the backend that runs ``op`` on tensors living on ``device``.

    ``backend`` (else ``DISTILLKIT_BACKEND``) names one explicitly; it must be available, implemented
    for ``op`` and fit the device, or this raises BackendUnavailable with the reason. With none named,
    the first backend of the preference order that runs here is chosen.
    """
    implemented = tuple(implemented)
    requested = backend if backend is not None else (os.environ.get("DISTILLKIT_BACKEND") or None)
    if requested is not None:
        if requested not in BACKENDS:
            src = "backend=" if backend is not None else "DISTILLKIT_BACKEND="
            raise InputError(f"{src}{requested!r}: expected one of {BACKENDS} or None")
        ok, why = _why_not(op, requested, device, implemented)
        if not ok:
            src = "backend=" if backend is not None else "DISTILLKIT_BACKEND="
            raise BackendUnavailable(f"{op}: {src}{requested!r} cannot run: {why}")
        return requested
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    reasons = []
    for name in order:
        ok, why = _why_not(op, name, device, implemented)
        if ok:
            return name
        reasons.append(f"{name}: {why}")
    raise BackendUnavailable(f"{op}: no backend runs on {device}: " + "; ".join(reasons))


def _why_not(op: str, name: str, device: torch.device, implemented: tuple[str, ...]) -> tuple[bool, str]:
    if name not in implemented:
        return False, f"{op} has no {name} implementation"
    ok, why = _fits_device(name, device)
    if not ok:
        return False, why
    return _STATUS[name]()


def backend_problem(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run ops on tensors of ``device`` here (one line), or None when it can.
    Config checks call this before any model loads (a device naming CUDA is checked apart)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}: expected one of {BACKENDS}"
    device = torch.device(device)
    ok, why = _STATUS[name]()
    if not ok:
        return f"the {name} backend is not available here: {why}"
    ok, why = _fits_device(name, device)
    if not ok:
        return f"the {name} backend cannot run on the configured device {device}: {why}"
    return None


def runnable_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends able to run on tensors of ``device`` here, fastest first (reference always last).

    On CPU this includes triton only under TRITON_INTERPRET=1: tests and benchmarks iterate over it.
    """
    device = torch.device(device)
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "triton", "reference")
    return [b for b in order if _fits_device(b, device)[0] and _STATUS[b]()[0]]
