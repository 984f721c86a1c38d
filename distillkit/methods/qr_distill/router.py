"""QR-Distill's trainable parts: the path router, mutual-student distillation and the total loss.

The seed paper's equations were not available to us verbatim (only its abstract, its description of the
method and its released code); these are the formulas implemented, each with its reason where the seed or
its released code leaves room.

Notation (one batch of B reasoning paths, S students, shared space of D dimensions):

  Router features (the encoder is frozen, so its features are computed once before training)
    u_b      = mean over the path's tokens of the frozen encoder's last hidden states      [B, d_enc]
    x_b      = (u_b - mean) / std       (per dimension, over the training paths; raw LLM features
                                          saturate a freshly initialised MLP)
    a_b      = MLP(x_b) = W2 GELU(W1 x_b + b1) + b2                                           [B, S]

  Routing, Eq. 2: alpha_b in {0, 1}^S, a path goes to one or more students (``routing``):
    bernoulli    p_bs = sigmoid(a_bs), alpha_bs ~ Bernoulli(p_bs) independently per student (a path
                 drawn for no student goes to its most likely one); the default
    topk         alpha_b = 1 on the k largest a_bs (k = route_top_k), p_b = softmax(a_b)
    gumbel_top1  alpha_b = 1 on the top-k of softmax((a_b + g_b) / tau), g ~ Gumbel(0, 1), p_b that
                 softmax (straight-through Gumbel-softmax; k = route_top_k, 1 by default; the old
                 ``learned`` routing)
    random | all the ablations: uniform top-k without a router, every student on every path
  Noise: the uniforms of bernoulli, gumbel_top1 and random are drawn per path from a generator seeded by
    (seed, the path's position in the run's stream of paths) (``path_uniforms``); the position is
    step x global batch + the path's index in the global batch, so a run on N ranks draws, path by path,
    the noise one process draws on the same global batches (whatever the split into ranks and micro-batches),
    and a resumed run draws the same noise again.
  Capacity (beyond the paper; on by default): each student takes at most
    C = ceil(c * R / S) routes of a batch (R = the batch's routes, c = router_capacity_factor), as in
  mixture-of-experts routing. Over capacity, a student keeps the paths it is most preferred for
  (largest p_bs); a path left with no student goes to its most preferred student with room. Without it
  the router collapses: a student that is better on every path by a fixed margin takes every path, and
  neither regulariser below can stop that (tests/methods/qr_distill: 100% of paths to one student
  within 2000 steps at lambda_2 = 0.01).

  Routed loss and the router's gradient (straight-through estimator)
    L_ce     = (1/B) sum_b sum_s alpha_bs ce_bs
             + (1/B) sum_b sum_s (p_bs - sg(p_bs)) sg(ce_bs - mean_s' ce_bs')
    ce_bs    = token-mean cross-entropy of student s on path b (every student runs on every path)
  The second term is exactly 0 in the forward pass; its gradient moves the router's probability
  toward the students whose loss on the path is below the path's mean loss. For softmax routings the
  centring changes nothing (a softmax's Jacobian sums to 0 over students); for Bernoulli routing it is
  the baseline without which every p_bs would only fall (every ce_bs > 0).

  Router regularisers (``router_regularizer``, weighted by lambda_2; ``entropy_reg: false`` is the ablation)
    pi_b     = the path's routing distribution: p_b for softmax routings, p_b / sum_s p_bs for Bernoulli
    balance  L_reg = log S - H((1/B) sum_b pi_b) = KL(mean assignment || uniform): students used evenly
             across the batch (the default before the paper preset; it lost to a fixed 0.2 loss gap)
    entropy  Eqs. 3-4 as we read them: L_reg = log S - (1/B) sum_b H(pi_b), the mean entropy of each
             path's routing distribution, maximised (keeps routing exploratory; it does not constrain
             the split across the batch, hence the capacity limit)

  Mutual-student distillation, Eqs. 5-8 (``mutual_form``)
    Eq. 5    z_bst = P_s h_bst: student s's last hidden state at response token t, projected to D
             (P_s: per-student linear map H_s -> D, D lower than the students' widths by default);
             rescaled to norm sqrt(D) when normalize_shared (stops the trivial minimiser P_s -> 0)
    Eq. 6    w = softmax(theta), theta in R^S: one competence score per student (``competence:
             student``); ``competence: path`` is the per-path regressor w_b = softmax_s(v . sg(zbar_bs) + c0)
    Eq. 7    e_bt = sum_{s in R_b} w_s sg(z_bst) / sum_{s in R_b} w_s, R_b = the students path b is
             routed to (``mutual_scope: routed``; ``all``: every student on every path)
    Eq. 8    token: L_mutual = mean over paths with |R_b| >= 2 of (1/|R_b|) sum_{s in R_b} mean_{t, d}
             (z_bstd - e_btd)^2. Students with different tokenizers see different token counts: each
             student's response states are resampled (linear interpolation along the response) to the
             path's longest response; with one tokenizer the positions coincide exactly.
             pooled (the variant): the same with zbar_bs = the mean of z_bst over response tokens.
    L_comp   = mean over valid b of KL(t_b || w_b), t_b = softmax_s(-sg(ce_b) / tau_c): what trains
             the competence scores (the ensemble is a fixed target, so Eq. 8 gives w no gradient)
  A row is valid when every student sees at least one response token (after truncation).

  Total, Eq. 9:  L = L_ce + lambda_1 (L_mutual + L_comp) + lambda_2 L_reg.

``mutual_loss_reference`` is the pooled mutual loss written literally (per row, per student, per token,
projection before pooling) for float64 tests; ``token_mutual_loss_reference`` the token form.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# routings with a router; random and all are the ablations; "learned" is the old name of gumbel_top1
LEARNED_ROUTINGS = ("bernoulli", "topk", "gumbel_top1")
ROUTINGS = (*LEARNED_ROUTINGS, "random", "all")
ROUTING_ALIASES = {"learned": "gumbel_top1"}
REGULARIZERS = ("balance", "entropy")
MUTUAL_FORMS = ("token", "pooled")
MUTUAL_SCOPES = ("routed", "all")
COMPETENCE_KINDS = ("student", "path")


def canonical_routing(routing: str) -> str:
    """``routing`` with the old name ``learned`` read as ``gumbel_top1``; InputError for an unknown one."""
    from distillkit._errors import InputError

    name = ROUTING_ALIASES.get(routing, routing)
    if name not in ROUTINGS:
        raise InputError(f"routing={routing!r}: expected one of {ROUTINGS} (or the old name 'learned')")
    return name

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


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def path_seed(seed: int, position: int) -> int:
    """The 63-bit seed of one path's routing noise: a hash of (run seed, the path's position in the stream)."""
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(position) & _MASK64)) >> 1


def path_uniforms(keys: torch.Tensor, seed: int, num_students: int, *, dtype: torch.dtype = torch.float32,
                  device=None) -> torch.Tensor:
    """Uniforms in [0, 1) [B, num_students]: row b from a generator seeded by ``path_seed(seed, keys[b])``, so a
    path's noise depends on (seed, its key) alone, not on the rows it is batched with nor on the rank.
    keys: [B] integers (the paths' positions in the run's stream of paths)."""
    if keys.dim() != 1:
        raise ValueError(f"keys: expected [B], got shape {tuple(keys.shape)}")
    if num_students < 1:
        raise ValueError(f"num_students={num_students}: expected >= 1")
    g = torch.Generator()
    rows = [torch.rand(num_students, generator=g.manual_seed(path_seed(seed, k)), dtype=torch.float64)
            for k in keys.tolist()]
    out = torch.stack(rows) if rows else torch.zeros(0, num_students, dtype=torch.float64)
    return out.to(device=device if device is not None else keys.device, dtype=dtype)


def gumbel_topk_straight_through(logits: torch.Tensor, *, tau: float = 1.0, k: int = 1,
                                 noise: bool = True, generator: torch.Generator | None = None,
                                 uniforms: torch.Tensor | None = None):
    """Straight-through Gumbel-softmax: (assignment [B, S], y_soft [B, S]).

    ``assignment`` equals the hard top-k one-hot in the forward pass and carries the gradient of
    ``y_soft = softmax((logits + g) / tau)`` in the backward pass. ``noise=False`` drops the Gumbel
    noise (deterministic routing, e.g. for statistics). ``uniforms`` [B, S]: the uniforms of the noise
    (``path_uniforms``) instead of drawing them from ``generator``."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, S], got shape {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k={k}: expected 1 <= k <= {logits.shape[1]} (the number of students)")
    if not tau > 0:
        raise ValueError(f"tau={tau}: expected > 0")
    x = _upcast(logits)
    if noise:
        u = _uniforms(uniforms, x, generator)
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


