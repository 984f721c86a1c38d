"""QR-Distill's trainable parts: the path router, mutual-student distillation and the total loss.

The seed paper's equations were not available to us verbatim; these are the formulas implemented,
with the reason for each choice where the seed or its released code leaves room.

Notation (one batch of B reasoning paths, S students, shared space of D dimensions):

  Router (seed eq. 3-4; the encoder is frozen, so its features are computed once before training)
    u_b      = mean over the path's tokens of the frozen encoder's last hidden states      [B, d_enc]
    x_b      = (u_b - mean) / std       (per dimension, over the training paths; raw LLM features
                                          saturate a freshly initialised MLP's softmax)
    a_b      = MLP(x_b) = W2 GELU(W1 x_b + b1) + b2                                           [B, S]
    y_soft   = softmax((a_b + g_b) / tau),  g_b ~ Gumbel(0, 1) i.i.d.                          [B, S]
    y_hard   = 1 on the top-k entries of y_soft, else 0 (k = route_top_k, default 1)
    y        = y_hard + y_soft - sg(y_soft)          (straight-through: forward y_hard, gradient of y_soft)
    L_ce     = (1/B) sum_b sum_s y_bs * ce_bs,  ce_bs = token-mean cross-entropy of student s on path b
  Every student is run on every path, so ce_bs exists for all (b, s). In the forward pass only the
  routed pairs count (y_bs = y_hard_bs); in the backward pass d L_ce / d a_bj
  = y_soft_bj (ce_bj - sum_s y_soft_bs ce_bs) / (B tau): the router's logits move toward the students
  whose loss on that path is below the (router-weighted) average. The released code multiplied
  nothing by the gate (it only selected rows with boolean masks), so its router got no gradient.
    p_bar    = (1/B) sum_b softmax(a_b)                 (noise-free router probabilities)
    L_bal    = log S - H(p_bar) = KL(p_bar || uniform) >= 0
  Minimising L_bal maximises the entropy of the mean assignment: students are used evenly across
  the batch while each path's own assignment stays sharp. p_bar uses the noise-free probabilities
  (not the hard one-hots) because H of a one-hot average has unbounded gradients at empty students.

  Mutual-student distillation (seed eq. 5-8)
    h_s      = student s's last hidden states                                            [B, T_s, H_s]
    m_s      = 1 at the path's response tokens (labels != -100) in student s's tokenisation
    zhat_bs  = (1/|m_bs|) sum_t m_bst P_s h_bst = P_s (mean of h over response tokens)        [B, D]
               (P_s: per-student linear projection H_s -> D; mean and projection commute; pooling
               over response tokens makes students with different tokenizers comparable)
    z_bs     = sqrt(D) zhat_bs / max(||zhat_bs||, eps) when normalize_shared, else zhat_bs
               (normalising stops the trivial minimiser P_s -> 0 of an MSE between learned projections)
    r_bs     = w . sg(z_bs) + c0                       (the competence regressor, shared by students)
    c_b      = softmax_s(r_b)                                                                 [B, S]
    e_b      = sum_s sg(c_bs) sg(z_bs)                 (the soft ensemble, a fixed target)
    L_align  = mean over valid b, s, d of (z_bsd - e_bd)^2                                (the MSE)
    t_b      = softmax_s(-sg(ce_b) / tau_c)            (who fits path b best, from the students' losses)
    L_comp   = mean over valid b of KL(t_b || c_b)
    L_mutual = L_align + L_comp
  The released code detaches the ensemble, so its weight learner never receives a gradient; here the
  competence regressor is trained explicitly to predict which student fits each path (L_comp, which
  only reaches w and c0), while L_align only reaches the students and their projections.
  A row is valid when every student sees at least one response token (after truncation). The mutual
  loss covers every student on every path, routed to it or not: that is how a student learns from
  the paths the router sent to its peers.

  Total (seed eq. 9):  L = L_ce + lambda_1 L_mutual + lambda_2 L_bal.

``mutual_loss_reference`` is the same mutual loss written literally (per row, per student, per token,
projection before pooling) for float64 tests.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROUTINGS = ("learned", "random", "all")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 -> float32; float64 stays float64 for the reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------
# Frozen encoder features
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_texts(encoder, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                 max_length: int = 512) -> torch.Tensor:
    """Mean-pooled last hidden states of a frozen Hugging Face encoder: float32 [len(texts), hidden].

    Padding tokens are excluded from the mean (attention mask). ``encoder`` is any ``AutoModel``
    whose output has ``last_hidden_state``; it is put in eval mode and not modified.
    """
    if isinstance(texts, str):
        raise TypeError("texts: expected a list of strings, got a single string")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size={batch_size}, max_length={max_length}: expected >= 1")
    device = next(encoder.parameters()).device
    encoder.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            out.append(masked_mean(hidden, mask.bool()).cpu())
    finally:
        tokenizer.padding_side = side
    hidden_size = getattr(encoder.config, "hidden_size", 0)
    return torch.cat(out) if out else torch.zeros(0, hidden_size)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, H] over the positions where ``mask`` [B, T] (bool) is set: [B, H].
    Rows with no position set give zeros."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------
class Router(nn.Module):
    """MLP from frozen-encoder features [B, d_in] to routing logits [B, num_students]."""

    def __init__(self, in_dim: int, num_students: int, hidden: int = 256):
        super().__init__()
        if in_dim < 1 or num_students < 2 or hidden < 1:
            raise ValueError(f"in_dim={in_dim}, num_students={num_students}, hidden={hidden}: "
                             "expected in_dim >= 1, num_students >= 2, hidden >= 1")
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_students))
        # per-dimension standardisation of the features (set by fit_feature_scale, saved with the router)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    @torch.no_grad()
    def fit_feature_scale(self, features: torch.Tensor) -> None:
        """Standardise each feature dimension by its mean and std over ``features`` [B, d_in] (the training
        paths). LLM hidden states have large, uneven magnitudes: raw, they give a freshly initialised MLP
        saturated logits, and one student takes every path before the balance term can act."""
        if features.dim() != 2 or features.shape[1] != self.feature_mean.numel() or features.shape[0] < 1:
            raise ValueError(f"features: expected [B >= 1, {self.feature_mean.numel()}], got {tuple(features.shape)}")
        x = features.to(self.feature_mean)
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0, unbiased=False).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(x[0]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.feature_mean) - self.feature_mean) / self.feature_std
        return self.mlp(x.to(self.mlp[0].weight.dtype))


def gumbel_topk_straight_through(logits: torch.Tensor, *, tau: float = 1.0, k: int = 1,
                                 noise: bool = True, generator: torch.Generator | None = None):
    """Straight-through Gumbel-softmax: (assignment [B, S], y_soft [B, S]).

    ``assignment`` equals the hard top-k one-hot in the forward pass and carries the gradient of
    ``y_soft = softmax((logits + g) / tau)`` in the backward pass. ``noise=False`` drops the Gumbel
    noise (deterministic routing, e.g. for statistics)."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, S], got shape {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k={k}: expected 1 <= k <= {logits.shape[1]} (the number of students)")
    if not tau > 0:
        raise ValueError(f"tau={tau}: expected > 0")
    x = _upcast(logits)
    if noise:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    y_soft = torch.softmax(x / tau, dim=-1)
    hard = torch.zeros_like(y_soft).scatter_(-1, y_soft.topk(k, dim=-1).indices, 1.0)
    # (y_soft - sg(y_soft)) is exactly 0 in the forward pass: the assignment is exactly one-hot.
    return hard + (y_soft - y_soft.detach()), y_soft


