"""Triton multi-tensor weighted average: targets[i] <- sum_k w_k * sources[k][i], one launch per group.

Tensors of a group are reached through a table of raw addresses (int64) so one launch covers any
number of parameters; each program handles BLOCK elements of one tensor (a chunk table maps
program id -> tensor, first element). Accumulation is float32 (float64 for float64 groups).
Bytes on paper: (K + 1) * numel * itemsize, as for the CUDA kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_DTYPE = {
    torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
}


@triton.jit
def _to_bf16_rne(x):
    """float32 -> bfloat16, round to nearest even, in integer arithmetic. GPUs round this way
    natively; the CPU interpreter truncates, so the kernel spells the rounding out (free in a
    bandwidth-bound kernel) and gives the same bits on both."""
    u = x.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    r = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), r)  # NaN stays NaN


@triton.jit
def _merge_average_kernel(
    ptrs_ptr,          # [T, K + 1] int64 addresses: target, then sources
    numel_ptr,         # [T] int64
    chunk_tensor_ptr,  # [C] int32
    chunk_start_ptr,   # [C] int64
    weights_ptr,       # [K] float64
    K: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid).to(tl.int64)
    start = tl.load(chunk_start_ptr + pid)
    n = tl.load(numel_ptr + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    row = ptrs_ptr + t * (K + 1)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for k in tl.static_range(K):
        src = tl.load(row + 1 + k).to(tl.pointer_type(DTYPE))
        w = tl.load(weights_ptr + k).to(ACC)
        acc += w * tl.load(src + offs, mask=mask, other=0.0).to(ACC)
    dst = tl.load(row).to(tl.pointer_type(DTYPE))
    if DTYPE == tl.bfloat16:
        out = _to_bf16_rne(acc)
    else:
        out = acc.to(DTYPE)
    tl.store(dst + offs, out, mask=mask)


def average_group_(targets: list[torch.Tensor], sources: list[list[torch.Tensor]], weights: list[float],
                   block: int = 4096) -> None:
    """targets[i] <- sum_k weights[k] * sources[k][i] for contiguous tensors of one dtype and device."""
    if not targets:
        return
    dev, dtype, K = targets[0].device, targets[0].dtype, len(sources)
    rows = [[t.data_ptr()] + [src[i].data_ptr() for src in sources] for i, t in enumerate(targets)]
    ptrs = torch.tensor(rows, dtype=torch.int64)
    numel = torch.tensor([t.numel() for t in targets], dtype=torch.int64)
    nchunks = (numel + block - 1) // block
    chunk_tensor = torch.repeat_interleave(torch.arange(len(targets), dtype=torch.int32), nchunks)
    first_chunk = torch.cumsum(nchunks, 0) - nchunks
    chunk_start = (torch.arange(int(nchunks.sum()), dtype=torch.int64) - first_chunk[chunk_tensor.long()]) * block
    w = torch.tensor(weights, dtype=torch.float64)  # cast to the accumulator in the kernel
    ptrs, numel, chunk_tensor, chunk_start, w = (
        x.to(dev, non_blocking=True) for x in (ptrs, numel, chunk_tensor, chunk_start, w))
    grid = (chunk_tensor.numel(),)
    if grid[0] == 0:
        return
    _merge_average_kernel[grid](
        ptrs, numel, chunk_tensor, chunk_start, w,
        K=K, DTYPE=_TL_DTYPE[dtype], ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK=block,
    )