def _uniforms(uniforms: torch.Tensor | None, like: torch.Tensor, generator) -> torch.Tensor:
    if uniforms is None:
        return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if uniforms.shape != like.shape:
        raise ValueError(f"uniforms: expected shape {tuple(like.shape)}, got {tuple(uniforms.shape)}")
    return uniforms.to(device=like.device, dtype=like.dtype)


def bernoulli_straight_through(logits: torch.Tensor, *, noise: bool = True, generator: torch.Generator | None = None,
                               uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 with a per-student Bernoulli: (hard [B, S] in {0, 1}, p = sigmoid(logits) [B, S]).

    hard_bs ~ Bernoulli(p_bs) independently (``noise=False``: hard_bs = [p_bs > 0.5]); a row drawn for no
    student is routed to its argmax. ``hard`` carries no gradient: the straight-through term of the
    routed loss (``routed_loss``) gives the router its gradient through ``p``. ``uniforms`` [B, S]: the draw's
    uniforms (``path_uniforms``) instead of drawing them from ``generator``."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, S], got shape {tuple(logits.shape)}")
    p = torch.sigmoid(_upcast(logits))
    with torch.no_grad():
        if noise:
            u = _uniforms(uniforms, p, generator)
            hard = (u < p).to(p.dtype)
        else:
            hard = (p > 0.5).to(p.dtype)
        empty = hard.sum(1) == 0
        if bool(empty.any()):
            hard[empty] = torch.zeros_like(hard[empty]).scatter_(-1, p[empty].argmax(-1, keepdim=True), 1.0)
    return hard, p


