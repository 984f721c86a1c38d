"""Triton kernel for VCRD's PRM-free validity weight: one read of each logits row.

One program per row streams the row in blocks of BLOCK:
  teacher  online max m and sum s of exp(z - m) (rescaled when m grows)
  student  running argmax (first maximum on ties, as torch.argmax)
  top-k    a register buffer `top` [BLOCK] of the largest teacher logits so far, sorted descending. A block
           whose max beats the buffer's minimum is merged: sort the block descending, take
           max(top[i], block[BLOCK-1-i]) (the first half-cleaner of a bitonic merge of two sorted lists:
           exactly the BLOCK largest of both), sort again. After the first blocks of a row most blocks are
           skipped by the max test.
  w = exp(clamp(gamma * (z_T[a_S] - m - log s - log(sum_{i<top_k} exp(2 (top_i - m)) / s^2 + eps)), lo, hi))
BLOCK = max(next_pow2(top_k), 512) on a GPU, 32 under the CPU interpreter (top_k <= 1024).
Bytes per row: 2 V itemsize read, 4 written.
NaN inputs or an all -inf teacher row give a NaN weight; the Python wrapper raises on it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _validity_kernel(zt_ptr, zs_ptr, out_ptr,  # [N, V] teacher, [N, V] student, [N] float32
                     V, stride_t, stride_s, top_k, gamma, log_lo, log_hi, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zt_row = zt_ptr + row * stride_t
    zs_row = zs_ptr + row * stride_s
    offs = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    m = tl.full((), neg_inf, tl.float32)
    s = tl.zeros((), tl.float32)
    best = tl.full((), neg_inf, tl.float32)
    best_idx = tl.zeros((), tl.int32)
    nans = tl.zeros((), tl.int32)
    top = tl.full((BLOCK,), neg_inf, tl.float32)
    bar = tl.full((), neg_inf, tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        mask = idx < V
        zt = tl.load(zt_row + idx, mask=mask, other=neg_inf).to(tl.float32)
        zs = tl.load(zs_row + idx, mask=mask, other=neg_inf).to(tl.float32)
        nans += tl.sum(((zt != zt) | (zs != zs)).to(tl.int32), axis=0)
        block_max = tl.max(zt, axis=0)
        m_new = tl.maximum(m, block_max)
        grown = s * tl.exp(m - m_new) + tl.sum(tl.exp(zt - m_new), axis=0)
        s = tl.where(m_new == neg_inf, 0.0, grown)  # nothing finite yet: exp(-inf - -inf) would be NaN
        m = m_new
        block_best = tl.max(zs, axis=0)
        block_idx = tl.min(tl.where(zs == block_best, idx, 2147483647), axis=0)
        better = block_best > best  # strictly: an earlier block keeps ties
        best_idx = tl.where(better, block_idx, best_idx)
        best = tl.where(better, block_best, best)
        if block_max > bar:
            ranked = tl.sort(zt, descending=True)
            top = tl.sort(tl.maximum(top, tl.flip(ranked)), descending=True)
            bar = tl.min(top, axis=0)
    z_greedy = tl.load(zt_row + best_idx).to(tl.float32)
    log_s = tl.log(s)
    log_p_greedy = z_greedy - m - log_s
    sq = tl.where(offs < top_k, tl.exp(2.0 * (top - m)), 0.0)
    top_sq = tl.sum(sq, axis=0) / (s * s)
    scaled = gamma * (log_p_greedy - tl.log(top_sq + eps))
    scaled = tl.where(gamma == 0.0, 0.0, scaled)  # never 0 * -inf
    scaled = tl.minimum(tl.maximum(scaled, log_lo), log_hi)  # -inf (p_T(a_S) = 0) clamps to log_lo
    w = tl.exp(scaled)
    bad = (nans > 0) | (m == neg_inf) | (m == float("inf"))
    tl.store(out_ptr + row, tl.where(bad, float("nan"), w))


def teacher_likelihood_validity(teacher_logits: torch.Tensor, student_logits: torch.Tensor, top_k: int, gamma: float,
                                log_lo: float, log_hi: float, eps: float) -> torch.Tensor:
    """teacher_logits, student_logits: [N, V] contiguous (any float dtypes). Returns float32 [N]."""
    n, vocab = teacher_logits.shape
    out = torch.empty(n, dtype=torch.float32, device=teacher_logits.device)
    if n == 0:
        return out
    # the CPU interpreter runs tl.sort slowly per element: small blocks there (tests), wide ones on a GPU
    min_block = 32 if teacher_logits.device.type == "cpu" else 512
    block = max(triton.next_power_of_2(top_k), min_block)
    _validity_kernel[(n,)](teacher_logits, student_logits, out, vocab, teacher_logits.stride(0),
                           student_logits.stride(0), top_k, float(gamma), float(log_lo), float(log_hi), float(eps),
                           BLOCK=block, num_warps=8 if block >= 1024 else 4)
    return out
