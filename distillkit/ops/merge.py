"""The multi-tensor weighted average (Merge-of-Thought's merge step): launchers and dispatch.

    cuda       distillkit._C.merge_average_cuda   (csrc/cuda/merge.cu, multi-tensor apply)
    triton     distillkit.kernels.merge
    cpu        distillkit._C.merge_average_cpu    (csrc/cpu/merge.cpp)
    reference  distillkit.reference.merge         (eager, one tensor at a time)

distillkit.merge.average keeps the named-parameter / module logic (ties, grouping by device and dtype) on top.
"""
from __future__ import annotations

import torch

from distillkit._backend import FLOAT_DTYPES, Backend, Op, dispatch, extension

OP = "merge.average_"
SUPPORTED_DTYPES = FLOAT_DTYPES


# ---- launchers: targets [T] tensors, sources [K][T], weights [K] floats; one dtype, one device, contiguous

def _run_reference(targets, sources, weights):
    from distillkit.reference.merge import average_group_ as ref

    ref(targets, sources, weights)


def _run_cpu(targets, sources, weights):
    extension().merge_average_cpu(targets, sources, weights)


def _run_cuda(targets, sources, weights):
    extension().merge_average_cuda(targets, sources, weights)


def _run_triton(targets, sources, weights):
    from distillkit.kernels.merge import average_group_ as tri  # triton loads on first use only

    tri(targets, sources, weights)


MERGE_AVERAGE = Op(OP, [Backend(name, run, dtypes=SUPPORTED_DTYPES) for name, run in
                        (("cuda", _run_cuda), ("triton", _run_triton), ("cpu", _run_cpu),
                         ("reference", _run_reference))])


def average_group_(targets: list[torch.Tensor], sources: list[list[torch.Tensor]], weights: list[float],
                   backend: str | None = None) -> str:
    """targets[i] <- sum_k weights[k] * sources[k][i] in one launch; returns the backend that ran.

    All tensors: contiguous, one dtype (float32/float64/bfloat16/float16), one device; sources[k][i]
    has targets[i]'s shape. A target may alias its own sources (each element is read before written).
    """
    if not targets:
        return "none"
    chosen = dispatch(MERGE_AVERAGE, targets, backend)
    chosen.run(targets, sources, [float(w) for w in weights])
    return chosen.name
