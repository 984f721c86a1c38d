"""Predictive-perplexity scoring for CoRD's meta-prover.

CoRD keeps the candidate reasoning steps under which a meta-prover finds the ground-truth answer
most likely: S = exp((1/M) sum_m log p(a_m | context, a_<m)). Only M answer tokens are scored, yet an
eager lm_head computes [M, V] logits; these functions apply the lm_head chunk by chunk over the
vocabulary with an online log-sum-exp, so no [M, V] float32 tensor is ever made (except by the
``reference`` backend, kept for tests).

    answer_logprobs(hidden [M, H], weight [V, H], answer_ids [M]) -> float32 [M]
    predictive_perplexity(hidden, weight, answer_ids, cu_seqlens [C+1]) -> float32 [C]

Both are inference-only: they run under ``torch.no_grad()`` and return detached tensors (no
gradient flows to hidden, weight or bias). No autograd Function: scoring is inference-only.

Models whose logits are not ``hidden @ weight.T + bias`` (Gemma-2/3's final softcap, Cohere's and Granite's
logit scaling) pass ``logit_scale`` and ``softcap`` (see distillkit.losses.logit_transform_from_config):
logits = softcap * tanh(z * logit_scale / softcap). The kernels below take no transform, so with one the
lm_head runs as torch GEMMs in float32 (float64 for float64 inputs), chunked over the vocabulary with the same
online log-sum-exp, whichever backend is named (``reference`` still runs the eager formula).
DTensor arguments (an FSDP2-sharded or tensor-parallel lm_head) are gathered whole on each rank first
(distillkit.ops._dtensor: one full [V, H] copy for the call).

Backends (``backend=`` or DISTILLKIT_BACKEND; automatic: cuda > triton > reference on CUDA tensors, cpu >
reference on CPU ones), each given contiguous tensors, int64 ids and a float32 bias:

    cuda       distillkit._C.answer_logprobs_cuda   (csrc/cuda/scoring.cu)
    triton     distillkit.kernels.scoring           (kernels/scoring.py)
    cpu        distillkit._C.answer_logprobs_cpu    (csrc/cpu/scoring.cpp)
    reference  distillkit.reference.scoring         (full [M, V] logits; tests and fallback only)
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from distillkit._backend import FLOAT_DTYPES as _FLOAT_DTYPES
from distillkit._backend import Backend, Op, extension
from distillkit._errors import InputError
from distillkit.ops._checks import first_nonfinite, nonfinite_rows
from distillkit.ops._dtensor import gather_constant
from distillkit.reference.fused_linear import logit_transform as _logit_transform
from distillkit.reference.scoring import segment_mean_exp

__all__ = ["answer_logprobs", "predictive_perplexity", "check_values", "resolve_backend", "IMPLEMENTED"]

OP_NAME = "answer_logprobs"


# ---- launchers, one per backend: hidden [M, H], weight [V, H] (one float dtype), ids [M] int64, bias [V]
# float32 or None, all contiguous -> float32 (or the input's dtype for reference) [M] -----------------

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


SCORING = Op(OP_NAME, [Backend("cuda", _run_cuda), Backend("triton", _run_triton), Backend("cpu", _run_cpu),
                       Backend("reference", _run_reference)])
IMPLEMENTED = tuple(SCORING.backends)


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend answer_logprobs would run on tensors on ``device`` (raises BackendUnavailable)."""
    return SCORING.select(device, backend=backend).name


def _prepare(name, hidden, weight, answer_ids, bias):
    if hidden.dtype == torch.float64 and name in ("triton", "cuda"):  # fp64 GPU math: not worth a kernel
        hidden, weight = hidden.float(), weight.float()
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    return hidden.detach().contiguous(), weight.detach().contiguous(), answer_ids.to(torch.int64).contiguous(), bias32


