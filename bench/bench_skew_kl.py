"""Logits-level skew KL / skew reverse KL: eager reference vs the fused backends.

    pytest bench/bench_skew_kl.py -q -s

Shapes: bench/shapes.py (CPU: llama-tiny's N x V in float32; GPU: llama3-8b's in bfloat16; the profile
DISTILLKIT_BENCH_SHAPES=anchor|tiny picks issue 19's anchor or a toy copy of it). Providers: eager (the
reference formulas), on a GPU and in the tiny profile also "compiled" (the same eager function through
torch.compile, backend from DISTILLKIT_BENCH_COMPILE_BACKEND, default inductor), and the fused backends. Modes:
"forward" (no gradient kept) and "full" (forward + backward of the mean loss). Each row names the
backend that ran, its time relative to eager measured in this run, and a roofline fraction: the
fused minimum of bytes (read both logits; in "full" also write the gradient) over the measured copy
bandwidth. On CPU the exp/log math, not memory, is the floor (see csrc/cpu/skew_kl.cpp).
"""
from __future__ import annotations

import pytest
import torch

import _util
import distillkit
import shapes
from distillkit.reference import skew_kl as reference

DEV = _util.device()
CASE_NAME, (N, _, V) = shapes.loss_shape(DEV.type == "cuda", "llama-tiny")
if DEV.type == "cuda":
    DTYPE, ROUNDS = torch.bfloat16, 10
    PROVIDERS = ["eager", "compiled", "auto", "triton", "cuda"]
else:
    DTYPE, ROUNDS = torch.float32, 3
    PROVIDERS = ["eager", "auto", "cpu"]
if shapes.profile() == "tiny":  # a code-path check of the GPU run's providers, one round
    ROUNDS = 1
    if "compiled" not in PROVIDERS:
        PROVIDERS.insert(1, "compiled")
LOSSES = {"skew_kl": (distillkit.skew_kl, reference.skew_kl),
          "skew_reverse_kl": (distillkit.skew_reverse_kl, reference.skew_reverse_kl)}
_ROWS: dict[tuple[str, str], list[_util.Row]] = {}
_COPY_GBS: list[float] = []


def _backend_of(provider: str) -> str | None:
    return {"eager": "reference", "compiled": "reference", "auto": None}.get(provider, provider)


def _chosen_backend(provider: str) -> str:
    from distillkit._backend import select_backend

    if provider == "compiled":
        return "torch.compile"
    return select_backend("skew_kl", DEV, _backend_of(provider))


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device=DEV).manual_seed(0)
    student = (3 * torch.randn(N, V, generator=g, device=DEV)).to(DTYPE)
    teacher = (3 * torch.randn(N, V, generator=g, device=DEV)).to(DTYPE)
    labels = torch.randint(0, V, (N,), generator=g, device=DEV)
    labels[::8] = -100
    _COPY_GBS.append(_util.copy_bandwidth_gbs(dev=DEV))
    yield student, teacher, labels
    for (loss_name, mode), rows in _ROWS.items():
        eager = next((r.time_s for r in rows if r.provider == "eager"), None)
        for r in rows:
            r.ratio_to_eager = r.time_s / eager if eager else None
        _util.report(rows, f"skew_kl-{loss_name}-{mode}")
    print(f"copy bandwidth {_COPY_GBS[0]:.1f} GB/s; N={N} V={V} {DTYPE}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_skew_kl(benchmark, inputs, loss_name, mode, provider):
    from distillkit._backend import BackendUnavailable

    student, teacher, labels = inputs
    fused, eager = LOSSES[loss_name]
    try:
        backend = _chosen_backend(provider)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))

    fn = {"eager": eager, "compiled": _util.compiled(eager)}.get(provider, fused)

    def run():
        if mode == "forward":
            with torch.no_grad():
                return fn(student, teacher, labels, **kwargs)
        s = student.detach().requires_grad_(True)
        fn(s, teacher, labels, **kwargs).backward()
        return s.grad

    kwargs = {} if provider in ("eager", "compiled") else {"backend": _backend_of(provider)}
    try:
        peak, _ = _util.peak_extra_bytes(run, DEV)
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{provider} runs out of memory at N={N} V={V}")
    benchmark.pedantic(lambda: (run(), _util.sync(DEV)), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    time_s = benchmark.stats.stats.median
    elt = torch.finfo(DTYPE).bits // 8
    min_bytes = (2 if mode == "forward" else 3) * N * V * elt
    roofline = min_bytes / time_s / 1e9 / _COPY_GBS[0]
    _ROWS.setdefault((loss_name, mode), []).append(_util.Row(
        suite="skew_kl", case=f"{loss_name} {mode} {N}x{V}", provider=provider, backend=backend, time_s=time_s,
        peak_bytes=peak, roofline_fraction=roofline, extra={"dtype": str(DTYPE)}))
