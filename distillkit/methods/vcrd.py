"""VCRD: Validity-Calibrated Reasoning Distillation.

Every training batch of prompts draws one teacher rollout and one student rollout per prompt (the
student's with its current weights), then distils the teacher into the student on both, weighting
each token's divergence by the relative local validity of the student's and teacher's proposed
next tokens:

    loss = lambda_T * LV-SKL(teacher-prefix tokens, w^T) + lambda_S * LV-SRKL(student-prefix tokens, w^S)

LV-SKL / LV-SRKL are the skew KL / skew reverse KL (DistiLLM) with per-token weights, computed by the
fused-linear kernels from the two models' last hidden states (no [N, V] logits in the training step).

Validity at a generated position t (prefix = prompt + rollout[:t], the hidden state at t predicts
token t + 1): a_S, a_T = the student's and the teacher's greedy next tokens, and

    r_s, r_t = judge(prefix, a_S), judge(prefix, a_T)       a judge (e.g. a process reward model), or
    r_s = p_T(a_S),  r_t = sum of the top_k largest p_T^2   PRM-free (judge: null)

    weighting   w
    uniform         1
    ratio           r_s / (r_t + eps)
    clamped_ratio   exp(clip(gamma * log(r_s / (r_t + eps)), log clip[0], log clip[1]))
                    (PRM-free: distillkit.validity.teacher_likelihood_validity, one fused pass)
    r_s             r_s
    r_s_minus_r_t   r_s - r_t        (may be negative: the update then pushes away from the teacher)

Weights are constants (no gradient) and are computed chunk by chunk over positions, so the [N, V]
logits of a whole batch never exist.

    distillkit vcrd --config configs/vcrd.yaml

The step is factored for tests and reuse: ``rollout`` -> ``final_hidden`` -> ``validity_weights`` ->
``vcrd_loss`` (``vcrd_step`` chains the last three).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from distillkit._errors import InputError
from distillkit.pipeline.config import config_field as _help
from distillkit.pipeline.config import parse_config
from distillkit.pipeline.runs import config_values, write_json_atomic
from distillkit.pipeline.train import (
    TrainConfig, save_pretrained_atomic, torch_device, train_field, with_train_options,
)

log = logging.getLogger(__name__)
WEIGHTINGS = ("uniform", "ratio", "clamped_ratio", "r_s", "r_s_minus_r_t")
IGNORE_INDEX = -100
_KERNEL_BACKENDS = ("cuda", "triton", "cpu", "reference")


@with_train_options(renamed={"steps": "max_steps", "warmup": "warmup_steps"})
@dataclass
class VcrdConfig:
    student: str = _help("student checkpoint to train (HF directory or Hub id)", default="")
    teacher: str = _help("teacher checkpoint (same tokenizer / vocabulary as the student)", default="")
    judge: str | None = _help("process reward model checkpoint (causal LM, Math-Shepherd style); "
                              "null = PRM-free teacher-likelihood validity", default=None)
    judge_good_token: str = _help("PRM token meaning 'this step is correct'", default="+")
    judge_bad_token: str = _help("PRM token meaning 'this step is wrong'", default="-")
    judge_step_tag: str | None = _help("PRM step marker appended after the candidate token (Math-Shepherd: "
                                       "'ки'); null reads the PRM right after the candidate", default=None)
    judge_batch_size: int = _help("PRM candidates scored per forward pass", default=64)
    prompts: str = _help("JSONL of prompts {id, question, answer}", default="")
    prompt_template: str = _help("prompt with {question}", default="{question}\n<think> ### Step")
    output_dir: str = _help("run directory: checkpoint, metrics.jsonl, final/ model, vcrd_summary.json",
                            default="vcrd-run")
    # the shared trainer's options (flat in YAML and flags: max_steps, batch_size = prompts per micro-batch, each
    # giving a teacher and a student rollout, lr, warmup_steps, seed = data order and rollout seeds, ...)
    train: TrainConfig = train_field(max_steps=100, lr=1e-5, save_every=10, log_every=1)
    rollout_tokens: int = _help("max new tokens per rollout (no stop boundary; EOS ends early)", default=256)
    temperature: float = _help("rollout sampling temperature (0 = greedy)", default=1.0)
    teacher_backend: str = _help("teacher rollouts: hf | vllm (student rollouts always use hf: its weights "
                                 "change every step)", default="hf")
    vllm_gpu_memory_utilization: float = _help("vllm teacher: fraction of GPU memory for its engine",
                                               default=0.3)
    teacher_dtype: str = _help("teacher (and PRM) weights: float32 | bfloat16 | float16", default="float32")
    alpha: float = _help("skew of both divergences, in [0, 1]", default=0.1)
    lambda_t: float = _help("weight of LV-SKL on teacher-prefix tokens", default=1.0)
    lambda_s: float = _help("weight of LV-SRKL on student-prefix tokens", default=1.0)
    weighting: str = _help("uniform | ratio | clamped_ratio | r_s | r_s_minus_r_t", default="clamped_ratio")
    top_k: int = _help("PRM-free r_t: sum of the top_k largest teacher p^2 (capped at the vocabulary)",
                       default=128)
    gamma: float = _help("clamped_ratio: exponent of the validity ratio", default=0.5)
    clip: list[float] = _help("clamped_ratio: bounds (low high) of the weight", default_factory=lambda: [0.5, 2.0])
    eps: float = _help("added to r_t in the ratios", default=1e-8)
    eval_data: str | None = _help("JSONL {id, question, answer} for answer accuracy at the end", default=None)
    eval_limit: int = _help("at most this many eval questions", default=256)
    max_new_tokens: int = _help("generation budget per eval answer", default=256)
    backend: str | None = _help("kernel backend: cuda | triton | cpu | reference (null = automatic)", default=None)
    device: str = _help("auto | cpu | cuda", default="auto")
    overwrite: bool = _help("when output_dir holds a run started with a different config: move it aside "
                            "(<output_dir>.replaced-<time>) and start afresh instead of refusing", default=False)

    def __post_init__(self):
        for name in ("student", "teacher", "prompts"):
            if not getattr(self, name):
                raise ValueError(f"{name}: a path is required")
        for name in ("rollout_tokens", "eval_limit", "max_new_tokens", "top_k", "judge_batch_size"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.teacher_backend not in ("hf", "vllm"):
            raise ValueError(f"teacher_backend={self.teacher_backend!r}: expected hf or vllm")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} must lie in (0, 1]")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must lie in [0, 1]")
        for name in ("lambda_t", "lambda_s"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number >= 0")
        if self.lambda_t == 0 and self.lambda_s == 0:
            raise ValueError("lambda_t and lambda_s are both 0: nothing to train")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r}: expected one of {WEIGHTINGS}")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma={self.gamma} must be a finite number >= 0")
        clip = list(self.clip) if isinstance(self.clip, (list, tuple)) else None
        if clip is None or len(clip) != 2 or not all(isinstance(c, (int, float)) for c in clip) \
                or not 0 < clip[0] <= clip[1] < math.inf:
            raise ValueError(f"clip={self.clip!r} must be [low, high] with 0 < low <= high < inf")
        self.clip = [float(c) for c in clip]
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps={self.eps} must be a finite number >= 0")
        if self.backend is not None and self.backend not in _KERNEL_BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {_KERNEL_BACKENDS} or null")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda")
        if self.teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}: expected float32, bfloat16 or float16")
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {question}")


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
    """Last hidden state after the final norm, [B, L, H]: the decoder body only (no [B, L, V] logits)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, getattr(model, "base_model_prefix", "model"))
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


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
                     weighting: str = "clamped_ratio", top_k: int = 128, gamma: float = 0.5,
                     clip: Sequence[float] = (0.5, 2.0), eps: float = 1e-8, chunk_rows: int | None = None,
                     backend: str | None = None) -> ValidityWeights:
    """Validity weights of every target position, without [N, V] logits.

    student_hidden [R, L, H_s], teacher_hidden [R, L, H_t]: last hidden states (detached here);
    student_head, teacher_head: (weight [V, H], bias [V] or None); input_ids [R, L] int64;
    target_mask [R, L] bool (positions t that predict a rollout token t + 1). judge: None (PRM-free:
    r_s = p_T(a_S), r_t = sum of the top_k largest p_T^2) or a :class:`distillkit.judges.Judge`
    (r_s = judge(ids, a_S), r_t = judge(ids, a_T)). Logits exist for ``chunk_rows`` target rows at a
    time (default: distillkit.ops.fused_linear.default_chunk_size).
    """
    from distillkit.ops.fused_linear import default_chunk_size
    from distillkit.validity import teacher_likelihood_validity

    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: expected one of {WEIGHTINGS}")
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
    fused_w = torch.empty_like(r_s) if judge is None and weighting == "clamped_ratio" else None
    with torch.autocast(h_s.device.type, enabled=False):
        for start in range(0, m, rows):
            sl = slice(start, min(m, start + rows))
            z_s = _logits_chunk(h_s[sl], w_s, b_s)
            z_t = _logits_chunk(h_t[sl], w_t, b_t)
            a_s[sl] = z_s.argmax(-1)
            a_t[sl] = z_t.argmax(-1)
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
        from distillkit.judges import check_scores

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
              chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lambda_T * LV-SKL(teacher-prefix rows) + lambda_S * LV-SRKL(student-prefix rows).

    student_hidden [2B, L, H_s] (differentiable), teacher_hidden [2B, L, H_t] (constant), labels [2B, L]
    int64 (IGNORE_INDEX off the rollouts), weights [2B, L] float32 (weight of position t, which predicts
    token t + 1), num_prompts = B (rows < B: teacher prefix, rows >= B: student prefix); heads as in
    :func:`validity_weights`. Each term is a mean over its rollout tokens of w_t D_t (0 without tokens).
    Returns (scalar loss, {"loss_teacher_prefix", "loss_student_prefix"} detached).
    """
    from distillkit.ops.fused_linear import (
        fused_linear_skew_kl,
        fused_linear_skew_reverse_kl,
    )

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
    zero = h_s.new_zeros((), dtype=torch.float32)
    parts = {"loss_teacher_prefix": zero, "loss_student_prefix": zero}
    with torch.autocast(student_hidden.device.type, enabled=False):
        loss = zero
        if lambda_t:
            parts["loss_teacher_prefix"] = fused_linear_skew_kl(
                h_s[:B], ws, h_t[:B], wt, labels[:B], weights[:B], alpha=alpha, ignore_index=IGNORE_INDEX,
                reduction="mean", chunk_size=chunk_size, backend=backend, **heads)
            loss = loss + lambda_t * parts["loss_teacher_prefix"]
        if lambda_s:
            parts["loss_student_prefix"] = fused_linear_skew_reverse_kl(
                h_s[B:], ws, h_t[B:], wt, labels[B:], weights[B:], alpha=alpha, ignore_index=IGNORE_INDEX,
                reduction="mean", chunk_size=chunk_size, backend=backend, **heads)
            loss = loss + lambda_s * parts["loss_student_prefix"]
    return loss, {k: v.detach() for k, v in parts.items()}


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict[str, float]
    weights: ValidityWeights


def vcrd_step(student, teacher, rollouts: Rollouts, *, judge=None, weighting: str = "clamped_ratio",
              alpha: float = 0.1, lambda_t: float = 1.0, lambda_s: float = 1.0, top_k: int = 128,
              gamma: float = 0.5, clip: Sequence[float] = (0.5, 2.0), eps: float = 1e-8,
              backend: str | None = None, chunk_size: int | None = None) -> StepResult:
    """Hidden states of both models on the rollouts, validity weights, and the VCRD loss (with a graph
    into the student's parameters). Metrics: the loss and its parts, mean w / r_s / r_t per side, and
    rollout token counts."""
    device = next(student.parameters()).device
    rollouts = rollouts.to(device)
    with torch.no_grad():
        teacher_h = final_hidden(teacher, rollouts.input_ids, rollouts.attention_mask)
    student_h = final_hidden(student, rollouts.input_ids, rollouts.attention_mask)
    s_head, t_head = output_head(student), output_head(teacher)
    mask = target_positions(rollouts.labels)
    vw = validity_weights(student_h, teacher_h, s_head, t_head, rollouts.input_ids, mask, judge=judge,
                          weighting=weighting, top_k=top_k, gamma=gamma, clip=clip, eps=eps, chunk_rows=chunk_size,
                          backend=backend)
    loss, parts = vcrd_loss(student_h, teacher_h, rollouts.labels, vw.weight, rollouts.num_prompts, s_head, t_head,
                            alpha=alpha, lambda_t=lambda_t, lambda_s=lambda_s, backend=backend, chunk_size=chunk_size)
    metrics = {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}
    B = rollouts.num_prompts
    for side, rows in (("teacher_prefix", slice(0, B)), ("student_prefix", slice(B, None))):
        m = mask[rows]
        n = int(m.sum())
        metrics[f"tokens_{side}"] = float(n)
        for name, values in (("w", vw.weight), ("r_s", vw.r_s), ("r_t", vw.r_t)):
            metrics[f"{name}_{side}"] = float(values[rows][m].sum()) / max(n, 1)
    return StepResult(loss, metrics, vw)


# ---- training --------------------------------------------------------------------------------------

class VcrdObjective:
    """The Trainer's ``loss_fn(model, prompts)``: rollouts (no grad) + weights + fused losses.

    ``trainer`` must be set after the Trainer is built: the rollout seeds derive from its step and
    the micro-batch index (counted here: the Trainer calls once per micro-batch, in order)."""

    def __init__(self, teacher_model, teacher_backend, tokenizer, cfg: VcrdConfig, judge=None):
        self.teacher_model, self.teacher_backend, self.tokenizer = teacher_model, teacher_backend, tokenizer
        self.cfg, self.judge = cfg, judge
        self.trainer = None
        self._step, self._micro = -1, 0

    def _next_seed(self) -> int:
        step = self.trainer.step if self.trainer is not None else 0
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        return rollout_seed(self.cfg.train.seed, step, self._micro)

    def __call__(self, model, prompts: list[str]):
        from distillkit.teachers.hf import HFTeacher

        cfg = self.cfg
        seed = self._next_seed()
        was_training = model.training
        student_backend = HFTeacher(model, self.tokenizer, name="student", batch_size=max(1, len(prompts)))
        model.train(was_training)  # HFTeacher puts the model in eval mode; rollout() handles generation
        rolls = rollout(self.teacher_backend, student_backend, self.tokenizer, prompts,
                        max_new_tokens=cfg.rollout_tokens, temperature=cfg.temperature, seed=seed)
        res = vcrd_step(model, self.teacher_model, rolls, judge=self.judge, weighting=cfg.weighting,
                        alpha=cfg.alpha, lambda_t=cfg.lambda_t, lambda_s=cfg.lambda_s, top_k=cfg.top_k,
                        gamma=cfg.gamma, clip=cfg.clip, eps=cfg.eps, backend=cfg.backend)
        return res.loss, res.metrics


def load_prompts(cfg: VcrdConfig) -> list[str]:
    """The prompts file's questions in ``cfg.prompt_template``; InputError naming the line (and id) of a
    record without a text question. The answer is not needed: VCRD trains on rollouts."""
    from distillkit.pipeline.data import fill_prompt, read_jsonl_lines

    rows = read_jsonl_lines(cfg.prompts)
    if not rows:
        raise InputError(f"prompts={cfg.prompts!r} holds no record")
    out = []
    for lineno, r in rows:
        question = r.get("question")
        if not isinstance(question, str) or not question.strip():
            rid = f" (id {r['id']!r})" if "id" in r else ""
            raise InputError(f"prompts={cfg.prompts!r}: line {lineno}{rid}: question={question!r}: expected a "
                             "non-empty string")
        out.append(fill_prompt(cfg.prompt_template, question=question))
    return out


def load_models(cfg: VcrdConfig, device):
    """(student float32 in train mode, teacher frozen in eval mode, teacher rollout backend, tokenizer, judge)."""
    from transformers import AutoModelForCausalLM

    from distillkit.teachers.hf import HFTeacher, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.student)
    student = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).to(device)
    teacher, _ = load_causal_lm(cfg.teacher, dtype=cfg.teacher_dtype, device=device)
    teacher.requires_grad_(False)
    v_s, v_t = output_head(student)[0].shape[0], output_head(teacher)[0].shape[0]
    if v_s != v_t:
        raise ValueError(f"teacher={cfg.teacher!r} has a vocabulary of {v_t}, student={cfg.student!r} of {v_s}: "
                         "VCRD needs one shared tokenizer")
    if cfg.teacher_backend == "vllm":
        from distillkit.teachers.vllm import VLLMTeacher

        backend = VLLMTeacher(cfg.teacher, name="teacher", dtype=cfg.teacher_dtype,
                              gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    else:
        backend = HFTeacher(teacher, tokenizer, name="teacher", batch_size=max(1, cfg.train.batch_size))
    judge = None
    if cfg.judge:
        from distillkit.judges import HFProcessRewardJudge

        judge = HFProcessRewardJudge.from_pretrained(
            cfg.judge, policy_tokenizer=tokenizer, dtype=cfg.teacher_dtype, device=device,
            good_token=cfg.judge_good_token, bad_token=cfg.judge_bad_token, step_tag=cfg.judge_step_tag,
            batch_size=cfg.judge_batch_size)
    return student.train(), teacher.eval(), backend, tokenizer, judge



# may differ between a run and its resume: how often a checkpoint / metrics line is written (the trainer
# resumes exactly from any checkpoint); overwrite and progress always may (distillkit.pipeline.runs)
RESUME_FREE_FIELDS = ("save_every", "log_every")


def run(cfg: VcrdConfig) -> dict:
    """Trains (resuming from output_dir's checkpoint), saves ``output_dir/final``, evaluates answer
    accuracy when eval_data is given; returns (and writes to vcrd_summary.json) the summary.

    A rerun must use the config the run was started with (recorded in output_dir/run_config.json;
    see :mod:`distillkit.pipeline.runs`): a different one raises InputError naming the fields, unless
    ``overwrite`` (then the old output_dir is moved aside and the run starts afresh)."""
    from distillkit.pipeline.train import Trainer

    from distillkit.pipeline.data import read_questions_for_eval
    from distillkit.pipeline.runs import begin_dir_run

    device = torch_device(cfg.device)
    # the input files are checked, and the config compared with the run's, before any model loads
    prompts = load_prompts(cfg)
    questions = read_questions_for_eval(cfg.eval_data, cfg.eval_limit) if cfg.eval_data else None
    begin_dir_run(cfg, cfg.output_dir, free=RESUME_FREE_FIELDS, previous_from="vcrd_summary.json")
    student, teacher, teacher_backend, tokenizer, judge = load_models(cfg, device)
    tcfg = dataclasses.replace(cfg.train, output_dir=cfg.output_dir)
    objective = VcrdObjective(teacher, teacher_backend, tokenizer, cfg, judge)
    trainer = Trainer(student, tcfg, prompts, list, objective)
    objective.trainer = trainer
    last = trainer.train()
    final = os.path.join(cfg.output_dir, "final")
    save_pretrained_atomic(student, tokenizer, final)
    summary_path = os.path.join(cfg.output_dir, "vcrd_summary.json")
    previous = {}
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            previous = json.load(f)
    finished_before = previous.get("step") == trainer.step  # a rerun of a finished run: nothing was trained
    if finished_before and previous.get("last_metrics"):
        last = previous["last_metrics"]  # the trainer returns only the step when it trains nothing
    summary = {"config": config_values(cfg), "step": trainer.step, "final_model": final, "last_metrics": last}
    if cfg.eval_data:
        if finished_before and "eval" in previous:  # same eval fields: the run config guarantees it
            summary["eval"] = previous["eval"]
        else:
            from distillkit.pipeline.evaluate import answer_accuracy

            acc = answer_accuracy(student, tokenizer, questions, prompt_template=cfg.prompt_template,
                                  max_new_tokens=cfg.max_new_tokens)
            summary["eval"] = {"accuracy": acc["accuracy"], "n": acc["n"]}
        log.info("answer accuracy %.4f on %d questions", summary["eval"]["accuracy"], summary["eval"]["n"])
    write_json_atomic(summary_path, summary)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(VcrdConfig, argv, "distillkit vcrd",
                       "VCRD: validity-calibrated reasoning distillation (teacher- and student-prefix rollouts, "
                       "validity-weighted skew KL / skew reverse KL).")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(cfg)
    print(json.dumps({k: summary[k] for k in ("step", "final_model", "last_metrics", "eval") if k in summary}))
    return 0
