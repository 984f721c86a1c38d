"""Scoring benchmark (CoRD meta-prover): answer log-probs kernel vs eager, and (below) MetaProver.

Kernel section: log softmax(hidden @ W.T)[m, id_m] for M answer rows.
  providers  every backend runnable on this device (the Triton interpreter is skipped: it is a test
             vehicle), "eager": full logits (in the input dtype, then float32) + log_softmax + gather, and
             on a GPU (and in the tiny profile) "compiled": eager through torch.compile.
  shapes     CPU: V=32000, H=512 fp32 (llama-tiny); GPU: llama3-8b (V=128256, H=4096) and qwen2.5-7b
             (V=152064, H=3584) bf16; M in {64, 1024}. Profiles (bench/shapes.py): anchor = llama3-8b
             alone, tiny = a toy head.
  metrics    median time, peak extra memory of a warm call, ratios to eager (same run), roofline fraction = time to
             read W once at the copy bandwidth measured in this run / kernel time (GPU goal: kernel
             <= 1.5x that time, i.e. fraction >= 0.67), and gemm_fraction = 2*M*V*H FLOPs at the
             dense matmul rate measured in this run / kernel time (the floor where the op is compute
             bound: CPU always, GPU at M=1024).

    pytest bench/bench_scoring.py -q -s
"""
from __future__ import annotations

import functools

import pytest
import torch

import shapes
from _util import Row, compiled, copy_bandwidth_gbs, device, matmul_flops, median_time_s, peak_extra_bytes, report
from distillkit._backend import backends, runnable_backends
from distillkit.scoring import answer_logprobs

DEV = device()
LM_HEADS = shapes.lm_heads(DEV.type == "cuda")
DTYPE = torch.bfloat16 if DEV.type == "cuda" else torch.float32
WITH_COMPILED = DEV.type == "cuda" or shapes.profile() == "tiny"
ANSWER_ROWS = (64, 1024)
KERNEL_ROWS: list[Row] = []
_MEASURED: dict[str, float] = {}


def eager_answer_logprobs(hidden, weight, ids):
    """What a user writes: lm_head over every row, float32 log_softmax, gather."""
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, ids.view(-1, 1)).squeeze(1)


@functools.cache
def _kernel_providers() -> tuple[str, ...]:
    table = backends()
    names = []
    for name in ("cuda", "triton", "cpu", "reference"):
        if name in runnable_backends(DEV) and not (name == "triton" and DEV.type == "cpu"):
            names.append(name)
        else:
            why = "the interpreter is for tests" if name == "triton" and table[name][0] else table[name][1]
            print(f"[bench_scoring] backend {name} skipped: {why}")
    return (*names, "eager", *(["compiled"] if WITH_COMPILED else []))


def _rates():
    if not _MEASURED:
        _MEASURED["copy_gbs"] = copy_bandwidth_gbs(dev=DEV)
        _MEASURED["flops"] = matmul_flops(DTYPE, n=4096 if DEV.type == "cuda" else 1024, dev=DEV)
    return _MEASURED["copy_gbs"], _MEASURED["flops"]


@pytest.mark.parametrize("m", ANSWER_ROWS)
@pytest.mark.parametrize("head", list(LM_HEADS))
def test_kernel(benchmark, head, m):
    torch.manual_seed(0)
    v, h = LM_HEADS[head]
    copy_gbs, flops = _rates()
    weight = (torch.randn(v, h, device=DEV) / h**0.5).to(DTYPE)
    hidden = torch.randn(m, h, device=DEV).to(DTYPE)
    ids = torch.randint(0, v, (m,), device=DEV)
    w_bytes = weight.numel() * weight.element_size()
    t_read = w_bytes / (copy_gbs * 1e9)
    t_gemm = 2.0 * m * v * h / flops
    case = f"{head} M={m} V={v} H={h} {str(DTYPE).split('.')[-1]}"
    repeats = 20 if DEV.type == "cuda" else 3
    rows, outs = {}, {}
    for name in _kernel_providers():
        if name == "eager":
            fn = lambda: eager_answer_logprobs(hidden, weight, ids)  # noqa: E731
        elif name == "compiled":
            fn = functools.partial(compiled(eager_answer_logprobs), hidden, weight, ids)
        else:
            fn = lambda name=name: answer_logprobs(hidden, weight, ids, backend=name)  # noqa: E731
        fn()  # warm: a first call's one-time setup (OpenMP worker arenas, BLAS buffers) is not working memory
        peak, outs[name] = peak_extra_bytes(fn, DEV)
        t = median_time_s(fn, DEV, warmup=0, repeats=repeats)
        rows[name] = Row("scoring_kernel", case, name, {"eager": "eager", "compiled": "torch.compile"}.get(name, name),
                         t, peak,
                         roofline_fraction=t_read / t,
                         extra={"gemm_fraction": t_gemm / t, "W_read_ms": t_read * 1e3, "gemm_floor_ms": t_gemm * 1e3,
                                "copy_GBs": copy_gbs, "matmul_TFLOPs": flops / 1e12})
    for name, r in rows.items():
        r.ratio_to_eager = r.time_s / rows["eager"].time_s
        r.extra["peak_ratio_to_eager"] = r.peak_bytes / max(rows["eager"].peak_bytes, 1)
        if name != "eager":  # the kernel answers what eager answers (float32 accumulation both)
            r.extra["max_abs_diff_vs_eager"] = (outs[name] - outs["eager"]).abs().max().item()
        KERNEL_ROWS.append(r)
    best = _kernel_providers()[0]
    benchmark.extra_info.update({n: r.time_s for n, r in rows.items()})
    benchmark.pedantic(lambda: answer_logprobs(hidden, weight, ids, backend=best), rounds=3, iterations=1)


def test_kernel_report():
    if not KERNEL_ROWS:
        pytest.skip("no kernel rows measured")
    report(KERNEL_ROWS, "scoring_kernel")
    for r in KERNEL_ROWS:
        if r.provider in ("eager", "compiled"):
            continue
        line = (f"  {r.case} {r.provider}: {r.time_s * 1e3:.2f} ms = {r.time_s / r.extra['W_read_ms'] * 1e3:.1f}x one "
                f"W read ({r.extra['W_read_ms']:.2f} ms), {r.extra['gemm_fraction']:.0%} of the GEMM floor "
                f"({r.extra['gemm_floor_ms']:.1f} ms), {r.ratio_to_eager:.2f}x eager time, "
                f"peak {r.peak_bytes / 2**20:.2f} MiB = {r.extra['peak_ratio_to_eager']:.3f}x eager's, "
                f"|diff vs eager| {r.extra['max_abs_diff_vs_eager']:.1e}")
        if DEV.type == "cuda" and r.provider in ("cuda", "triton"):
            line += "  [goal <= 1.5x W read: " + ("meets]" if r.roofline_fraction >= 1 / 1.5 else "MISSES]")
        print(line)


# ---- MetaProver section (prefix KV reuse vs recompute): owned by the CoRD decoder work; it currently
# lives in bench/bench_meta_prover.py and may move below this line. ----
