"""Triton kernel for the logits-level skew KL / skew reverse KL (DistiLLM): per-row loss D_i and
d(sum_i scale_i D_i)/dstudent, rows with scale_i == 0 skipped.

Formulas and the gradient's derivation: csrc/cpu/skew_kl.cpp's header. One program per token row. Two paths:
  one tile (V <= ONE_TILE_MAX_COLUMNS = 8192): both rows are loaded once and stay in registers for the
    log-sum-exps, the loss, the ratio sum and the gradient: one read of each row, one write.
  streaming (wider rows, e.g. 128k vocabularies), BLOCK-wide tiles, three sweeps:
    1. online max and sum of exp for student AND teacher in one loop (per-lane running values, merged at the end)
    2. loss and the gradient's row sum (S for skew KL, A for skew reverse KL)
    3. the gradient, written once in the logits' dtype
    Sweeps 2 and 3 cannot merge: every gradient element needs S (or the loss), a sum over the whole row of terms
    that need both normalisers; and sweep 1 cannot take sweep 2's sum, since the mixture log(a p + b q) couples
    the two normalisers non-linearly (no online rescaling exists). Writing a partial gradient in sweep 2 and
    fixing it in sweep 3 would read it back: more bytes, not fewer.
Bytes moved per (row, column) element, bf16 logits and gradient (fp32: twice these); floor = each input read
once, the gradient written once = 6 (loss + gradient), 4 (loss only):
                              loss + gradient            loss only
  v2 (four loops)             3 reads x 2 rows x 2 B     2 reads x 2 x 2 B
                              + 2 B write = 14 B         = 8 B
  v3 streaming (three loops)  14 B (unchanged)           8 B (unchanged)
  v3 one tile (V <= 8192)     6 B (the floor)            4 B (the floor)
Streaming re-reads come from L2 only while the rows in flight fit: at V = 128256 a row pair is 501 KiB, so 132
SMs x one program each is ~66 MB against the H200's 60 MB L2; expect most re-reads from HBM, i.e. 14 B per
element: N = 8192 full (loss + gradient) ~ 14 x 8192 x 128256 / 4.3 TB/s = 3.4 ms, floor 1.5 ms.
History: v1 four loops (student lse, teacher lse, loss, gradient); compiled for sm_90 here (triton.compile, no
GPU), run only under the interpreter so far, so not yet timed.
v2: the mixture in log space (log m = logaddexp(log a + log p, log b + log q)),
q p / m and q^2 / m as exp of log differences: alpha = 0 (or far-apart distributions) no longer gives an
underflowed m and an inf loss. Costs one exp and one log1p more per element and sweep than p / m did;
NaN / inf rows give a NaN loss (they were dropped by the probability guards and returned 0).
v3 (issue 19): the two log-sum-exp sweeps fused into one loop over both rows (same bytes, one loop's latency
instead of two, twice the loads in flight per iteration); a one-tile path that reads each row once for V <= 8192
(registers decide the width: see ONE_TILE_MAX_COLUMNS); streaming tiles at 16 warps. Predicted on an H200
(untimed: no GPU lent yet; bench/gpu_check.py measures it): anchor N = 8192, V = 128256 bf16 within 10% of v2
(same bytes; fewer loop overheads), near 3.4 ms for loss + gradient; one-tile rows at ~6/14 of v2's time when
memory-bound. Compiles for sm_90 (bench/triton_compile_check.py: registers and stack per configuration).
v4: the ratios q p / m and q^2 / m from log(q / m) taken without subtracting two large logs. v2's
exp(log q + log p - log m) lost ~1e-3 of the exponent where the student has no mass (alpha = 0, logits 1e4 apart:
log q and log m both ~-1e4, their sum with log p ~-2e4 rounded in float32), up to 4e-4 of each ratio; the row
sum S and so every gradient element (q S - p) carried it. Where w_q q dominates m, log(q / m) = -log w_q -
log(1 + e^(x - y)), exact at alpha = 0; the loss terms are unchanged. Measured (interpreter, float32, the
far-apart rows of tests/ops/test_skew_kl.py, either path): skew KL gradient error at alpha = 0 6.3e-5 -> 1.4e-7
(plain PyTorch 2.3e-8; the 1.4e-7 is the log-sum's own float32 rounding, 2.4 ulp of the 0.993 element); other
alphas and the reverse KL unchanged within 1e-8. sm_90 registers (bf16 +grad, 16 warps): one-tile 8k skew KL
101 -> 121, reverse 91 -> 99, streaming 82-86 (unchanged range); no stack; still one block per SM.
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
def _load_scaled(row_ptr, cols, mask, inv_t, ACC: tl.constexpr):
    """One tile of a row of [N, V] as ACC values times 1 / T; masked lanes are -inf (probability 0)."""
    return tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t


@triton.jit
def _lse_step(x, run_max, run_sum, run_nan):
    """Folds one tile x into per-lane running (max, sum of exp(x - max), saw-NaN)."""
    run_nan = tl.maximum(run_nan, (x != x).to(tl.int32))  # tl.maximum drops NaN: a NaN must still poison
    new_max = tl.maximum(run_max, x)
    # a lane that has seen only -inf keeps sum 0 (exp(-inf - -inf) would be NaN)
    dead = new_max == float("-inf")
    run_sum = tl.where(dead, 0.0, run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max))
    return new_max, run_sum, run_nan


@triton.jit
def _lse_finish(run_max, run_sum, run_nan):
    """(max, log sum exp(x - max)) of the row from the per-lane running values; log-sum NaN if a NaN was seen.

    The two stay apart: log q = (x / T - max) - log_sum keeps full precision for the large entries,
    where x / T - (max + log_sum) would lose the low bits of a large max."""
    row_max = tl.max(run_max, axis=0)
    lane_scale = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - row_max))
    log_sum = tl.log(tl.sum(run_sum * lane_scale, axis=0))
    return row_max, tl.where(tl.max(run_nan, axis=0) > 0, float("nan"), log_sum)


@triton.jit
def _tile_lse(x):
    """(max, log-sum) of a row held whole in one tile: each lane is its own running (max, sum) = (x, 1)."""
    return _lse_finish(x, tl.where(x == float("-inf"), 0.0, 1.0).to(x.dtype), (x != x).to(tl.int32))


@triton.jit
def _online_lse_pair(s_row, t_row, V, inv_t, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(max, log-sum) of student and teacher rows in ONE sweep that reads each row once (v3: two sweeps
    before, each a separate loop with its own latency to hide)."""
    offs = tl.arange(0, BLOCK)
    max_s = tl.full([BLOCK], float("-inf"), ACC)
    sum_s = tl.zeros([BLOCK], ACC)
    nan_s = tl.zeros([BLOCK], tl.int32)
    max_t = tl.full([BLOCK], float("-inf"), ACC)
    sum_t = tl.zeros([BLOCK], ACC)
    nan_t = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        xs = _load_scaled(s_row, cols, mask, inv_t, ACC)
        xt = _load_scaled(t_row, cols, mask, inv_t, ACC)
        max_s, sum_s, nan_s = _lse_step(xs, max_s, sum_s, nan_s)
        max_t, sum_t, nan_t = _lse_step(xt, max_t, sum_t, nan_t)
    row_max_s, log_sum_s = _lse_finish(max_s, sum_s, nan_s)
    row_max_t, log_sum_t = _lse_finish(max_t, sum_t, nan_t)
    return row_max_s, log_sum_s, row_max_t, log_sum_t