def topk_route(logits: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard [B, S]: 1 on the k largest logits of each row, p = softmax(logits) [B, S])."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, S], got shape {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k={k}: expected 1 <= k <= {logits.shape[1]} (the number of students)")
    p = torch.softmax(_upcast(logits), dim=-1)
    hard = torch.zeros_like(p).scatter_(-1, logits.detach().topk(k, dim=-1).indices, 1.0)
    return hard, p


@torch.no_grad()
def apply_capacity(hard: torch.Tensor, preference: torch.Tensor, capacity_factor: float | None) -> torch.Tensor:
    """``hard`` [B, S] (0/1) with each student limited to C = ceil(c * R / S) routes, R = the routes left.

    A student over capacity keeps the rows with the largest ``preference`` [B, S] for it; a row left with
    no student goes to its most preferred student with room (its first choice, else its second, ...;
    among rows competing for the last places, the ones preferring that student most).
    ``capacity_factor`` None: ``hard`` unchanged. c >= 1 leaves room for every row (S * C >= R)."""
    if capacity_factor is None:
        return hard
    if hard.shape != preference.shape or hard.dim() != 2:
        raise ValueError(f"hard {tuple(hard.shape)} and preference {tuple(preference.shape)}: expected one [B, S]")
    if not capacity_factor >= 1:
        raise ValueError(f"capacity_factor={capacity_factor}: expected >= 1 (or None: no limit)")
    B, S = hard.shape
    out = hard.clone()
    pref = preference.detach().float()
    ranked = pref.argsort(dim=1, descending=True, stable=True)            # [B, S] students by preference
    # Dropping a co-routed path's route lowers R and so C: repeat until every load is within C of the final R.
    for _ in range(2 * S + 2):
        routes = int(out.sum())
        if routes == 0:
            break
        cap = math.ceil(capacity_factor * routes / S - 1e-9)
        if bool((out.sum(0) <= cap).all()):
            break
        for s in range(S):
            rows = out[:, s].nonzero().squeeze(1)
            if len(rows) > cap:
                order = pref[rows, s].argsort(descending=True, stable=True)
                out[rows[order[cap:]], s] = 0.0
        # rows left with no student: their 1st choices with room first, then their 2nd choices, ...
        for rank in range(S):
            orphans = (out.sum(1) == 0).nonzero().squeeze(1)
            if len(orphans) == 0:
                break
            choice = ranked[orphans, rank]
            for s in range(S):
                room = cap - int(out[:, s].sum())
                rows = orphans[choice == s]
                if room > 0 and len(rows):
                    rows = rows[pref[rows, s].argsort(descending=True, stable=True)[:room]]
                    out[rows, s] = 1.0
    return out


