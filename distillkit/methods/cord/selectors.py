"""Step selectors for CoRD's beam search: what ranks the B x K candidate steps (the paper's Tables 5, 6, 14).

    perplexity   the meta-prover's predictive perplexity of the ground-truth answer after the trace (the
                 paper's selector; :class:`distillkit.methods.cord.meta_prover.MetaProver` itself)
    prm          a process reward model's score of the newest step: P(good) / (P(good) + P(bad)) of a
                 ``distillkit.judges`` PRM read after the trace (+ its step tag)
    binary       an LLM judge's yes/no probability that the newest step is correct: P(yes) / (P(yes) + P(no))
                 of the continuations after a judging prompt
    max_length   the longest newest step (tokens with a tokenizer, else characters)

Every selector has the decoder's scorer interface (``score(pairs, *, prefixes=None)`` -> float32 [C], higher
is better; a running ``tokens_processed``; ``last_pair_tokens``: per pair of the last call, the tokens it cost,
so that the decode loop scores many questions' candidates in one call and charges each its own), so the beam
search takes any of them where it takes the meta-prover. A pair is (context, answer): context = the prompt +
the candidate's steps; the candidate's newest step is the text after its prefix (the parent beam), or the
whole context after the prompt when no prefix is given. Only ``perplexity`` reads the answer.

    selector = make_selector(cfg, meta_prover)      # cfg.selector: perplexity | prm | binary | max_length
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from distillkit._errors import InputError
from distillkit.methods.cord.config import SELECTORS

BINARY_TEMPLATE = ("{context}\n\nThe last step above was:\n{step}\n\n"
                   "Is this step correct? Answer yes or no.\nAnswer: ")


def _check_pairs(pairs, prefixes) -> tuple[list[tuple[str, str]], list[str | None]]:
    pairs = list(pairs)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and isinstance(pair[0], str) and isinstance(pair[1], str)):
            raise TypeError(f"pairs[{i}]: expected a (context: str, answer: str) pair, got {pair!r}")
    prefixes = [None] * len(pairs) if prefixes is None else list(prefixes)
    if len(prefixes) != len(pairs):
        raise InputError(f"prefixes: expected {len(pairs)} entries (one per pair), got {len(prefixes)}")
    for i, (p, (ctx, _)) in enumerate(zip(prefixes, pairs)):
        if p is not None and not ctx.startswith(p):
            raise InputError(f"prefixes[{i}]: the context of pairs[{i}] does not start with it")
    return pairs, prefixes


def newest_steps(pairs: Sequence[tuple[str, str]], prefixes: Sequence[str | None] | None = None,
                 prompt: str | None = None) -> list[str]:
    """The newest step of each candidate: its context after its prefix (or after ``prompt``, or the whole
    context when neither is given)."""
    pairs, prefixes = _check_pairs(pairs, prefixes)
    out = []
    for (ctx, _), p in zip(pairs, prefixes):
        head = p if p is not None else (prompt if prompt is not None and ctx.startswith(prompt) else "")
        out.append(ctx[len(head):])
    return out


# ----------------------------------------------------------------------------------------------
# max_length
# ----------------------------------------------------------------------------------------------
class MaxLengthSelector:
    """Scores a candidate by the length of its newest step: its tokens under ``tokenizer`` (a teacher's), or
    its characters without one. No model runs (``tokens_processed`` stays 0)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.tokens_processed = 0
        self.last_pair_tokens: list[int] = []

    def score(self, pairs, *, prefixes=None) -> torch.Tensor:
        steps = newest_steps(pairs, prefixes)
        self.last_pair_tokens = [0] * len(steps)  # no model runs
        if self.tokenizer is None:
            lengths = [len(s) for s in steps]
        else:
            lengths = [len(self.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in steps]
        return torch.tensor(lengths, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# prm
# ----------------------------------------------------------------------------------------------
class PRMSelector:
    """Scores a candidate by a ``distillkit.judges`` PRM's validity of its trace's last token, i.e. the PRM's
    P(good) / (P(good) + P(bad)) read after the whole trace (+ the PRM's step tag): the PRM's score of the
    newest step given everything before it.

    judge: a :class:`distillkit.judges.Judge` (e.g. ``HFProcessRewardJudge``) over ``tokenizer``'s ids.
    """

    def __init__(self, judge, tokenizer):
        if not callable(judge):
            raise TypeError(f"judge: expected a distillkit.judges Judge, got {type(judge).__name__}")
        self.judge, self.tokenizer = judge, tokenizer
        self.tokens_processed = 0
        self.last_pair_tokens: list[int] = []

    @classmethod
    def from_pretrained(cls, path: str, *, dtype="float32", device="cpu", **judge_kwargs) -> PRMSelector:
        from distillkit.judges import HFProcessRewardJudge

        judge = HFProcessRewardJudge.from_pretrained(path, dtype=dtype, device=device, **judge_kwargs)
        return cls(judge, judge.tokenizer)

    @torch.no_grad()
    def score(self, pairs, *, prefixes=None) -> torch.Tensor:
        pairs, _ = _check_pairs(pairs, prefixes)
        self.last_pair_tokens = []
        if not pairs:
            return torch.empty(0, dtype=torch.float32)
        ids = [list(self.tokenizer(ctx)["input_ids"]) for ctx, _ in pairs]
        for i, row in enumerate(ids):
            if len(row) < 2:
                raise InputError(f"pairs[{i}]: the context is {len(row)} token(s); the PRM needs at least 2")
        width = max(len(r) for r in ids) - 1
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        prefix_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        token_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        last = []
        for b, row in enumerate(ids):
            t = len(row) - 2  # the judge scores token_ids[b, t] after prefix_ids[b, :t + 1]
            prefix_ids[b, :t + 1] = torch.tensor(row[:-1])
            token_ids[b, t] = row[-1]
            mask[b, t] = True
            last.append(t)
        scores = self.judge(prefix_ids, token_ids, mask)
        self.last_pair_tokens = [len(r) for r in ids]
        self.tokens_processed += sum(self.last_pair_tokens)
        return scores[torch.arange(len(ids)), torch.tensor(last)].detach().float().cpu()


# ----------------------------------------------------------------------------------------------
# binary
# ----------------------------------------------------------------------------------------------
class BinaryJudgeSelector:
    """Scores a candidate by an LLM judge's probability that its newest step is correct:
    P(yes) / (P(yes) + P(no)) = sigmoid(log p(yes | q) - log p(no | q)), q = ``template`` filled with the context
    before the step and the step; ``yes`` / ``no`` may be several tokens (their log-probabilities are summed).

    model: a ``transformers`` causal LM; tokenizer: its tokenizer. The lm_head runs only at the positions that
    predict the answer tokens (left-padded rows, ``logits_to_keep``), never over the whole prompt.
    """

    def __init__(self, model, tokenizer, *, template: str = BINARY_TEMPLATE, yes: str = "yes", no: str = "no",
                 batch_size: int = 8):
        if "{context}" not in template or "{step}" not in template:
            raise InputError(f"template: must contain {{context}} and {{step}}, got {template!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}: expected an integer >= 1")
        self.model, self.tokenizer, self.template, self.batch_size = model.eval(), tokenizer, template, batch_size
        self.yes_ids = list(tokenizer(yes, add_special_tokens=False)["input_ids"])
        self.no_ids = list(tokenizer(no, add_special_tokens=False)["input_ids"])
        if not self.yes_ids or not self.no_ids or self.yes_ids == self.no_ids:
            raise InputError(f"yes={yes!r}, no={no!r}: expected two different non-empty answers")
        self.tokens_processed = 0
        self.last_pair_tokens: list[int] = []

    @classmethod
    def from_pretrained(cls, path: str, *, dtype="float32", device="cpu", **kwargs) -> BinaryJudgeSelector:
        from distillkit.teachers.hf import load_causal_lm

        model, tok = load_causal_lm(path, dtype=dtype, device=device)
        return cls(model, tok, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def question(self, context: str, step: str) -> str:
        """The judging prompt for a newest ``step`` after ``context`` (the trace before it)."""
        return self.template.replace("{context}", context).replace("{step}", step)

    def _answer_logprob(self, prompts: list[list[int]], answer: list[int]) -> torch.Tensor:
        """log p(answer | prompt) for each prompt -> float32 [N] (left-padded batches)."""
        out = []
        m = len(answer)
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        for i in range(0, len(prompts), self.batch_size):
            rows = [p + answer for p in prompts[i:i + self.batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            att = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, width - len(r):] = torch.tensor(r)
                att[j, width - len(r):] = 1
            pos = (att.cumsum(1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device),
                                position_ids=pos.to(self.device), logits_to_keep=m + 1).logits
            # logits[:, j] (of the last m + 1 positions) predicts the token at width - m + j
            logp = torch.log_softmax(logits[:, :m].float(), dim=-1)
            target = torch.tensor(answer, device=logp.device).expand(len(rows), m)
            out.append(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def score(self, pairs, *, prefixes=None) -> torch.Tensor:
        pairs, prefixes = _check_pairs(pairs, prefixes)
        self.last_pair_tokens = []
        if not pairs:
            return torch.empty(0, dtype=torch.float32)
        steps = newest_steps(pairs, prefixes)
        prompts = [list(self.tokenizer(self.question(ctx[:len(ctx) - len(step)], step))["input_ids"])
                   for (ctx, _), step in zip(pairs, steps)]
        yes = self._answer_logprob(prompts, self.yes_ids)
        no = self._answer_logprob(prompts, self.no_ids)
        # each pair runs its judging prompt twice, once before each answer
        self.last_pair_tokens = [2 * len(p) + len(self.yes_ids) + len(self.no_ids) for p in prompts]
        self.tokens_processed += sum(self.last_pair_tokens)
        return torch.sigmoid(yes - no).float()


# ----------------------------------------------------------------------------------------------
# Config -> selector
# ----------------------------------------------------------------------------------------------
def make_selector(cfg, meta_prover, *, tokenizer=None):
    """The scorer the beam search ranks candidates with, by ``cfg.selector``: the meta-prover itself
    (perplexity), or a PRM / binary judge loaded from ``cfg.selector_model``, or max-length (``tokenizer``:
    whose tokens count; None: characters)."""
    name = cfg.selector
    if name == "perplexity":
        return meta_prover
    if name == "max_length":
        return MaxLengthSelector(tokenizer)
    kw = dict(dtype=cfg.dtype, device=cfg.device)
    if name == "prm":
        return PRMSelector.from_pretrained(cfg.selector_model, **kw)
    if name == "binary":
        return BinaryJudgeSelector.from_pretrained(cfg.selector_model, batch_size=cfg.batch_size, **kw)
    raise InputError(f"selector={name!r}: expected one of {SELECTORS}")



def score_for_record(cfg, meta_prover, res, answer: str, end_marker: str):
    """``res`` (a DecodeResult) with the meta-prover's predictive perplexity of its final reasoning as its
    score, when the beams were ranked by another selector (records and summaries keep reporting the
    meta-prover's score; the rescoring's tokens are added to ``meta_prover_tokens``). Unchanged for the
    perplexity selector, whose score it already is."""
    if cfg.selector == "perplexity":
        return res
    reasoning = res.beam.text[:-len(end_marker)] if res.beam.text.endswith(end_marker) else res.beam.text
    before = meta_prover.tokens_processed
    (score,) = [float(s) for s in meta_prover.score([(reasoning, answer)], prefixes=[res.prompt])]
    res.beam.score = score
    res.meta_prover_tokens += meta_prover.tokens_processed - before
    return res
