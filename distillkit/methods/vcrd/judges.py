"""Token-validity judges for VCRD: how valid is it to continue a reasoning prefix with a given token?

The interface is one call over a batch of sequences and one candidate token per position:

    scores = judge(prefix_ids, token_ids, mask=None)          # [B, T] float32 in [0, 1]

    scores[b, t] = validity of appending token_ids[b, t] to the context prefix_ids[b, : t + 1]

i.e. position t's context is the first t + 1 tokens of row b (the same convention as a causal LM,
whose hidden state at position t predicts token t + 1): VCRD calls ``judge(ids, a_S)`` and
``judge(ids, a_T)`` with a_S[b, t], a_T[b, t] the student's and teacher's candidate tokens at position t
(sampled from each model, or their argmax).
Rows are right-padded; ``mask[b, t]`` (bool) says which positions need a score (the rollout's
positions: a judge spends no work elsewhere, and returns 0 there). mask=None scores every position.

Judges:
    CallableJudge(fn)              wraps any ``fn(prefix_ids, token_ids) -> [B, T]`` (tests, user rules)
    HFProcessRewardJudge(model, tokenizer, good_token="+", bad_token="-", step_tag=None)
                                   a causal-LM process reward model in the Math-Shepherd style:
                                   score = P(good) / (P(good) + P(bad)) of the PRM's next-token
                                   distribution after prefix + candidate (+ step_tag)
    HFValueHeadJudge(model, tokenizer, value_head, step_tag="\n")
                                   a causal LM with a scalar value head (Skywork-o1-Open-PRM style):
                                   score = sigmoid(value_head(last hidden state)) read at the step
                                   separator appended after prefix + candidate
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

__all__ = ["CallableJudge", "HFProcessRewardJudge", "HFValueHeadJudge", "Judge", "check_judge_inputs",
           "check_scores", "load_value_head", "VALUE_HEAD_FILE"]


@runtime_checkable
class Judge(Protocol):
    def __call__(self, prefix_ids: torch.Tensor, token_ids: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """prefix_ids, token_ids: [B, T] int64 (right-padded); mask: [B, T] bool or None.
        Returns float32 [B, T] in [0, 1]: scores[b, t] = validity of token_ids[b, t] after
        prefix_ids[b, :t+1]; 0 where mask is False."""


def check_judge_inputs(prefix_ids, token_ids, mask) -> torch.Tensor:
    """Validates a judge call; returns the mask as a bool [B, T] tensor (all True when None)."""
    for name, x in (("prefix_ids", prefix_ids), ("token_ids", token_ids)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer (int64) tensor [B, T], got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")
    if token_ids.shape != prefix_ids.shape:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must have the shape of prefix_ids "
                         f"{tuple(prefix_ids.shape)} (one candidate per position)")
    if mask is None:
        return torch.ones(prefix_ids.shape, dtype=torch.bool, device=prefix_ids.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != prefix_ids.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(prefix_ids.shape)} or None, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    return mask


def check_scores(scores, shape, who: str = "judge") -> torch.Tensor:
    """A judge's output as float32 [B, T]; raises if it has the wrong shape, NaN or leaves [0, 1]."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if tuple(scores.shape) != tuple(shape):
        raise ValueError(f"{who} returned shape {tuple(scores.shape)}, expected {tuple(shape)}")
    scores = scores.detach().to(torch.float32)
    if torch.isnan(scores).any():
        raise ValueError(f"{who} returned NaN scores")
    if scores.numel() and (scores.min() < 0 or scores.max() > 1):
        raise ValueError(f"{who} returned scores outside [0, 1] (min {float(scores.min())}, "
                         f"max {float(scores.max())})")
    return scores


