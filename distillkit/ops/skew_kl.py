"""Fused skew KL / skew reverse KL on logits (DistiLLM), with backend dispatch.

One kernel launch computes every token row's divergence D_i and, when asked, d(sum_i scale_i D_i)/dlogits
in the same sweep, with the row scale (token weight x kept / kept count, x the incoming gradient in the
backward) folded in; no [N, V] probability, log-probability or mixture tensor ever exists.
:func:`skew_kl_rows` is that primitive without autograd, for callers that chunk the tokens themselves
(distillkit.ops.fused_linear). The formulas, and the eager
version every backend is tested against, are in :mod:`distillkit.reference.skew_kl`.

Both fused ops are registered with torch.library (custom_op + fake, and autograd for the loss), so a
torch.compile'd training step traces through them.

Backends: cuda (distillkit._C), triton (kernels/skew_kl.py), cpu (distillkit._C), reference (eager).
The fused backends treat the teacher as a constant (it comes from a frozen model); a teacher that
requires grad is refused with a pointer to ``backend="reference"``.
"""
from __future__ import annotations

import math

import torch

from distillkit._backend import FLOAT_DTYPES as _FLOAT_DTYPES
from distillkit._backend import Backend, Op, extension
from distillkit._errors import InputError
from distillkit.ops._dtensor import gather_constant, gather_input
from distillkit.reference import skew_kl as _reference

# ---- launchers, one per backend, and the op's declaration --------------------------------------------
# student, teacher [N, V] one float dtype, contiguous; scale [N] float32 (float64 for float64 logits)
# -> (D [N] in scale's dtype, d(sum scale D)/dstudent [N, V], or an empty tensor when need_grad is False)

def _rows_cpu(student, teacher, scale, alpha, temperature, reverse, detach_mixture, need_grad):
    return extension().skew_kl_forward_cpu(student, teacher, scale, alpha, 1.0 / temperature, reverse,
                                           detach_mixture, need_grad)


def _rows_cuda(student, teacher, scale, alpha, temperature, reverse, detach_mixture, need_grad):
    return extension().skew_kl_forward_cuda(student, teacher, scale, alpha, 1.0 / temperature, reverse,
                                            detach_mixture, need_grad)


def _rows_triton(student, teacher, scale, alpha, temperature, reverse, detach_mixture, need_grad):
    from distillkit.kernels.skew_kl import skew_kl_forward  # triton loads on first use only

    return skew_kl_forward(student, teacher, scale, alpha, 1.0 / temperature, reverse, detach_mixture, need_grad)


def _reference_rows(student, teacher, scale, alpha, temperature, reverse, detach_mixture, need_grad):
    """The row primitive by the eager formulas (float32 for half inputs), its gradient by autograd (so it
    runs here, not inside the custom op, where autograd does not record)."""
    with torch.enable_grad():
        s = student.detach().requires_grad_(need_grad)
        d = _reference._per_token(s, teacher.detach(), alpha, temperature, True, reverse, detach_mixture)
        d = d.to(scale.dtype)
        kept = scale != 0
        d = torch.where(kept, d, torch.zeros_like(d))
        if not need_grad:
            return d.detach(), None
        (dz,) = torch.autograd.grad((d * scale).sum(), s)
    return d.detach(), torch.where(kept.unsqueeze(-1), dz, torch.zeros_like(dz))


SKEW_KL = Op("skew_kl", [Backend("cuda", _rows_cuda), Backend("triton", _rows_triton), Backend("cpu", _rows_cpu),
                         Backend("reference", _reference_rows)])


def _fused_rows(student, teacher, scale, alpha, temperature, reverse, detach_mixture, need_grad, backend):
    return SKEW_KL.backends[backend].run(student, teacher, scale, alpha, float(temperature), reverse,
                                         detach_mixture, need_grad)


