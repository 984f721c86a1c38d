"""Triton kernels for answer log-probs (CoRD meta-prover scoring): log softmax(h @ W.T + b)[m, id_m].

Two launches:
  _partial_kernel   grid (row blocks, vocabulary splits). Each program owns BLOCK_M rows and one
                    contiguous vocabulary range; it walks the range in BLOCK_V tiles, computes the
                    [BLOCK_M, BLOCK_V] logit tile with tl.dot over H in BLOCK_K steps (fp32
                    accumulation; fp32 inputs use input_precision="ieee", not TF32), adds the bias and
                    folds the tile into a per-row online (max, sum exp). The answer logit is picked by
                    the one split whose range holds it (others add 0). Writes partial [S, M] triples.
  _combine_kernel   per row: lse = max_s + log(sum_s sum_s' e^(max_s' - max)), out = answer - lse.
No [M, V] tensor exists: partials are 3 * S * M floats.

Bandwidth on paper (H100, M=64, V=128256, H=4096, bf16): W is 1.05 GB, read once if the row blocks
of one split run together (program_id(0) varies fastest, so they do, and re-reads of a W tile for
M > BLOCK_M hit L2); 67 GFLOP on tensor cores is ~0.1 ms, well under the ~0.35 ms of the W read:
memory bound. M=1024 is 1.07 TFLOP (~1.6 ms at a realistic ~650 TFLOP/s): compute bound.
Splits: enough (row blocks x splits) programs to fill the GPU ~4 times over.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["answer_logprobs"]


@triton.jit
def _partial_kernel(
    h_ptr,      # [M, H] hidden, contiguous
    w_ptr,      # [V, H] weight, contiguous
    b_ptr,      # [V] float32 bias (unused when HAS_BIAS is False)
    ids_ptr,    # [M] int64 answer ids
    pmax_ptr,   # [S, M] float32 out: running max per split
    psum_ptr,   # [S, M] float32 out: sum exp(logit - max) per split
    pans_ptr,   # [S, M] float32 out: answer logit if in this split's range, else 0
    M, V, H, v_per_split,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    answer = tl.zeros([BLOCK_M], tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            hb = tl.load(h_ptr + rows[:, None].to(tl.int64) * H + ks[None, :],
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wb = tl.load(w_ptr + cols[:, None].to(tl.int64) * H + ks[None, :],
                         mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST_OPERANDS:  # exact (bf16 -> fp32); only for the interpreter, see the launcher
                hb = hb.to(tl.float32)
                wb = wb.to(tl.float32)
            acc = tl.dot(hb, tl.trans(wb), acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        # every tile has >= 1 valid column, so new_max is finite and exp(-inf - new_max) = 0 is safe
        new_max = tl.maximum(run_max, tl.max(acc, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(acc - new_max[:, None]), axis=1)
        run_max = new_max
        answer += tl.sum(tl.where((cols[None, :] == ids[:, None]) & col_ok[None, :], acc, 0.0), axis=1)
    out = pid_s * M + rows
    tl.store(pmax_ptr + out, run_max, mask=row_ok)
    tl.store(psum_ptr + out, run_sum, mask=row_ok)
    tl.store(pans_ptr + out, answer, mask=row_ok)


@triton.jit
def _combine_kernel(
    pmax_ptr, psum_ptr, pans_ptr,  # [S, M] float32 partials
    out_ptr,                       # [M] float32 answer log-probs
    M, S,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < M
    gmax = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(0, S):
        gmax = tl.maximum(gmax, tl.load(pmax_ptr + s * M + rows, mask=ok, other=0.0))
    total = tl.zeros([BLOCK], tl.float32)
    answer = tl.zeros([BLOCK], tl.float32)
    for s in range(0, S):
        total += tl.load(psum_ptr + s * M + rows, mask=ok, other=1.0) * tl.exp(  # 1: no log(0) on pad rows
            tl.load(pmax_ptr + s * M + rows, mask=ok, other=0.0) - gmax)
        answer += tl.load(pans_ptr + s * M + rows, mask=ok, other=0.0)
    tl.store(out_ptr + rows, answer - gmax - tl.log(total), mask=ok)


def _blocks(m: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps): tl.dot needs every dim >= 16."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    if interpret:  # numpy executes each program; few fat programs are fastest
        return block_m, 32, 32, 4
    return block_m, 128, 64, 4 if block_m <= 32 else 8


def answer_logprobs(hidden: torch.Tensor, weight: torch.Tensor, answer_ids: torch.Tensor,
                    bias: torch.Tensor | None, vocab_splits: int | None = None) -> torch.Tensor:
    """hidden [M, H], weight [V, H] (contiguous, same dtype fp32/bf16/fp16), answer_ids [M] int64,
    bias [V] float32 or None -> float32 [M]. Inputs are validated by distillkit.scoring."""
    m, h = hidden.shape
    v = weight.shape[0]
    interpret = hidden.device.type == "cpu"
    block_m, block_v, block_k, num_warps = _blocks(m, interpret)
    row_blocks = triton.cdiv(m, block_m)
    v_tiles = triton.cdiv(v, block_v)
    if vocab_splits is None:
        if interpret:
            vocab_splits = min(3, v_tiles)  # still exercises the multi-split combine
        else:
            sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
            vocab_splits = max(1, min(v_tiles, triton.cdiv(4 * sms, row_blocks)))
    tiles_per_split = triton.cdiv(v_tiles, max(1, min(vocab_splits, v_tiles)))
    v_per_split = tiles_per_split * block_v
    splits = triton.cdiv(v, v_per_split)  # every split owns >= 1 valid column
    pmax = torch.empty((splits, m), dtype=torch.float32, device=hidden.device)
    psum = torch.empty_like(pmax)
    pans = torch.empty_like(pmax)
    # The interpreter (triton 3.9) multiplies bf16 blocks as raw bits in tl.dot; upcasting the loaded
    # blocks there is exact. On GPU bf16/fp16 go to the tensor cores as they are.
    upcast = interpret and hidden.dtype == torch.bfloat16
    precision = "ieee" if hidden.dtype == torch.float32 or upcast else "tf32"  # tf32: ignored for 16-bit
    _partial_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else pmax, answer_ids, pmax, psum, pans,
        m, v, h, v_per_split,
        HAS_BIAS=bias is not None, INPUT_PRECISION=precision, UPCAST_OPERANDS=upcast,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps, num_stages=3,
    )
    out = torch.empty(m, dtype=torch.float32, device=hidden.device)
    _combine_kernel[(triton.cdiv(m, 128),)](pmax, psum, pans, out, m, splits, BLOCK=128)
    return out