def _answer_logprobs(hidden, weight, answer_ids, bias, backend, logit_scale=1.0, softcap=None):
    """float32 [M] on the chosen backend; inputs already validated."""
    name = resolve_backend(hidden.device, backend)
    if hidden.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=hidden.device)
    if logit_scale != 1.0 or softcap is not None:
        if name == "reference":
            from distillkit.reference import scoring as ref

            return ref.answer_logprobs(hidden, weight, answer_ids, bias=bias, logit_scale=logit_scale,
                                       softcap=softcap).to(torch.float32)
        return _transformed_logprobs(hidden, weight, answer_ids, bias, logit_scale, softcap).to(torch.float32)
    return SCORING.backends[name].run(*_prepare(name, hidden, weight, answer_ids, bias)).to(torch.float32)


# logits elements per vocabulary chunk of the transformed path (16 MB in float32)
_TRANSFORM_CHUNK_ELEMENTS = 1 << 22


def _transformed_logprobs(hidden, weight, answer_ids, bias, logit_scale, softcap):
    """log softmax(f(hidden @ weight.T + bias))[m, answer_ids[m]] with f the logit transform: torch GEMMs over
    vocabulary chunks [M, c] and an online log-sum-exp, in float32 (float64 for float64 inputs). -> [M]."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.detach().to(acc)
    m, v = h.shape[0], weight.shape[0]
    ids = answer_ids.to(torch.int64)
    run_max = torch.full((m,), float("-inf"), dtype=acc, device=h.device)
    run_sum = torch.zeros(m, dtype=acc, device=h.device)
    picked = torch.zeros(m, dtype=acc, device=h.device)
    cols = max(1, _TRANSFORM_CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, v, cols):
        stop = min(v, start + cols)
        z = h @ weight[start:stop].detach().to(acc).T  # [M, c]
        if bias is not None:
            z += bias[start:stop].detach().to(acc)
        z = _logit_transform(z, logit_scale, softcap)
        new_max = torch.maximum(run_max, z.amax(1))
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max.unsqueeze(1)).sum(1)
        run_max = new_max
        inside = (ids >= start) & (ids < stop)
        local = torch.where(inside, ids - start, torch.zeros_like(ids)).unsqueeze(1)
        picked = torch.where(inside, z.gather(1, local).squeeze(1), picked)
    return picked - (run_max + torch.log(run_sum))


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def _validate(hidden, weight, answer_ids, bias) -> None:
    for name, x in (("hidden", hidden), ("weight", weight), ("answer_ids", answer_ids)):
        _check_tensor(name, x)
    if hidden.dim() != 2:
        raise InputError(f"hidden: expected shape [M, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise InputError(f"weight: expected shape [V, H], got {tuple(weight.shape)}")
    m, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise InputError(f"weight: hidden size {weight.shape[1]} does not match hidden's H={h} "
                         f"(hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})")
    if v == 0:
        raise InputError("weight: the vocabulary is empty (V=0)")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise InputError(f"hidden: expected a floating dtype {_FLOAT_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise InputError(f"weight: dtype {weight.dtype} does not match hidden's dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise InputError(f"weight: on {weight.device} but hidden is on {hidden.device}")
    if answer_ids.dim() != 1 or answer_ids.shape[0] != m:
        raise InputError(f"answer_ids: expected shape [M]=[{m}], got {tuple(answer_ids.shape)}")
    if answer_ids.dtype.is_floating_point or answer_ids.dtype.is_complex or answer_ids.dtype == torch.bool:
        raise InputError(f"answer_ids: expected an integer dtype (int64), got {answer_ids.dtype}")
    if answer_ids.device != hidden.device:
        raise InputError(f"answer_ids: on {answer_ids.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != v:
            raise InputError(f"bias: expected shape [V]=[{v}], got {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise InputError(f"bias: expected a floating dtype, got {bias.dtype}")
        if bias.device != hidden.device:
            raise InputError(f"bias: on {bias.device} but hidden is on {hidden.device}")
    check_values(hidden, weight, answer_ids, bias)


def check_values(hidden: torch.Tensor, weight: torch.Tensor, answer_ids: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
    """The value check of every scoring backend: ids in [0, V); weight [V, H] and bias [V] finite everywhere (one
    NaN or inf entry poisons the log-sum-exp of every row); hidden [M, H] finite (every row is scored).

    One summing pass each (the weight's is one more read of [V, H] next to the kernel's, ~25 ms at V=32000,
    H=512); a weight or bias found finite is not read again while it is the same tensor object, unchanged
    (same data_ptr, _version, shape, strides, dtype, device): CoRD's meta-prover scores many batches with one
    lm_head. Raises InputError naming the argument. CPU tensors only: on CUDA each check would cost a device sync.
    """
    if hidden.device.type != "cpu":
        return
    v = weight.shape[0]
    bad = (answer_ids < 0) | (answer_ids >= v)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise InputError(f"answer_ids: id {int(answer_ids[i])} at position {i} is outside the vocabulary [0, {v})")
    for name, w in (("weight", weight), ("bias", bias)):
        if w is None or _checked_before(w):
            continue
        where = first_nonfinite(w)
        if where is not None:
            raise InputError(f"{name}: entry [{where}] is {float(w[~torch.isfinite(w)][0])}; the lm_head must be "
                             "finite (one NaN or inf entry makes every log-probability NaN)")
        _remember_checked(w)
    if hidden.numel():
        bad = nonfinite_rows(hidden)
        if bool(bad.any()):
            raise InputError(f"hidden: row {int(bad.nonzero()[0, 0])} holds NaN or inf (every row of hidden is a "
                             "scored position)")


# id(tensor) -> (weakref to it, its state when found finite); an entry dies with its tensor, so a new tensor
# at a freed tensor's address is never taken for it
_FINITE: dict[int, tuple] = {}


def _state(w: torch.Tensor):
    try:
        return (w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype, w.device)
    except RuntimeError:  # an inference-mode tensor keeps no version counter: never cached
        return None


def _checked_before(w: torch.Tensor) -> bool:
    entry = _FINITE.get(id(w))
    return entry is not None and entry[0]() is w and entry[1] is not None and entry[1] == _state(w)


def _remember_checked(w: torch.Tensor) -> None:
    key = id(w)
    _FINITE[key] = (weakref.ref(w, lambda _, key=key: _FINITE.pop(key, None)), _state(w))


def _validate_cu_seqlens(cu_seqlens, m: int) -> torch.Tensor:
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
            raise InputError(f"cu_seqlens: expected an integer dtype, got {cu_seqlens.dtype} (float offsets would "
                             "be truncated)")
        if cu_seqlens.dim() != 1:
            raise InputError(f"cu_seqlens: expected shape [C+1], got {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.detach().to("cpu", torch.int64)
    else:
        try:
            cu = torch.as_tensor(cu_seqlens if hasattr(cu_seqlens, "__array__") else list(cu_seqlens))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"cu_seqlens: expected a 1-D integer tensor or a sequence of ints ({exc})") from exc
        if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
            # converting would truncate 2.5 to 2 without a word
            raise InputError(f"cu_seqlens: expected integers, got {cu.dtype} values {cu.tolist()[:8]}")
        cu = cu.to(torch.int64)
        if cu.dim() != 1:
            raise InputError(f"cu_seqlens: expected shape [C+1], got {tuple(cu.shape)}")
    if cu.numel() == 0:
        raise InputError("cu_seqlens: expected at least one entry ([0] for no segments)")
    if int(cu[0]) != 0:
        raise InputError(f"cu_seqlens: must start at 0, got {int(cu[0])}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        c = int((lengths < 0).nonzero()[0, 0])
        raise InputError(f"cu_seqlens: must be non-decreasing; cu_seqlens[{c + 1}]={int(cu[c + 1])} < "
                         f"cu_seqlens[{c}]={int(cu[c])}")
    if bool((lengths == 0).any()):
        c = int((lengths == 0).nonzero()[0, 0])
        raise InputError(f"cu_seqlens: segment {c} is empty (cu_seqlens[{c}] == cu_seqlens[{c + 1}] == "
                         f"{int(cu[c])}); every candidate needs at least one answer token")
    if int(cu[-1]) != m:
        raise InputError(f"cu_seqlens: last entry must equal M={m} (rows of hidden), got {int(cu[-1])}")
    return cu


@torch.no_grad()
def answer_logprobs(hidden: torch.Tensor, weight: torch.Tensor, answer_ids: torch.Tensor, *,
                    bias: torch.Tensor | None = None, backend: str | None = None, logit_scale: float = 1.0,
                    softcap: float | None = None) -> torch.Tensor:
    """Log-probability of each answer token under the lm_head: log softmax(hidden @ weight.T + bias)[m, answer_ids[m]].

    Args:
        hidden: [M, H] float32/bfloat16/float16 (float64 is accepted and computed in float32), the
            final hidden states at the positions that predict the answer tokens (position t predicts
            token t+1).
        weight: [V, H], same dtype and device as hidden (the lm_head / tied embedding).
        answer_ids: [M] integer (int64) token ids in [0, V).
        bias: optional [V] floating lm_head bias (used in float32).
        backend: None (automatic: cuda > triton for CUDA tensors, cpu > reference for CPU tensors),
            or "cuda", "triton", "cpu", "reference".
        logit_scale, softcap: the model's final logit transform, logits = softcap * tanh(z * logit_scale /
            softcap) (z * logit_scale when softcap is None); with one, torch GEMMs chunked over the vocabulary
            run instead of the backend's kernel (see the module docstring).
        DTensor hidden, weight or bias (FSDP2, tensor parallel) are gathered whole on each rank first.

    Returns:
        float32 [M], detached (no gradient; runs under no_grad). Products accumulate in float32; the
        vocabulary is processed in chunks with an online log-sum-exp, so memory stays O(M + chunk).

    Raises:
        InputError (a ValueError and a TypeError) naming the argument: not a tensor, shape/dtype/device
        mismatch; and on CPU tensors (on CUDA a check would cost a device sync), ids outside [0, V), NaN or
        inf anywhere in weight or bias (it would poison every row's log-sum-exp), NaN or inf in hidden.
        BackendUnavailable: the named backend cannot run here.
    """
    hidden, weight, bias = gather_constant(hidden), gather_constant(weight), gather_constant(bias)
    answer_ids = gather_constant(answer_ids)
    _validate(hidden, weight, answer_ids, bias)
    from distillkit.ops.fused_linear import check_logit_transform

    check_logit_transform(logit_scale, softcap)
    return _answer_logprobs(hidden, weight, answer_ids, bias, backend, float(logit_scale),
                            None if softcap is None else float(softcap))


@torch.no_grad()
def predictive_perplexity(hidden: torch.Tensor, weight: torch.Tensor, answer_ids: torch.Tensor,
                          cu_seqlens: torch.Tensor | Sequence[int], *, bias: torch.Tensor | None = None,
                          backend: str | None = None, logit_scale: float = 1.0,
                          softcap: float | None = None) -> torch.Tensor:
    """CoRD's score per candidate: S_c = exp(mean of log p(answer_ids[m]) over m in segment c).

    Segment c is rows [cu_seqlens[c], cu_seqlens[c+1]) of hidden/answer_ids (all candidates' answer
    positions packed together, as in varlen attention). S is the seed paper's definition: the
    geometric-mean answer probability in (0, 1], higher is better (1 / the usual perplexity).

    Args:
        hidden, weight, answer_ids, bias, backend, logit_scale, softcap: as in answer_logprobs.
        cu_seqlens: [C+1] integer tensor (any device), or sequence / array of ints; starts at 0, strictly
            increasing (no empty segment), last entry == M.

    Returns:
        float32 [C] on hidden's device, detached (runs under no_grad).

    Raises:
        InputError naming the argument, as answer_logprobs, plus bad cu_seqlens (not integers: float
        offsets are refused, never truncated; not starting at 0, decreasing, an empty segment, last entry != M).
    """
    _check_tensor("hidden", hidden)
    if hidden.dim() != 2:
        raise InputError(f"hidden: expected shape [M, H], got {tuple(hidden.shape)}")
    cu = _validate_cu_seqlens(cu_seqlens, hidden.shape[0])
    lp = answer_logprobs(hidden, weight, answer_ids, bias=bias, backend=backend, logit_scale=logit_scale,
                         softcap=softcap)
    return segment_mean_exp(lp, cu).to(torch.float32)