@dataclass
class Route:
    hard: torch.Tensor               # [B, S] 0/1, the assignment alpha (after the capacity limit)
    probs: torch.Tensor | None       # [B, S] what the router's gradient flows through (None: no router)
    distribution: torch.Tensor | None  # [B, S] pi, each row summing to 1 (for the regularisers)


def route(router_logits: torch.Tensor | None, batch_size: int, num_students: int, *, routing: str,
          tau: float = 1.0, k: int = 1, capacity_factor: float | None = None, device=None,
          noise: bool = True, noise_keys: torch.Tensor | None = None, noise_seed: int = 0) -> Route:
    """The assignment of one batch under ``routing`` (see the module docstring), capacity-limited for the
    learned routings when ``capacity_factor`` is set. ``noise_keys`` [B]: the paths' positions in the run's
    stream, their noise drawn by ``path_uniforms(noise_keys, noise_seed, S)`` (the same path for the same key
    whatever the batch and rank); None: from torch's global generator."""
    routing = canonical_routing(routing)
    uniforms = None
    if noise_keys is not None and noise and routing in ("bernoulli", "gumbel_top1", "random"):
        if noise_keys.shape != (batch_size,):
            raise ValueError(f"noise_keys: expected [{batch_size}], got shape {tuple(noise_keys.shape)}")
        dtype = torch.float32 if router_logits is None else _upcast(router_logits).dtype
        uniforms = path_uniforms(noise_keys, noise_seed, num_students, dtype=dtype,
                                 device=device if router_logits is None else router_logits.device)
    if routing in LEARNED_ROUTINGS:
        if router_logits is None:
            raise ValueError(f"routing={routing!r} needs router logits")
        if routing == "bernoulli":
            hard, probs = bernoulli_straight_through(router_logits, noise=noise, uniforms=uniforms)
            dist = probs / probs.sum(-1, keepdim=True)
        elif routing == "topk":
            hard, probs = topk_route(router_logits, k)
            dist = probs
        else:
            y, probs = gumbel_topk_straight_through(router_logits, tau=tau, k=k, noise=noise, uniforms=uniforms)
            hard = y.detach()
            dist = torch.softmax(_upcast(router_logits), dim=-1)  # noise-free, as the balance term always was
        hard = apply_capacity(hard, probs, capacity_factor)
        return Route(hard, probs, dist)
    if routing == "random":
        scores = uniforms if uniforms is not None else torch.rand(batch_size, num_students, device=device)
        return Route(torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0), None, None)
    return Route(torch.ones(batch_size, num_students, device=device), None, None)


def assign(router_logits: torch.Tensor | None, batch_size: int, num_students: int, *, routing: str,
           tau: float, k: int, device) -> torch.Tensor:
    """The [B, S] assignment of the old interface: forward value alpha, gradient through the router's
    probabilities for the learned routings (no capacity limit)."""
    r = route(router_logits, batch_size, num_students, routing=routing, tau=tau, k=k, device=device)
    return r.hard if r.probs is None else r.hard + (r.probs - r.probs.detach())


def routed_loss(route_: Route, ce: torch.Tensor) -> torch.Tensor:
    """L_ce of the module docstring: (1/B) sum alpha * ce, plus the straight-through term (0 in the forward
    pass) that gives the router the gradient of the centred losses. ce [B, S] float32."""
    B = ce.shape[0]
    loss = (route_.hard.to(ce.dtype) * ce).sum() / B
    if route_.probs is not None:
        adv = (ce - ce.mean(1, keepdim=True)).detach().to(route_.probs.dtype)
        loss = loss + ((route_.probs - route_.probs.detach()) * adv).sum() / B
    return loss


