"""One VCRD step: rollouts -> final hidden states -> validity weights -> the fused LV-SKL / LV-SRKL loss."""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from distillkit.methods.vcrd.config import CANDIDATE_TOKENS, NORMALIZATIONS, WEIGHTING_CHOICES, WEIGHTINGS

log = logging.getLogger(__name__)


IGNORE_INDEX = -100


# ---- rollouts --------------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """Teacher- and student-prefix sequences of B prompts, right-padded to one width L.

    input_ids, attention_mask, labels: [2B, L] int64. Rows 0..B-1 hold prompt + teacher rollout,
    rows B..2B-1 prompt + student rollout. labels = input_ids on rollout tokens, IGNORE_INDEX on the
    prompt and the padding.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    num_prompts: int
    texts: list[str] = field(default_factory=list)  # the 2B rollout texts, for inspection

    def to(self, device) -> Rollouts:
        return Rollouts(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                        self.num_prompts, self.texts)


def rollout_seed(seed: int, step: int, micro: int) -> int:
    """The sampling seed of a micro-batch's rollouts: a pure function of (seed, step, micro-batch),
    so a resumed run draws the same rollouts. The student's rollouts use this + 1."""
    return ((seed * 1_000_003 + step) * 1_009 + micro) * 2 % (1 << 62)


@contextlib.contextmanager
def _eval_mode(backends):
    """Generation in eval mode (no dropout), restoring each model's mode afterwards."""
    models = [b.model for b in backends if isinstance(getattr(b, "model", None), torch.nn.Module)]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def build_rollouts(tokenizer, prompts: Sequence[str], teacher_props, student_props, *,
                   max_new_tokens: int) -> Rollouts:
    """Tokenises prompt + rollout text for both sides (see :class:`Rollouts`).

    The prompt is encoded as the teacher backends encode a prefix (special tokens on, e.g. BOS); the
    rollout text is re-encoded without special tokens, cut to ``max_new_tokens``, and followed by EOS
    when generation ended with it. Teacher and student must share this tokenizer.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    rows, texts = [], []
    for side in (teacher_props, student_props):
        for prompt, prop in zip(prompts, side):
            p_ids = tokenizer(prompt)["input_ids"]
            r_ids = tokenizer(prop.text, add_special_tokens=False)["input_ids"] if prop.text else []
            ends_eos = prop.stop_reason == "eos" and eos is not None
            r_ids = r_ids[:max_new_tokens - int(ends_eos)] + ([eos] if ends_eos else [])
            rows.append((p_ids, r_ids))
            texts.append(prop.text)
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        att[i, :n] = 1
        if r:
            labels[i, len(p):n] = torch.tensor(r, dtype=torch.long)
    return Rollouts(ids, att, labels, len(prompts), texts)


def rollout(teacher_backend, student_backend, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
            temperature: float, seed: int) -> Rollouts:
    """One teacher and one student rollout per prompt through the teacher backends
    (``distillkit.teachers``: no stop boundary, ``max_new_tokens`` budget, EOS ends early), sampled
    with seeds ``seed`` (teacher) and ``seed + 1`` (student). The student backend must wrap the
    current student model. Returns CPU tensors."""
    prompts = list(prompts)
    with _eval_mode([teacher_backend, student_backend]):
        t_props = teacher_backend.propose(prompts, n=1, max_new_tokens=max_new_tokens, stop=None,
                                          temperature=temperature, seed=seed)
        s_props = student_backend.propose(prompts, n=1, max_new_tokens=max_new_tokens, stop=None,
                                          temperature=temperature, seed=seed + 1)
    return build_rollouts(tokenizer, prompts, [p[0] for p in t_props], [p[0] for p in s_props],
                          max_new_tokens=max_new_tokens)


# ---- hidden states and heads -----------------------------------------------------------------------

def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lm_head weight [V, H], bias [V] or None). Refuses models whose logits are not a plain linear
    map of the last hidden state (soft-capping, logit scaling): the fused losses assume one."""
    cfg = getattr(model, "config", None)
    for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
        value = getattr(cfg, attr, neutral)
        if value is not None and value != neutral:
            raise ValueError(f"{type(model).__name__} applies {attr}={value} to its logits; VCRD's fused losses "
                             "need logits = last_hidden @ lm_head.weight.T (+ bias)")
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (lm_head)")
    return head.weight, getattr(head, "bias", None)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state after the final norm, [B, L, H], through ``model``'s own forward
    (:func:`distillkit.losses.final_hidden_states`: logits of one position only, no [B, L, V]), so that a
    DistributedDataParallel wrapper or an FSDP2-sharded root runs its hooks (gradient all-reduce, all-gathers)."""
    from distillkit.losses import final_hidden_states

    return final_hidden_states(model, input_ids, attention_mask, use_cache=False)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """[R, L] bool: position t predicts a rollout token (labels[:, t + 1] != IGNORE_INDEX)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


