"""Triton kernel for the logits-level skew KL / skew reverse KL (DistiLLM): per-row loss D_i and
d(sum_i scale_i D_i)/dstudent, rows with scale_i == 0 skipped.

Formulas and the gradient's derivation: csrc/cpu/skew_kl.cpp's header. One program per token row,
three sweeps over the vocabulary in BLOCK-wide tiles (a row of a 128k vocabulary does not fit on chip):
  1. online max and sum of exp for student and teacher (per-lane running values, merged at the end)
  2. loss and the gradient's row sum (S for skew KL, A for skew reverse KL)
  3. the gradient, written once in the logits' dtype
Bytes per element: 3 reads of each logits row + 1 write, the re-reads mostly from L2; the floor is
2 reads + 1 write. Sweep 2 and 3 recompute exp/log instead of storing [N, V] intermediates.
History: v1 as above; compiled for sm_90 here (triton.compile, no GPU), run only under the interpreter
so far, so not yet timed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from distillkit._backend import triton_interpret


# probabilities below this count as 0, so that alpha * p never underflows (or is flushed) to a zero
# mixture while p > 0: p * log(p / 0) would be inf for a term worth < 1e-28
TINY = tl.constexpr(1e-30)


@triton.jit
def _online_lse(row_ptr, V, inv_t, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(max, log sum exp(row / T - max)) over V columns. row_ptr: one row of [N, V].

    The two stay apart: log q = (x / T - max) - log_sum keeps full precision for the large entries,
    where x / T - (max + log_sum) would lose the low bits of a large max."""
    offs = tl.arange(0, BLOCK)
    run_max = tl.full([BLOCK], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK], ACC)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(ACC) * inv_t
        new_max = tl.maximum(run_max, x)
        # a lane that has seen only -inf keeps sum 0 (exp(-inf - -inf) would be NaN)
        dead = new_max == float("-inf")
        run_sum = tl.where(dead, 0.0, run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max))
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lane_scale = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - row_max))
    return row_max, tl.log(tl.sum(run_sum * lane_scale, axis=0))


@triton.jit
def _skew_kl_fwd_kernel(
    s_ptr,  # [N, V] student logits, contiguous
    t_ptr,  # [N, V] teacher logits, same dtype
    scale_ptr,  # [N] ACC: row weights; 0 skips the row (loss 0, gradient 0)
    loss_ptr,  # [N] ACC: per-row loss
    grad_ptr,  # [N, V] logits dtype: scale_i dloss_i/ds_i (unused unless WITH_GRAD)
    V, alpha, inv_t, alpha_in_grad,  # alpha_in_grad: alpha, or 0 for a detached mixture
    REVERSE: tl.constexpr, WITH_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    g_row = grad_ptr + row * V
    offs = tl.arange(0, BLOCK)
    row_scale = tl.load(scale_ptr + row)
    if row_scale != 0:
        max_s, log_sum_s = _online_lse(s_row, V, inv_t, BLOCK, ACC)
        max_t, log_sum_t = _online_lse(t_row, V, inv_t, BLOCK, ACC)
        beta = 1.0 - alpha
        loss_acc = tl.zeros([BLOCK], ACC)
        sum_acc = tl.zeros([BLOCK], ACC)
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            log_q = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t - max_s - log_sum_s
            log_p = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t - max_t - log_sum_t
            q = tl.exp(log_q)
            p = tl.exp(log_p)
            if REVERSE:
                m = beta * p + alpha * q
                loss_acc += tl.where(q > TINY, q * (log_q - tl.log(m)), 0.0)
                sum_acc += tl.where(q > TINY, q * (q / m), 0.0)
            else:
                m = alpha * p + beta * q
                loss_acc += tl.where(p > TINY, p * (log_p - tl.log(m)), 0.0)
                sum_acc += tl.where(p > TINY, q * (p / m), 0.0)
        loss = tl.sum(loss_acc, axis=0)
        tl.store(loss_ptr + row, loss)
        if WITH_GRAD:
            row_sum = tl.sum(sum_acc, axis=0)
            k = loss - alpha_in_grad * row_sum  # skew reverse KL: sum_k q_k h_k
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                log_q = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t - max_s - log_sum_s
                log_p = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t - max_t - log_sum_t
                q = tl.exp(log_q)
                p = tl.exp(log_p)
                if REVERSE:
                    m = beta * p + alpha * q
                    h = tl.where(q > TINY, q * (log_q - tl.log(m)) - alpha_in_grad * q * (q / m), 0.0)
                    g = (row_scale * inv_t) * (h - q * k)
                else:
                    m = alpha * p + beta * q
                    qr = tl.where(p > TINY, q * (p / m), 0.0)
                    g = (row_scale * beta * inv_t) * (q * row_sum - qr)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if WITH_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK], grad_ptr.dtype.element_ty), mask=cols < V)


def skew_kl_forward(student: torch.Tensor, teacher: torch.Tensor, scale: torch.Tensor, alpha: float,
                    inv_temperature: float, reverse: bool, detach_mixture: bool,
                    with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """student, teacher: [N, V] contiguous, same dtype; scale: [N] float32 (float64 for float64 inputs).

    Returns (loss [N] in scale's dtype, 0 where scale == 0; d(sum_i scale_i loss_i)/dstudent [N, V], or an
    empty tensor when with_grad is False).
    """
    rows, vocab = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=acc_dtype, device=student.device)
    grad = torch.empty_like(student) if with_grad else student.new_empty((0,))
    if rows == 0:
        return loss, grad
    # the interpreter runs a tile as numpy arrays: small tiles keep test shapes quick; on a GPU 4096
    # columns x 8 warps gives 16 elements per thread per sweep
    block = min(triton.next_power_of_2(vocab), 256 if triton_interpret() else 4096)
    _skew_kl_fwd_kernel[(rows,)](
        student, teacher, scale, loss, grad if with_grad else student,
        vocab, float(alpha), float(inv_temperature), 0.0 if detach_mixture else float(alpha),
        REVERSE=bool(reverse), WITH_GRAD=bool(with_grad),
        BLOCK=block, ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        num_warps=8,
    )
    return loss, grad