def balance_from_distribution(pi: torch.Tensor) -> torch.Tensor:
    """log S - H(mean_b pi_b), pi [B, S] rows summing to 1."""
    p_bar = pi.float().mean(0)
    return math.log(pi.shape[-1]) + (p_bar * torch.log(p_bar.clamp_min(1e-12))).sum()


def path_entropy_loss(pi: torch.Tensor) -> torch.Tensor:
    """log S - mean_b H(pi_b): Eqs. 3-4 as read here (0 when every path's routing is uniform)."""
    pi = pi.float()
    h = -(pi * torch.log(pi.clamp_min(1e-12))).sum(-1)
    return math.log(pi.shape[-1]) - h.mean()


def router_regularizer(pi: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "balance":
        return balance_from_distribution(pi)
    if kind == "entropy":
        return path_entropy_loss(pi)
    raise ValueError(f"router_regularizer={kind!r}: expected one of {REGULARIZERS}")


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


def mutual_loss(z: torch.Tensor, ce: torch.Tensor, valid: torch.Tensor, competence: nn.Linear | None, *,
                competence_tau: float = 1.0, scores: torch.Tensor | None = None,
                routed: torch.Tensor | None = None) -> MutualTerms:
    """The pooled form of Eq. 8 (L_align) and L_comp of the module docstring.

    z [B, S, D]: the students' shared representations; ce [B, S]: per-example losses (detached
    here); valid [B] bool: rows every student saw response tokens of. ``competence``: Linear(D, 1), the
    per-path regressor, used when ``scores`` is None; scores [B, S]: competence logits given instead (one
    per student, broadcast: Eq. 6). routed [B, S] bool: align only the students each path is routed to,
    on the paths routed to two or more (None: every student on every path).
    """
    if z.dim() != 3:
        raise ValueError(f"z: expected [B, S, D], got shape {tuple(z.shape)}")
    if ce.shape != z.shape[:2]:
        raise ValueError(f"ce: expected shape {tuple(z.shape[:2])}, got {tuple(ce.shape)}")
    if valid.shape != z.shape[:1] or valid.dtype != torch.bool:
        raise ValueError(f"valid: expected bool [B={z.shape[0]}], got {valid.dtype} {tuple(valid.shape)}")
    if not competence_tau > 0:
        raise ValueError(f"competence_tau={competence_tau}: expected > 0")
    if scores is None:
        scores = competence(z.detach()).squeeze(-1)                      # [B, S]
    log_c = torch.log_softmax(_upcast(scores), dim=-1).expand(z.shape[:2])
    weights = log_c.exp()
    members = _members(routed, valid, z.shape[:2])                       # [B, S] bool
    mw = weights.detach() * members.to(weights.dtype)
    mw = mw / mw.sum(1, keepdim=True).clamp_min(1e-30)
    ensemble = (mw.to(z.dtype).unsqueeze(-1) * z.detach()).sum(1)       # [B, D]
    mf = members.to(z.dtype)
    per_row = (((z - ensemble.unsqueeze(1)) ** 2).mean(-1) * mf).sum(1) / mf.sum(1).clamp_min(1.0)
    rows = members.sum(1) >= 2
    align = (per_row * rows.to(z.dtype)).sum() / rows.sum().clamp_min(1).to(z.dtype)
    comp = competence_kl(log_c, ce, valid, competence_tau)
    return MutualTerms(align=align, competence=comp, weights=weights)


def _members(routed: torch.Tensor | None, valid: torch.Tensor, shape) -> torch.Tensor:
    """[B, S] bool: the students a row's alignment covers (routed ones, or all), on valid rows only."""
    members = torch.ones(shape, dtype=torch.bool, device=valid.device) if routed is None else routed.bool()
    if members.shape != tuple(shape):
        raise ValueError(f"routed: expected shape {tuple(shape)}, got {tuple(members.shape)}")
    return members & valid.unsqueeze(1)


def competence_kl(log_c: torch.Tensor, ce: torch.Tensor, valid: torch.Tensor, competence_tau: float) -> torch.Tensor:
    """L_comp = mean over valid rows of KL(softmax(-ce / tau) || c); log_c [B, S] log competence weights."""
    vf = valid.to(log_c.dtype)
    log_t = torch.log_softmax(-_upcast(ce.detach()).to(log_c.dtype) / competence_tau, dim=-1)
    kl = (log_t.exp() * (log_t - log_c)).sum(-1)
    return (kl * vf).sum() / vf.sum().clamp_min(1.0)


def resample_tokens(states: torch.Tensor, length: int) -> torch.Tensor:
    """states [n, D] -> [length, D] by linear interpolation along the sequence (the identity when n == length;
    a single state is repeated)."""
    n = states.shape[0]
    if n == length:
        return states
    if n == 1:
        return states.expand(length, states.shape[1])
    return F.interpolate(states.T.unsqueeze(0), size=length, mode="linear", align_corners=True)[0].T


def token_mutual_loss(states: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], ce: torch.Tensor,
                      valid: torch.Tensor, scores: torch.Tensor, *, routed: torch.Tensor | None = None,
                      competence_tau: float = 1.0) -> MutualTerms:
    """Eq. 8, token form (and L_comp): see the module docstring.

    states[s] [B, T_s, D]: student s's projected (and, if wanted, normalised) token states; masks[s]
    [B, T_s] bool: its response tokens; ce [B, S]; valid [B] bool; scores [S] or [B, S]: competence logits;
    routed [B, S] bool or None (every student)."""
    S = len(states)
    if S < 2 or len(masks) != S:
        raise ValueError(f"states, masks: expected S >= 2 of each, got {len(states)} and {len(masks)}")
    B = ce.shape[0]
    if ce.shape != (B, S) or valid.shape != (B,) or valid.dtype != torch.bool:
        raise ValueError(f"ce {tuple(ce.shape)} / valid {valid.dtype} {tuple(valid.shape)}: expected [B, {S}] / "
                         "bool [B]")
    for s in range(S):
        if states[s].dim() != 3 or states[s].shape[0] != B or masks[s].shape != states[s].shape[:2]:
            raise ValueError(f"states[{s}] {tuple(states[s].shape)}, masks[{s}] {tuple(masks[s].shape)}: expected "
                             "[B, T, D] and [B, T]")
    log_c = torch.log_softmax(_upcast(scores), dim=-1).expand(B, S)
    weights = log_c.exp()
    members = _members(routed, valid, (B, S))
    dtype = torch.promote_types(states[0].dtype, torch.float32)
    align = states[0].new_zeros((), dtype=dtype)
    n_rows = 0
    for b in range(B):
        who = members[b].nonzero().squeeze(1).tolist()
        if len(who) < 2:
            continue
        toks = [states[s][b][masks[s][b]].to(dtype) for s in who]       # [n_s, D] each
        length = max(t.shape[0] for t in toks)
        zs = torch.stack([resample_tokens(t, length) for t in toks])     # [m, L, D]
        w = weights[b, who].detach().to(dtype)
        w = w / w.sum()
        ensemble = (w[:, None, None] * zs.detach()).sum(0)                # [L, D]
        align = align + ((zs - ensemble) ** 2).mean()
        n_rows += 1
    align = align / max(1, n_rows)
    comp = competence_kl(log_c, ce, valid, competence_tau)
    return MutualTerms(align=align, competence=comp, weights=weights)