@triton.jit
def _log_mix(log_p, log_q, log_wp, log_wq):
    """(log m, log(q / m)) for m = w_p p + w_q q, from log p, log q and the weights' logs (-inf for a zero
    weight), in log space: it stays finite where the probability-space mixture would underflow to 0 (a weight
    near 0, far-apart distributions), which made log m = -inf and the term inf.

    log(q / m) is not log q - log m: where w_q q dominates, m = w_q q (1 + e^(x - y)) and log q cancels exactly,
    -log w_q - log(1 + e^(x - y)); the difference of two logs near -1e4 (no student mass, alpha = 0) lost ~1e-3
    of the exponent to float32 rounding. NaN where both sides are -inf (0 / 0), as exp(-inf - -inf) was."""
    x = log_wp + log_p
    y = log_wq + log_q
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    log_1p = tl.log(1.0 + tl.exp(lo - hi))
    log_m = tl.where(hi == float("-inf"), hi, hi + log_1p)
    log_q_over_m = tl.where(y >= x, -log_wq, log_q - x) - log_1p
    return log_m, log_q_over_m


@triton.jit
def _tile_terms(xs, xt, max_s, log_sum_s, max_t, log_sum_t, alpha_in_grad, log_alpha, log_beta,
                REVERSE: tl.constexpr):
    """One tile's (q, loss term, ratio term) from its scaled logits xs, xt (-inf on masked lanes), 0 where
    the weighting probability is below TINY. The ratio is q p / m for the skew KL, q^2 / m for the reverse
    one (only used times alpha_in_grad, and unbounded when that is 0, where m = p: then 0). Every path
    calls this, so they all compute the same numbers."""
    log_q = xs - max_s - log_sum_s
    log_p = xt - max_t - log_sum_t
    q = tl.exp(log_q)
    if REVERSE:
        log_m, log_q_over_m = _log_mix(log_p, log_q, log_beta, log_alpha)
        term = tl.where(q > TINY, q * (log_q - log_m), 0.0)
        ratio = tl.where(q > TINY, tl.where(alpha_in_grad > 0.0, q * tl.exp(log_q_over_m), 0.0), 0.0)
    else:
        p = tl.exp(log_p)
        log_m, log_q_over_m = _log_mix(log_p, log_q, log_alpha, log_beta)
        term = tl.where(p > TINY, p * (log_p - log_m), 0.0)
        ratio = tl.where(p > TINY, tl.exp(log_p + log_q_over_m), 0.0)
    return q, term, ratio


