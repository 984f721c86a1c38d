"""Fused-linear skew KL / skew reverse KL: the loss from hidden states and lm_head weights, chunk by chunk.

For each chunk of rows (tokens):
    z_S = h_S W_S^T + b_S,  z_T = h_T W_T^T + b_T                  [c, V], the only [*, V] tensors alive
    D, dz = skew_kl_rows(z_S, z_T, scale)                            loss rows and d(sum scale D)/dz_S, one pass
    grad_h_S[chunk] = dz W_S;  grad_W_S += dz^T h_S;  grad_b_S += sum_rows dz   (float32 accumulators)
all inside the forward, so the backward only multiplies the saved gradients by the incoming scalar (the
approach of Liger's fused-linear cross entropy). [N, V] logits never exist: peak extra memory is a few
chunks of logits plus the float32 weight-gradient accumulator. ``reduction="none"`` cannot fold a per-row
incoming gradient into a saved weight gradient, so there the forward computes the loss only and the
backward recomputes the chunks with scale = grad_output * weight.

The matmuls are torch's (cuBLAS / MKL); ``backend`` picks the backend of the row primitive
:func:`distillkit.ops.skew_kl.skew_kl_rows` (cuda, triton, cpu). ``backend="reference"`` runs the whole
loss eagerly with the float formulas of :mod:`distillkit.reference.fused_linear` (it builds [N, V] logits).

Registered with torch.library (``distillkit::fused_linear_skew``, custom_op + fake + autograd) so a
torch.compile'd training step traces through it as one opaque op.

Padded vocabularies (``vocab_size``): the loss is over the token ids both sides share, [0, vocab_size); the
lm_heads are row-sliced (views) before the op, so padding rows are never read and get a zero gradient.
Logit transforms (``*_logit_scale``, ``*_softcap``) run on each chunk's logits in the loop below, in float32
for half inputs, the student's gradient through them by the chain rule (scale x (1 - tanh^2)).

DTensor arguments (FSDP2 with lm_head in its own ``fully_shard`` group, a sharded teacher, tensor
parallel) are gathered, not computed shard by shard: outside the custom op each DTensor becomes its full
plain tensor (all-gather), and the student weight's gradient goes back to the parameter's own placements,
averaged over its mesh as FSDP2 reduces every other gradient (:mod:`distillkit.ops._dtensor`). Memory cost:
one full [V, H] copy of each gathered lm_head per rank for the duration of the call (bf16 152064 x 3584:
1.1 GB), which is what FSDP2 allocates anyway to run that lm_head's own forward; the float32 [V, H]
gradient accumulator is the op's in any case. Computing on vocabulary shards (local logits, all-reduced max
and sum per row) would save that copy at the price of two collectives per chunk and a custom backward; at
the sizes where the copy matters a rank already holds several [c, V] chunks of the same order.

FLOPs per call (N tokens, hidden H, vocabulary V; H_s = H_t = H): student and teacher logits 2 x 2NHV,
grad_hidden 2NHV, grad_weight 2NHV: 8NHV in all, i.e. 6NHV for the student head (fwd + bwd) and 2NHV for
the teacher head (fwd only). Everything else is O(NV) and bandwidth-bound.
"""
from __future__ import annotations

import math

import torch

from distillkit._backend import FLOAT_DTYPES as _FLOAT_DTYPES
from distillkit._backend import Op
from distillkit._errors import InputError
from distillkit.ops._checks import first_index as _first
from distillkit.ops._checks import first_nonfinite, nonfinite_rows
from distillkit.ops._ddp import check_ddp_forward
from distillkit.ops._dtensor import gather_constant, gather_input, gather_weight, is_dtensor
from distillkit.ops.skew_kl import SKEW_KL, _acc_dtype, _row_scale, check_options, check_token_tensors, skew_kl_rows

__all__ = ["fused_linear_skew_kl", "fused_linear_skew_reverse_kl", "default_chunk_size"]

# logits elements per chunk (each of z_S, z_T, dz): 64 MB fp32 on CPU (~512 rows at V = 32000: three
# such buffers + the [V, H] float32 accumulator stay under 10% of the eager loss's peak, while the
# per-chunk costs, re-reading both weights and the accumulator, stay small next to the GEMMs);
# on GPU 2^27 elements (256 MiB in bf16) keeps the GEMMs large enough that re-reading the two weight
# matrices per chunk stays well under the GEMM time, and the whole op under ~4 GB at V = 128k, H = 4096.
_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}
_GRAD_HIDDEN, _GRAD_WEIGHT, _GRAD_BIAS = 1, 2, 4