def token_mutual_loss_reference(hiddens, masks, proj_weights, proj_biases, ce, theta, routed, *, normalize: bool,
                                competence_tau: float = 1.0, eps: float = 1e-6, dtype: torch.dtype = torch.float64):
    """The token form written literally (loops over rows and students) for tests: (L_align, L_comp), computed
    in ``dtype`` (float64: the truth; float32: plain PyTorch's error budget). hiddens[s] [B, T_s, H_s];
    masks[s] [B, T_s] bool; proj_weights[s] [D, H_s]; proj_biases[s] [D] or None; ce [B, S]; theta [S];
    routed [B, S] bool. Every row's students must share one response length (no resampling here)."""
    S, B = len(hiddens), ce.shape[0]
    d64 = dtype
    w_all = torch.softmax(theta.to(d64), 0)
    align, n_rows, comp, n_valid = torch.zeros((), dtype=d64), 0, torch.zeros((), dtype=d64), 0
    for b in range(B):
        if any(int(masks[s][b].sum()) == 0 for s in range(S)):
            continue
        n_valid += 1
        neg = -ce[b].detach().to(d64) / competence_tau
        t = torch.exp(neg - torch.logsumexp(neg, 0))
        comp = comp + (t * (torch.log(t) - torch.log(w_all))).sum()
        who = [s for s in range(S) if bool(routed[b, s])]
        if len(who) < 2:
            continue
        zs = {}
        for s in who:
            z = hiddens[s][b][masks[s][b]].to(d64) @ proj_weights[s].to(d64).T
            if proj_biases[s] is not None:
                z = z + proj_biases[s].to(d64)
            if normalize:
                z = z * math.sqrt(z.shape[1]) / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(eps)
            zs[s] = z
        wsum = sum(w_all[s] for s in who)
        ens = sum(w_all[s].detach() / wsum.detach() * zs[s].detach() for s in who)
        align = align + sum(((zs[s] - ens) ** 2).mean() for s in who) / len(who)
        n_rows += 1
    return align / max(1, n_rows), comp / max(1, n_valid)


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

    # the loss leaves parameters out depending on the settings and the routing of a batch (the competence kind
    # not in use, projections on a batch without co-routed paths): DDP must look for them every step
    ddp_find_unused_parameters = True

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
        self.competence = nn.Linear(shared_dim, 1)                       # per-path regressor (competence: path)
        self.competence_scores = nn.Parameter(torch.zeros(len(students)))  # theta, Eq. 6 (competence: student)
        self.router = Router(router_in_dim, len(students), router_hidden) if router_in_dim else None

    @property
    def num_students(self) -> int:
        return len(self.students)

    def forward(self, batch: dict, settings: LossSettings) -> tuple[torch.Tensor, dict]:
        """:func:`qr_loss` of this container: the trainer calls the container (its DDP wrapper), so the students',
        router's, projections' and competence gradients are all-reduced like any parameter's."""
        return qr_loss(self, batch, settings)