def skew_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, scale: torch.Tensor, *,
                 alpha: float = 0.1, temperature: float = 1.0, reverse: bool = False,
                 detach_mixture: bool = False, need_grad: bool = True,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row skew (reverse) KL D_i and the gradient of sum_i scale_i D_i, in one fused pass. No autograd.

    student_logits, teacher_logits: [N, V] of one float dtype, on one device. scale: [N] float32 (float64
    for float64 logits); rows with scale 0 are skipped (D 0, gradient 0, whatever their logits hold).
    detach_mixture: skew reverse KL only. Returns (D [N] in scale's dtype, d(sum scale D)/dstudent [N, V]
    in the logits' dtype, or None when need_grad is False). This is the primitive of the chunked
    fused-linear losses; :func:`skew_kl` wraps it with autograd.
    """
    if detach_mixture and not reverse:
        raise InputError("detach_mixture applies to the skew reverse KL only (reverse=True)")
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise InputError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must both be [N, V]")
    acc_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    if scale.shape != student_logits.shape[:1] or scale.dtype != acc_dtype or scale.device != student_logits.device:
        raise InputError(f"scale must be [N={student_logits.shape[0]}] {acc_dtype} on {student_logits.device}, got "
                         f"{tuple(scale.shape)} {scale.dtype} on {scale.device}")
    name = _pick_backend("skew_kl_rows", student_logits.device, backend)
    student = student_logits.contiguous()
    teacher = teacher_logits.to(student.dtype).contiguous()
    if name == "reference":
        return _reference_rows(student, teacher, scale, alpha, temperature, reverse, detach_mixture, need_grad)
    d, dz = _skew_kl_rows_op(student, teacher, scale.contiguous(), float(alpha), float(temperature), bool(reverse),
                             bool(detach_mixture), bool(need_grad), name)
    return d, (dz if need_grad else None)


@torch.library.custom_op("distillkit::skew_kl_rows", mutates_args=())
def _skew_kl_rows_op(student: torch.Tensor, teacher: torch.Tensor, scale: torch.Tensor, alpha: float,
                     temperature: float, reverse: bool, detach_mixture: bool, need_grad: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_rows(student, teacher, scale, alpha, temperature, reverse, detach_mixture, need_grad, backend)


@_skew_kl_rows_op.register_fake
def _(student, teacher, scale, alpha, temperature, reverse, detach_mixture, need_grad, backend):
    grad = torch.empty_like(student) if need_grad else student.new_empty((0,))
    return scale.new_empty((student.shape[0],)), grad


# ---- the differentiable loss -----------------------------------------------------------------------
# The forward computes the loss only; the backward runs the row kernel again with the incoming gradient
# folded into the row scale, writing the final gradient in one pass. Against computing dz in the forward
# (Liger's way) this moves the same bytes on a GPU (2 logits reads in the forward + 2 reads and a write
# in the backward, versus 2 reads and a write + a read and a write of dz), keeps no [N, V] tensor alive
# between forward and backward, allocates one [N, V] buffer instead of two (page faults dominate a
# fresh CPU buffer), and leaves nothing to mutate, so retained graphs and gradcheck work.

@torch.library.custom_op("distillkit::skew_kl_loss", mutates_args=())
def _skew_kl_loss_op(student: torch.Tensor, teacher: torch.Tensor, scale: torch.Tensor, alpha: float,
                     temperature: float, reverse: bool, detach_mixture: bool, reduce: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss: sum_i scale_i D_i if reduce else scale_i D_i [N]; D [N])."""
    d, _ = _fused_rows(student, teacher, scale, alpha, temperature, reverse, detach_mixture, False, backend)
    check_values(student, teacher, None, scale, 0, rows=d)  # NaN in D marks an undefined row; free to read
    per_row = d * scale  # skipped rows hold D = 0
    return (per_row.sum() if reduce else per_row), d


@_skew_kl_loss_op.register_fake
def _(student, teacher, scale, alpha, temperature, reverse, detach_mixture, reduce, backend):
    n = student.shape[0]
    return (scale.new_empty(()) if reduce else scale.new_empty((n,))), scale.new_empty((n,))


@torch.library.custom_op("distillkit::skew_kl_checked_weights", mutates_args=())
def _checked_weights_op(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                        weights: torch.Tensor | None, ignore_index: int, check_rows: bool) -> torch.Tensor:
    """The value check every backend goes through (check_rows: the logits rows too, for the reference backend;
    the fused ones read them off their per-row loss). Returns a copy of weights [N] (ones when None), which
    the op then uses, so that a compiled graph keeps the check: a custom op's body runs eagerly there too."""
    check_values(student, teacher, labels, weights, ignore_index)
    if check_rows:
        check_values(student, teacher, labels, weights, ignore_index, rows="logits")
    if weights is None:
        return torch.ones(student.shape[0], dtype=_acc_dtype(student.dtype), device=student.device)
    return weights.clone()


@_checked_weights_op.register_fake
def _(student, teacher, labels, weights, ignore_index, check_rows):
    if weights is None:
        return student.new_empty((student.shape[0],), dtype=_acc_dtype(student.dtype))
    return torch.empty_like(weights)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every op: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _setup_context(ctx, inputs, output):
    student, teacher, scale, alpha, temperature, reverse, detach_mixture, reduce, backend = inputs
    ctx.save_for_backward(student, teacher, scale)
    ctx.options = (alpha, temperature, reverse, detach_mixture, backend)


def _backward(ctx, grad_loss, _grad_rows):
    student, teacher, scale = ctx.saved_tensors
    alpha, temperature, reverse, detach_mixture, backend = ctx.options
    _, grad_student = _skew_kl_rows_op(student, teacher, scale * grad_loss.to(scale.dtype), alpha, temperature,
                                       reverse, detach_mixture, True, backend)
    return grad_student, None, None, None, None, None, None, None, None


_skew_kl_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ------------------------------------------------------------------------------------

@torch.compiler.assume_constant_result
def _pick_backend(op: str, device: torch.device, backend: str | None) -> str:
    # evaluated once while torch.compile traces (it reads the environment and the extension's state)
    return SKEW_KL.select(device, backend=backend, label=op).name


def _validate(student_logits, teacher_logits, labels, weights, alpha, temperature, ignore_index, reduction,
              vocab_size=None):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise InputError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise InputError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    from distillkit.ops.fused_linear import check_vocab_size

    check_vocab_size(vocab_size, student_logits.shape[-1], teacher_logits.shape[-1], "student_logits",
                     "teacher_logits")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or (
            vocab_size is None and student_logits.shape != teacher_logits.shape):
        raise InputError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
                         f"{tuple(student_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise InputError(f"student_logits is on {student_logits.device}, teacher_logits on {teacher_logits.device}")
    check_token_tensors(labels, weights, student_logits.shape[:-1], "student_logits.shape[:-1]")
    for name, x in (("labels", labels), ("weights", weights)):
        if x is not None and x.device != student_logits.device:
            raise InputError(f"{name} is on {x.device}, student_logits on {student_logits.device}")
    check_options(alpha, temperature, ignore_index, reduction)


def check_token_tensors(labels, weights, lead, lead_name: str) -> None:
    """labels (integer) and weights (floating), each None or of the tokens' shape ``lead``."""
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise InputError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise InputError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != lead:
            raise InputError(f"labels shape {tuple(labels.shape)} must equal {lead_name} = {tuple(lead)}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise InputError(f"weights must be a floating torch.Tensor or None, got "
                             f"{getattr(weights, 'dtype', type(weights).__name__)}")
        if weights.shape != lead:
            raise InputError(f"weights shape {tuple(weights.shape)} must equal {lead_name} = {tuple(lead)}")


def check_options(alpha, temperature, ignore_index, reduction) -> None:
    """The scalar options every skew-KL op takes (logits-level and fused-linear)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature <= 0):
        raise InputError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise InputError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in _reference.REDUCTIONS:
        raise InputError(f"reduction must be one of {_reference.REDUCTIONS}, got {reduction!r}")


def _row_scale(labels, weights, ignore_index, reduction, n, device, dtype):
    """scale_i = weight_i * kept_i (/ the number of kept tokens for "mean"), [N] in dtype, no host sync.
    labels, weights: [...] of N tokens, or None. Shared with distillkit.ops.fused_linear."""
    scale = torch.ones(n, dtype=dtype, device=device) if weights is None else weights.reshape(-1).to(dtype)
    if labels is None:
        count = torch.tensor(n, device=device)
    else:
        kept = labels.reshape(-1) != ignore_index
        scale = torch.where(kept, scale, torch.zeros_like(scale))
        count = kept.sum()
    if reduction == "mean":
        scale = scale / count.clamp(min=1).to(dtype)  # no kept token: loss 0, never NaN
    return scale


def check_values(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                 weights: torch.Tensor | None, ignore_index: int, rows=None) -> None:
    """The value check of every skew-KL backend. student, teacher [N, V]; labels, weights [N] or None.

    rows=None: labels in [0, V) or ignore_index, weights free of NaN (before the kernel).
    rows="logits": the reference backend's row check, one max-reduction over each logits tensor.
    rows=D [N] float: the fused kernels' per-row divergence, where NaN marks the same rows (weights is then the
    row scale: its zeros are the rows that count for nothing).

    A row that counts (label kept, weight not 0) with NaN or +inf, or all -inf, in either logits tensor has no
    defined loss: InputError naming the row; rows that count for nothing may hold anything. CPU tensors only:
    on CUDA each check would cost a device sync. Called from the custom ops' bodies, so it runs under
    torch.compile too.
    """
    if student.device.type != "cpu":
        return
    vocab = student.shape[-1]
    if rows is None:
        if labels is not None:
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise InputError(f"labels[{row}] (flattened) = {int(labels[row])} is neither ignore_index="
                                 f"{ignore_index} nor a token id in [0, {vocab})")
        if weights is not None and bool(torch.isnan(weights).any()):
            row = int(torch.isnan(weights).nonzero()[0, 0])
            raise InputError(f"weights[{row}] (flattened) is NaN")
        return
    if isinstance(rows, str):  # a row's max is NaN if one entry is, +inf if one is, -inf if all are
        bad = ~torch.isfinite(student.amax(-1)) | ~torch.isfinite(teacher.amax(-1))
    else:
        bad = torch.isnan(rows)
    if labels is not None:
        bad &= labels != ignore_index
    if weights is not None:
        bad &= weights != 0
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise InputError(f"student_logits or teacher_logits row {row} (flattened) holds NaN or +inf, or is all -inf")


def _skew_kl(student_logits, teacher_logits, labels, weights, alpha, temperature, ignore_index, reduction, backend,
             reverse, detach_mixture, vocab_size=None):
    # DTensor logits (a vocabulary-parallel lm_head) become plain full tensors, outside the custom ops
    student_logits, teacher_logits = gather_input(student_logits), gather_input(teacher_logits)
    labels, weights = gather_constant(labels), gather_constant(weights)
    _validate(student_logits, teacher_logits, labels, weights, alpha, temperature, ignore_index, reduction,
              vocab_size)
    if vocab_size is not None:  # padding columns are not tokens: the slice's backward leaves them 0
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    op = "skew_reverse_kl" if reverse else "skew_kl"
    name = _pick_backend(op, student_logits.device, backend)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    labels_1d = None if labels is None else labels.reshape(-1)
    weights_1d = None if weights is None else weights.detach().reshape(-1)
    if name == "reference":
        checked = _checked_weights_op(student_logits.detach().reshape(-1, vocab),
                                      teacher_logits.detach().reshape(-1, vocab), labels_1d, weights_1d,
                                      int(ignore_index), True).reshape(lead_shape)
        kw = dict(alpha=alpha, temperature=temperature, ignore_index=ignore_index, reduction=reduction)
        if reverse:
            return _reference.skew_reverse_kl(student_logits, teacher_logits, labels, checked,
                                              detach_mixture=detach_mixture, **kw)
        return _reference.skew_kl(student_logits, teacher_logits, labels, checked, **kw)
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise InputError(f"teacher_logits requires grad, but the fused {op} treats the teacher as a constant: pass "
                         f"teacher_logits.detach(), or backend='reference' to differentiate through the teacher")
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    student = student_logits.to(dtype).reshape(-1, vocab).contiguous()
    teacher = teacher_logits.to(dtype).reshape(-1, vocab).contiguous()
    checked = _checked_weights_op(student.detach(), teacher, labels_1d, weights_1d, int(ignore_index), False)
    scale = _row_scale(labels, checked, ignore_index, reduction, student.shape[0], student.device, _acc_dtype(dtype))
    loss, _ = _skew_kl_loss_op(student, teacher, scale, float(alpha), float(temperature), reverse, detach_mixture,
                               reduction != "none", name)
    return loss if reduction != "none" else loss.reshape(lead_shape)


def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            weights: torch.Tensor | None = None, *, alpha: float = 0.1, temperature: float = 1.0,
            ignore_index: int = -100, reduction: str = "mean", backend: str | None = None,
            vocab_size: int | None = None) -> torch.Tensor:
    """Skew KL divergence KL(p || alpha p + (1 - alpha) q) of DistiLLM, fused over the vocabulary.

    p = softmax(teacher_logits / temperature), q = softmax(student_logits / temperature).

    Args:
        student_logits: [..., V] float16, bfloat16, float32 or float64; receives the gradient.
        teacher_logits: [..., V] float, same shape and device; a constant for the fused backends. A dtype
            different from the student's is promoted (both are cast to the wider one).
        labels: [...] integer, or None: tokens whose label is ``ignore_index`` are excluded. Only the
            mask is used; on CPU other values must be token ids in [0, V).
        weights: [...] floating, or None: per-token weights w_t (loss_t = w_t D_t), constants (no gradient
            reaches them).
        alpha: skew in [0, 1]; 0 gives the forward KL(p || q), 1 gives 0.
        temperature: > 0, divides both logits (the loss is not multiplied by temperature**2).
        reduction: "mean" (sum of w_t D_t over kept tokens / their number; 0 when none is kept), "sum", or
            "none" ([...], 0 at ignored tokens).
        backend: None (automatic: cuda > triton > reference on CUDA tensors, cpu > reference on CPU
            ones), or "cuda", "triton", "cpu", "reference".
        vocab_size: the number of real token ids when the two logits differ only by padding columns: the loss
            is over columns [0, vocab_size) of both (the student's others get gradient 0). None: both must
            have the same V. Different V without it, or vocab_size over either V, raise InputError.
        DTensor logits (a vocabulary-parallel lm_head) are gathered whole on each rank first.

    Returns:
        the loss in float32 (float64 for float64 inputs) on every backend: a scalar, or [...] for
        reduction="none".

    Bad values raise InputError naming the argument, the same on every backend: labels out of range, NaN
    weights, and a row that counts (label kept, weight not 0) with NaN or +inf, or all -inf, in either
    logits tensor. Rows that count for nothing may hold anything: loss and gradient 0 there. No tokens
    ([0, V]): loss 0. The value checks run on CPU tensors only, eagerly and under torch.compile alike (they
    run inside the custom ops); on CUDA they would cost a device sync, so NaN there propagates into the loss.
    """
    return _skew_kl(student_logits, teacher_logits, labels, weights, alpha, temperature, ignore_index, reduction,
                    backend, reverse=False, detach_mixture=False, vocab_size=vocab_size)


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None, *, alpha: float = 0.1, temperature: float = 1.0,
                    ignore_index: int = -100, reduction: str = "mean", detach_mixture: bool = False,
                    backend: str | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Skew reverse KL divergence KL(q || (1 - alpha) p + alpha q) of DistiLLM, fused over the vocabulary.

    Arguments, shapes and dtypes as in :func:`skew_kl` (vocab_size included); alpha = 0 gives the reverse KL(q || p).
    detach_mixture: no gradient through the mixture (1 - alpha) p + alpha q (DistiLLM-2's variant).
    """
    if not isinstance(detach_mixture, bool):
        raise InputError(f"detach_mixture must be a bool, got {type(detach_mixture).__name__}")
    return _skew_kl(student_logits, teacher_logits, labels, weights, alpha, temperature, ignore_index, reduction,
                    backend, reverse=True, detach_mixture=detach_mixture, vocab_size=vocab_size)