def default_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk so that one chunk's [rows, V] logits hold about a fixed number of elements."""
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"])
    rows = max(1, budget // max(vocab, 1))
    if device.type == "cuda" and rows >= 128:
        rows = rows // 128 * 128  # tensor-core friendly GEMM M
    return max(1, min(n_rows, rows))


# ---- the chunked kernel ----------------------------------------------------------------------------

def _linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return hidden @ weight.T
    return torch.addmm(bias.to(hidden.dtype), hidden, weight.T)


_MIXED_ADDMM_OK: dict[str, bool] = {}


def _accumulate_grad_weight(acc: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc [V, H] float32 += dlogits^T [V, c] @ hidden [c, H], accumulating in float32 for half inputs."""
    if dlogits.dtype == acc.dtype:
        acc.addmm_(dlogits.T, hidden)
        return
    dev = acc.device.type
    if _MIXED_ADDMM_OK.get(dev, dev == "cuda"):
        try:  # cuBLAS: half inputs, float32 C accumulated in place (beta = 1), no [V, H] temporary
            torch.addmm(acc, dlogits.T, hidden, out_dtype=torch.float32, out=acc)
            _MIXED_ADDMM_OK[dev] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_ADDMM_OK[dev] = False
    # upcasting the chunk costs two [c, *] float32 copies, not a [V, H] one
    acc.addmm_(dlogits.T.float(), hidden.float())


def _row_divergence(z_s, z_t, scale, alpha, temperature, reverse, detach_mixture, need_grad, backend):
    return skew_kl_rows(z_s, z_t, scale, alpha=alpha, temperature=temperature, reverse=reverse,
                        detach_mixture=detach_mixture, need_grad=need_grad, backend=backend)


def _transform(z: torch.Tensor, logit_scale: float, softcap: float, acc_dtype: torch.dtype, need_slope: bool):
    """The model's own logits from z = h W^T + b [c, V]: z * logit_scale, then softcap * tanh(z / softcap)
    (softcap 0: none). Returns (logits, d logits / dz [c, V] or None). Identity: z itself, slope None.
    Half inputs are transformed in acc_dtype (float32): tanh's slope 1 - t^2 loses everything near the cap
    in bfloat16."""
    if logit_scale == 1.0 and softcap == 0.0:
        return z, None
    if z.dtype != acc_dtype:
        z = z.to(acc_dtype)
    if softcap == 0.0:
        return z * logit_scale, None
    t = torch.tanh(z * (logit_scale / softcap))
    slope = None
    if need_slope:  # d/dz softcap tanh(s z / softcap) = s (1 - t^2)
        slope = torch.addcmul(torch.ones((), dtype=t.dtype, device=t.device), t, t, value=-1.0).mul_(logit_scale)
    return t.mul_(softcap), slope


def _chunked(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, scale,
             alpha, temperature, reverse, detach_mixture, chunk_size, backend, grad_flags, student_logit_scale=1.0,
             student_softcap=0.0, teacher_logit_scale=1.0, teacher_softcap=0.0):
    n = student_hidden.shape[0]
    vocab, dev = student_weight.shape[0], student_hidden.device
    acc_dtype = scale.dtype  # float32, float64 for float64 inputs
    need_grad = grad_flags != 0
    loss_rows = torch.empty(n, dtype=acc_dtype, device=dev)
    grad_hidden = torch.empty_like(student_hidden) if grad_flags & _GRAD_HIDDEN else None
    grad_weight = (torch.zeros(student_weight.shape, dtype=acc_dtype, device=dev)
                   if grad_flags & _GRAD_WEIGHT else None)
    grad_bias = torch.zeros(vocab, dtype=acc_dtype, device=dev) if grad_flags & _GRAD_BIAS else None
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        h_s = student_hidden[start:stop]
        z_s, slope = _transform(_linear(h_s, student_weight, student_bias), student_logit_scale, student_softcap,
                                acc_dtype, need_grad)
        z_t, _ = _transform(_linear(teacher_hidden[start:stop], teacher_weight, teacher_bias), teacher_logit_scale,
                            teacher_softcap, acc_dtype, False)
        if z_t.dtype != z_s.dtype:
            z_t = z_t.to(z_s.dtype)
        d, dz = _row_divergence(z_s, z_t, scale[start:stop], alpha, temperature, reverse, detach_mixture,
                                need_grad, backend)
        del z_s, z_t  # the logits of this chunk are dead before the gradient GEMMs allocate
        loss_rows[start:stop] = d
        if not need_grad:
            continue
        if slope is not None:  # chain rule through the softcap: d/dz = d/dlogits * scale (1 - tanh^2)
            dz = dz.mul_(slope)
            del slope
        elif student_logit_scale != 1.0:
            dz = dz.mul_(student_logit_scale)
        if dz.dtype != student_hidden.dtype:
            dz = dz.to(student_hidden.dtype)
        if grad_hidden is not None:
            torch.mm(dz, student_weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            # a skipped row's dz is 0, but 0 * (NaN or inf in its hidden state) would still be NaN
            kept = (scale[start:stop] != 0).unsqueeze(1)
            _accumulate_grad_weight(grad_weight, dz, torch.where(kept, h_s, torch.zeros_like(h_s)))
        if grad_bias is not None:
            grad_bias += dz.sum(0, dtype=acc_dtype)
        del dz
    # unrequested gradients are distinct empty tensors (custom-op outputs may not alias each other)
    grad_hidden = student_hidden.new_empty((0,)) if grad_hidden is None else grad_hidden
    grad_weight = student_hidden.new_empty((0,)) if grad_weight is None else grad_weight.to(student_weight.dtype)
    grad_bias = student_hidden.new_empty((0,)) if grad_bias is None else grad_bias.to(student_bias.dtype)
    return loss_rows, grad_hidden, grad_weight, grad_bias


def _scaled_loss(loss_rows: torch.Tensor, scale: torch.Tensor, reduce: bool) -> torch.Tensor:
    # rows with scale 0 (ignored, or weight 0) may hold anything, even inf logits: they give exactly 0
    per_row = torch.where(scale != 0, loss_rows * scale, torch.zeros_like(loss_rows))
    return per_row.sum() if reduce else per_row


# ---- registered op ---------------------------------------------------------------------------------

@torch.library.custom_op("distillkit::fused_linear_skew", mutates_args=())
def fused_linear_skew_op(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                         student_bias: torch.Tensor | None, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None, scale: torch.Tensor,
                         alpha: float, temperature: float, reverse: bool, detach_mixture: bool, chunk_size: int,
                         backend: str, reduce: bool, grad_flags: int, transforms: list[float]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked fused-linear skew (reverse) KL.

    student_hidden [N, H_s], student_weight [V, H_s], student_bias [V] or None, teacher_* likewise with H_t,
    scale [N] float32 (float64 for float64 inputs; weight x kept / denominator). reduce=True:
    loss = sum_t scale_t D_t (scalar) and, per grad_flags (1 hidden, 2 weight, 4 bias), its gradients; reduce=False: loss = scale_t D_t [N], no
    gradients. transforms = [student logit scale, student softcap, teacher logit scale, teacher softcap]
    (softcap 0: none), applied to each chunk's logits before the temperature. Returns (loss, D_t [N] float32,
    grad_hidden, grad_weight, grad_bias); unrequested gradients are empty tensors.
    """
    flags = grad_flags if reduce else 0
    loss_rows, g_h, g_w, g_b = _chunked(student_hidden, student_weight, student_bias, teacher_hidden,
                                        teacher_weight, teacher_bias, scale, alpha, temperature, reverse,
                                        detach_mixture, chunk_size, backend, flags, *transforms)
    # NaN in D marks a row whose logits are undefined (e.g. a half-precision GEMM that overflowed); free to read
    check_values(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, None,
                 scale, 0, rows=loss_rows)
    return _scaled_loss(loss_rows, scale, reduce), loss_rows, g_h, g_w, g_b


@fused_linear_skew_op.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, scale, alpha,
      temperature, reverse, detach_mixture, chunk_size, backend, reduce, grad_flags, transforms):
    n = student_hidden.shape[0]
    flags = grad_flags if reduce else 0
    loss = scale.new_empty(()) if reduce else scale.new_empty((n,))
    return (loss, scale.new_empty((n,)),
            torch.empty_like(student_hidden) if flags & _GRAD_HIDDEN else student_hidden.new_empty((0,)),
            torch.empty_like(student_weight) if flags & _GRAD_WEIGHT else student_hidden.new_empty((0,)),
            torch.empty_like(student_bias) if flags & _GRAD_BIAS and student_bias is not None
            else student_hidden.new_empty((0,)))


@torch.library.custom_op("distillkit::fused_linear_checked_weights", mutates_args=())
def _checked_weights_op(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                        student_bias: torch.Tensor | None, teacher_hidden: torch.Tensor,
                        teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
                        labels: torch.Tensor | None, weights: torch.Tensor | None,
                        ignore_index: int) -> torch.Tensor:
    """The value check every backend goes through (:func:`check_values`); returns a copy of weights [N] (ones
    when None) that the op then uses, so that a compiled graph keeps the check: a custom op's body runs
    eagerly there too."""
    check_values(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                 weights, ignore_index)
    if weights is None:
        dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
        return torch.ones(student_hidden.shape[0], dtype=dtype, device=student_hidden.device)
    return weights.clone()


@_checked_weights_op.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, weights,
      ignore_index):
    if weights is None:
        dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
        return student_hidden.new_empty((student_hidden.shape[0],), dtype=dtype)
    return torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, scale, alpha,
     temperature, reverse, detach_mixture, chunk_size, backend, reduce, grad_flags, transforms) = inputs
    ctx.reduce = reduce
    ctx.grad_flags = grad_flags
    ctx.has_student_bias = student_bias is not None
    if reduce:  # gradients were computed in the forward: keep them, not the inputs
        ctx.save_for_backward(output[2], output[3], output[4])
    else:  # "none": recompute with the incoming per-row gradient folded into the scale
        ctx.options = (alpha, temperature, reverse, detach_mixture, chunk_size, backend, transforms)
        ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              teacher_bias, scale)


