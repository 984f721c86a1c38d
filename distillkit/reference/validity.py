"""VCRD's validity weights, eager, written from the paper (VCRD eq. 1 and its PRM-free weight).

    validity_ratio               w = r_s / (r_t + eps)
    teacher_likelihood_validity  a_S = argmax_v z_S;  p_T = softmax(z_T)
                                 w = exp(clip(gamma * log(p_T(a_S) / (sum of the top_k largest p_T^2 + eps)),
                                              log clip[0], log clip[1]))

The fast backends in distillkit.validity are tested against these in float64. Same signatures as the
public functions, plus ``compute_dtype``.
"""
from __future__ import annotations

import math

import torch


def validity_ratio(r_student: torch.Tensor, r_teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """r_s / (r_t + eps), elementwise, in the broadcast of both inputs' dtypes."""
    return r_student / (r_teacher + eps)


@torch.no_grad()
def teacher_likelihood_validity(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, top_k: int = 128,
                                gamma: float = 0.5, clip: tuple[float, float] = (0.5, 2.0), eps: float = 1e-8,
                                compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-token validity weight from the teacher's likelihood of the student's greedy token.

    teacher_logits, student_logits: [..., V] floating. Returns [...] in ``compute_dtype`` (no gradient).
    """
    z_t = teacher_logits.to(compute_dtype)
    greedy = student_logits.argmax(dim=-1, keepdim=True)  # first maximum on ties, as torch.argmax
    log_p = torch.log_softmax(z_t, dim=-1)
    log_p_greedy = log_p.gather(-1, greedy).squeeze(-1)
    top_p = log_p.topk(top_k, dim=-1).values.exp()
    log_ratio = log_p_greedy - torch.log((top_p * top_p).sum(-1) + eps)
    if gamma == 0:  # 0 * log 0 would be NaN; the weight is then exp(clip(0))
        scaled = torch.zeros_like(log_ratio)
    else:
        scaled = gamma * log_ratio
    return torch.exp(torch.clamp(scaled, math.log(clip[0]), math.log(clip[1])))
