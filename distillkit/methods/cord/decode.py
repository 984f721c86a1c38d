"""CoRD's step-wise beam search over K teachers' proposals, and its baselines (greedy, random, curation)."""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from distillkit.methods.cord.config import CordConfig
from distillkit.methods.cord.segmentation import END_MARKER, Segmentation
from distillkit.pipeline.data import fill_prompt
from distillkit.teachers.base import Proposal, StringStop, Teacher


# ----------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------
class Scorer(Protocol):
    """What the decoder needs from a meta-prover (MetaProver implements it)."""

    tokens_processed: int

    def score(self, pairs: Sequence[tuple[str, str]], *, prefixes: Sequence[str | None] | None = None): ...


@dataclass
class Beam:
    """A partial trace: the prompt plus the chosen steps so far."""
    text: str                                   # prompt + steps (+ end marker once finished)
    steps: list[dict] = field(default_factory=list)   # [{text, teacher, score}]
    tokens: int = 0                             # teacher tokens of the chosen steps
    finished: bool = False
    score: float = float("-inf")                # meta-prover score of this trace so far
    teacher: int | None = None                  # index of the teacher that wrote the last step
    parent: str = ""                            # the beam text this one extends (its KV-reuse prefix)


@dataclass
class DecodeResult:
    beam: Beam
    prompt: str
    answer_text: str
    tokens_generated: int
    meta_prover_tokens: int


@dataclass
class _Counters:
    tokens_generated: int = 0


def _strip_end(text: str, end_marker: str) -> str:
    return text[:-len(end_marker)] if text.endswith(end_marker) else text


def extend_beam(beam: Beam, proposal: Proposal, teacher: int, names: Sequence[str], *, token_budget: int,
                end_marker: str = END_MARKER) -> Beam:
    """The beam with ``proposal`` appended as its next step (not yet scored). It finishes when the
    teacher ended the reasoning (end marker or EOS) or the budget is spent; a finish without the end
    marker gets it appended."""
    tokens = beam.tokens + proposal.num_tokens
    step_text = proposal.text
    finished = proposal.finished or tokens >= token_budget
    text = beam.text + step_text
    if finished and not text.endswith(end_marker):
        text += end_marker
    return Beam(text=text, steps=beam.steps + [{"text": step_text, "teacher": names[teacher], "score": None}],
                tokens=tokens, finished=finished, teacher=teacher, parent=beam.text)


def propose_steps(teachers: Sequence[Teacher], beams: Sequence[Beam], *, seg: Segmentation, names: Sequence[str],
                  cfg: CordConfig, seed: int, counters: _Counters) -> list[Beam]:
    """Every teacher proposes the next step of every active beam: B x K candidates, beam-major
    (candidate b * K + k extends beam b with teacher k's step)."""
    per_teacher: list[list[Proposal]] = []
    for k, teacher in enumerate(teachers):
        props: list[Proposal | None] = [None] * len(beams)
        # A beam near its budget may only generate what is left of it; group beams by that limit.
        limits: dict[int, list[int]] = {}
        for b, beam in enumerate(beams):
            limits.setdefault(min(cfg.max_step_tokens, cfg.token_budget - beam.tokens), []).append(b)
        for limit, idx in limits.items():
            got = teacher.propose([beams[b].text for b in idx], n=1, max_new_tokens=max(1, limit), stop=seg,
                                  temperature=cfg.temperature, seed=seed + 7919 * k)
            for b, row in zip(idx, got):
                props[b] = row[0]
                counters.tokens_generated += row[0].num_tokens
        per_teacher.append(props)
    return [extend_beam(beam, per_teacher[k][b], k, names, token_budget=cfg.token_budget, end_marker=seg.end_marker)
            for b, beam in enumerate(beams) for k in range(len(teachers))]


def score_candidates(scorer: Scorer, candidates: Sequence[Beam], answer: str, *,
                     end_marker: str = END_MARKER) -> list[float]:
    """Meta-prover score of each candidate trace against the ground-truth answer; candidates of
    one parent beam share its KV cache. Sets ``beam.score`` and the last step's score."""
    if not candidates:
        return []
    pairs = [(_strip_end(c.text, end_marker), answer) for c in candidates]
    prefixes = [c.parent if c.parent and _strip_end(c.text, end_marker).startswith(c.parent) else None
                for c in candidates]
    scores = [float(s) for s in scorer.score(pairs, prefixes=prefixes)]
    for c, s in zip(candidates, scores):
        c.score = s
        if c.steps:
            c.steps[-1]["score"] = s
    return scores


def select_beams(pool: Sequence[Beam], beam_size: int) -> list[Beam]:
    """The ``beam_size`` best traces of ``pool`` by score (ties: earlier in the pool first);
    identical traces are kept once."""
    order = sorted(range(len(pool)), key=lambda i: (-pool[i].score if not math.isnan(pool[i].score) else math.inf, i))
    seen, out = set(), []
    for i in order:
        if pool[i].text in seen:
            continue
        seen.add(pool[i].text)
        out.append(pool[i])
        if len(out) == beam_size:
            break
    return out


def _close(beam: Beam, end_marker: str) -> Beam:
    """Ends an unfinished beam (step limit reached) by appending the end marker."""
    if beam.finished:
        return beam
    return dataclasses.replace(beam, text=beam.text + end_marker, finished=True)


