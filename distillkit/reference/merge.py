"""Eager reference for the merge kernels: sum_k w_k * source_k, written as plainly as possible."""
from __future__ import annotations

import torch


def weighted_sum(sources: list[torch.Tensor], weights: list[float], *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_k weights[k] * sources[k] computed in ``dtype`` (default: float64), as a new tensor."""
    dtype = dtype or torch.float64
    out = torch.zeros(sources[0].shape, dtype=dtype, device=sources[0].device)
    for w, s in zip(weights, sources):
        out += float(w) * s.to(dtype)
    return out


def average_group_(targets: list[torch.Tensor], sources: list[list[torch.Tensor]], weights: list[float]) -> None:
    """targets[i] <- sum_k weights[k] * sources[k][i], accumulated in float32 (float64 for float64)."""
    for i, tgt in enumerate(targets):
        acc_dtype = torch.float64 if tgt.dtype == torch.float64 else torch.float32
        acc = weighted_sum([src[i] for src in sources], weights, dtype=acc_dtype)
        tgt.copy_(acc)