def balance_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """log S - H(mean_b softmax(a_b)): 0 when students are used evenly, log S when one takes all."""
    p_bar = torch.softmax(router_logits.float(), dim=-1).mean(0)
    entropy = -(p_bar * torch.log(p_bar.clamp_min(1e-12))).sum()
    return math.log(router_logits.shape[-1]) - entropy


def assign(router_logits: torch.Tensor | None, batch_size: int, num_students: int, *, routing: str,
           tau: float, k: int, device) -> torch.Tensor:
    """The [B, S] assignment used to weight the students' losses under ``routing``:
    learned (straight-through Gumbel top-k of the router), random (uniform top-k, no gradient) or
    all (every student learns every path)."""
    if routing == "learned":
        return gumbel_topk_straight_through(router_logits, tau=tau, k=k)[0]
    if routing == "random":
        scores = torch.rand(batch_size, num_students, device=device)
        return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
    if routing == "all":
        return torch.ones(batch_size, num_students, device=device)
    raise ValueError(f"routing={routing!r}: expected one of {ROUTINGS}")


# ----------------------------------------------------------------------------------------------
# Per-example student losses
# ----------------------------------------------------------------------------------------------
def per_example_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean next-token cross-entropy per row [B] float32, number of target tokens per row [B]).

    logits [B, T, V]; labels [B, T] int64 with -100 at ignored positions (shifted here)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    count = (labels != -100).sum(1)
    return tok.sum(1) / count.clamp_min(1).to(tok.dtype), count


# ----------------------------------------------------------------------------------------------
# Mutual-student distillation
# ----------------------------------------------------------------------------------------------
def shared_representation(pooled: torch.Tensor, projection: nn.Linear, *, normalize: bool,
                          eps: float = 1e-6) -> torch.Tensor:
    """z = P(pooled) [B, D], rescaled to norm sqrt(D) when ``normalize``."""
    z = projection(pooled.to(projection.weight.dtype))
    if normalize:
        z = z * (math.sqrt(z.shape[-1]) / z.norm(dim=-1, keepdim=True).clamp_min(eps))
    return z


