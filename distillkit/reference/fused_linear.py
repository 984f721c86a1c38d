"""Fused-linear skew KL / skew reverse KL, eager: logits = hidden @ weight.T + bias, then the formulas.

    p = softmax(z_T / tau), q = softmax(z_S / tau), mixtures formed in log space:
    SKL  = sum_v p (log p - log(alpha p + (1 - alpha) q))
    SRKL = sum_v q (log q - log((1 - alpha) p + alpha q))      (detach_mixture: no gradient through the mix)
    loss_t = w_t D_t, ignored tokens (label == ignore_index) give 0; "mean" divides by the number of kept
    tokens (0 when none is kept), "sum" adds, "none" returns [N].

The divergence and the reduction are those of distillkit.reference.skew_kl (one statement of the formulas).
This is what distillkit.ops.fused_linear is tested against (in float64), and what its "reference"
backend runs (in float32 for half inputs). It materialises [N, V] logits: tests and fallback only.
The teacher is a constant (detached).
"""
from __future__ import annotations

import torch

from distillkit.reference.skew_kl import _per_token, _reduce, skipped_rows, zero_skipped


def skew_divergence_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha: float,
                         temperature: float, reverse: bool, detach_mixture: bool = False) -> torch.Tensor:
    """Per-row D_t: SKL (reverse=False) or SRKL (reverse=True), by the formulas of
    :mod:`distillkit.reference.skew_kl`. Logits [N, V] in the compute dtype -> [N]."""
    return _per_token(student_logits, teacher_logits.detach(), alpha, temperature, False, reverse, detach_mixture)


def _logits(hidden, weight, bias, dtype):
    z = hidden.reshape(-1, hidden.shape[-1]).to(dtype) @ weight.to(dtype).T
    return z if bias is None else z + bias.to(dtype)


def logit_transform(logits: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """A model's logits from its lm_head's output z [..., V]: z * logit_scale, then softcap * tanh(z / softcap)
    when softcap is set (Gemma-2/3's final softcap, Cohere's and Granite's logit scaling), eagerly."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def fused_linear_skew(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, labels: torch.Tensor | None = None,
                      weights: torch.Tensor | None = None, *, student_bias: torch.Tensor | None = None,
                      teacher_bias: torch.Tensor | None = None, alpha: float = 0.1, temperature: float = 1.0,
                      ignore_index: int = -100, reduction: str = "mean", reverse: bool = False,
                      detach_mixture: bool = False, compute_dtype: torch.dtype | None = None,
                      vocab_size: int | None = None, student_logit_scale: float = 1.0,
                      student_softcap: float | None = None, teacher_logit_scale: float = 1.0,
                      teacher_softcap: float | None = None) -> torch.Tensor:
    """Eager fused-linear skew (reverse) KL, differentiable in the student's hidden, weight and bias.

    student_hidden [N, H_s] or [B, T, H_s]; student_weight [V_s, H_s]; teacher_hidden [..., H_t] (same leading
    shape); teacher_weight [V_t, H_t]; biases [V_s], [V_t]; labels, weights [N] or [B, T]. compute_dtype: None
    computes in the student's dtype (float32 for half inputs). vocab_size: the loss is over token ids
    [0, vocab_size) of both sides (None: all rows; V_s must equal V_t). Each side's logits go through
    :func:`logit_transform` with its scale and softcap, then the temperature. Returns the loss in
    compute_dtype: a scalar, or the leading shape for reduction="none".
    """
    if vocab_size is not None:
        student_weight, teacher_weight = student_weight[:vocab_size], teacher_weight[:vocab_size]
        student_bias = None if student_bias is None else student_bias[:vocab_size]
        teacher_bias = None if teacher_bias is None else teacher_bias[:vocab_size]
    if compute_dtype is None:
        compute_dtype = torch.float32 if student_hidden.dtype in (torch.float16, torch.bfloat16) else student_hidden.dtype
    lead = student_hidden.shape[:-1]
    # rows that count for nothing (ignored label, or weight 0) may hold anything, NaN and inf included: they
    # enter as zeros, so they cannot reach the weight gradient through 0 * NaN
    skip = skipped_rows(lead, labels, weights, ignore_index, student_hidden.device)
    student_hidden, teacher_hidden = zero_skipped(student_hidden, skip), zero_skipped(teacher_hidden, skip)
    z_s = logit_transform(_logits(student_hidden, student_weight, student_bias, compute_dtype), student_logit_scale,
                          student_softcap)
    with torch.no_grad():
        z_t = logit_transform(_logits(teacher_hidden, teacher_weight, teacher_bias, compute_dtype),
                              teacher_logit_scale, teacher_softcap)
    d = skew_divergence_rows(z_s, z_t, alpha=alpha, temperature=temperature, reverse=reverse,
                             detach_mixture=detach_mixture)
    return _reduce(d.reshape(lead), labels, weights, ignore_index, reduction)
