"""answer_logprobs / predictive_perplexity on every (backend, device) runnable here against float64 formulas.

Pairs from tests/ops/conftest.py: reference and cpu on CPU tensors, triton under TRITON_INTERPRET=1 (small
shapes only) on a CPU host; cuda, triton and reference on CUDA tensors on a GPU host.
Tolerance (STYLE habit 6): a backend's error against float64 must be no worse than twice the error of
plain PyTorch computing the same thing eagerly with float32 accumulation (full logits, log_softmax,
gather) on the same inputs, plus a float32-rounding floor.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import distillkit
from _tolerance import assert_eager_budget
from distillkit import scoring
from distillkit._backend import backends
from distillkit.reference import scoring as ref

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

_AVAILABLE = backends()
_GPU = torch.cuda.is_available()
GPU_ONLY = [pytest.mark.backends("cuda", "triton"), pytest.mark.devices("cuda")]  # GPU-sized shapes
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(m, v, h, dtype, *, bias=True, scale=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(m, h, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    ids = torch.randint(0, v, (m,), generator=g)
    b = torch.randn(v, generator=g) if bias else None
    return hidden.to(device), weight.to(device), ids.to(device), None if b is None else b.to(device)


def eager_fp32(hidden, weight, ids, bias):
    """Plain PyTorch: full float32 logits, log_softmax, gather (the baseline users would write)."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    return torch.log_softmax(logits, -1).gather(1, ids.view(-1, 1)).squeeze(1)


def check_close(out, hidden, weight, ids, bias):
    """out [M] against float64, compared on the CPU (inputs on any device)."""
    out, hidden, weight, ids = out.cpu(), hidden.cpu(), weight.cpu(), ids.cpu()
    bias = None if bias is None else bias.cpu()
    exact = ref.answer_logprobs(hidden, weight, ids, bias=bias, compute_dtype=torch.float64)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert torch.isfinite(out).all()
    # one scale for the tensor: a log-prob's rounding error follows the logits' size, not |log p| (~0 at the argmax)
    assert_eager_budget(out, eager_fp32(hidden, weight, ids, bias), exact, scale="tensor", what="answer_logprobs")


@pytest.mark.no_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,v,h", [(1, 97, 5), (7, 1271, 33), (67, 32003, 65), (67, 1271, 129)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_answer_logprobs_matches_float64(backend, device, dtype, m, v, h, with_bias):
    hidden, weight, ids, bias = make_inputs(m, v, h, dtype, bias=with_bias, device=device)
    out = distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend=backend)
    check_close(out, hidden, weight, ids, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_answer_logprobs_small_all_backends(backend, device, dtype, with_bias):
    # sizes that are not multiples of any block: rows, vocabulary and hidden all odd
    hidden, weight, ids, bias = make_inputs(7, 97, 33, dtype, bias=with_bias, seed=1, device=device)
    check_close(distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend=backend), hidden, weight, ids, bias)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("m,v,h", [(1, 97, 5), (67, 1271, 65)])
def test_triton_interpreter_odd_sizes(backend, device, m, v, h):
    hidden, weight, ids, bias = make_inputs(m, v, h, torch.float32, seed=2, device=device)
    check_close(distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend=backend), hidden, weight, ids, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,v,h", [(1, 97, 5), (67, 32003, 129), (130, 1271, 4096), (1024, 128256, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
@GPU_ONLY[0]
@GPU_ONLY[1]
def test_gpu_backends_match_float64(backend, device, dtype, m, v, h, with_bias):
    # H=4096 (a multiple of 8) takes the CUDA kernel's 16-byte vector loads; H odd the scalar path
    hidden, weight, ids, bias = make_inputs(m, v, h, dtype, bias=with_bias, seed=7, device=device)
    out = distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend=backend)
    check_close(out, hidden, weight, ids, bias)