@dataclass
class MutualTerms:
    align: torch.Tensor        # scalar, L_align
    competence: torch.Tensor   # scalar, L_comp
    weights: torch.Tensor      # [B, S], the competence scores c (softmax over students)


def mutual_loss(z: torch.Tensor, ce: torch.Tensor, valid: torch.Tensor, competence: nn.Linear, *,
                competence_tau: float = 1.0) -> MutualTerms:
    """L_align and L_comp of the module docstring.

    z [B, S, D]: the students' shared representations; ce [B, S]: per-example losses (detached
    here); valid [B] bool: rows every student saw response tokens of. ``competence``: Linear(D, 1).
    """
    if z.dim() != 3:
        raise ValueError(f"z: expected [B, S, D], got shape {tuple(z.shape)}")
    if ce.shape != z.shape[:2]:
        raise ValueError(f"ce: expected shape {tuple(z.shape[:2])}, got {tuple(ce.shape)}")
    if valid.shape != z.shape[:1] or valid.dtype != torch.bool:
        raise ValueError(f"valid: expected bool [B={z.shape[0]}], got {valid.dtype} {tuple(valid.shape)}")
    if not competence_tau > 0:
        raise ValueError(f"competence_tau={competence_tau}: expected > 0")
    scores = competence(z.detach()).squeeze(-1)                          # [B, S]
    log_c = torch.log_softmax(_upcast(scores), dim=-1)
    weights = log_c.exp()
    ensemble = (weights.detach().unsqueeze(-1) * z.detach()).sum(1)     # [B, D]
    vf = valid.to(z.dtype)
    n_valid = vf.sum().clamp_min(1.0)
    per_row = ((z - ensemble.unsqueeze(1)) ** 2).mean(dim=(1, 2))        # mean over s and d
    align = (per_row * vf).sum() / n_valid
    log_t = torch.log_softmax(-_upcast(ce.detach()) / competence_tau, dim=-1)
    kl = (log_t.exp() * (log_t - log_c)).sum(-1)
    comp = (kl * vf.to(kl.dtype)).sum() / n_valid.to(kl.dtype)
    return MutualTerms(align=align, competence=comp, weights=weights)


def mutual_loss_reference(hiddens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                          proj_weights: Sequence[torch.Tensor], proj_biases: Sequence[torch.Tensor | None],
                          comp_weight: torch.Tensor, comp_bias: torch.Tensor, ce: torch.Tensor, *,
                          normalize: bool, competence_tau: float = 1.0, eps: float = 1e-6):
    """The mutual loss written literally in float64 (loops over rows and students, projection of
    every token before the mean): returns (L_align, L_comp) as float64 scalars.

    hiddens[s] [B, T_s, H_s]; masks[s] [B, T_s] bool (response tokens); proj_weights[s] [D, H_s];
    proj_biases[s] [D] or None; comp_weight [1, D]; comp_bias [1]; ce [B, S]. Gradients flow to the
    float64 views of the inputs that require them (autograd), for comparison with ``mutual_loss``.
    """
    S, B = len(hiddens), ce.shape[0]
    d64 = torch.float64
    zs = [[None] * S for _ in range(B)]
    valid = []
    for b in range(B):
        ok = True
        for s in range(S):
            m = masks[s][b]
            if int(m.sum()) == 0:
                ok = False
                zs[b][s] = None
                continue
            tokens = hiddens[s][b][m].to(d64) @ proj_weights[s].to(d64).T   # [n, D] projected tokens
            if proj_biases[s] is not None:
                tokens = tokens + proj_biases[s].to(d64)
            z = tokens.mean(0)
            if normalize:
                z = z * math.sqrt(z.shape[0]) / torch.clamp(torch.linalg.vector_norm(z), min=eps)
            zs[b][s] = z
        valid.append(ok)
    align = torch.zeros((), dtype=d64)
    comp = torch.zeros((), dtype=d64)
    n_valid = max(1, sum(valid))
    for b in range(B):
        if not valid[b]:
            continue
        scores = torch.stack([(comp_weight.to(d64) @ zs[b][s].detach()).squeeze() + comp_bias.to(d64).squeeze()
                              for s in range(S)])
        c = torch.exp(scores - torch.logsumexp(scores, 0))
        ensemble = sum(c[s].detach() * zs[b][s].detach() for s in range(S))
        D = ensemble.shape[0]
        align = align + sum(((zs[b][s] - ensemble) ** 2).sum() for s in range(S)) / (S * D)
        neg = -ce[b].detach().to(d64) / competence_tau
        t = torch.exp(neg - torch.logsumexp(neg, 0))
        comp = comp + (t * (torch.log(t) - torch.log(c))).sum()
    return align / n_valid, comp / n_valid