# ---- validity weights ------------------------------------------------------------------------------

def combine_validity(r_s: torch.Tensor, r_t: torch.Tensor, weighting: str, *, gamma: float = 0.5,
                     clip: Sequence[float] = (0.5, 2.0), eps: float = 1e-8) -> torch.Tensor:
    """The weight of each ablation from validities r_s, r_t (same-shape floating tensors, any shape):
    uniform 1 | ratio r_s / (r_t + eps) | clamped_ratio exp(clip(gamma log(r_s / (r_t + eps)), log lo,
    log hi)) | r_s | r_s_minus_r_t r_s - r_t."""
    from distillkit.validity import validity_ratio

    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: expected one of {WEIGHTINGS}")
    if r_s.shape != r_t.shape:
        raise ValueError(f"r_s {tuple(r_s.shape)} and r_t {tuple(r_t.shape)} must have one shape")
    if weighting == "uniform":
        return torch.ones_like(r_s)
    if weighting == "ratio":
        return validity_ratio(r_s, r_t, eps)
    if weighting == "r_s":
        return r_s.clone()
    if weighting == "r_s_minus_r_t":
        return r_s - r_t
    lo, hi = float(clip[0]), float(clip[1])
    if gamma == 0:  # 0 * log 0 would be NaN; the weight is exp(clip(0))
        scaled = torch.zeros_like(r_s)
    else:  # r_s = 0 gives -inf, which the clip turns into lo
        scaled = gamma * (torch.log(r_s) - torch.log(r_t + eps))
    return torch.exp(torch.clamp(scaled, math.log(lo), math.log(hi)))


def resolve_weighting(weighting: str, judge) -> str:
    """``auto``: the raw ratio r_s / (r_t + eps) of Eq. 1 with a judge, the gamma-scaled, clipped ratio of the
    PRM-free variant (Appendix 10.4) without one; any other weighting as given."""
    if weighting not in WEIGHTING_CHOICES:
        raise ValueError(f"weighting={weighting!r}: expected one of {WEIGHTING_CHOICES}")
    if weighting == "auto":
        return "clamped_ratio" if judge is None else "ratio"
    return weighting


def _candidates(logits: torch.Tensor, how: str, generator: torch.Generator | None) -> torch.Tensor:
    """One candidate token per row of logits [n, V]: sampled from softmax(logits) or the argmax."""
    if how == "greedy":
        return logits.argmax(-1)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class ValidityWeights:
    """Per position of [R, L] (0 where the position predicts no rollout token), float32:
    weight w, student-token validity r_s, teacher-token validity r_t."""
    weight: torch.Tensor
    r_s: torch.Tensor
    r_t: torch.Tensor


def _logits_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    z = hidden.to(weight.dtype) @ weight.T  # in the head's dtype (bf16 heads stay bf16, as the fused op)
    return z if bias is None else z + bias


