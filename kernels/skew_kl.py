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
so far, so not yet timed. v2: the mixture in log space (log m = logaddexp(log a + log p, log b + log q)),
q p / m and q^2 / m as exp of log differences: alpha = 0 (or far-apart distributions) no longer gives an
underflowed m and an inf loss. Costs one exp and one log1p more per element and sweep than p / m did;
NaN / inf rows give a NaN loss (they were dropped by the probability guards and returned 0).
"""
from __future__ import annotations

import math

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
    run_nan = tl.zeros([BLOCK], tl.int32)  # tl.maximum drops NaN: a NaN logit must still poison the row
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(ACC) * inv_t
        run_nan = tl.maximum(run_nan, (x != x).to(tl.int32))
        new_max = tl.maximum(run_max, x)
        # a lane that has seen only -inf keeps sum 0 (exp(-inf - -inf) would be NaN)
        dead = new_max == float("-inf")
        run_sum = tl.where(dead, 0.0, run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max))
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lane_scale = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - row_max))
    log_sum = tl.log(tl.sum(run_sum * lane_scale, axis=0))
    return row_max, tl.where(tl.max(run_nan, axis=0) > 0, float("nan"), log_sum)


@triton.jit
def _log_mix(log_p, log_q, log_wp, log_wq):
    """log(w_p p + w_q q) from log p, log q and the weights' logs (-inf for a zero weight), in log space:
    it stays finite where the probability-space mixture would underflow to 0 (a weight near 0, far-apart
    distributions), which made log m = -inf and the term inf."""
    x = log_wp + log_p
    y = log_wq + log_q
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    return tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def _tile_terms(s_row, t_row, cols, mask, inv_t, max_s, log_sum_s, max_t, log_sum_t, alpha_in_grad, log_alpha,
                log_beta, REVERSE: tl.constexpr, ACC: tl.constexpr):
    """One tile's (q, loss term, ratio term), 0 where the weighting probability is below TINY. The ratio is
    q p / m for the skew KL, q^2 / m for the reverse one (only used times alpha_in_grad, and unbounded
    when that is 0, where m = p: then 0). Both sweeps call this, so they read the same numbers."""
    log_q = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t - max_s - log_sum_s
    log_p = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t - max_t - log_sum_t
    q = tl.exp(log_q)
    if REVERSE:
        log_m = _log_mix(log_p, log_q, log_beta, log_alpha)
        term = tl.where(q > TINY, q * (log_q - log_m), 0.0)
        ratio = tl.where(q > TINY, tl.where(alpha_in_grad > 0.0, tl.exp(2.0 * log_q - log_m), 0.0), 0.0)
    else:
        p = tl.exp(log_p)
        log_m = _log_mix(log_p, log_q, log_alpha, log_beta)
        term = tl.where(p > TINY, p * (log_p - log_m), 0.0)
        ratio = tl.where(p > TINY, tl.exp(log_q + log_p - log_m), 0.0)
    return q, term, ratio


@triton.jit
def _skew_kl_fwd_kernel(
    s_ptr,  # [N, V] student logits, contiguous
    t_ptr,  # [N, V] teacher logits, same dtype
    scale_ptr,  # [N] ACC: row weights; 0 skips the row (loss 0, gradient 0)
    loss_ptr,  # [N] ACC: per-row loss
    grad_ptr,  # [N, V] logits dtype: scale_i dloss_i/ds_i (unused unless WITH_GRAD)
    V, alpha, inv_t, alpha_in_grad,  # alpha_in_grad: alpha, or 0 for a detached mixture
    log_alpha, log_beta,  # log(alpha), log(1 - alpha); -inf for a zero weight
    params_ptr,  # float64 runs: [alpha, inv_t, alpha_in_grad, log_alpha, log_beta] (scalar args are float32)
    REVERSE: tl.constexpr, WITH_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr, PARAMS_IN_MEMORY: tl.constexpr,
):
    if PARAMS_IN_MEMORY:  # Triton passes Python floats as float32: a float64 run reads exact ones
        alpha = tl.load(params_ptr + 0)
        inv_t = tl.load(params_ptr + 1)
        alpha_in_grad = tl.load(params_ptr + 2)
        log_alpha = tl.load(params_ptr + 3)
        log_beta = tl.load(params_ptr + 4)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    g_row = grad_ptr + row * V
    offs = tl.arange(0, BLOCK)
    row_scale = tl.load(scale_ptr + row)
    if row_scale != 0:
        max_s, log_sum_s = _online_lse(s_row, V, inv_t, BLOCK, ACC)
        max_t, log_sum_t = _online_lse(t_row, V, inv_t, BLOCK, ACC)
        # NaN or +inf in a row, or a row of -inf, leaves a NaN or non-finite max / log-sum: the loss is
        # undefined; adding 0 * (...) turns it into NaN below instead of letting the guards drop every term
        poison = (max_s - max_s) + (max_t - max_t) + (log_sum_s - log_sum_s) + (log_sum_t - log_sum_t)
        beta = 1.0 - alpha
        loss_acc = tl.zeros([BLOCK], ACC)
        sum_acc = tl.zeros([BLOCK], ACC)
        for start in range(0, V, BLOCK):
            cols = start + offs
            _, term, ratio = _tile_terms(s_row, t_row, cols, cols < V, inv_t, max_s, log_sum_s, max_t, log_sum_t,
                                         alpha_in_grad, log_alpha, log_beta, REVERSE, ACC)
            loss_acc += term
            sum_acc += ratio
        loss = tl.sum(loss_acc, axis=0) + poison
        tl.store(loss_ptr + row, loss)
        if WITH_GRAD:
            row_sum = tl.sum(sum_acc, axis=0) + poison
            k = loss - alpha_in_grad * row_sum  # skew reverse KL: sum_k q_k h_k
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                q, term, ratio = _tile_terms(s_row, t_row, cols, mask, inv_t, max_s, log_sum_s, max_t, log_sum_t,
                                             alpha_in_grad, log_alpha, log_beta, REVERSE, ACC)
                if REVERSE:  # h = q (log q - log m) - alpha q^2 / m
                    g = (row_scale * inv_t) * (term - alpha_in_grad * ratio - q * k)
                else:
                    g = (row_scale * beta * inv_t) * (q * row_sum - ratio)
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
    scalars = [float(alpha), float(inv_temperature), 0.0 if detach_mixture else float(alpha),
               math.log(alpha) if alpha > 0 else float("-inf"), math.log1p(-alpha) if alpha < 1 else float("-inf")]
    f64 = acc_dtype == torch.float64
    params = torch.tensor(scalars, dtype=torch.float64, device=student.device) if f64 else scale
    _skew_kl_fwd_kernel[(rows,)](
        student, teacher, scale, loss, grad if with_grad else student,
        vocab, *scalars, params,
        REVERSE=bool(reverse), WITH_GRAD=bool(with_grad),
        BLOCK=block, ACC=tl.float64 if f64 else tl.float32, PARAMS_IN_MEMORY=f64,
        num_warps=8,
    )
    return loss, grad
