"""VCRD's validity weights (Validity-Calibrated Reasoning Distillation).

    validity_ratio(r_student, r_teacher, eps)          VCRD eq. 1: w = r_s / (r_t + eps)
    teacher_likelihood_validity(teacher_logits, ...)   VCRD's PRM-free weight:
        a_S = argmax_v z_S (the student's greedy token), p_T = softmax(z_T)
        w   = exp(clip(gamma * log(p_T(a_S) / (sum of the top_k largest p_T^2 + eps)), log clip[0], log clip[1]))

teacher_likelihood_validity reads each logits row once on the fast backends: an online max /
sum-exp of the teacher row, a running argmax of the student row and a bounded top-k of the teacher
logits (the top_k largest p_T^2 are the squares at the top_k largest teacher logits), all in one pass.
Backends (``backend=`` or DISTILLKIT_BACKEND; automatic: cuda > triton > reference on CUDA tensors, cpu on CPU;
a top_k beyond a kernel's on-chip limit moves the automatic choice on, and refuses a named backend):

    cuda       distillkit._C.teacher_likelihood_validity_cuda  (csrc/cuda/validity.cu)
    triton     distillkit.kernels.validity                     (kernels/validity.py)
    cpu        distillkit._C.teacher_likelihood_validity_cpu   (csrc/cpu/validity.cpp)
    reference  distillkit.reference.validity                   (eager, full softmax + topk)

The weights are constants for the loss: results are detached float32.
"""
from __future__ import annotations

import math

import torch

from distillkit._backend import Backend, Limit, Op, extension
from distillkit._errors import InputError

__all__ = ["validity_ratio", "teacher_likelihood_validity", "IMPLEMENTED"]

OP_NAME = "teacher_likelihood_validity"