def _scale_saved(saved: torch.Tensor, grad: torch.Tensor, needed: bool) -> torch.Tensor | None:
    if not needed:
        return None
    # a 0-dim factor keeps the saved gradient's dtype; the product is formed in float32 and rounded once
    return torch.mul(saved, grad)


def _backward(ctx, grad_loss, _grad_rows, _g1, _g2, _g3):
    flags = ctx.grad_flags
    if ctx.reduce:
        g_h, g_w, g_b = ctx.saved_tensors
    else:
        sh, sw, sb, th, tw, tb, scale = ctx.saved_tensors
        alpha, temperature, reverse, detach_mixture, chunk_size, backend, transforms = ctx.options
        _, _, g_h, g_w, g_b = fused_linear_skew_op(sh, sw, sb, th, tw, tb, scale * grad_loss.to(scale.dtype),
                                                   alpha, temperature, reverse, detach_mixture, chunk_size,
                                                   backend, True, flags, transforms)
        grad_loss = torch.ones((), dtype=scale.dtype, device=scale.device)
    return (_scale_saved(g_h, grad_loss, bool(flags & _GRAD_HIDDEN)),
            _scale_saved(g_w, grad_loss, bool(flags & _GRAD_WEIGHT)),
            _scale_saved(g_b, grad_loss, bool(flags & _GRAD_BIAS) and ctx.has_student_bias),
            None, None, None, None, None, None, None, None, None, None, None, None, None)


