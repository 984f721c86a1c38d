"""The distributed form of averaging: each rank trained one branch; afterwards every rank holds the
(optionally weighted) average of all branches."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

_DEFAULT_BUCKET_BYTES = 64 * 2**20


def all_reduce_average_(module: nn.Module, group=None, *, weight: float | None = None,
                        bucket_bytes: int = _DEFAULT_BUCKET_BYTES) -> nn.Module:
    """Replaces every floating parameter and buffer of ``module`` with its average over the ranks of
    ``group`` (default: the world), in place, and returns ``module``.

    weight: this rank's weight (default 1 on every rank: the plain mean); the weights are normalised
    by their all-reduced sum. Tensors are packed into flat float32 buckets of about ``bucket_bytes``
    (float64 stays float64), one all-reduce per bucket, so bf16 branches are summed in float32.
    Every rank must call this with identically structured modules.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce_average_ needs an initialised torch.distributed process group")
    if weight is not None and (not math.isfinite(float(weight)) or float(weight) < 0):
        raise ValueError(f"weight={weight} must be finite and >= 0")
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")

    tensors, seen = [], set()
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and t.data_ptr() not in seen:  # tied weights once
            seen.add(t.data_ptr())
            tensors.append(t)
    device = tensors[0].device if tensors else torch.device("cpu")

    w = torch.tensor([1.0 if weight is None else float(weight)], dtype=torch.float64, device=device)
    dist.all_reduce(w, group=group)
    total = float(w.item())
    if total <= 0:
        raise ValueError("the ranks' weights sum to 0")
    scale = (1.0 if weight is None else float(weight)) / total

    by_kind = defaultdict(list)
    for t in tensors:
        by_kind[(t.device, torch.float64 if t.dtype == torch.float64 else torch.float32)].append(t)
    with torch.no_grad():
        for (dev, acc), group_tensors in by_kind.items():
            for bucket in _buckets(group_tensors, bucket_bytes // torch.finfo(acc).bits * 8):
                flat = torch.cat([t.reshape(-1).to(acc) for t in bucket])
                flat.mul_(scale)
                dist.all_reduce(flat, group=group)
                offset = 0
                for t in bucket:
                    n = t.numel()
                    t.copy_(flat[offset: offset + n].view_as(t))
                    offset += n
    return module


def _buckets(tensors, max_elems: int):
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > max_elems:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket
