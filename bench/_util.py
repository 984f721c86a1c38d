"""Shared measurement helpers for the pytest-benchmark suites.

Every suite reports, for each provider, median time, peak extra memory and a roofline fraction
measured in the same run (memcpy bandwidth on CPU or a device-to-device copy on GPU), and names
the backend it ran (the choice is never silent).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

import distillkit

# bench/gpu_check.py points this elsewhere, so a dry run never overwrites the recorded results
RESULTS_DIR = os.environ.get("DISTILLKIT_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compiled(fn):
    """fn through torch.compile (static shapes); DISTILLKIT_BENCH_COMPILE_BACKEND picks the backend (default
    inductor; the CPU dry run uses aot_eager, which traces the same graph without generating code)."""
    return torch.compile(fn, backend=os.environ.get("DISTILLKIT_BENCH_COMPILE_BACKEND", "inductor"), dynamic=False)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Hands freed heap pages back to the OS so that RSS baselines are honest (glibc only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn, dev: torch.device | None = None) -> tuple[int, object]:
    """Runs fn() once; returns (peak bytes allocated above the level before the call, fn's result).

    On CUDA this is the caching allocator's peak; on CPU a 0.5 ms RSS sampler (allocations that
    matter here are tens of MB and live for milliseconds, well inside its resolution).
    """
    dev = dev or device()
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base, out
    _trim()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return peak[0] - base, out


def median_time_s(fn, dev: torch.device | None = None, *, warmup: int = 1, repeats: int = 5) -> float:
    dev = dev or device()
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _tiny() -> bool:
    """The toy profile (bench/shapes.py) checks code paths: its rate measurements shrink too."""
    return os.environ.get("DISTILLKIT_BENCH_SHAPES") == "tiny"


def copy_bandwidth_gbs(nbytes: int = 1 << 28, dev: torch.device | None = None) -> float:
    """Measured copy bandwidth in GB/s, counting bytes read plus bytes written."""
    dev = dev or device()
    nbytes = min(nbytes, 1 << 22) if _tiny() else nbytes
    n = nbytes // 4
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    t = median_time_s(lambda: dst.copy_(src), dev, warmup=2, repeats=7)
    return 2 * n * 4 / t / 1e9


def matmul_flops(dtype: torch.dtype = torch.float32, n: int = 2048, dev: torch.device | None = None) -> float:
    """Measured dense matmul rate in FLOP/s for n x n x n in `dtype`."""
    dev = dev or device()
    n = min(n, 256) if _tiny() else n
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = median_time_s(lambda: a @ b, dev, warmup=1, repeats=3)
    return 2 * n**3 / t


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    env = {
        "device": None,  # filled below: the GPU's name, or the CPU's model and threads
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "distillkit": distillkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=False,
            ).stdout.strip()
        except OSError:
            env["driver"] = None
    env["device"] = env.get("gpu") or f"CPU {env['cpu']}, {env['cpu_threads']} threads"
    return env


@dataclass
class Row:
    """One provider's measurement in a benchmark table."""
    suite: str
    case: str
    provider: str
    backend: str
    time_s: float
    peak_bytes: int
    roofline_fraction: float | None = None
    ratio_to_eager: float | None = None
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        roof = f"{self.roofline_fraction:6.1%}" if self.roofline_fraction is not None else "   n/a"
        ratio = f"{self.ratio_to_eager:6.2f}x" if self.ratio_to_eager is not None else "    n/a"
        return (f"{self.case:<34} {self.provider:<18} {self.backend:<10} {self.time_s * 1e3:10.2f} ms "
                f"{self.peak_bytes / 2**20:10.1f} MiB  roofline {roof}  time/eager {ratio}")


def report(rows: list[Row], suite: str) -> str:
    """Prints the table and writes it as JSON under bench/results/<suite>-<device>.json."""
    env = environment()
    text = "\n".join([f"== {suite} on {env['device']} ==", *(r.line() for r in rows)])
    print("\n" + text)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    tag = env.get("gpu", "cpu").replace(" ", "_")
    with open(os.path.join(RESULTS_DIR, f"{suite}-{tag}.json"), "w") as f:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return text


def child_peak_rss(code: str, *, timeout_s: float = 3600) -> dict:
    """Runs ``code`` in a fresh Python interpreter; returns its peak RSS and run time.

    {"peak_bytes": the child's VmHWM (high-water resident set, interpreter and imports included),
    "elapsed_s": wall time of the whole child, "stdout": what it printed}. A child that fails raises
    RuntimeError with its stderr.
    """
    import subprocess
    import sys

    footer = ("\nwith open('/proc/self/status') as _f:\n"
              "    print('__VMHWM_KB__', [l.split()[1] for l in _f if l.startswith('VmHWM:')][0])\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + footer], capture_output=True, text=True, timeout=timeout_s)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    lines = proc.stdout.splitlines()
    peak_kb = int(next(line.split()[1] for line in reversed(lines) if line.startswith("__VMHWM_KB__")))
    return {"peak_bytes": peak_kb * 1024, "elapsed_s": elapsed,
            "stdout": "\n".join(line for line in lines if not line.startswith("__VMHWM_KB__"))}