@GPU_ONLY[0]
@GPU_ONLY[1]
def test_gpu_vocab_splits(backend, device):
    # one split, a few, and one tile per split must give the same answer
    from distillkit import _backend

    hidden, weight, ids, bias = make_inputs(70, 5003, 64, torch.bfloat16, device=device)
    for splits in (1, 3, 10_000):
        if backend == "cuda":
            out = _backend.extension().answer_logprobs_cuda(hidden, weight, ids, bias, splits)
        else:
            from distillkit.kernels import scoring as tk

            out = tk.answer_logprobs(hidden, weight, ids, bias, vocab_splits=splits)
        check_close(out.cpu(), hidden.cpu(), weight.cpu(), ids.cpu(), bias.cpu())


@pytest.mark.skipif(not _AVAILABLE["triton"][0] or _GPU, reason="needs the Triton interpreter (CPU-only machine)")
@pytest.mark.parametrize("splits", [1, 2, 100])
def test_triton_interpreter_vocab_splits(splits):
    # one split (no combine work), two, and more splits than vocabulary tiles (clamped)
    from distillkit.kernels import scoring as tk

    hidden, weight, ids, bias = make_inputs(20, 300, 33, torch.float32, seed=8)
    check_close(tk.answer_logprobs(hidden, weight, ids, bias, vocab_splits=splits), hidden, weight, ids, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_hidden_values(backend, device, dtype):
    # peaky softmax: logits of size ~1e3-1e4 (exp overflows without max subtraction), answer ids
    # both at the arg-max (log p ~ 0) and far below it (log p ~ -1e4)
    hidden, weight, ids, bias = make_inputs(9, 211, 17, dtype, scale=300.0, seed=3, device=device)
    logits = hidden.double() @ weight.double().T
    ids[:4] = logits[:4].argmax(-1)
    ids[4:] = logits[4:].argmin(-1)
    out = distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend=backend)
    check_close(out, hidden, weight, ids, bias)
    assert out[:4].abs().max() < 1.0 and out[4:].max() < -100.0


def test_predictive_perplexity_segments(backend, device, interpreted):
    small = interpreted
    m, v, h = (10, 97, 17) if small else (23, 1271, 33)
    hidden, weight, ids, bias = make_inputs(m, v, h, torch.float32, seed=4, device=device)
    # segments of length 1 (first two), a long one, and a trailing length-1 segment
    cu = torch.tensor([0, 1, 2, m - 1, m], dtype=torch.int32)
    out = distillkit.predictive_perplexity(hidden, weight, ids, cu, bias=bias, backend=backend)
    exact = ref.predictive_perplexity(hidden, weight, ids, cu, bias=bias, compute_dtype=torch.float64)
    assert out.dtype == torch.float32 and out.shape == (4,)
    # perplexities are positive and independent: relative error per element, against plain float32 PyTorch
    eager = ref.predictive_perplexity(hidden, weight, ids, cu, bias=bias, compute_dtype=torch.float32)
    assert_eager_budget(out, eager, exact, scale="element", what="predictive_perplexity")

    # direct check of the definition: exp(mean log p) per segment, from plain PyTorch (float64 and float32)
    def manual_ppl(dtype, bounds):
        lp = torch.log_softmax(hidden.to(dtype) @ weight.to(dtype).T + bias.to(dtype), -1).gather(
            1, ids.view(-1, 1)).squeeze(1)
        return torch.stack([lp[a:b].mean().exp() for a, b in zip(bounds[:-1], bounds[1:])])

    segments = cu.tolist()
    assert_eager_budget(out, manual_ppl(torch.float32, segments), manual_ppl(torch.float64, segments),
                        scale="element", what="exp(mean log p)")
    # all-length-1 segments: S is the per-token probability; a python list is accepted too
    ones = distillkit.predictive_perplexity(hidden, weight, ids, list(range(m + 1)), bias=bias, backend=backend)
    assert_eager_budget(ones, manual_ppl(torch.float32, list(range(m + 1))),
                        manual_ppl(torch.float64, list(range(m + 1))), scale="element", what="per-token p")


