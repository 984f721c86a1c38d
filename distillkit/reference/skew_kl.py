"""Skew KL and skew reverse KL, eager, written from DistiLLM (Ko et al., ICML 2024, eqs. 4-5).

With teacher p = softmax(teacher_logits / T) and student q = softmax(student_logits / T), per token:

    skew_kl          SKL(p, q)  = KL(p || alpha * p + (1 - alpha) * q)
    skew_reverse_kl  SRKL(p, q) = KL(q || (1 - alpha) * p + alpha * q)

alpha = 0 gives the plain forward KL(p || q) and reverse KL(q || p); identical distributions give 0.
``detach_mixture`` (skew reverse KL, DistiLLM-2) stops the gradient through the mixture. Per-token
``weights`` multiply the per-token losses; "mean" divides by the number of kept tokens.
Terms with a zero probability in the first argument contribute 0 (0 * log 0 = 0), so -inf logits
(masked vocabulary entries) are allowed. Tokens whose label equals ``ignore_index`` are excluded.
Rows that count for nothing (ignored, or weight 0) may hold anything, NaN and inf included: they give a
loss of exactly 0 and a gradient of exactly 0, as on the fused backends.

These functions have the signatures of ``distillkit.ops.skew_kl`` (plus ``upcast``) and are what every
backend is tested against in float64. They differentiate through both logits tensors.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def _log_probs(logits: torch.Tensor, temperature: float, upcast: bool) -> torch.Tensor:
    if upcast and logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits / temperature, dim=-1)


def _xlogy_mix(weight: torch.Tensor, log_weight: torch.Tensor, log_mix: torch.Tensor) -> torch.Tensor:
    """weight * (log_weight - log_mix) with 0 where weight == 0, NaN-free in both directions of autograd."""
    present = ~(weight <= 0)  # NaN counts as present: a NaN row must give a NaN loss, not a silent 0
    zero = torch.zeros_like(weight)
    return torch.where(present, weight * (torch.where(present, log_weight, zero) - log_mix), zero)


def _log_mix(a: float, log_a: torch.Tensor, b: float, log_b: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """log(a exp(log_a) + b exp(log_b)) in log space, so that a * tiny probability never underflows to a
    zero mixture; absent entries are fed 0 so that the backward of logaddexp(-inf, -inf) stays NaN-free."""
    zero = torch.zeros_like(log_a)
    with_a = torch.where(present, log_a + torch.log(torch.tensor(a, dtype=log_a.dtype)), zero)
    with_b = torch.where(present, log_b + torch.log(torch.tensor(b, dtype=log_b.dtype)), zero)
    return torch.logaddexp(with_a, with_b)


def skipped_rows(lead_shape, labels: torch.Tensor | None, weights: torch.Tensor | None, ignore_index: int,
                 device: torch.device) -> torch.Tensor | None:
    """Bool [lead_shape]: the tokens that count for nothing (label == ignore_index, or weight 0); None if none can."""
    if labels is None and weights is None:
        return None
    skip = torch.zeros(lead_shape, dtype=torch.bool, device=device)
    if labels is not None:
        skip = skip | (labels == ignore_index)
    if weights is not None:
        skip = skip | (weights.detach() == 0)
    return skip


def zero_skipped(x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """x [..., D] with the rows where skip [...] is True replaced by zeros (their gradient is then exactly 0)."""
    return x if skip is None else torch.where(skip.unsqueeze(-1), torch.zeros((), dtype=x.dtype, device=x.device), x)


def _reduce(per_token: torch.Tensor, labels: torch.Tensor | None, weights: torch.Tensor | None,
            ignore_index: int, reduction: str) -> torch.Tensor:
    skip = skipped_rows(per_token.shape, labels, weights, ignore_index, per_token.device)
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    if weights is not None:
        # weights are constants (the spec); a skipped row's weight (NaN at an ignored token) never multiplies
        per_token = per_token * torch.where(skip, zero, weights.detach().to(per_token.dtype))
    if skip is not None:
        per_token = torch.where(skip, zero, per_token)
    if labels is not None:
        count = (labels != ignore_index).sum()
    else:
        count = per_token.numel()
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    # mean over kept tokens; no kept token gives 0 (not NaN), so an all-padding batch is harmless
    return total / torch.clamp(torch.as_tensor(count, device=total.device), min=1).to(total.dtype)


def _per_token(student_logits, teacher_logits, alpha, temperature, upcast, reverse, detach_mixture=False):
    log_q = _log_probs(student_logits, temperature, upcast)
    log_p = _log_probs(teacher_logits, temperature, upcast).to(log_q.dtype)
    q, p = log_q.exp(), log_p.exp()
    if reverse:
        log_mix = _log_mix(1.0 - alpha, log_p, alpha, log_q, q > 0)
        return _xlogy_mix(q, log_q, log_mix.detach() if detach_mixture else log_mix).sum(-1)
    return _xlogy_mix(p, log_p, _log_mix(alpha, log_p, 1.0 - alpha, log_q, p > 0)).sum(-1)


def _shared_vocab(student_logits, teacher_logits, vocab_size):
    if vocab_size is None:
        return student_logits, teacher_logits
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            weights: torch.Tensor | None = None, *, alpha: float = 0.1, temperature: float = 1.0,
            ignore_index: int = -100, reduction: str = "mean", upcast: bool = True,
            vocab_size: int | None = None) -> torch.Tensor:
    """KL(p || alpha p + (1 - alpha) q), eager.

    student_logits, teacher_logits: [..., V] floating; labels: [...] integer or None; weights: [...]
    floating or None.
    upcast: compute half-precision inputs in float32 (False gives plain PyTorch in the input dtype,
    the baseline of the tests' error budget). vocab_size: only columns [0, vocab_size) of both logits are
    tokens (None: all). Returns a scalar, or [...] for reduction="none".
    """
    student_logits, teacher_logits = _shared_vocab(student_logits, teacher_logits, vocab_size)
    skip = skipped_rows(student_logits.shape[:-1], labels, weights, ignore_index, student_logits.device)
    per_token = _per_token(zero_skipped(student_logits, skip), zero_skipped(teacher_logits, skip), alpha, temperature,
                           upcast, reverse=False)
    return _reduce(per_token, labels, weights, ignore_index, reduction)


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None, *, alpha: float = 0.1, temperature: float = 1.0,
                    ignore_index: int = -100, reduction: str = "mean", detach_mixture: bool = False,
                    upcast: bool = True, vocab_size: int | None = None) -> torch.Tensor:
    """KL(q || (1 - alpha) p + alpha q), eager. Arguments as in :func:`skew_kl`; detach_mixture stops the
    gradient through (1 - alpha) p + alpha q."""
    student_logits, teacher_logits = _shared_vocab(student_logits, teacher_logits, vocab_size)
    skip = skipped_rows(student_logits.shape[:-1], labels, weights, ignore_index, student_logits.device)
    per_token = _per_token(zero_skipped(student_logits, skip), zero_skipped(teacher_logits, skip), alpha, temperature,
                           upcast, reverse=True, detach_mixture=detach_mixture)
    return _reduce(per_token, labels, weights, ignore_index, reduction)