# ----------------------------------------------------------------------------------------------
# The container the Trainer checkpoints
# ----------------------------------------------------------------------------------------------
class QRDistillModel(nn.Module):
    """S students + router + per-student projections + competence regressor, trained together.

    students: causal LMs (``transformers`` models, possibly peft-wrapped) of any architectures and
    hidden sizes. router_in_dim: the frozen encoder's hidden size (None: no router, e.g. for
    routing='random'/'all'). shared_dim: D, the shared space of the mutual loss.
    """

    def __init__(self, students: Sequence[nn.Module], *, shared_dim: int, router_in_dim: int | None = None,
                 router_hidden: int = 256, hidden_sizes: Sequence[int] | None = None):
        super().__init__()
        if len(students) < 2:
            raise ValueError(f"students: QR-Distill needs at least 2, got {len(students)}")
        if shared_dim < 1:
            raise ValueError(f"shared_dim={shared_dim}: expected >= 1")
        self.students = nn.ModuleList(students)
        sizes = list(hidden_sizes) if hidden_sizes is not None else [student_hidden_size(m) for m in students]
        self.projections = nn.ModuleList(nn.Linear(h, shared_dim) for h in sizes)
        self.competence = nn.Linear(shared_dim, 1)
        self.router = Router(router_in_dim, len(students), router_hidden) if router_in_dim else None

    @property
    def num_students(self) -> int:
        return len(self.students)


def student_hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: pass hidden_sizes")


@dataclass
class LossSettings:
    routing: str = "learned"
    gumbel_tau: float = 1.0
    top_k: int = 1
    mutual: bool = True
    entropy_reg: bool = True
    lambda_1: float = 0.1
    lambda_2: float = 0.01
    normalize_shared: bool = True
    competence_tau: float = 1.0


def student_forward(student: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce [B], number of response tokens [B], mean last hidden state over response tokens [B, H])."""
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    ce, count = per_example_ce(out.logits, batch["labels"])
    pooled = masked_mean(out.hidden_states[-1].float(), batch["labels"] != -100)
    return ce, count, pooled


def qr_loss(model: QRDistillModel, batch: dict, settings: LossSettings) -> tuple[torch.Tensor, dict]:
    """L = L_ce + lambda_1 (L_align + L_comp) + lambda_2 L_bal for one batch; returns (loss, metrics).

    batch: {"student{s}": {input_ids, attention_mask, labels} per student, "route_features": [B, d_enc]
    (routing='learned')}."""
    S = model.num_students
    ces, counts, pooled = [], [], []
    for s, student in enumerate(model.students):
        ce, count, pool = student_forward(student, batch[f"student{s}"])
        ces.append(ce)
        counts.append(count)
        pooled.append(pool)
    ce = torch.stack(ces, 1)                                             # [B, S]
    B, device = ce.shape[0], ce.device
    valid = torch.stack(counts, 1).gt(0).all(1)                          # [B]
    logits = None
    if settings.routing == "learned":
        if model.router is None:
            raise ValueError("routing='learned' needs a router (QRDistillModel(router_in_dim=...))")
        logits = model.router(batch["route_features"])
    y = assign(logits, B, S, routing=settings.routing, tau=settings.gumbel_tau, k=settings.top_k, device=device)
    loss_ce = (y * ce).sum() / B
    loss = loss_ce
    metrics = {"ce_routed": float(loss_ce.detach())}
    if settings.mutual and settings.lambda_1 > 0:
        # float32 at least: under bf16 autocast the projections return bf16
        z = _upcast(torch.stack([shared_representation(p, proj, normalize=settings.normalize_shared)
                                 for p, proj in zip(pooled, model.projections)], 1))
        terms = mutual_loss(z, ce, valid, model.competence, competence_tau=settings.competence_tau)
        loss = loss + settings.lambda_1 * (terms.align + terms.competence)
        metrics["align"] = float(terms.align.detach())
        metrics["competence_kl"] = float(terms.competence.detach())
    if logits is not None and settings.entropy_reg and settings.lambda_2 > 0:
        bal = balance_loss(logits)
        loss = loss + settings.lambda_2 * bal
        metrics["balance"] = float(bal.detach())
    hard = y.detach()
    for s in range(S):
        metrics[f"ce_s{s}"] = float(ce[:, s].detach().mean())
        metrics[f"share_s{s}"] = float(hard[:, s].mean())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


@torch.no_grad()
def routing_probabilities(router: Router, features: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Noise-free router probabilities softmax(a) for every row of ``features``: float32 [N, S]."""
    device = next(router.parameters()).device
    out = [torch.softmax(router(features[i:i + batch_size].to(device)).float(), -1).cpu()
           for i in range(0, len(features), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, router.mlp[-1].out_features)