@torch.no_grad()
def validity_weights(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head, teacher_head,
                     input_ids: torch.Tensor, target_mask: torch.Tensor, *, judge=None,
                     weighting: str = "auto", top_k: int = 128, gamma: float = 0.5,
                     clip: Sequence[float] = (0.5, 2.0), eps: float = 1e-8, chunk_rows: int | None = None,
                     backend: str | None = None, candidate_tokens: str = "sample",
                     seed: int = 0) -> ValidityWeights:
    """Validity weights of every target position, without [N, V] logits.

    student_hidden [R, L, H_s], teacher_hidden [R, L, H_t]: last hidden states (detached here);
    student_head, teacher_head: (weight [V, H], bias [V] or None); input_ids [R, L] int64;
    target_mask [R, L] bool (positions t that predict a rollout token t + 1). judge: None (PRM-free:
    r_s = p_T(a_S), r_t = sum of the top_k largest p_T^2) or a :class:`distillkit.methods.vcrd.judges.Judge`
    (r_s = judge(ids, a_S), r_t = judge(ids, a_T)). Logits exist for ``chunk_rows`` target rows at a
    time (default: distillkit.ops.fused_linear.default_chunk_size).

    candidate_tokens: "sample" (Section 2.1: a_S ~ q(.|c), a_T ~ p(.|c), drawn chunk by chunk from one
    generator seeded by ``seed``: the same inputs, seed and ``chunk_rows`` give the same tokens) or "greedy"
    (the argmax of each; only then does the PRM-free clamped_ratio use the fused one-pass kernel).
    weighting "auto": see :func:`resolve_weighting`.
    """
    from distillkit.ops.fused_linear import default_chunk_size
    from distillkit.validity import teacher_likelihood_validity

    weighting = resolve_weighting(weighting, judge)
    if candidate_tokens not in CANDIDATE_TOKENS:
        raise ValueError(f"candidate_tokens={candidate_tokens!r}: expected one of {CANDIDATE_TOKENS}")
    (w_s, b_s), (w_t, b_t) = student_head, teacher_head
    vocab = w_s.shape[0]
    if w_t.shape[0] != vocab:
        raise ValueError(f"vocabulary mismatch: student head V={vocab}, teacher head V={w_t.shape[0]}")
    top_k = min(top_k, vocab)
    h_s = student_hidden.detach()[target_mask]
    h_t = teacher_hidden.detach()[target_mask]
    m = h_s.shape[0]
    rows = chunk_rows or default_chunk_size(max(m, 1), vocab, h_s.device)
    a_s = torch.empty(m, dtype=torch.long, device=h_s.device)
    a_t = torch.empty_like(a_s)
    r_s = torch.empty(m, dtype=torch.float32, device=h_s.device)
    r_t = torch.empty_like(r_s)
    # the fused PRM-free kernel takes the student's argmax itself: only the greedy candidates can use it
    fused = judge is None and weighting == "clamped_ratio" and candidate_tokens == "greedy"
    fused_w = torch.empty_like(r_s) if fused else None
    generator = None
    if candidate_tokens == "sample":
        generator = torch.Generator(device=h_s.device)
        generator.manual_seed(int(seed) % (1 << 63))
    with torch.autocast(h_s.device.type, enabled=False):
        for start in range(0, m, rows):
            sl = slice(start, min(m, start + rows))
            z_s = _logits_chunk(h_s[sl], w_s, b_s)
            z_t = _logits_chunk(h_t[sl], w_t, b_t)
            a_s[sl] = _candidates(z_s, candidate_tokens, generator)
            a_t[sl] = _candidates(z_t, candidate_tokens, generator)
            if judge is None:
                log_p = torch.log_softmax(z_t.float(), dim=-1)
                r_s[sl] = log_p.gather(-1, a_s[sl, None]).squeeze(-1).exp()
                top = log_p.topk(top_k, dim=-1).values.exp()
                r_t[sl] = (top * top).sum(-1)
                del log_p, top
                if fused_w is not None:
                    fused_w[sl] = teacher_likelihood_validity(z_t, z_s, top_k=top_k, gamma=gamma, clip=tuple(clip),
                                                              eps=eps, backend=backend)
            del z_s, z_t
    if judge is not None:
        from distillkit.methods.vcrd.judges import check_scores

        def judged(tokens):
            full = torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)
            full[target_mask] = tokens.to(input_ids.device)
            got = check_scores(judge(input_ids, full, target_mask), input_ids.shape)
            return got.to(h_s.device)[target_mask]

        r_s, r_t = judged(a_s), judged(a_t)
    weight = fused_w if fused_w is not None else combine_validity(r_s, r_t, weighting, gamma=gamma, clip=clip,
                                                                  eps=eps)

    def scatter(values):
        out = torch.zeros(target_mask.shape, dtype=torch.float32, device=h_s.device)
        out[target_mask] = values.float()
        return out

    return ValidityWeights(scatter(weight), scatter(r_s), scatter(r_t))


# ---- the loss --------------------------------------------------------------------------------------