@triton.jit
def _tile_grad(q, term, ratio, row_sum, loss, row_scale, inv_t, alpha_in_grad, beta, REVERSE: tl.constexpr):
    """scale_i dD_i/ds for one tile, given the row's loss and ratio sum."""
    if REVERSE:  # h = q (log q - log m) - alpha q^2 / m; k = sum_k q_k h_k = loss - alpha * row_sum
        k = loss - alpha_in_grad * row_sum
        g = (row_scale * inv_t) * (term - alpha_in_grad * ratio - q * k)
    else:
        g = (row_scale * beta * inv_t) * (q * row_sum - ratio)
    return g


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
    ONE_TILE: tl.constexpr,  # BLOCK >= V: the row is read once and kept in registers for every step
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
    beta = 1.0 - alpha
    if row_scale != 0:
        if ONE_TILE:
            mask = offs < V
            xs = _load_scaled(s_row, offs, mask, inv_t, ACC)
            xt = _load_scaled(t_row, offs, mask, inv_t, ACC)
            max_s, log_sum_s = _tile_lse(xs)
            max_t, log_sum_t = _tile_lse(xt)
        else:
            max_s, log_sum_s, max_t, log_sum_t = _online_lse_pair(s_row, t_row, V, inv_t, BLOCK, ACC)
        # NaN or +inf in a row, or a row of -inf, leaves a NaN or non-finite max / log-sum: the loss is
        # undefined; adding 0 * (...) turns it into NaN below instead of letting the guards drop every term
        poison = (max_s - max_s) + (max_t - max_t) + (log_sum_s - log_sum_s) + (log_sum_t - log_sum_t)
        if ONE_TILE:
            q, term, ratio = _tile_terms(xs, xt, max_s, log_sum_s, max_t, log_sum_t, alpha_in_grad, log_alpha,
                                         log_beta, REVERSE)
            loss = tl.sum(term, axis=0) + poison
            tl.store(loss_ptr + row, loss)
            if WITH_GRAD:
                row_sum = tl.sum(ratio, axis=0) + poison
                g = _tile_grad(q, term, ratio, row_sum, loss, row_scale, inv_t, alpha_in_grad, beta, REVERSE)
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            loss_acc = tl.zeros([BLOCK], ACC)
            sum_acc = tl.zeros([BLOCK], ACC)
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                xs = _load_scaled(s_row, cols, mask, inv_t, ACC)
                xt = _load_scaled(t_row, cols, mask, inv_t, ACC)
                _, term, ratio = _tile_terms(xs, xt, max_s, log_sum_s, max_t, log_sum_t, alpha_in_grad, log_alpha,
                                             log_beta, REVERSE)
                loss_acc += term
                sum_acc += ratio
            loss = tl.sum(loss_acc, axis=0) + poison
            tl.store(loss_ptr + row, loss)
            if WITH_GRAD:
                # every gradient element needs the whole row's ratio sum (and loss): a third sweep
                row_sum = tl.sum(sum_acc, axis=0) + poison
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    mask = cols < V
                    xs = _load_scaled(s_row, cols, mask, inv_t, ACC)
                    xt = _load_scaled(t_row, cols, mask, inv_t, ACC)
                    q, term, ratio = _tile_terms(xs, xt, max_s, log_sum_s, max_t, log_sum_t, alpha_in_grad,
                                                 log_alpha, log_beta, REVERSE)
                    g = _tile_grad(q, term, ratio, row_sum, loss, row_scale, inv_t, alpha_in_grad, beta, REVERSE)
                    tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if WITH_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK], grad_ptr.dtype.element_ty), mask=cols < V)


