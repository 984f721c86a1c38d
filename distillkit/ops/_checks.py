"""Value-check helpers shared by the ops: vectorised one-pass tests for NaN and inf (CPU tensors; on CUDA a
check costs a device sync, so the ops skip them there)."""
from __future__ import annotations

import torch


def first_index(bad: torch.Tensor) -> str:
    """The index of bad's first True entry, as "2, 3"."""
    return ", ".join(str(int(i)) for i in bad.nonzero()[0])


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Bool [N]: the rows of x [N, D] holding NaN or +-inf. One summing pass (a sum is NaN or inf if an entry
    is; ~3x faster than isfinite(x).any(-1) here, which writes an [N, D] mask); a sum that overflowed on
    finite entries is confirmed entry by entry, on those rows only."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    suspect = ~torch.isfinite(x.sum(-1, dtype=acc))
    if bool(suspect.any()):
        suspect[suspect.clone()] = ~torch.isfinite(x[suspect]).all(-1)
    return suspect


def first_nonfinite(x: torch.Tensor) -> str | None:
    """Index of x's first NaN or inf entry ("2, 3"), or None when x is finite; one summing pass if it is."""
    if not x.numel():
        return None
    bad = nonfinite_rows(x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1))
    return first_index(~torch.isfinite(x)) if bool(bad.any()) else None