fused_linear_skew_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ------------------------------------------------------------------------------------

def _check_tensor(name, x, dims):
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise InputError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() not in dims:
        raise InputError(f"{name} must have {' or '.join(str(d) for d in dims)} dimensions, got {tuple(x.shape)}")


def _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, weights, student_bias,
              teacher_bias, alpha, temperature, ignore_index, reduction, chunk_size, vocab_size=None,
              transforms=(1.0, None, 1.0, None)):
    _check_tensor("student_hidden", student_hidden, (2, 3))
    _check_tensor("teacher_hidden", teacher_hidden, (2, 3))
    _check_tensor("student_weight", student_weight, (2,))
    _check_tensor("teacher_weight", teacher_weight, (2,))
    for h_name, h, w_name, w in (("student_hidden", student_hidden, "student_weight", student_weight),
                                 ("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)):
        if h.dtype != w.dtype:
            raise InputError(f"{w_name} ({w.dtype}) must have the dtype of {h_name} ({h.dtype})")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise InputError(f"teacher_hidden {tuple(teacher_hidden.shape)} must have the tokens of student_hidden "
                         f"{tuple(student_hidden.shape)} (same leading shape)")
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise InputError(f"student_weight {tuple(student_weight.shape)} must be [V, H_s] with H_s = "
                         f"student_hidden.shape[-1] = {student_hidden.shape[-1]}")
    if teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise InputError(f"teacher_weight {tuple(teacher_weight.shape)} must be [V, H_t] with H_t = "
                         f"teacher_hidden.shape[-1] = {teacher_hidden.shape[-1]}")
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    check_vocab_size(vocab_size, v_s, v_t, "student_weight", "teacher_weight")
    if min(v_s, v_t) < 1:
        raise InputError("student_weight and teacher_weight must have V >= 1 rows")
    for name, b, v in (("student_bias", student_bias, v_s), ("teacher_bias", teacher_bias, v_t)):
        if b is not None:
            _check_tensor(name, b, (1,))
            if b.shape[0] != v:
                raise InputError(f"{name} must be [V={v}] (the rows of its lm_head weight), got {tuple(b.shape)}")
    tensors = [("student_weight", student_weight), ("teacher_hidden", teacher_hidden),
               ("teacher_weight", teacher_weight), ("student_bias", student_bias), ("teacher_bias", teacher_bias)]
    check_token_tensors(labels, weights, lead, "the tokens' shape")
    for name, x in (*tensors, ("labels", labels), ("weights", weights)):
        if x is not None and x.device != student_hidden.device:
            raise InputError(f"{name} is on {x.device}, student_hidden on {student_hidden.device}")
    check_options(alpha, temperature, ignore_index, reduction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    for side, (scale, cap) in (("student", transforms[:2]), ("teacher", transforms[2:])):
        check_logit_transform(scale, cap, f"{side}_logit_scale", f"{side}_softcap")


def check_vocab_size(vocab_size, v_student: int, v_teacher: int, student_name: str, teacher_name: str) -> None:
    """vocab_size (None or an int) against the two sides' vocabulary sizes (lm_head rows or logits columns):
    None needs equal sizes; an int must be in [1, min(v_student, v_teacher)]. InputError otherwise."""
    if vocab_size is None:
        if v_student != v_teacher:
            raise InputError(
                f"vocabulary mismatch: {student_name} has V={v_student}, {teacher_name} has V={v_teacher}. "
                f"Vocabularies that differ only by padding rows (one tokenizer, lm_heads padded to different "
                f"multiples) need vocab_size=len(tokenizer): the loss is then over token ids [0, vocab_size)")
        return
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise InputError(f"vocab_size must be a positive int (the number of real token ids) or None, got "
                         f"{vocab_size!r}")
    if vocab_size > min(v_student, v_teacher):
        raise InputError(f"vocabulary mismatch: vocab_size={vocab_size} exceeds {student_name}'s V={v_student} or "
                         f"{teacher_name}'s V={v_teacher}; both sides must hold every real token id (a vocabulary "
                         f"that is smaller than the tokenizer is a different vocabulary, not padding)")


def check_logit_transform(logit_scale, softcap, scale_name: str = "logit_scale", cap_name: str = "softcap") -> None:
    """logit_scale a finite number > 0; softcap None or a finite number > 0. InputError otherwise."""
    if (isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale)
            or logit_scale <= 0):
        raise InputError(f"{scale_name} must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise InputError(f"{cap_name} must be None or a finite number > 0, got {softcap!r}")


def check_values(student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
                 teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
                 labels: torch.Tensor | None, weights: torch.Tensor | None, ignore_index: int, rows=None) -> None:
    """The value check of every fused-linear backend. Hidden states [N, H], lm_head weights [V, H], biases [V]
    or None, labels and weights [N] or None.

    rows=None (before the op, every backend): weights free of NaN; both lm_head weights finite; each bias free
    of NaN and +inf and not all -inf (a -inf entry masks a vocabulary entry); both hidden states finite at the
    rows that count (label kept, weight not 0; the other rows may hold anything). Each is one vectorised
    reduction, O(N H + V H) reads next to the O(N H V) GEMMs.
    rows=D [N] float: the fused backends' per-row divergence, where NaN marks a row whose logits are undefined
    all the same (weights is then the row scale: its zeros are the rows that count for nothing).

    Raises InputError naming the argument. CPU tensors only: on CUDA each check would cost a device sync.
    Called from the custom ops' bodies, so it runs under torch.compile too.
    """
    if student_hidden.device.type != "cpu":
        return
    if rows is not None:
        bad = torch.isnan(rows) & (weights != 0)
        if bool(bad.any()):
            raise InputError(f"row {_first(bad)} (flattened) of the student or teacher logits holds NaN or +inf, or "
                             "is all -inf: check student_hidden/teacher_hidden and the lm_head weights")
        return
    counts = torch.ones(student_hidden.shape[0], dtype=torch.bool, device=student_hidden.device)
    if weights is not None:
        if bool(torch.isnan(weights).any()):
            raise InputError(f"weights[{_first(torch.isnan(weights))}] (flattened) is NaN")
        counts &= weights != 0
    if labels is not None:
        counts &= labels != ignore_index
    for name, w in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        where = first_nonfinite(w)
        if where is not None:
            raise InputError(f"{name}[{where}] is {float(w[~torch.isfinite(w)][0])}: the lm_head weight must be "
                             "finite (one non-finite entry makes every row's logits NaN or inf)")
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None and not bool(torch.isfinite(b.amax())):  # the max is NaN, +inf, or -inf if all are
            raise InputError(f"{name} holds NaN or +inf, or is all -inf: no row of logits would be defined")
    for name, h in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if h.shape[0] and h.shape[-1]:
            bad = nonfinite_rows(h) & counts
            if bool(bad.any()):
                raise InputError(f"{name} row {_first(bad)} (flattened) holds NaN or inf, and that token counts "
                                 "(its label is kept and its weight is not 0)")


# the same kernels as the logits-level op: the fused backends run its row launcher chunk by chunk
FUSED_LINEAR = Op("fused_linear_skew_kl", SKEW_KL.backends.values())


@torch.compiler.assume_constant_result
def _select_backend(op: str, device: str, backend: str | None) -> str:
    # evaluated eagerly under torch.compile (it reads thread counts and the environment)
    return FUSED_LINEAR.select(torch.device(device), backend=backend, label=op).name


def _as_hidden_dtype(param, hidden):
    """A DTensor lm_head weight or bias in hidden's floating dtype (a differentiable cast of its local shards);
    anything else unchanged (a plain tensor of another dtype is an input error, reported as such)."""
    if (is_dtensor(param) and isinstance(hidden, torch.Tensor) and param.is_floating_point()
            and hidden.is_floating_point() and param.dtype != hidden.dtype):
        return param.to(hidden.dtype)
    return param


def _fused_linear_skew(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, weights,
                       student_bias, teacher_bias, alpha, temperature, ignore_index, reduction, chunk_size,
                       backend, reverse, detach_mixture, vocab_size=None, transforms=(1.0, None, 1.0, None)):
    check_ddp_forward(student_weight)  # hidden states that bypassed DDP's forward would never sync
    # DTensor arguments (FSDP2, tensor parallel) become plain full tensors here, outside the custom op; a
    # sharded lm_head kept in float32 under FSDP2's mixed precision is cast to its hidden states' dtype first,
    # shard by shard, as FSDP2 itself all-gathers parameters in param_dtype for a forward
    student_weight, student_bias = _as_hidden_dtype(student_weight, student_hidden), _as_hidden_dtype(
        student_bias, student_hidden)
    teacher_weight, teacher_bias = _as_hidden_dtype(teacher_weight, teacher_hidden), _as_hidden_dtype(
        teacher_bias, teacher_hidden)
    student_hidden, teacher_hidden = gather_input(student_hidden), gather_constant(teacher_hidden)
    student_weight, student_bias = gather_weight(student_weight), gather_weight(student_bias)
    teacher_weight, teacher_bias = gather_constant(teacher_weight), gather_constant(teacher_bias)
    labels, weights = gather_constant(labels), gather_constant(weights)
    dev_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(dev_type):
        # Autocast does not reach inside a custom op: apply it here as nn.Linear would (GEMMs in the autocast
        # dtype; gradients flow back through the casts into the parameters' own dtype), then run without it.
        dt = torch.get_autocast_dtype(dev_type)

        def cast(x):
            return x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        with torch.autocast(dev_type, enabled=False):
            return _fused_linear_skew(cast(student_hidden), cast(student_weight), cast(teacher_hidden),
                                      cast(teacher_weight), labels, weights, cast(student_bias), cast(teacher_bias),
                                      alpha, temperature, ignore_index, reduction, chunk_size, backend, reverse,
                                      detach_mixture, vocab_size, transforms)
    _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, weights, student_bias,
              teacher_bias, alpha, temperature, ignore_index, reduction, chunk_size, vocab_size, transforms)
    if vocab_size is not None:
        # padding rows are not tokens: a row slice (a view, still row-major); its backward leaves them 0
        student_weight, teacher_weight = student_weight[:vocab_size], teacher_weight[:vocab_size]
        student_bias = None if student_bias is None else student_bias[:vocab_size]
        teacher_bias = None if teacher_bias is None else teacher_bias[:vocab_size]
    op = "fused_linear_skew_reverse_kl" if reverse else "fused_linear_skew_kl"
    name = _select_backend(op, str(student_hidden.device), backend)
    lead = student_hidden.shape[:-1]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n = h_s.shape[0]
    checked = _checked_weights_op(h_s.detach(), student_weight.detach(),
                                  None if student_bias is None else student_bias.detach(), h_t,
                                  teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
                                  None if labels is None else labels.reshape(-1),
                                  None if weights is None else weights.detach().reshape(-1), int(ignore_index))
    s_scale, s_cap, t_scale, t_cap = transforms
    if name == "reference":
        from distillkit.reference import fused_linear as ref

        return ref.fused_linear_skew(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                     checked.reshape(lead), student_bias=student_bias, teacher_bias=teacher_bias,
                                     alpha=alpha, temperature=temperature, ignore_index=ignore_index,
                                     reduction=reduction, reverse=reverse, detach_mixture=detach_mixture,
                                     student_logit_scale=s_scale, student_softcap=s_cap,
                                     teacher_logit_scale=t_scale, teacher_softcap=t_cap)
    scale = _row_scale(labels, checked, ignore_index, reduction, n, h_s.device, _acc_dtype(h_s.dtype))
    # the teacher is a constant: its tensors never carry autograd history into the op
    t_w = teacher_weight.detach()
    t_b = None if teacher_bias is None else teacher_bias.detach()
    # the GEMMs want row-major operands; a hidden slice or a transposed weight would be copied per chunk
    s_w = student_weight if student_weight.is_contiguous() else student_weight.contiguous()
    h_s = h_s if h_s.is_contiguous() else h_s.contiguous()
    grad_flags = 0
    if torch.is_grad_enabled():
        grad_flags = ((_GRAD_HIDDEN if student_hidden.requires_grad else 0)
                      | (_GRAD_WEIGHT if student_weight.requires_grad else 0)
                      | (_GRAD_BIAS if student_bias is not None and student_bias.requires_grad else 0))
    rows = chunk_size if chunk_size is not None else default_chunk_size(n, student_weight.shape[0], h_s.device)
    op_transforms = [float(s_scale), float(s_cap or 0.0), float(t_scale), float(t_cap or 0.0)]
    loss, loss_rows, _, _, _ = fused_linear_skew_op(
        h_s, s_w, student_bias, h_t.contiguous(), t_w.contiguous(), t_b, scale, float(alpha),
        float(temperature), bool(reverse), bool(detach_mixture), int(max(1, min(rows, max(n, 1)))), name,
        reduction != "none", grad_flags, op_transforms)
    return loss.reshape(lead) if reduction == "none" else loss


def fused_linear_skew_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, labels: torch.Tensor | None = None,
                         weights: torch.Tensor | None = None, *, student_bias: torch.Tensor | None = None,
                         teacher_bias: torch.Tensor | None = None, alpha: float = 0.1, temperature: float = 1.0,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
                         backend: str | None = None, vocab_size: int | None = None,
                         student_logit_scale: float = 1.0, student_softcap: float | None = None,
                         teacher_logit_scale: float = 1.0, teacher_softcap: float | None = None) -> torch.Tensor:
    """Skew KL(p || alpha p + (1 - alpha) q) from hidden states, never materialising [N, V] logits.

    p = softmax(f_T(teacher_hidden @ teacher_weight.T + teacher_bias) / temperature), q likewise for the student,
    f the side's logit transform (identity by default).

    Args:
        student_hidden: [N, H_s] or [B, T, H_s], float16/bfloat16/float32/float64; receives a gradient.
        student_weight: [V_s, H_s], the student's lm_head weight; receives a gradient (float32-accumulated).
        teacher_hidden: [N, H_t] or [B, T, H_t]; teacher_weight: [V_t, H_t]. Constants (no gradient).
        labels: [N] / [B, T] integer or None; tokens whose label is ``ignore_index`` contribute nothing.
        weights: [N] / [B, T] floating or None: per-token constants w_t (e.g. validity weights), loss_t = w_t D_t.
        student_bias, teacher_bias: [V_s], [V_t] or None.
        alpha: skew in [0, 1]; temperature > 0 divides both logits.
        reduction: "mean" (sum over kept tokens / number of kept tokens, 0 if none), "sum", "none" ([N]/[B, T]).
        chunk_size: rows per chunk; None sizes chunks so a chunk's logits stay bounded (see default_chunk_size).
        backend: backend of the row primitive ("cuda", "triton", "cpu"), or "reference" for the eager formula;
            None picks automatically (cuda > triton on CUDA tensors, cpu on CPU tensors).
        vocab_size: the number of real token ids, shared by both sides, when the two lm_heads differ only by
            padding rows (Qwen2.5 pads 151665 ids to 151936 or 152064 rows): the loss is over ids
            [0, vocab_size) on both sides, the rows past it are not tokens (their gradient is 0). None: both
            lm_heads must have the same rows. Sizes that differ without it, or a vocab_size larger than either
            side, raise InputError naming both sizes.
        student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap: each side's logits are its
            model's own, z * logit_scale then softcap * tanh(z / softcap) when softcap is set (Gemma-2/3's
            final_logit_softcapping, Cohere's logit_scale, 1 / Granite's logits_scaling; see
            :func:`distillkit.losses.logit_transform_from_config`), before the temperature divides them.
        DTensor weights, biases and hidden states (FSDP2, in any wrapping, or tensor parallel) are gathered
            whole on each rank before the op; the weight's gradient comes back as a DTensor with the
            parameter's placements, averaged over its mesh as FSDP2 averages every other gradient
            (:mod:`distillkit.ops._dtensor`, which gives the memory cost).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or the tokens' shape for reduction="none".
        Gradients for student_hidden, student_weight and student_bias come in their own dtypes. No tokens
        ([0, H] or [B, 0, H]): loss 0 and zero gradients.

    Raises:
        InputError naming the argument, the same on every backend: shapes, dtypes, devices, options; and on CPU
        tensors (:func:`check_values`; on CUDA a check would cost a device sync) NaN weights, a NaN or inf entry
        in either lm_head weight, a bias holding NaN or +inf or all -inf, NaN or inf hidden states at a token
        that counts (tokens that count for nothing may hold anything), or a row whose logits come out undefined.
        The value checks run inside custom ops, so they run under torch.compile too.
    """
    return _fused_linear_skew(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, weights,
                              student_bias, teacher_bias, alpha, temperature, ignore_index, reduction, chunk_size,
                              backend, reverse=False, detach_mixture=False, vocab_size=vocab_size,
                              transforms=(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap))


def fused_linear_skew_reverse_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                 teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                                 labels: torch.Tensor | None = None, weights: torch.Tensor | None = None, *,
                                 student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                                 alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                                 reduction: str = "mean", chunk_size: int | None = None,
                                 backend: str | None = None, detach_mixture: bool = False,
                                 vocab_size: int | None = None, student_logit_scale: float = 1.0,
                                 student_softcap: float | None = None, teacher_logit_scale: float = 1.0,
                                 teacher_softcap: float | None = None) -> torch.Tensor:
    """Skew reverse KL(q || (1 - alpha) p + alpha q) from hidden states, chunked like
    :func:`fused_linear_skew_kl` (same arguments, vocab_size and logit transforms included). detach_mixture=True
    stops the gradient through the mixture (DistiLLM-2's variant)."""
    return _fused_linear_skew(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, weights,
                              student_bias, teacher_bias, alpha, temperature, ignore_index, reduction, chunk_size,
                              backend, reverse=True, detach_mixture=detach_mixture, vocab_size=vocab_size,
                              transforms=(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap))