def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # under autocast (bf16 on GPU) the head GEMMs of the fused op run in the autocast dtype
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def vcrd_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor,
              weights: torch.Tensor, num_prompts: int, student_head, teacher_head, *, alpha: float = 0.1,
              lambda_t: float = 1.0, lambda_s: float = 1.0, backend: str | None = None,
              chunk_size: int | None = None, normalization: str = "sequence",
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lambda_T * LV-SKL(teacher-prefix rows) + lambda_S * LV-SRKL(student-prefix rows).

    student_hidden [2B, L, H_s] (differentiable), teacher_hidden [2B, L, H_t] (constant), labels [2B, L]
    int64 (IGNORE_INDEX off the rollouts), weights [2B, L] float32 (weight of position t, which predicts
    token t + 1), num_prompts = B (rows < B: teacher prefix, rows >= B: student prefix); heads as in
    :func:`validity_weights`. normalization "sequence" (Algorithm 1): each term sums w_t D_t over the tokens of
    each rollout and averages over the B prompts; "token": each term is the mean of w_t D_t over its own rollout
    tokens (0 without tokens), which shifts the lambda_T : lambda_S balance when the rollouts differ in length.
    Returns (scalar loss, {"loss_teacher_prefix", "loss_student_prefix"} detached).
    """
    from distillkit.ops.fused_linear import (
        fused_linear_skew_kl,
        fused_linear_skew_reverse_kl,
    )

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: expected one of {NORMALIZATIONS}")
    (w_s, b_s), (w_t, b_t) = student_head, teacher_head
    dtype_s = _compute_dtype(student_hidden, w_s)
    dtype_t = _compute_dtype(teacher_hidden, w_t)
    h_s = student_hidden[:, :-1].to(dtype_s)
    h_t = teacher_hidden[:, :-1].detach().to(dtype_t)
    labels, weights = labels[:, 1:], weights[:, :-1].detach()
    heads = dict(student_bias=None if b_s is None else b_s.to(dtype_s),
                 teacher_bias=None if b_t is None else b_t.detach().to(dtype_t))
    ws, wt = w_s.to(dtype_s), w_t.detach().to(dtype_t)
    B = num_prompts
    reduction = "mean" if normalization == "token" else "sum"
    per_prompt = 1.0 if normalization == "token" else 1.0 / max(B, 1)
    zero = h_s.new_zeros((), dtype=torch.float32)
    parts = {"loss_teacher_prefix": zero, "loss_student_prefix": zero}
    with torch.autocast(student_hidden.device.type, enabled=False):
        loss = zero
        if lambda_t:
            parts["loss_teacher_prefix"] = fused_linear_skew_kl(
                h_s[:B], ws, h_t[:B], wt, labels[:B], weights[:B], alpha=alpha, ignore_index=IGNORE_INDEX,
                reduction=reduction, chunk_size=chunk_size, backend=backend, **heads) * per_prompt
            loss = loss + lambda_t * parts["loss_teacher_prefix"]
        if lambda_s:
            parts["loss_student_prefix"] = fused_linear_skew_reverse_kl(
                h_s[B:], ws, h_t[B:], wt, labels[B:], weights[B:], alpha=alpha, ignore_index=IGNORE_INDEX,
                reduction=reduction, chunk_size=chunk_size, backend=backend, **heads) * per_prompt
            loss = loss + lambda_s * parts["loss_student_prefix"]
    return loss, {k: v.detach() for k, v in parts.items()}


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict[str, float]
    weights: ValidityWeights


def vcrd_step(student, teacher, rollouts: Rollouts, *, judge=None, weighting: str = "auto",
              alpha: float = 0.1, lambda_t: float = 1.0, lambda_s: float = 1.0, top_k: int = 128,
              gamma: float = 0.5, clip: Sequence[float] = (0.5, 2.0), eps: float = 1e-8,
              backend: str | None = None, chunk_size: int | None = None, candidate_tokens: str = "sample",
              normalization: str = "sequence", seed: int = 0) -> StepResult:
    """Hidden states of both models on the rollouts, validity weights, and the VCRD loss (with a graph
    into the student's parameters; ``student`` may be the trainer's DDP wrapper or FSDP2 root: its own forward
    runs); ``candidate_tokens`` and ``seed`` as in :func:`validity_weights`,
    ``normalization`` as in :func:`vcrd_loss`. Metrics: the loss and its parts, mean w / r_s / r_t per side, and
    rollout token counts."""
    from distillkit.pipeline.distributed import unwrap

    device = next(student.parameters()).device
    rollouts = rollouts.to(device)
    with torch.no_grad():
        teacher_h = final_hidden(teacher, rollouts.input_ids, rollouts.attention_mask)
    student_h = final_hidden(student, rollouts.input_ids, rollouts.attention_mask)
    # the heads after the forwards: under FSDP2 the root's parameters are gathered by its forward
    s_head, t_head = output_head(unwrap(student)), output_head(unwrap(teacher))
    mask = target_positions(rollouts.labels)
    vw = validity_weights(student_h, teacher_h, s_head, t_head, rollouts.input_ids, mask, judge=judge,
                          weighting=weighting, top_k=top_k, gamma=gamma, clip=clip, eps=eps, chunk_rows=chunk_size,
                          backend=backend, candidate_tokens=candidate_tokens, seed=seed)
    loss, parts = vcrd_loss(student_h, teacher_h, rollouts.labels, vw.weight, rollouts.num_prompts, s_head, t_head,
                            alpha=alpha, lambda_t=lambda_t, lambda_s=lambda_s, backend=backend, chunk_size=chunk_size,
                            normalization=normalization)
    metrics = {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}
    B = rollouts.num_prompts
    for side, rows in (("teacher_prefix", slice(0, B)), ("student_prefix", slice(B, None))):
        m = mask[rows]
        n = int(m.sum())
        metrics[f"tokens_{side}"] = float(n)
        for name, values in (("w", vw.weight), ("r_s", vw.r_s), ("r_t", vw.r_t)):
            metrics[f"{name}_{side}"] = float(values[rows][m].sum()) / max(n, 1)
    return StepResult(loss, metrics, vw)
