"""Which backends exist on this machine, and why not.

Backends, in order of preference for automatic choice:
  cuda       distillkit._C built with CUDA, and a CUDA device present
  triton     triton imports, and a CUDA device is present or TRITON_INTERPRET=1 (the CPU interpreter)
  cpu        distillkit._C (C++ CPU kernels)
  reference  eager PyTorch, always

Each op declares its backends once (:class:`Op`, :class:`Backend`: launcher, dtypes, size limits);
:func:`dispatch` / :meth:`Op.select` pick one, and `distillkit info` prints the same declarations.
Automatic choice looks at the device of the op's tensors: CUDA tensors go cuda > triton > cpu > reference
(cpu never fits them), CPU tensors go cpu > reference (the Triton interpreter is never chosen automatically:
it is a test vehicle, not a fast path). ``DISTILLKIT_BACKEND`` sets the default for every op; an op's ``backend=``
argument overrides it. A backend asked for by name that cannot run raises ``BackendUnavailable``
naming the reason; a missing extension is reported here, on use, never at import.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from distillkit._errors import InputError

BACKENDS = ("cuda", "triton", "cpu", "reference")
_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (after `pip install torch==<your version>`)"
)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op here; the message says why."""


@functools.cache
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


@functools.cache
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


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Limit:
    """A bound a backend's kernel keeps: ``sizes[arg] <= most`` (e.g. top_k held in an on-chip buffer)."""
    arg: str
    most: int
    why: str

    def problem(self, sizes: dict) -> str | None:
        value = sizes.get(self.arg)
        if value is None or value <= self.most:
            return None
        return f"{self.arg}={value} exceeds this kernel's limit {self.arg} <= {self.most} ({self.why})"


@dataclass(frozen=True)
class Backend:
    """One backend of an op: its launcher ``run`` and what it supports (dtypes, size limits); devices and
    "needs the extension built / triton / a GPU" come from the backend's name (see backends())."""
    name: str
    run: Callable | None = None
    dtypes: tuple = FLOAT_DTYPES
    limits: tuple = ()

    def problem(self, device: torch.device, dtype: torch.dtype | None, sizes: dict) -> str | None:
        """Why this backend cannot run on tensors of ``device``/``dtype`` with ``sizes`` here, or None."""
        ok, why = _fits_device(self.name, device)
        if not ok:
            return why
        ok, why = _STATUS[self.name]()
        if not ok:
            return why
        if dtype is not None and dtype not in self.dtypes:
            return f"dtype {_dtype_name(dtype)} not supported (supports {', '.join(map(_dtype_name, self.dtypes))})"
        for limit in self.limits:
            why = limit.problem(sizes)
            if why:
                return why
        return None

    def supports(self) -> str:
        """One line: the dtypes and limits this backend declares (devices follow from its name)."""
        short = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}
        parts = [_DEVICES[self.name], "/".join(short.get(_dtype_name(d), _dtype_name(d)) for d in self.dtypes)]
        parts += [f"{lim.arg} <= {lim.most}" for lim in self.limits]
        return "; ".join(parts)


_DEVICES = {"cuda": "cuda", "triton": "cuda (cpu: interpreter)", "cpu": "cpu", "reference": "any device"}
OPS: dict[str, Op] = {}


class Op:
    """An op's backends, in preference order, each with what it supports; :meth:`select` picks one.

    Automatic choice: CUDA tensors go cuda > triton > cpu > reference, CPU tensors cpu > reference, skipping a
    backend that cannot run (with its reason kept). ``DISTILLKIT_BACKEND`` names a default, ``backend=``
    overrides it; a named backend that cannot run raises BackendUnavailable with the reason, except that a
    size limit under the environment default falls back to automatic choice (the variable is a preference).
    """

    def __init__(self, name: str, backends: Iterable[Backend], register: bool = True):
        self.name = name
        self.backends = {b.name: b for b in sorted(backends, key=lambda b: BACKENDS.index(b.name))}
        if register:
            OPS[name] = self

    def problem(self, name: str, device: torch.device, dtype=None, sizes=None) -> str | None:
        if name not in self.backends:
            return f"{self.name} has no {name} implementation"
        return self.backends[name].problem(device, dtype, sizes or {})

    def select(self, device: torch.device | str, dtype: torch.dtype | None = None, backend: str | None = None,
               label: str | None = None, **sizes) -> Backend:
        """The backend that runs this op on tensors of ``device`` (and ``dtype``, ``sizes``); see the class doc.
        ``label`` names the caller in messages (default: the op's name)."""
        device = torch.device(device)
        label = label or self.name
        requested = backend if backend is not None else (os.environ.get("DISTILLKIT_BACKEND") or None)
        if requested is not None:
            src = "backend=" if backend is not None else "DISTILLKIT_BACKEND="
            if requested not in BACKENDS:
                raise InputError(f"{src}{requested!r}: expected one of {BACKENDS} or None")
            why = self.problem(requested, device, dtype, sizes)
            if why is None:
                return self.backends[requested]
            limited = requested in self.backends and any(lim.problem(sizes)
                                                         for lim in self.backends[requested].limits)
            if backend is not None or not limited:
                raise BackendUnavailable(f"{label}: {src}{requested!r} cannot run: {why}")
        order = ("cuda", "triton", "cpu", "reference") if device.type == "cuda" else ("cpu", "reference")
        reasons = []
        for name in order:
            why = self.problem(name, device, dtype, sizes)
            if why is None:
                return self.backends[name]
            reasons.append(f"{name}: {why}")
        raise BackendUnavailable(f"{label}: no backend runs on {device}: " + "; ".join(reasons))

    def table(self) -> list[tuple[str, bool, str, str]]:
        """[(backend, runs here, reason, supports)] for every backend of BACKENDS, device-independent."""
        rows = []
        for name in BACKENDS:
            if name not in self.backends:
                rows.append((name, False, f"{self.name} has no {name} implementation", ""))
                continue
            ok, why = _STATUS[name]()
            rows.append((name, ok, why, self.backends[name].supports()))
        return rows


def dispatch(op: Op | str, tensors, backend: str | None = None, **sizes) -> Backend:
    """The backend of ``op`` (an Op or a registered op's name) for ``tensors`` (a tensor or a sequence whose
    first entry gives device and dtype); raises BackendUnavailable listing every candidate and its reason."""
    op = OPS[op] if isinstance(op, str) else op
    first = tensors if isinstance(tensors, torch.Tensor) else next(iter(tensors))
    return op.select(first.device, first.dtype, backend, **sizes)


def select_backend(op: str, device: torch.device, backend: str | None = None,
                   implemented: Iterable[str] = BACKENDS) -> str:
    """Picks the backend that runs an op named ``op`` with backends ``implemented`` on tensors of ``device``
    (:meth:`Op.select` for an op declared on the spot; ops declare theirs once with :class:`Op`)."""
    return Op(op, [Backend(n) for n in implemented], register=False).select(device, backend=backend).name


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