# Widest row kept whole on chip (the one-read path): both rows' fp32 values live in registers with the arithmetic
# on them. ptxas for sm_90 (bench/triton_compile_check.py, bf16 +grad): 8192 columns at 16 warps (16 per thread
# per row) take 101 registers and no stack; 16384 at 16 warps hits the 128-register cap of 512 threads and
# spills 312 bytes, at 32 warps 112 bytes. Shared memory is no way out in Triton: it stages tiles for dots and
# layout changes, not a row a program keeps (and two 64k bf16 rows are 256 KB, over Hopper's 228 KB anyway).
ONE_TILE_MAX_COLUMNS = 8192
ONE_TILE_PER_THREAD = 16  # columns of each row per thread on the one-tile path
# streaming tiles: 4096 columns x 16 warps = 8 per thread per row and sweep. The fused lse sweep keeps running
# (max, sum, NaN) for both rows per lane: 159-171 registers at 8 warps (1 block of 8 warps per SM), 82-86 at 16
# (1 block of 16 warps, as v2's 108 registers at 8 warps gave 2 blocks of 8)
STREAM_BLOCK, STREAM_WARPS = 4096, 16
INTERPRET_BLOCK = 256  # the interpreter runs a tile as numpy arrays: small tiles keep test shapes quick


def launch_config(vocab: int, one_tile_max: int | None = None) -> tuple[bool, int, int]:
    """(one_tile, BLOCK, num_warps) for rows of `vocab` columns. one_tile_max: widest row taken in one tile
    (default ONE_TILE_MAX_COLUMNS on a GPU, INTERPRET_BLOCK under the interpreter; 0 forces streaming)."""
    if one_tile_max is None:
        one_tile_max = INTERPRET_BLOCK if triton_interpret() else ONE_TILE_MAX_COLUMNS
    width = triton.next_power_of_2(max(vocab, 1))
    if width <= one_tile_max:
        return True, width, max(8, min(32, width // (32 * ONE_TILE_PER_THREAD)))
    return False, min(width, INTERPRET_BLOCK if triton_interpret() else STREAM_BLOCK), STREAM_WARPS


def skew_kl_forward(student: torch.Tensor, teacher: torch.Tensor, scale: torch.Tensor, alpha: float,
                    inv_temperature: float, reverse: bool, detach_mixture: bool,
                    with_grad: bool, one_tile_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """student, teacher: [N, V] contiguous, same dtype; scale: [N] float32 (float64 for float64 inputs).
    one_tile_max: see :func:`launch_config` (tests force each path with it).

    Returns (loss [N] in scale's dtype, 0 where scale == 0; d(sum_i scale_i loss_i)/dstudent [N, V], or an
    empty tensor when with_grad is False).
    """
    rows, vocab = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=acc_dtype, device=student.device)
    grad = torch.empty_like(student) if with_grad else student.new_empty((0,))
    if rows == 0:
        return loss, grad
    one_tile, block, num_warps = launch_config(vocab, one_tile_max)
    scalars = [float(alpha), float(inv_temperature), 0.0 if detach_mixture else float(alpha),
               math.log(alpha) if alpha > 0 else float("-inf"), math.log1p(-alpha) if alpha < 1 else float("-inf")]
    f64 = acc_dtype == torch.float64
    params = torch.tensor(scalars, dtype=torch.float64, device=student.device) if f64 else scale
    _skew_kl_fwd_kernel[(rows,)](
        student, teacher, scale, loss, grad if with_grad else student,
        vocab, *scalars, params,
        REVERSE=bool(reverse), WITH_GRAD=bool(with_grad),
        BLOCK=block, ACC=tl.float64 if f64 else tl.float32, PARAMS_IN_MEMORY=f64, ONE_TILE=one_tile,
        num_warps=num_warps,
    )
    return loss, grad
