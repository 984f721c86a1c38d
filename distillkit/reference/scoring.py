"""Eager formulas for CoRD's meta-prover scoring (predictive perplexity of the ground-truth answer).

CoRD scores a candidate reasoning prefix by
    S = exp((1/M) sum_m log p_meta(a_m | prefix + step + "</think> The final answer is", a_<m))
for the answer tokens a_1..a_M. Given the meta-prover's final hidden states at the answer positions
(hidden [M, H]) and its lm_head (weight [V, H], optional bias [V]):
    log p(a_m) = (hidden[m] @ weight.T + bias)[a_m] - logsumexp_v(hidden[m] @ weight.T + bias)[v]

This file materialises the full [M, V] logits on purpose: it is the readable formula every fast
backend is tested against (in float64 with ``compute_dtype=torch.float64``). It does no input
checking; distillkit.scoring validates and dispatches.
"""
from __future__ import annotations

import torch

__all__ = ["answer_logprobs", "predictive_perplexity", "segment_ids"]


@torch.no_grad()
def answer_logprobs(hidden: torch.Tensor, weight: torch.Tensor, answer_ids: torch.Tensor, *,
                    bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype = torch.float32, logit_scale: float = 1.0,
                    softcap: float | None = None) -> torch.Tensor:
    """log softmax(f(hidden @ weight.T + bias))[m, answer_ids[m]] -> [M] in ``compute_dtype``.

    hidden [M, H] and weight [V, H] (any floating dtype) are upcast to ``compute_dtype`` before the
    matmul, so float64 gives the exact formula and float32 mirrors "fp32 accumulation". f is the model's
    final logit transform (distillkit.reference.fused_linear.logit_transform): z * logit_scale, then
    softcap * tanh(z / softcap) when softcap is set.
    """
    from distillkit.reference.fused_linear import logit_transform

    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T  # [M, V]
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    logits = logit_transform(logits, logit_scale, softcap)
    lse = torch.logsumexp(logits, dim=-1)  # [M]
    picked = logits.gather(1, answer_ids.long().view(-1, 1)).squeeze(1)
    return picked - lse


def segment_ids(cu_seqlens: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """[M] int64 segment index of every row, from cu_seqlens [C+1] (0 = cu[0] <= ... <= cu[C] = M)."""
    cu = cu_seqlens.long().cpu()
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return seg.to(device) if device is not None else seg


@torch.no_grad()
def segment_mean_exp(logprobs: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """exp(mean of logprobs over each segment [cu[c], cu[c+1])) -> [C] in logprobs' dtype.

    Sums in float64 so long answers do not lose digits (this is [M] work, never the bottleneck).
    """
    cu = cu_seqlens.long().cpu()
    lengths = (cu[1:] - cu[:-1]).to(logprobs.device)
    sums = torch.zeros(lengths.numel(), dtype=torch.float64, device=logprobs.device)
    sums.index_add_(0, segment_ids(cu, logprobs.device), logprobs.to(torch.float64))
    return torch.exp(sums / lengths.to(torch.float64)).to(logprobs.dtype)


@torch.no_grad()
def predictive_perplexity(hidden: torch.Tensor, weight: torch.Tensor, answer_ids: torch.Tensor,
                          cu_seqlens: torch.Tensor, *, bias: torch.Tensor | None = None,
                          compute_dtype: torch.dtype = torch.float32, logit_scale: float = 1.0,
                          softcap: float | None = None) -> torch.Tensor:
    """S_c = exp(mean_{m in segment c} log p(answer_ids[m])) -> [C] in ``compute_dtype``.

    This is the seed paper's score (the geometric-mean answer probability, in (0, 1], higher is
    better; i.e. 1 / the conventional perplexity).
    """
    lp = answer_logprobs(hidden, weight, answer_ids, bias=bias, compute_dtype=compute_dtype,
                         logit_scale=logit_scale, softcap=softcap)
    return segment_mean_exp(lp, cu_seqlens)