def validity_ratio(r_student: torch.Tensor, r_teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """VCRD eq. 1: w = r_s / (r_t + eps).

    r_student, r_teacher: floating tensors of the same (or broadcastable) shape, e.g. [N] per-step
    correctness rates. Returns their broadcast shape in their promoted floating dtype.
    """
    for name, r in (("r_student", r_student), ("r_teacher", r_teacher)):
        if not isinstance(r, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(r).__name__}")
        if not r.is_floating_point():
            raise InputError(f"{name} must be floating point, got {r.dtype}")
        if torch.isnan(r).any():
            raise InputError(f"{name} contains NaN")
    try:
        torch.broadcast_shapes(r_student.shape, r_teacher.shape)
    except RuntimeError as exc:
        raise InputError(f"r_student {tuple(r_student.shape)} and r_teacher {tuple(r_teacher.shape)} "
                         "do not broadcast") from exc
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
    return r_student / (r_teacher + eps)


def _validate(teacher_logits, student_logits, top_k, gamma, clip, eps):
    for name, z in (("teacher_logits", teacher_logits), ("student_logits", student_logits)):
        if not isinstance(z, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise InputError(f"{name} must be a floating tensor [..., V], got {z.dtype}")
        if z.dim() < 1 or z.shape[-1] == 0:
            raise InputError(f"{name} must be [N, V] or [B, T, V] with V > 0, got {tuple(z.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise InputError(f"student_logits {tuple(student_logits.shape)} must match teacher_logits "
                         f"{tuple(teacher_logits.shape)} (same tokens, same vocabulary)")
    if teacher_logits.device != student_logits.device:
        raise InputError(f"student_logits is on {student_logits.device}, teacher_logits on {teacher_logits.device}")
    vocab = teacher_logits.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise InputError(f"top_k must be an int in [1, V={vocab}], got {top_k!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise InputError(f"gamma must be a finite number >= 0, got {gamma!r}")
    try:
        lo, hi = (float(c) for c in clip)
    except (TypeError, ValueError) as exc:
        raise InputError(f"clip must be a pair (low, high) of numbers, got {clip!r}") from exc
    if not (0 < lo <= hi < math.inf):
        raise InputError(f"clip must satisfy 0 < clip[0] <= clip[1] < inf, got {clip!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
    return lo, hi


def _run_reference(z_t, z_s, top_k, gamma, lo, hi, eps):
    from distillkit.reference import validity as ref

    return ref.teacher_likelihood_validity(z_t, z_s, top_k=top_k, gamma=gamma, clip=(lo, hi), eps=eps,
                                           compute_dtype=torch.float32)


def _run_cpu(z_t, z_s, top_k, gamma, lo, hi, eps):
    return extension().teacher_likelihood_validity_cpu(z_t, z_s, top_k, gamma, math.log(lo), math.log(hi), eps)


def _run_cuda(z_t, z_s, top_k, gamma, lo, hi, eps):
    return extension().teacher_likelihood_validity_cuda(z_t, z_s, top_k, gamma, math.log(lo), math.log(hi), eps)


def _run_triton(z_t, z_s, top_k, gamma, lo, hi, eps):
    from distillkit.kernels import validity as tk  # triton loads on first use only

    return tk.teacher_likelihood_validity(z_t, z_s, top_k, gamma, math.log(lo), math.log(hi), eps)


_ON_CHIP = "the running top-k lives in a fixed on-chip buffer"
# the fast kernels keep the running top-k on chip; beyond their limit the automatic choice moves on
VALIDITY = Op(OP_NAME, [Backend("cuda", _run_cuda, limits=(Limit("top_k", 2048, _ON_CHIP),)),
                        Backend("triton", _run_triton, limits=(Limit("top_k", 1024, _ON_CHIP),)),
                        Backend("cpu", _run_cpu), Backend("reference", _run_reference)])
IMPLEMENTED = tuple(VALIDITY.backends)


def resolve_backend(device: torch.device, backend: str | None = None, top_k: int | None = None) -> str:
    """The backend teacher_likelihood_validity would run on tensors on ``device`` (with ``top_k``)."""
    return VALIDITY.select(device, backend=backend, top_k=top_k).name


@torch.no_grad()
def teacher_likelihood_validity(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, top_k: int = 128,
                                gamma: float = 0.5, clip: tuple[float, float] = (0.5, 2.0), eps: float = 1e-8,
                                backend: str | None = None) -> torch.Tensor:
    """VCRD's PRM-free per-token validity weight.

    teacher_logits, student_logits: [N, V] or [B, T, V], float32 / bfloat16 / float16 (each may have
    its own dtype), same shape and device. -inf entries (masked vocabulary) are allowed; NaN is not.
    top_k: how many of the teacher's largest probabilities enter the denominator, 1 <= top_k <= V.
    gamma >= 0: exponent of the likelihood ratio; clip = (low, high), 0 < low <= high: bounds of w.
    Returns float32 [N] or [B, T], detached (a constant weight for the loss).
    """
    lo, hi = _validate(teacher_logits, student_logits, top_k, gamma, clip, eps)
    name = resolve_backend(teacher_logits.device, backend, top_k)
    lead = teacher_logits.shape[:-1]
    vocab = teacher_logits.shape[-1]
    z_t = teacher_logits.detach().reshape(-1, vocab).contiguous()
    z_s = student_logits.detach().reshape(-1, vocab).contiguous()
    if z_t.shape[0] == 0:
        return torch.empty(lead, dtype=torch.float32, device=z_t.device)
    if name == "reference" and (torch.isnan(z_t).any() or torch.isnan(z_s).any()):
        _raise_bad_rows(z_t, z_s)
    out = VALIDITY.backends[name].run(z_t, z_s, top_k, float(gamma), lo, hi, float(eps)).to(torch.float32)
    # the fast kernels flag a NaN input or an all -inf teacher row with a NaN weight; checking the [N]
    # result costs nothing next to a second read of the logits
    if torch.isnan(out).any():
        _raise_bad_rows(z_t, z_s)
    return out.reshape(lead)


def _raise_bad_rows(z_t: torch.Tensor, z_s: torch.Tensor):
    if torch.isnan(z_t).any():
        raise InputError("teacher_logits contains NaN")
    if torch.isnan(z_s).any():
        raise InputError("student_logits contains NaN")
    empty = torch.isneginf(z_t).all(-1) | torch.isposinf(z_t).any(-1)
    if empty.any():
        row = int(empty.nonzero()[0, 0])
        raise InputError(f"teacher_logits row {row} has no finite maximum (all -inf or some +inf): "
                         "its softmax is undefined")
    raise InputError("teacher_logits / student_logits gave a NaN validity weight (non-finite input)")