def student_hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: pass hidden_sizes")


@dataclass
class LossSettings:
    routing: str = "bernoulli"
    gumbel_tau: float = 1.0
    top_k: int = 1
    capacity_factor: float | None = 1.25
    mutual: bool = True
    mutual_form: str = "token"
    mutual_scope: str = "routed"
    competence: str = "student"
    entropy_reg: bool = True
    regularizer: str = "balance"
    lambda_1: float = 0.1
    lambda_2: float = 0.01
    normalize_shared: bool = True
    competence_tau: float = 1.0
    noise_seed: int = 0  # with the batch's "route_keys", seeds each path's routing noise (path_uniforms)

    def __post_init__(self):
        self.routing = canonical_routing(self.routing)
        for name, allowed in (("mutual_form", MUTUAL_FORMS), ("mutual_scope", MUTUAL_SCOPES),
                              ("competence", COMPETENCE_KINDS), ("regularizer", REGULARIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.capacity_factor is not None and not self.capacity_factor >= 1:
            raise ValueError(f"capacity_factor={self.capacity_factor}: expected >= 1 or None")


def student_states(student: nn.Module, batch: dict):
    """(ce [B], number of response tokens [B], last hidden states [B, T, H] float32, response mask [B, T])."""
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    ce, count = per_example_ce(out.logits, batch["labels"])
    return ce, count, out.hidden_states[-1].float(), batch["labels"] != -100


def student_forward(student: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce [B], number of response tokens [B], mean last hidden state over response tokens [B, H])."""
    ce, count, hidden, mask = student_states(student, batch)
    return ce, count, masked_mean(hidden, mask)


def _project(hidden: torch.Tensor, projection: nn.Linear, normalize: bool, eps: float = 1e-6) -> torch.Tensor:
    z = _upcast(projection(hidden.to(projection.weight.dtype)))
    if normalize:
        z = z * (math.sqrt(z.shape[-1]) / z.norm(dim=-1, keepdim=True).clamp_min(eps))
    return z


def qr_loss(model: QRDistillModel, batch: dict, settings: LossSettings) -> tuple[torch.Tensor, dict]:
    """L = L_ce + lambda_1 (L_mutual + L_comp) + lambda_2 L_reg for one batch (Eq. 9); returns (loss, metrics).

    batch: {"student{s}": {input_ids, attention_mask, labels} per student, "route_features": [B, d_enc]
    (learned routings), optionally "route_keys": [B] the paths' positions in the run's stream (seeding each
    path's routing noise with ``settings.noise_seed``; without them the noise comes from torch's generator)}."""
    S = model.num_students
    ces, counts, hiddens, masks = [], [], [], []
    for s, student in enumerate(model.students):
        ce, count, hidden, mask = student_states(student, batch[f"student{s}"])
        ces.append(ce)
        counts.append(count)
        hiddens.append(hidden)
        masks.append(mask)
    ce = torch.stack(ces, 1)                                             # [B, S]
    B, device = ce.shape[0], ce.device
    valid = torch.stack(counts, 1).gt(0).all(1)                          # [B]
    logits = None
    if settings.routing in LEARNED_ROUTINGS:
        if model.router is None:
            raise ValueError(f"routing={settings.routing!r} needs a router (QRDistillModel(router_in_dim=...))")
        logits = model.router(batch["route_features"])
    r = route(logits, B, S, routing=settings.routing, tau=settings.gumbel_tau, k=settings.top_k,
              capacity_factor=settings.capacity_factor, device=device, noise_keys=batch.get("route_keys"),
              noise_seed=settings.noise_seed)
    loss_ce = routed_loss(r, ce)
    loss = loss_ce
    metrics = {"ce_routed": float(loss_ce.detach())}
    if settings.mutual and settings.lambda_1 > 0:
        routed = r.hard.bool() if settings.mutual_scope == "routed" else None
        scores = model.competence_scores if settings.competence == "student" else None
        if settings.mutual_form == "token" and scores is None:  # the per-path regressor reads pooled states
            pooled = torch.stack([_project(masked_mean(h, m), p, settings.normalize_shared)
                                  for h, m, p in zip(hiddens, masks, model.projections)], 1)
            scores = model.competence(pooled.detach()).squeeze(-1)
        if settings.mutual_form == "token":
            states = [_project(h, p, settings.normalize_shared) for h, p in zip(hiddens, model.projections)]
            terms = token_mutual_loss(states, masks, ce, valid, scores, routed=routed,
                                      competence_tau=settings.competence_tau)
        else:
            z = torch.stack([shared_representation(masked_mean(h, m), p, normalize=settings.normalize_shared)
                             for h, m, p in zip(hiddens, masks, model.projections)], 1)
            terms = mutual_loss(_upcast(z), ce, valid, model.competence, competence_tau=settings.competence_tau,
                                scores=scores, routed=routed)
        loss = loss + settings.lambda_1 * (terms.align + terms.competence)
        metrics["align"] = float(terms.align.detach())
        metrics["competence_kl"] = float(terms.competence.detach())
    if r.distribution is not None and settings.entropy_reg and settings.lambda_2 > 0:
        reg = router_regularizer(r.distribution, settings.regularizer)
        loss = loss + settings.lambda_2 * reg
        metrics[settings.regularizer] = float(reg.detach())
    hard = r.hard.detach()
    routes = float(hard.sum())
    metrics["co_routed"] = float((hard.sum(1) >= 2).float().mean())
    for s in range(S):
        metrics[f"ce_s{s}"] = float(ce[:, s].detach().mean())
        metrics[f"share_s{s}"] = float(hard[:, s].sum()) / max(routes, 1.0)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


@torch.no_grad()
def routing_probabilities(router: Router, features: torch.Tensor, batch_size: int = 256, *,
                          routing: str = "gumbel_top1") -> torch.Tensor:
    """Noise-free router probabilities for every row of ``features``: float32 [N, S]; softmax(a) for the softmax
    routings, sigmoid(a) (each student's own probability of being drawn) for ``bernoulli``."""
    device = next(router.parameters()).device
    act = torch.sigmoid if canonical_routing(routing) == "bernoulli" else (lambda a: torch.softmax(a, -1))
    out = [act(router(features[i:i + batch_size].to(device)).float()).cpu()
           for i in range(0, len(features), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, router.mlp[-1].out_features)
