"""CoRD's meta-prover: scores (context, answer) pairs by predictive perplexity.

S = exp((1/M) sum_m log p(a_m | context + "</think> The final answer is ", a_<m)) over the M tokens
of the ground-truth answer: the geometric-mean probability the meta-prover gives the answer after
the reasoning so far, in (0, 1], higher is better.

Cost: the model body runs over the text, but the lm_head is applied only at the M positions that
predict answer tokens, through :func:`distillkit.scoring.predictive_perplexity` (chunked over the
vocabulary, never [tokens, V] logits). Candidates that extend the same beam prefix reuse that
prefix's KV cache: the prefix runs once, each candidate runs only its own suffix.

Across steps (paper Section 4.4, cached KV and incremental forward): the KV of each scored candidate's
context tokens is kept, keyed by those token ids. At the next step the surviving beam's text is the
prefix of its candidates, so its prefix's KV is the kept entry (the longest kept entry whose ids start
the prefix's ids), and only the tokens after it run. Kept entries are bounded by ``kv_cache_bytes``
(default 1 GiB of KV tensors; least recently used first out); an entry is also dropped once it or a
sibling (a candidate of the same beam in the same call) has been extended, since then no surviving
beam extends the others. A KV at position t depends only on tokens <= t, so a kept entry gives the
same KV as a recompute up to rounding (scores agree within the suite's float tolerance).

    prover = MetaProver.from_pretrained("path/to/meta-prover")
    s = prover.score([(ctx1, "42"), (ctx2, "42")], prefixes=[beam, beam])   # float32 [2]
    prover.tokens_processed                                                 # running count
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distillkit._errors import InputError
from distillkit.teachers.hf import cache_kwargs, output_cache

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{context}</think> The final answer is {answer}."
# Config fields that change logits beyond "final norm -> lm_head (+ bias)"; such models would be
# scored wrongly by applying the lm_head weight alone, so they are refused with the reason.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


@dataclass
class _Encoded:
    ids: list[int]        # full token ids: template head (context + answer prompt) + answer
    answer_start: int     # index in ids of the first answer token
    prefix_len: int = 0   # tokens shared with the beam prefix whose KV cache is reused
    context_len: int = 0  # leading tokens that lie inside the context (kept for the next step)
    family: int | None = None  # kept-entry family (candidates of one prefix in one call); None: not kept


@dataclass
class _Kept:
    kv: list[torch.Tensor]  # [k0, v0, k1, v1, ...], each [kv_heads, n, head_dim]
    family: int
    nbytes: int


@dataclass
class ScoreStats:
    """Token accounting of the scoring calls so far (cumulative)."""
    calls: int = 0
    candidates: int = 0
    tokens_processed: int = 0   # tokens run through the model body (prefixes once + suffixes)
    tokens_full: int = 0        # tokens a no-reuse scorer would have run (sum of full lengths)
    prefix_tokens_reused: int = 0
    reuse_fallbacks: int = 0    # candidates whose tokens did not extend their prefix's tokens
    prefix_tokens_kept: int = 0  # prefix tokens served by KV kept from an earlier call (not run again)


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class MetaProver:
    """Scores candidate reasoning by the predictive perplexity of the ground-truth answer.

    model: a ``transformers`` causal LM (its body gives hidden states after the final norm; its
        output embedding is the lm_head). tokenizer: its tokenizer.
    template: must contain ``{context}`` and ``{answer}``, with ``{answer}`` after ``{context}``; only
        the answer's tokens are scored, text after ``{answer}`` is not needed and not run.
    backend: kernel backend for :func:`distillkit.scoring.predictive_perplexity` (None: automatic).
    reuse_prefix_cache: run a shared beam prefix once and reuse its KV cache (False: every
        candidate runs in full, for comparison).
    batch_size: candidates per forward.
    kv_cache_bytes: cap on the KV kept across calls for the next step's prefixes (bytes of K and V
        tensors; 0 keeps nothing, so every prefix runs at every step). Needs reuse_prefix_cache. Each
        kept entry holds its whole context's KV, 2 x layers x kv_heads x head_dim x dtype bytes per token
        (the world's meta-prover: 2 KiB; a 32B model with 8 KV heads in bf16: 256 KiB); an entry larger
        than the cap is not kept. About B x K entries per question in flight are live at once.
    """

    def __init__(self, model, tokenizer, template: str = DEFAULT_TEMPLATE, *, backend: str | None = None,
                 reuse_prefix_cache: bool = True, batch_size: int = 16, kv_cache_bytes: int = 1 << 30):
        if "{context}" not in template or "{answer}" not in template:
            raise ValueError(f"template: must contain '{{context}}' and '{{answer}}', got {template!r}")
        if template.index("{answer}") < template.index("{context}"):
            raise ValueError(f"template: '{{answer}}' must come after '{{context}}', got {template!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        if isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 0:
            raise InputError(f"kv_cache_bytes={kv_cache_bytes!r}: expected an integer >= 0")
        config = getattr(model, "config", None)
        for key in _UNSUPPORTED_LOGIT_TRANSFORMS:
            value = getattr(config, key, None)
            if value not in (None, 0, 0.0, 1, 1.0):
                raise ValueError(f"model: config.{key}={value} transforms logits after the lm_head; "
                                 "MetaProver applies the lm_head weight (and bias) only")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.backend = backend
        self.reuse_prefix_cache = reuse_prefix_cache
        self.batch_size = batch_size
        self.kv_cache_bytes = kv_cache_bytes
        self._kept: dict[tuple[int, ...], _Kept] = {}  # insertion order = least recently used first
        self._kept_bytes = 0
        self._families = 0
        self.stats = ScoreStats()
        self.last_pair_tokens: list[int] = []  # per pair of the last score() call: tokens it cost
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError("model: has no output embedding (lm_head) to score answer tokens with")
        self._lm_head = head
        self._body = model.get_decoder() if hasattr(model, "get_decoder") else None
        if self._body is None:
            raise ValueError("model: get_decoder() returned nothing; MetaProver needs the model body")
        self._head_tail = template.split("{answer}", 1)
        # Sliding-window layers keep only a window of keys, so a shared prefix cache cannot be
        # re-masked per candidate; such models score every candidate in full.
        layer_types = getattr(config, "layer_types", None) or []
        self._can_reuse = not any("sliding" in str(t) for t in layer_types) and not getattr(
            config, "use_sliding_window", False)
        self._has_bos = bool(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]) \
            if tokenizer.bos_token_id is not None else False

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", **kwargs) -> MetaProver:
        from distillkit.teachers.hf import load_causal_lm

        model, tok = load_causal_lm(path, dtype=dtype, device=device)
        return cls(model, tok, **kwargs)

    @property
    def device(self) -> torch.device:
        return self._lm_head.weight.device

    @property
    def tokens_processed(self) -> int:
        return self.stats.tokens_processed

    @property
    def kept_kv_bytes(self) -> int:
        """Bytes of KV kept across calls now (at most ``kv_cache_bytes``)."""
        return self._kept_bytes

    def clear_kv_cache(self) -> None:
        """Drops the KV kept across calls (the next call runs its prefixes in full)."""
        self._kept.clear()
        self._kept_bytes = 0

    # -- tokenisation ---------------------------------------------------------------------------
    def head_text(self, context: str) -> str:
        """The text before the answer: the template up to ``{answer}`` with the context filled in."""
        return self._head_tail[0].replace("{context}", context)

    def encode(self, context: str, answer: str) -> tuple[list[int], int]:
        """(token ids of head_text(context) + answer, index of the first answer token).

        Answer tokens are those of the full text whose characters reach past the head text, so a
        token that merges the head's last character with the answer (BPE) is scored as an answer
        token. Tokenizers without offsets: head and answer are tokenised separately and joined.
        """
        ids, start, _ = self._encode(context, answer)
        return ids, start

    def _encode(self, context: str, answer: str) -> tuple[list[int], int, int]:
        """encode() and the number of leading tokens that end inside the context (0 without offsets)."""
        head = self.head_text(context)
        tok = self.tokenizer
        full = head + answer
        try:
            enc = tok(full, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
        except (NotImplementedError, TypeError, ValueError):
            offsets = None
        context_len = 0
        if offsets is not None:
            ids = list(enc["input_ids"])
            start = next((i for i, (s, e) in enumerate(offsets) if e > len(head) and e > s), len(ids))
            context_end = len(self._head_tail[0].split("{context}", 1)[0]) + len(context)
            while context_len < len(ids) and offsets[context_len][1] <= context_end:
                context_len += 1
        else:
            ids = list(tok(head)["input_ids"])
            start = len(ids)
            ids += list(tok(answer, add_special_tokens=False)["input_ids"])
        if start >= len(ids):
            raise ValueError(f"answer={answer!r}: tokenises to no tokens after the context")
        if start == 0:
            raise ValueError("template: the answer starts at the first token; nothing to condition on")
        return ids, start, min(context_len, start)

    def _prefix_ids(self, prefix: str) -> list[int]:
        return list(self.tokenizer(prefix)["input_ids"])

    # -- scoring --------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, pairs: Sequence[tuple[str, str]], *, prefixes: Sequence[str | None] | None = None
              ) -> torch.Tensor:
        """Predictive perplexity S of each (context, answer) pair -> float32 [C] on CPU.

        prefixes: optional, one per pair: a text the pair's context starts with (the beam prefix the
            candidate step extends). Pairs with the same prefix share one KV cache of it. A pair whose
            tokens do not start with the prefix's tokens (a tokenizer merging across the join)
            reuses only the tokens they share (possibly none, then it runs in full). A prefix starting
            with the context of a candidate scored in an earlier call (the surviving beam of the previous
            step) runs only its tokens after that context; each pair with a prefix has its context's KV
            kept for the next step (up to ``kv_cache_bytes``).

        Afterwards ``last_pair_tokens`` holds, per pair, the tokens it cost (its suffix, plus a shared
        prefix's tokens for the first pair of that prefix); they sum to the call's ``tokens_processed``,
        so a caller scoring several questions in one call can charge each its own.
        """
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and isinstance(pair[0], str) and isinstance(pair[1], str)):
                raise TypeError(f"pairs[{i}]: expected a (context: str, answer: str) pair, got {pair!r}")
        if prefixes is not None:
            prefixes = list(prefixes)
            if len(prefixes) != len(pairs):
                raise ValueError(f"prefixes: expected {len(pairs)} entries (one per pair), got {len(prefixes)}")
            for i, (p, (ctx, _)) in enumerate(zip(prefixes, pairs)):
                if p is not None and not ctx.startswith(p):
                    raise ValueError(f"prefixes[{i}]: the context of pairs[{i}] does not start with it")
        if not pairs:
            self.last_pair_tokens = []
            return torch.empty(0, dtype=torch.float32)
        encoded = []
        for ctx, ans in pairs:
            ids, start, context_len = self._encode(ctx, ans)
            encoded.append(_Encoded(ids, start, context_len=context_len))
        self.stats.calls += 1
        self.stats.candidates += len(pairs)
        self.stats.tokens_full += sum(len(e.ids) for e in encoded)
        caches, group_of, charged = None, [None] * len(pairs), [0] * len(pairs)
        keep = prefixes is not None and self.reuse_prefix_cache and self._can_reuse and self.kv_cache_bytes > 0
        dead: set[int] = set()  # families of kept entries extended in this call
        if prefixes is not None and self.reuse_prefix_cache and self._can_reuse:
            caches, group_of, charged, dead = self._prefix_caches(encoded, prefixes, keep)
        if keep:  # the candidates of one prefix in this call are one family of kept entries
            families: dict[object, int] = {}
            for i, (e, p) in enumerate(zip(encoded, prefixes)):
                if p is not None and e.context_len > 0:
                    key = ("group", group_of[i]) if group_of[i] is not None else ("alone", i)
                    if key not in families:
                        families[key] = self._families
                        self._families += 1
                    e.family = families[key]
        # Tokens each pair cost: its own suffix, and a shared prefix's tokens charged to its first pair.
        self.last_pair_tokens = [c + len(e.ids) - (e.prefix_len if g is not None else 0)
                                 for c, e, g in zip(charged, encoded, group_of)]
        scores = torch.empty(len(pairs), dtype=torch.float32)
        # Longest first: rows of a batch have similar lengths, so little compute goes to padding.
        order = sorted(range(len(pairs)), key=lambda i: -(len(encoded[i].ids) - encoded[i].prefix_len))
        for chunk in _chunks(order, self.batch_size):
            scores[chunk] = self._score_batch([encoded[i] for i in chunk], [group_of[i] for i in chunk], caches)
        if keep or dead:
            self._evict(dead)
        return scores

    # -- KV kept across calls -------------------------------------------------------------------
    def _lookup(self, ids: list[int]) -> tuple[tuple[int, ...] | None, int]:
        """The longest kept entry whose ids start ``ids`` -> (its key, its length); (None, 0) if none."""
        best, n = None, 0
        full = tuple(ids)
        for key in self._kept:
            if n < len(key) <= len(full) and full[:len(key)] == key:
                best, n = key, len(key)
        return best, n

    def _keep(self, ids: list[int], kv: list[torch.Tensor], family: int) -> None:
        key = tuple(ids)
        nbytes = sum(t.numel() * t.element_size() for t in kv)
        if nbytes > self.kv_cache_bytes:
            return
        old = self._kept.pop(key, None)
        if old is not None:
            self._kept_bytes -= old.nbytes
        self._kept[key] = _Kept(kv, family, nbytes)
        self._kept_bytes += nbytes

    def _evict(self, dead: set[int]) -> None:
        """Drops the families of the entries extended in this call (the extended entry and its siblings: no
        surviving beam extends them any more), then the least recently used entries while over
        ``kv_cache_bytes``."""
        for key in [k for k, v in self._kept.items() if v.family in dead]:
            self._kept_bytes -= self._kept.pop(key).nbytes
        while self._kept and self._kept_bytes > self.kv_cache_bytes:
            self._kept_bytes -= self._kept.pop(next(iter(self._kept))).nbytes

    def _prefix_caches(self, encoded: list[_Encoded], prefixes: Sequence[str | None], keep: bool):
        """Runs every distinct prefix once (batched, right-padded; from the longest kept entry it starts
        with, when ``keep``) and returns its KV tensors (per layer, [G, kv_heads, L_max, d]), per candidate
        its group index or None, per candidate the prefix tokens charged to it (a group's run, to its first
        candidate), and the keys of the kept entries used. Sets each candidate's ``prefix_len``: the tokens
        it shares with its prefix (its own, so a candidate whose tokens merge across the join still reuses
        the part before the merge)."""
        groups: dict[str, int] = {}
        group_of: list[int | None] = []
        group_ids: list[list[int]] = []
        for e, p in zip(encoded, prefixes):
            if p is None:
                group_of.append(None)
                continue
            if p not in groups:
                groups[p] = len(group_ids)
                group_ids.append(self._prefix_ids(p))
            g = groups[p]
            p_ids = group_ids[g]
            shared = _common_prefix_len(p_ids, e.ids)
            if shared < len(p_ids):
                self.stats.reuse_fallbacks += 1
            # The position before the first answer token must run with the suffix (its hidden state).
            e.prefix_len = min(shared, e.answer_start - 1)
            group_of.append(g if e.prefix_len > 0 else None)
        charged = [0] * len(encoded)
        if not group_ids:
            return None, group_of, charged, set()
        # Only the tokens some candidate reuses need to run.
        need = [0] * len(group_ids)
        for e, g in zip(encoded, group_of):
            if g is not None:
                need[g] = max(need[g], e.prefix_len)
        used = [g for g in range(len(group_ids)) if need[g] > 0]
        base: dict[int, tuple[tuple[int, ...] | None, int]] = {
            g: self._lookup(group_ids[g][:need[g]]) if keep and self._kept else (None, 0) for g in used}
        width = max(need)
        ran = {g: need[g] - base[g][1] for g in used}
        layers: list[list[torch.Tensor]] | None = None
        for chunk in _chunks(used, self.batch_size):
            run = [g for g in chunk if ran[g] > 0]
            kv_run, past = None, 0
            if run:
                starts = [base[g][1] for g in run]
                past_kv = self._gather_past([self._kept[base[g][0]].kv if base[g][0] else None for g in run],
                                            starts)
                _, kv_run, past = self._forward([group_ids[g][st:need[g]] for g, st in zip(run, starts)], starts,
                                                past_kv, want_kv=True)
            rows = []
            for g in chunk:
                if g in run:
                    r = run.index(g)
                    row = [_row_kv(t, r, base[g][1], past, need[g]) for t in kv_run]
                else:  # the kept entry covers all it needs
                    row = [t[:, :need[g]] for t in self._kept[base[g][0]].kv]
                rows.append([torch.nn.functional.pad(t, (0, 0, 0, width - need[g])) for t in row])
            kv = [torch.stack([r[j] for r in rows]) for j in range(len(rows[0]))]
            self.stats.tokens_processed += sum(ran[g] for g in chunk)
            layers = [[t] for t in kv] if layers is None else [acc + [t] for acc, t in zip(layers, kv)]
            del kv_run
        stacked = [torch.cat(ts, dim=0) for ts in layers]
        # Row r of `stacked` belongs to group used[r].
        slot = {g: r for r, g in enumerate(used)}
        reused = sum(e.prefix_len for e, g in zip(encoded, group_of) if g is not None)
        self.stats.prefix_tokens_reused += reused - sum(need[g] for g in used)
        self.stats.prefix_tokens_kept += sum(base[g][1] for g in used)
        for i, g in enumerate(group_of):
            if g is not None and need[g] > 0:
                charged[i], need[g] = ran[g], 0
        for key, _ in base.values():
            if key is not None:  # most recently used last
                self._kept[key] = self._kept.pop(key)
        dead = {self._kept[key].family for key, _ in base.values() if key is not None}
        return stacked, [slot[g] if g is not None else None for g in group_of], charged, dead

    def _gather_past(self, kept: list[list[torch.Tensor] | None], starts: list[int]) -> list[torch.Tensor] | None:
        """Per-row kept KV (or None) -> flat per-layer [rows, kv_heads, max(starts), d], zero right-padded."""
        past = max(starts)
        if past == 0:
            return None
        ref = next(kv for kv in kept if kv is not None)
        out = []
        for j, t in enumerate(ref):
            buf = t.new_zeros((len(kept), t.shape[0], past, t.shape[2]))
            for r, (kv, st) in enumerate(zip(kept, starts)):
                if kv is not None and st > 0:
                    buf[r, :, :st] = kv[j][:, :st]
            out.append(buf)
        return out

    def _pad(self, rows: list[list[int]], width: int) -> torch.Tensor:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids.to(self.device)

    def _forward(self, suffixes: list[list[int]], starts: list[int], past_kv: list[torch.Tensor] | None, *,
                 want_kv: bool):
        """Runs each row's suffix, right-padded, after its ``starts[r]`` cached tokens (left-aligned in
        ``past_kv``, flat per layer [rows, kv_heads, P, d], P = max(starts)) -> (last hidden states, the flat
        KV after the run or None, P). Without a past no mask is needed (causal attention: real tokens never
        see the right padding); with one, a 2-D mask hides each row's unused past slots and its padding,
        and position ids continue each row from its own start (rotary embeddings see true positions)."""
        width = max(len(x) for x in suffixes)
        ids = self._pad(suffixes, width)
        past = max(starts)
        kwargs = {}
        if past > 0:
            from transformers import DynamicCache

            cache = DynamicCache()
            for layer, (k, v) in enumerate(_pairs(past_kv)):
                cache.update(k, v, layer)
            mask = torch.zeros(len(suffixes), past + width, dtype=torch.long)
            for r, (st, x) in enumerate(zip(starts, suffixes)):
                mask[r, :st] = 1
                mask[r, past:past + len(x)] = 1
            pos = torch.tensor(starts).view(-1, 1) + torch.arange(width).view(1, -1)
            kwargs = dict(**cache_kwargs(self._body, cache), attention_mask=mask.to(self.device),
                          position_ids=pos.to(self.device))
        out = self._body(input_ids=ids, use_cache=bool(kwargs) or want_kv, **kwargs)
        kv = _kv_tensors(output_cache(out)) if want_kv else None
        return out.last_hidden_state, kv, past

    def _score_batch(self, batch: list[_Encoded], slots: list[int | None], caches) -> torch.Tensor:
        """Runs each candidate's suffix (the tokens after its reused prefix) on its prefix's cache, scores
        the answer positions, and keeps the KV of each keepable candidate's context tokens."""
        starts = [e.prefix_len if s is not None else 0 for e, s in zip(batch, slots)]
        suffixes = [e.ids[st:] for e, st in zip(batch, starts)]
        past_kv = None
        if any(s is not None for s in slots):
            past = max(starts)
            index = torch.tensor([s if s is not None else 0 for s in slots], device=self.device)
            past_kv = [t.index_select(0, index)[:, :, :past] for t in caches]
        want_kv = any(e.family is not None for e in batch)
        hidden, kv, past = self._forward(suffixes, starts, past_kv, want_kv=want_kv)
        self.stats.tokens_processed += sum(len(x) for x in suffixes)
        if want_kv:
            for r, (e, st) in enumerate(zip(batch, starts)):
                if e.family is not None:
                    self._keep(e.ids[:e.context_len], [_row_kv(t, r, st, past, e.context_len) for t in kv],
                               e.family)
            del kv
        rows, pos_idx, answer_ids, cu = [], [], [], [0]
        for r, (e, st) in enumerate(zip(batch, starts)):
            n_ans = len(e.ids) - e.answer_start
            first = e.answer_start - 1 - st  # hidden state at t predicts token t + 1
            rows += [r] * n_ans
            pos_idx += range(first, first + n_ans)
            answer_ids += e.ids[e.answer_start:]
            cu.append(cu[-1] + n_ans)
        h = hidden[torch.tensor(rows, device=self.device), torch.tensor(pos_idx, device=self.device)]
        weight = self._lm_head.weight
        bias = getattr(self._lm_head, "bias", None)
        from distillkit.scoring import predictive_perplexity

        s = predictive_perplexity(h.to(weight.dtype).contiguous(), weight,
                                  torch.tensor(answer_ids, dtype=torch.long, device=self.device),
                                  torch.tensor(cu, dtype=torch.long), bias=bias, backend=self.backend)
        return s.float().cpu()


def _row_kv(t: torch.Tensor, r: int, start: int, past: int, n: int) -> torch.Tensor:
    """Row r's KV of its first n positions from a flat cache tensor [rows, kv_heads, past + width, d] whose
    row holds positions < start at [0, start) and positions >= start from slot ``past`` on -> a new
    [kv_heads, n, d] tensor."""
    if n <= start:
        return t[r, :, :n].clone()
    return torch.cat([t[r, :, :start], t[r, :, past:past + n - start]], dim=1)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _kv_tensors(cache) -> list[torch.Tensor]:
    """[k0, v0, k1, v1, ...] of a DynamicCache, each [batch, kv_heads, seq, head_dim]."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for kv in cache.to_legacy_cache() for t in kv[:2]]  # transformers < 4.56


def _pairs(flat: list[torch.Tensor]):
    return zip(flat[0::2], flat[1::2])
