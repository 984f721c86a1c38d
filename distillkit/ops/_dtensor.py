"""DTensor arguments (FSDP2, tensor parallel) made plain before an op: gathered whole on every rank.

An lm_head in its own ``fully_shard`` group is a sharded DTensor when the loss reads its weight (its forward
did not run, so FSDP2 never unsharded it); the custom ops take plain tensors only. :func:`gather_weight`
all-gathers such a weight (``full_tensor``) outside the op and, in the backward, averages the rank's
[V, H] gradient over the weight's device mesh and hands it back with the parameter's own placements
(reduce-scatter for Shard, all-reduce for Replicate): what FSDP2 does for every parameter whose forward ran,
so the lm_head's gradient is on the same footing as the body's, and the optimizer finds the DTensor it
expects. Averaging is right both when each rank holds its own batch (data parallel: FSDP2's convention)
and when every rank holds the same tokens (tensor parallel: the average of equal gradients).
:func:`gather_input` gathers activations (hidden states, logits) with DTensor's own backward (each rank
keeps its slice of the gathered gradient). Teacher tensors are gathered without autograd.

Memory: the whole [V, H] weight on every rank for the duration of the call (V H x 2 bytes in bf16: 1.1 GB
for a 152064 x 3584 head), the same unsharded copy FSDP2 would make to run the lm_head's own forward; the
gathered teacher weight is freed when the call returns. No DTensor, no cost: the check is one isinstance
against a class that is only looked up when torch.distributed.tensor has been imported.
"""
from __future__ import annotations

import sys

import torch


def dtensor_class():
    """torch.distributed.tensor.DTensor if that module is loaded (nothing can be a DTensor otherwise), else None."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(x) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(x, cls)


class _GatherAveraged(torch.autograd.Function):
    """Forward: the full tensor (all-gather). Backward: the plain gradient averaged over the mesh, returned
    as a DTensor with the input's mesh and placements."""

    @staticmethod
    def forward(ctx, x):
        ctx.mesh, ctx.placements = x.device_mesh, x.placements
        return x.full_tensor()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor, Partial

        mesh = ctx.mesh
        # each rank's gradient is one term of a sum over the mesh (Partial); / size makes it the mean
        partial = DTensor.from_local(grad / mesh.size(), mesh, [Partial()] * mesh.ndim, run_check=False)
        return partial.redistribute(mesh, ctx.placements)


def gather_weight(x):
    """A parameter-like tensor ([V, H] weight, [V] bias): a DTensor becomes its full plain tensor, its gradient
    averaged over the mesh (see the module docstring); anything else is returned as it is."""
    if not is_dtensor(x):
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherAveraged.apply(x)
    return x.detach().full_tensor()


def gather_input(x):
    """An activation ([N, H] hidden states, [..., V] logits): a DTensor becomes its full plain tensor, with
    DTensor's own differentiable gather; anything else is returned as it is."""
    if not is_dtensor(x):
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return x.full_tensor()
    return x.detach().full_tensor()


def gather_constant(x):
    """A tensor that receives no gradient (the teacher's, labels, weights): the full plain tensor, detached."""
    if not is_dtensor(x):
        return x
    return x.detach().full_tensor()