def test_no_gradient_and_detached():
    hidden, weight, ids, bias = make_inputs(5, 97, 9, torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = distillkit.answer_logprobs(hidden, weight, ids, bias=bias)
    assert not out.requires_grad and out.grad_fn is None
    ppl = distillkit.predictive_perplexity(hidden, weight, ids, [0, 5], bias=bias)
    assert not ppl.requires_grad


def test_automatic_backend_and_top_level_exports():
    from distillkit.ops.scoring import resolve_backend

    expected = "cpu" if _AVAILABLE["cpu"][0] else "reference"
    assert resolve_backend(torch.device("cpu")) == expected
    assert distillkit.answer_logprobs is scoring.answer_logprobs
    assert distillkit.predictive_perplexity is scoring.predictive_perplexity


def test_empty_rows():
    hidden, weight, ids, _ = make_inputs(0, 97, 9, torch.float32)
    assert distillkit.answer_logprobs(hidden, weight, ids).shape == (0,)
    assert distillkit.predictive_perplexity(hidden, weight, ids, [0]).shape == (0,)


@pytest.mark.no_interpreter
def test_float64_inputs(backend, device):
    hidden, weight, ids, bias = make_inputs(5, 97, 9, torch.float64, device=device)
    check_close(distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend=backend), hidden, weight, ids, bias)


@pytest.mark.skipif(not _AVAILABLE["cpu"][0], reason=_AVAILABLE["cpu"][1])
@pytest.mark.parametrize("chunk", [1, 16, 100, 5000])
def test_cpu_chunk_sizes(chunk):
    # the vocabulary split must not matter: tiles of one row, ragged last tiles, one tile for all
    from distillkit import _C

    hidden, weight, ids, bias = make_inputs(13, 1271, 33, torch.float32, seed=5)
    out = _C.answer_logprobs_cpu(hidden, weight, ids, bias, chunk)
    check_close(out, hidden, weight, ids, bias)


@pytest.mark.skipif(not _AVAILABLE["cpu"][0], reason=_AVAILABLE["cpu"][1])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_worker_counts(threads, dtype):
    # workers claim vocabulary chunks from a shared counter: one worker, two, and more workers than
    # cores (an uneven claim) must all give the float64 answer; 41 chunks of 31 rows, the last ragged
    from distillkit import _C

    hidden, weight, ids, bias = make_inputs(19, 1271, 33, dtype, seed=9)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _C.answer_logprobs_cpu(hidden, weight, ids, bias, 31)
    finally:
        torch.set_num_threads(before)
    check_close(out, hidden, weight, ids, bias)


@pytest.mark.skipif(not _AVAILABLE["cpu"][0], reason=_AVAILABLE["cpu"][1])
def test_cpu_does_not_materialise_logits():
    """M=1024, V=32000: [M, V] float32 logits are 131 MB; the cpu backend must stay far below that."""
    from _util import peak_extra_bytes

    m, v, h = 1024, 32000, 64
    hidden, weight, ids, bias = make_inputs(m, v, h, torch.float32, seed=6)
    full_logits_bytes = m * v * 4
    eager_peak, _ = peak_extra_bytes(lambda: eager_fp32(hidden, weight, ids, bias), torch.device("cpu"))
    assert eager_peak >= 0.9 * full_logits_bytes  # the sampler does see an [M, V] allocation
    peak, out = peak_extra_bytes(lambda: distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend="cpu"),
                                 torch.device("cpu"))
    assert peak < full_logits_bytes / 8, f"cpu backend peaked at {peak / 2**20:.1f} MiB"
    check_close(out, hidden, weight, ids, bias)


# ---- errors: ValueError naming the argument ----

def _good():
    return make_inputs(4, 50, 8, torch.float32)


