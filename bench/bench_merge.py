"""Merge benchmark: in-place weighted average of K model copies.

Providers: every distillkit backend runnable here, `torch.stack(...).mean(0)` per tensor (what a
hand-written merge does) and `torch._foreach_mul_/_foreach_add_` (PyTorch's multi-tensor ops).
Roofline: bytes moved = (K + 1) x model bytes (K reads, one write), against a copy measured in the
same run (bytes read + written). Goals: CPU backend >= 0.8 of copy bandwidth and >= 2x the stack
baseline; GPU >= 0.9 of copy bandwidth.

    pytest bench/bench_merge.py -q -s      (DISTILLKIT_BENCH_PARAMS overrides the model size)

Cases: K in {2, 4} x {fp32, bf16} by default; the anchor and tiny profiles (bench/shapes.py) run K=4 bf16 alone,
at 1e9 parameters and at a toy size.
"""
from __future__ import annotations

import os

import pytest
import torch

import shapes
from _util import Row, copy_bandwidth_gbs, device, median_time_s, peak_extra_bytes, report
from distillkit._backend import backends, runnable_backends
from distillkit.ops.merge import average_group_

DEV = device()
PARAMS = int(os.environ.get("DISTILLKIT_BENCH_PARAMS", shapes.merge_params(DEV.type == "cuda")))
KS, DTYPES = shapes.merge_cases(DEV.type == "cuda", [torch.bfloat16, torch.float32] if DEV.type == "cuda"
                                else [torch.float32, torch.bfloat16])
ROWS: list[Row] = []
_COPY = {}


def _model(dtype, seed):
    """A transformer-like parameter list: a few large matrices and many small vectors."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    small = [torch.randn(4096, generator=g) for _ in range(64)]
    n_small = sum(t.numel() for t in small)
    per_big = (PARAMS - n_small) // 8
    big = [torch.randn(per_big, generator=g) for _ in range(8)]
    return [t.to(device=DEV, dtype=dtype) for t in big + small]


def _providers():
    table = backends()
    out = []
    for name in ("cuda", "triton", "cpu", "reference"):
        if name in runnable_backends(DEV):
            out.append((name, name))
        else:
            print(f"[bench_merge] backend {name} skipped: {table[name][1]}")
    return out + [("eager: stack.mean", "eager"), ("eager: _foreach", "eager")]


def _run(provider, target, sources, weights):
    if provider == "eager: stack.mean":
        for i, t in enumerate(target):
            t.copy_(torch.stack([s[i] for s in sources]).mul_(
                torch.tensor(weights, dtype=t.dtype, device=t.device).view(-1, *([1] * t.dim()))).sum(0))
    elif provider == "eager: _foreach":
        torch._foreach_mul_(target, 0.0)
        for w, s in zip(weights, sources):
            torch._foreach_add_(target, s, alpha=w)
    else:
        average_group_(target, sources, weights, backend=provider)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("k", KS)
def test_merge(benchmark, k, dtype):
    if "bw" not in _COPY:
        _COPY["bw"] = copy_bandwidth_gbs(dev=DEV)
    sources = [_model(dtype, s) for s in range(k)]
    target = [torch.zeros_like(t) for t in sources[0]]  # touched: first-touch page faults are not a temporary
    weights = [1.0 / k] * k
    nbytes = (k + 1) * sum(t.numel() * t.element_size() for t in target)
    case = f"K={k} {str(dtype).split('.')[-1]} {PARAMS / 1e6:.0f}M params"
    times = {}
    for label, backend in _providers():
        fn = lambda: _run(label, target, sources, weights)  # noqa: E731
        peak, _ = peak_extra_bytes(fn, DEV)
        t = median_time_s(fn, DEV, warmup=1, repeats=3 if DEV.type == "cpu" else 20)
        times[label] = t
        ROWS.append(Row("merge", case, label, backend, t, peak, roofline_fraction=nbytes / t / 1e9 / _COPY["bw"],
                        extra={"GB/s": nbytes / t / 1e9, "copy GB/s": _COPY["bw"]}))
    for r in ROWS:
        if r.case == case:
            r.ratio_to_eager = r.time_s / times["eager: stack.mean"]
    best = runnable_backends(DEV)[0]
    benchmark.extra_info.update({r.provider: r.time_s for r in ROWS if r.case == case})
    benchmark.pedantic(lambda: _run(best, target, sources, weights), rounds=3, iterations=1)


def test_report():
    if not ROWS:
        pytest.skip("no merge rows measured")
    report(ROWS, "merge")
    goal = 0.9 if DEV.type == "cuda" else 0.8
    for r in ROWS:
        if r.provider in ("cpu", "cuda"):
            verdict = "meets" if r.roofline_fraction >= goal and (r.ratio_to_eager or 1) <= 0.5 else "MISSES"
            print(f"goal ({goal:.0%} of copy, >= 2x stack) {verdict}: {r.case} {r.provider} "
                  f"{r.roofline_fraction:.0%} of {r.extra['copy GB/s']:.1f} GB/s, {1 / r.ratio_to_eager:.1f}x stack")
