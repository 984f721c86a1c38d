"""Dispatch for the multi-tensor weighted average (cuda ext > triton > cpu ext > reference)."""
from __future__ import annotations

import torch

from distillkit._backend import extension, select_backend

OP = "merge.average_"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def average_group_(targets: list[torch.Tensor], sources: list[list[torch.Tensor]], weights: list[float],
                   backend: str | None = None) -> str:
    """targets[i] <- sum_k weights[k] * sources[k][i] in one launch; returns the backend that ran.

    All tensors: contiguous, one dtype (float32/float64/bfloat16/float16), one device; sources[k][i]
    has targets[i]'s shape. A target may alias its own sources (each element is read before written).
    """
    if not targets:
        return "none"
    name = select_backend(OP, targets[0].device, backend)
    weights = [float(w) for w in weights]
    if name == "reference":
        from distillkit.reference.merge import average_group_ as ref

        ref(targets, sources, weights)
    elif name == "cpu":
        extension().merge_average_cpu(targets, sources, weights)
    elif name == "cuda":
        extension().merge_average_cuda(targets, sources, weights)
    else:
        from distillkit.kernels.merge import average_group_ as tri

        tri(targets, sources, weights)
    return name