def write_answer(teachers: Sequence[Teacher], beam: Beam, *, cfg: CordConfig, seed: int, counters: _Counters) -> str:
    """The teacher that wrote the last step continues after the end marker with the final answer."""
    teacher = teachers[beam.teacher if beam.teacher is not None else 0]
    (prop,), = teacher.propose([beam.text + cfg.answer_prompt], n=1, max_new_tokens=cfg.max_answer_tokens,
                               stop=None, temperature=cfg.temperature, seed=seed + 104729)
    counters.tokens_generated += prop.num_tokens
    return cfg.answer_prompt + prop.text


def _prompt(cfg: CordConfig, seg: Segmentation, question: str) -> str:
    return fill_prompt(cfg.prompt_template, question=question) if cfg.prompt_template else seg.prompt(question)


def decode_one(question: str, answer: str, teachers: Sequence[Teacher], scorer: Scorer, cfg: CordConfig, *,
               seed: int = 0, seg: Segmentation | None = None) -> DecodeResult:
    """CoRD beam search for one question (``cfg.method`` "cord" or "greedy"; B = cfg.beam_size)."""
    seg = seg or cfg.make_segmentation()
    names = cfg.names()
    counters = _Counters()
    scorer_start = scorer.tokens_processed
    prompt = _prompt(cfg, seg, question)
    beams = [Beam(text=prompt)]
    for step in range(cfg.max_steps):
        active = [b for b in beams if not b.finished]
        if not active:
            break
        candidates = propose_steps(teachers, active, seg=seg, names=names, cfg=cfg,
                                   seed=seed + 31 * step, counters=counters)
        score_candidates(scorer, candidates, answer, end_marker=seg.end_marker)
        # Finished beams stay in the pool with their score; they compete with the new candidates.
        beams = select_beams([b for b in beams if b.finished] + candidates, cfg.beam_size)
    beams = [_close(b, seg.end_marker) for b in beams]
    best = select_beams(beams, 1)[0]
    answer_text = write_answer(teachers, best, cfg=cfg, seed=seed, counters=counters)
    return DecodeResult(best, prompt, answer_text, counters.tokens_generated,
                        scorer.tokens_processed - scorer_start)


def decode_random(question: str, answer: str, teachers: Sequence[Teacher], scorer: Scorer, cfg: CordConfig, *,
                  seed: int = 0, seg: Segmentation | None = None) -> DecodeResult:
    """Random step selection: every step all K teachers propose (the same generation cost as
    greedy CoRD) and one proposal is picked uniformly at random; the meta-prover scores only the
    final trace (for the record)."""
    seg = seg or cfg.make_segmentation()
    names, counters, rng = cfg.names(), _Counters(), random.Random(seed)
    scorer_start = scorer.tokens_processed
    prompt = _prompt(cfg, seg, question)
    beam = Beam(text=prompt)
    for step in range(cfg.max_steps):
        if beam.finished:
            break
        candidates = propose_steps(teachers, [beam], seg=seg, names=names, cfg=cfg, seed=seed + 31 * step,
                                   counters=counters)
        beam = candidates[rng.randrange(len(candidates))]
    beam = _close(beam, seg.end_marker)
    (s,) = score_candidates(scorer, [dataclasses.replace(beam, parent="")], answer, end_marker=seg.end_marker)
    beam.score = s
    answer_text = write_answer(teachers, beam, cfg=cfg, seed=seed, counters=counters)
    return DecodeResult(beam, prompt, answer_text, counters.tokens_generated, scorer.tokens_processed - scorer_start)


def decode_curation(question: str, answer: str, teachers: Sequence[Teacher], scorer: Scorer, cfg: CordConfig, *,
                    seed: int = 0, seg: Segmentation | None = None) -> DecodeResult:
    """Curation: each teacher writes n complete traces (up to the token budget); the meta-prover
    keeps the best; its teacher writes the final answer."""
    seg = seg or cfg.make_segmentation()
    names, counters = cfg.names(), _Counters()
    scorer_start = scorer.tokens_processed
    prompt = _prompt(cfg, seg, question)
    n = cfg.n_curation if cfg.temperature > 0 else 1
    stop = StringStop([seg.end_marker])
    traces: list[Beam] = []
    for k, teacher in enumerate(teachers):
        (row,) = teacher.propose([prompt], n=n, max_new_tokens=cfg.token_budget, stop=stop,
                                 temperature=cfg.temperature, seed=seed + 7919 * k)
        for prop in row:
            counters.tokens_generated += prop.num_tokens
            text = prop.text if prop.text.endswith(seg.end_marker) else prop.text + seg.end_marker
            steps = [{"text": s, "teacher": names[k], "score": None} for s in seg.split(prop.text)]
            traces.append(Beam(text=prompt + text, steps=steps, tokens=prop.num_tokens, finished=True,
                               teacher=k, parent=prompt))
    score_candidates(scorer, traces, answer, end_marker=seg.end_marker)
    best = select_beams(traces, 1)[0]
    answer_text = write_answer(teachers, best, cfg=cfg, seed=seed, counters=counters)
    return DecodeResult(best, prompt, answer_text, counters.tokens_generated, scorer.tokens_processed - scorer_start)


DECODERS = {"cord": decode_one, "greedy": decode_one, "random": decode_random, "curation": decode_curation}