class CallableJudge:
    """A judge from a plain function ``fn(prefix_ids [B, T], token_ids [B, T]) -> [B, T] in [0, 1]``
    (same indexing as :class:`Judge`). Its output is checked and zeroed where ``mask`` is False."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn, self.name = fn, name or getattr(fn, "__name__", "callable")

    @torch.no_grad()
    def __call__(self, prefix_ids: torch.Tensor, token_ids: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = check_judge_inputs(prefix_ids, token_ids, mask)
        scores = check_scores(self.fn(prefix_ids, token_ids), prefix_ids.shape, f"judge {self.name!r}")
        return torch.where(mask, scores.to(mask.device), torch.zeros((), device=mask.device))

    def __repr__(self) -> str:
        return f"CallableJudge({self.name!r})"


def _single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{what}={text!r} must be exactly one token of the PRM's tokenizer, got ids {ids}")
    return int(ids[0])


class HFProcessRewardJudge:
    """A causal-LM process reward model (Math-Shepherd style) as a token-validity judge.

    model: a ``transformers`` causal LM trained to emit ``good_token`` / ``bad_token`` after a step;
    tokenizer: its tokenizer. score(prefix, candidate) = P(good) / (P(good) + P(bad)) of the model's
    next-token distribution after ``prefix + candidate + step_tag`` (step_tag: the PRM's step marker,
    e.g. Math-Shepherd's "ки", or None to read the distribution right after the candidate).

    Vocabulary: with ``policy_tokenizer=None`` the policy's token ids are taken to be the PRM's (same
    tokenizer): sequences are formed from ids directly. Otherwise every (prefix, candidate) is decoded
    with ``policy_tokenizer`` and re-encoded with the PRM's tokenizer (the text route, no cache reuse).

    Cost: a rollout of T scored positions needs T PRM evaluations of a prefix of up to P + T tokens
    (prompt P). Scoring them as T separate sequences costs O(T (P + T)) tokens of compute per rollout
    (``reuse_prefix_cache=False``). With ``reuse_prefix_cache=True`` (ids route) each row's prefix is
    run once with the KV cache on, then the candidates (1 + len(step_tag) tokens each) of up to
    ``batch_size`` positions are appended as one extra block whose 4-D attention mask lets candidate t
    see cached keys 0..t and its own tokens only (tree attention): O(P + T + T k) tokens of compute and
    one row's KV cache in memory. That mask needs the "eager" or "sdpa" attention implementation.
    VCRD calls the judge twice per rollout (student's and teacher's candidate tokens).
    """

    def __init__(self, model, tokenizer, *, good_token: str = "+", bad_token: str = "-",
                 step_tag: str | None = None, policy_tokenizer=None, batch_size: int = 64,
                 reuse_prefix_cache: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.good_id = _single_token(tokenizer, good_token, "good_token")
        self.bad_id = _single_token(tokenizer, bad_token, "bad_token")
        if self.good_id == self.bad_id:
            raise ValueError(f"good_token={good_token!r} and bad_token={bad_token!r} are the same token")
        self._set_sequence_options(tokenizer, step_tag, policy_tokenizer, batch_size, reuse_prefix_cache)

    def _set_sequence_options(self, tokenizer, step_tag, policy_tokenizer, batch_size, reuse_prefix_cache) -> None:
        # what both judges' sequence building reads: the step separator's ids, the routes, batching, padding
        self.tag_ids = tokenizer.encode(step_tag, add_special_tokens=False) if step_tag else []
        if step_tag and not self.tag_ids:
            raise ValueError(f"step_tag={step_tag!r} encodes to no token")
        self.policy_tokenizer, self.batch_size = policy_tokenizer, batch_size
        self.reuse_prefix_cache = reuse_prefix_cache
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, policy_tokenizer=None, dtype="float32", device="cpu",
                        **kwargs) -> HFProcessRewardJudge:
        """Loads the PRM; the policy's tokenizer is used for the text route only when the PRM's
        vocabulary differs from it."""
        from transformers import AutoModelForCausalLM

        from distillkit.teachers.hf import load_tokenizer, resolve_dtype

        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), attn_implementation="sdpa")
        tok = load_tokenizer(path)
        if policy_tokenizer is not None and policy_tokenizer.get_vocab() == tok.get_vocab():
            policy_tokenizer = None  # same ids: no decode / re-encode
        return cls(model.to(device), tok, policy_tokenizer=policy_tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, prefix_ids: torch.Tensor, token_ids: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = check_judge_inputs(prefix_ids, token_ids, mask)
        scores = torch.zeros(prefix_ids.shape, dtype=torch.float32)
        prefix_cpu, tokens_cpu, mask_cpu = prefix_ids.cpu(), token_ids.cpu(), mask.cpu()
        if self.policy_tokenizer is None:
            vocab = self.model.get_input_embeddings().weight.shape[0]
            for name, x in (("prefix_ids", prefix_cpu[mask_cpu]), ("token_ids", tokens_cpu[mask_cpu])):
                if x.numel() and (x.min() < 0 or x.max() >= vocab):
                    raise ValueError(f"{name} holds ids outside the PRM's vocabulary [0, {vocab})")
        for b in range(prefix_ids.shape[0]):
            positions = mask_cpu[b].nonzero().flatten().tolist()
            if not positions:
                continue
            if self.policy_tokenizer is not None:
                got = self._score_text(prefix_cpu[b], tokens_cpu[b], positions)
            elif self.reuse_prefix_cache:
                got = self._score_cached(prefix_cpu[b], tokens_cpu[b], positions)
            else:
                got = self._score_direct(prefix_cpu[b], tokens_cpu[b], positions)
            scores[b, positions] = got
        return scores.to(prefix_ids.device)

    def _forward(self, **kwargs) -> torch.Tensor:
        """The per-position features the score is read from: the PRM's next-token logits [B, L, V]."""
        return self.model(**kwargs).logits

    def _good_prob(self, logits: torch.Tensor) -> torch.Tensor:
        """P(good) / (P(good) + P(bad)) from next-token logits [..., V]."""
        pair = logits[..., [self.good_id, self.bad_id]].float()
        return torch.softmax(pair, dim=-1)[..., 0].cpu()

    def _last_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """Next-token logits after each sequence: right-padded batches of ``batch_size``."""
        out = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s)
                att[j, :len(s)] = 1
            logits = self._forward(input_ids=ids.to(self.device), attention_mask=att.to(self.device))
            last = att.sum(1) - 1
            out.append(logits[torch.arange(len(chunk)), last.to(self.device)])
        return torch.cat(out)

    def _score_direct(self, prefix: torch.Tensor, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        seqs = [prefix[:t + 1].tolist() + [int(tokens[t])] + self.tag_ids for t in positions]
        return self._good_prob(self._last_logits(seqs))

    def _score_text(self, prefix: torch.Tensor, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        seqs = []
        for t in positions:
            text = self.policy_tokenizer.decode(prefix[:t + 1].tolist() + [int(tokens[t])], skip_special_tokens=True)
            seqs.append(self.tokenizer(text)["input_ids"] + self.tag_ids)
        return self._good_prob(self._last_logits(seqs))

    def _score_cached(self, prefix: torch.Tensor, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        from distillkit.teachers.hf import cache_kwargs

        dev, k = self.device, 1 + len(self.tag_ids)
        n_prefix = max(positions) + 1
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=prefix[:n_prefix].unsqueeze(0).to(dev), use_cache=True, **cache_kwargs(self.model, cache))
        dtype = self.model.get_input_embeddings().weight.dtype
        neg = torch.finfo(dtype).min
        out = []
        for i in range(0, len(positions), self.batch_size):
            pos = torch.tensor(positions[i:i + self.batch_size])
            m = len(pos)
            # block of m candidates, k tokens each: candidate j = [token_ids[t_j]] + step_tag
            block = torch.tensor(self.tag_ids, dtype=torch.long).repeat(m, 1) if self.tag_ids else \
                torch.empty((m, 0), dtype=torch.long)
            block = torch.cat([tokens[pos].unsqueeze(1), block], 1)  # [m, k]
            position_ids = (pos.unsqueeze(1) + 1 + torch.arange(k)).reshape(1, -1)
            # query (j, a) sees cached keys 0..t_j and keys (j, b <= a) of its own candidate
            sees_prefix = torch.arange(n_prefix).unsqueeze(0) <= pos.unsqueeze(1)  # [m, n_prefix]
            sees_prefix = sees_prefix.unsqueeze(1).expand(m, k, n_prefix).reshape(m * k, n_prefix)
            own = torch.block_diag(*[torch.tril(torch.ones(k, k, dtype=torch.bool))] * m)  # [m k, m k]
            allowed = torch.cat([sees_prefix, own], 1)
            mask4d = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, neg)[None, None].to(dev)
            logits = self._forward(input_ids=block.reshape(1, -1).to(dev), attention_mask=mask4d,
                                   position_ids=position_ids.to(dev), use_cache=True,
                                   **cache_kwargs(self.model, cache))
            cache.crop(-m * k)  # drop this block's keys (negative: remove that many) before the next block
            out.append(self._good_prob(logits[0].reshape(m, k, -1)[:, -1]))
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"HFProcessRewardJudge(good_id={self.good_id}, bad_id={self.bad_id}, tag_ids={self.tag_ids})"


VALUE_HEAD_FILE = "value_head.safetensors"
# where value-head PRMs keep their head inside the checkpoint (TRL's AutoModelForCausalLMWithValueHead and
# Skywork-o1-Open-PRM: v_head.summary.*), or in a file of its own (weight [1, H], bias [1])
_VALUE_HEAD_PREFIXES = ("v_head.summary.", "value_head.", "score.")


def load_value_head(path: str | os.PathLike) -> torch.nn.Linear:
    """The scalar value head (a Linear H -> 1) of a value-head PRM checkpoint directory: from
    ``value_head.safetensors`` ({weight, bias}) when present, else from the checkpoint's own safetensors
    files (keys ``v_head.summary.weight`` / ``.bias``, or ``value_head.*``, ``score.*``)."""
    import glob

    from safetensors import safe_open

    files = [os.path.join(path, VALUE_HEAD_FILE)]
    if not os.path.exists(files[0]):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
            for prefix in ("",) + _VALUE_HEAD_PREFIXES if file.endswith(VALUE_HEAD_FILE) else _VALUE_HEAD_PREFIXES:
                if prefix + "weight" in keys:
                    weight = f.get_tensor(prefix + "weight")
                    bias = f.get_tensor(prefix + "bias") if prefix + "bias" in keys else None
                    if weight.dim() != 2 or weight.shape[0] != 1:
                        raise ValueError(f"{file}: {prefix}weight is {tuple(weight.shape)}, expected [1, hidden]")
                    head = torch.nn.Linear(weight.shape[1], 1, bias=bias is not None)
                    with torch.no_grad():
                        head.weight.copy_(weight.float())
                        if bias is not None:
                            head.bias.copy_(bias.float().reshape(1))
                    return head
    raise ValueError(f"judge={str(path)!r}: no value head found ({VALUE_HEAD_FILE}, or keys "
                     f"{[p + 'weight' for p in _VALUE_HEAD_PREFIXES]} in its safetensors files)")


class HFValueHeadJudge(HFProcessRewardJudge):
    """A value-head process reward model (Skywork-o1-Open-PRM style) as a token-validity judge.

    model: a ``transformers`` causal LM (its last hidden state is read); value_head: a Linear H -> 1;
    score(prefix, candidate) = sigmoid(value_head(h)) with h the last hidden state at the step separator
    ``step_tag`` appended after ``prefix + candidate`` (None: read at the candidate itself). Sequences,
    vocabulary routes, batching and the prefix-cache reuse are those of :class:`HFProcessRewardJudge`.
    """

    def __init__(self, model, tokenizer, value_head: torch.nn.Module, *, step_tag: str | None = "\n",
                 policy_tokenizer=None, batch_size: int = 64, reuse_prefix_cache: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        hidden = model.get_input_embeddings().weight.shape[1]
        head_in = getattr(value_head, "in_features", None)
        if head_in is not None and head_in != hidden:
            raise ValueError(f"value_head takes {head_in} features, the model's hidden size is {hidden}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.value_head = value_head.to(device=self.device, dtype=torch.float32).eval()
        self.good_id = self.bad_id = None
        self._set_sequence_options(tokenizer, step_tag, policy_tokenizer, batch_size, reuse_prefix_cache)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, policy_tokenizer=None, dtype="float32", device="cpu",
                        **kwargs) -> HFValueHeadJudge:
        """Loads the causal LM and its value head (:func:`load_value_head`) from a local directory."""
        from transformers import AutoModelForCausalLM

        from distillkit.teachers.hf import load_tokenizer, resolve_dtype

        head = load_value_head(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), attn_implementation="sdpa")
        tok = load_tokenizer(path)
        if policy_tokenizer is not None and policy_tokenizer.get_vocab() == tok.get_vocab():
            policy_tokenizer = None
        return cls(model.to(device), tok, head, policy_tokenizer=policy_tokenizer, **kwargs)

    def _forward(self, **kwargs) -> torch.Tensor:
        """The last hidden state [B, L, H] (after the final norm)."""
        return self.model(output_hidden_states=True, **kwargs).hidden_states[-1]

    def _good_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.value_head(hidden.float()).squeeze(-1)).cpu()

    def __repr__(self) -> str:
        return f"HFValueHeadJudge(tag_ids={self.tag_ids})"
