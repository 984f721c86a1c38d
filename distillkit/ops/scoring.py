"""Backend dispatch for the answer-log-prob scoring kernel (CoRD's meta-prover).

Inputs arrive validated by distillkit.scoring (shapes, dtypes, devices, id range); this module only
picks a backend and makes the layouts each one expects (contiguous, int64 ids, float32 bias).
No autograd: scoring runs under no_grad and returns detached float32.

    cuda       distillkit._C.answer_logprobs_cuda   (csrc/cuda/scoring.cu)
    triton     distillkit.kernels.scoring           (kernels/scoring.py)
    cpu        distillkit._C.answer_logprobs_cpu    (csrc/cpu/scoring.cpp)
    reference  distillkit.reference.scoring         (full [M, V] logits; tests and fallback only)
"""
from __future__ import annotations

import torch

from distillkit._backend import extension, select_backend

__all__ = ["IMPLEMENTED", "resolve_backend", "answer_logprobs"]

IMPLEMENTED = ("cuda", "triton", "cpu", "reference")
OP_NAME = "answer_logprobs"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend answer_logprobs would run on tensors on ``device`` (raises BackendUnavailable)."""
    return select_backend(OP_NAME, device, backend, IMPLEMENTED)


def _prepare(name, hidden, weight, answer_ids, bias):
    if hidden.dtype == torch.float64 and name in ("triton", "cuda"):  # fp64 GPU math: not worth a kernel
        hidden, weight = hidden.float(), weight.float()
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    return hidden.detach().contiguous(), weight.detach().contiguous(), answer_ids.to(torch.int64).contiguous(), bias32


def _run_reference(hidden, weight, answer_ids, bias):
    from distillkit.reference import scoring as ref

    return ref.answer_logprobs(hidden, weight, answer_ids, bias=bias, compute_dtype=torch.float32)


def _run_cpu(hidden, weight, answer_ids, bias):
    return extension().answer_logprobs_cpu(hidden, weight, answer_ids, bias)


def _run_cuda(hidden, weight, answer_ids, bias):
    return extension().answer_logprobs_cuda(hidden, weight, answer_ids, bias)


def _run_triton(hidden, weight, answer_ids, bias):
    from distillkit.kernels import scoring as tk  # triton loads on first use only

    return tk.answer_logprobs(hidden, weight, answer_ids, bias)


_RUN = {"reference": _run_reference, "cpu": _run_cpu, "cuda": _run_cuda, "triton": _run_triton}


@torch.no_grad()
def answer_logprobs(hidden: torch.Tensor, weight: torch.Tensor, answer_ids: torch.Tensor,
                    bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """float32 [M] answer log-probs on the chosen backend; inputs must already be validated."""
    name = resolve_backend(hidden.device, backend)
    if hidden.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=hidden.device)
    out = _RUN[name](*_prepare(name, hidden, weight, answer_ids, bias))
    return out.to(torch.float32)