@pytest.mark.parametrize("case,match", [
    ("id_high", "answer_ids"), ("id_negative", "answer_ids"), ("ids_float", "answer_ids"),
    ("ids_length", "answer_ids"), ("h_mismatch", "weight"), ("bias_length", "bias"),
    ("dtype_mismatch", "weight"), ("device_mismatch", "weight"), ("nan_hidden", "hidden"),
    ("hidden_3d", "hidden"), ("hidden_int", "hidden"),
])
def test_answer_logprobs_errors(case, match):
    hidden, weight, ids, bias = _good()
    if case == "id_high":
        ids[2] = 50
    elif case == "id_negative":
        ids[0] = -1
    elif case == "ids_float":
        ids = ids.float()
    elif case == "ids_length":
        ids = ids[:3]
    elif case == "h_mismatch":
        weight = weight[:, :7].contiguous()
    elif case == "bias_length":
        bias = bias[:49]
    elif case == "dtype_mismatch":
        weight = weight.bfloat16()
    elif case == "device_mismatch":
        weight = torch.empty(weight.shape, device="meta")
    elif case == "nan_hidden":
        hidden[1, 3] = float("nan")
    elif case == "hidden_3d":
        hidden = hidden.view(2, 2, 8)
    elif case == "hidden_int":
        hidden = hidden.long()
        weight = weight.long()
    with pytest.raises(ValueError, match=match):
        distillkit.answer_logprobs(hidden, weight, ids, bias=bias)


@pytest.mark.parametrize("cu,match", [
    ([1, 2, 4], "start at 0"), ([0, 3, 2, 4], "non-decreasing"), ([0, 2, 2, 4], "empty"),
    ([0, 2, 3], "last entry"), ([0, 2, 5], "last entry"), ([], "at least one"),
])
def test_predictive_perplexity_cu_seqlens_errors(cu, match):
    hidden, weight, ids, bias = _good()
    with pytest.raises(ValueError, match=f"cu_seqlens.*{match}"):
        distillkit.predictive_perplexity(hidden, weight, ids, torch.tensor(cu, dtype=torch.int64), bias=bias)


def test_predictive_perplexity_rejects_float_cu_seqlens_and_bad_ids():
    hidden, weight, ids, bias = _good()
    with pytest.raises(ValueError, match="cu_seqlens"):
        distillkit.predictive_perplexity(hidden, weight, ids, torch.tensor([0.0, 4.0]))
    ids[3] = 99
    with pytest.raises(ValueError, match="answer_ids"):
        distillkit.predictive_perplexity(hidden, weight, ids, [0, 4])


def test_non_tensor_argument():
    hidden, weight, ids, _ = _good()
    with pytest.raises(TypeError, match="answer_ids"):
        distillkit.answer_logprobs(hidden, weight, ids.tolist())


def test_unchanged_weight_is_checked_once_and_an_in_place_change_again(monkeypatch):
    """The [V, H] value check runs once per unchanged lm_head (CoRD scores many batches with one weight); an
    in-place write (which bumps the tensor's _version) is checked again and refused."""
    from distillkit.ops import scoring as ops_scoring

    reads = []
    real = ops_scoring.first_nonfinite
    monkeypatch.setattr(ops_scoring, "first_nonfinite", lambda x: reads.append(tuple(x.shape)) or real(x))
    hidden, weight, ids, bias = make_inputs(6, 97, 9, torch.float32, seed=3)
    first = distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend="reference")
    for _ in range(3):
        again = distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend="reference")
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert reads.count((97, 9)) == 1 and reads.count((97,)) == 1, reads
    with torch.no_grad():
        weight[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weight: entry \[4, 2\]"):
        distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend="reference")
    with torch.no_grad():
        weight[4, 2] = 0.5
        bias[7] = float("inf")
    with pytest.raises(ValueError, match=r"bias: entry \[7\]"):
        distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend="reference")
    # a copy (another tensor object) is checked on its own
    bad = weight.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weight: entry \[0, 0\]"):
        distillkit.answer_logprobs(hidden, bad, ids, backend="reference")
