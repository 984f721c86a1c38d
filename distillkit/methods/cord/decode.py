"""CoRD's step-wise beam search over K teachers' proposals, and its baselines (greedy, random, curation).

Baselines at equal cost (the paper's Section 5 and Appendix G.4.2): with ``baseline_cost: equal`` (the
default) greedy (B = 1) decodes ``beam_size`` independent trajectories, trajectory i with its own seeds, and
keeps the one the meta-prover scores best, so it spends as many trajectories as CoRD's beam. Greedy decoding
is deterministic at temperature 0: there the B trajectories would be one trajectory B times, so one is
decoded, and its record says ``trajectories: 1`` (no tokens are spent on copies). ``baseline_cost: single``
decodes one trajectory whatever the temperature. Random (``random_selection: trajectory``, the default,
Table 5) is post-hoc selection among complete trajectories: each teacher writes ``n_curation`` traces, the
pool curation ranks, and one is picked uniformly at random; ``random_selection: step`` keeps the per-step
coin (all K teachers propose every step, one proposal is taken at random). Curation: each teacher writes
``n_curation`` (the paper: 4) sampled traces, the best by the meta-prover's score (Eq. 3) is kept.

Every search decoder records, per trajectory it ran, per expansion step, the teachers of the candidates
that survived selection among all beams (``DecodeResult.selections``): the hit rates during expansion.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
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
    # per trajectory searched, per expansion step: the teachers of the candidates that survived selection
    selections: list[list[list[str]]] = field(default_factory=list)
    # trajectories the decoder spent (CoRD: its B beams; greedy: its one-beam runs; curation / random: the
    # complete traces written); None: not counted
    trajectories: int | None = None


@dataclass
class _Counters:
    tokens_generated: int = 0
    meta_prover_tokens: int = 0


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


# ----------------------------------------------------------------------------------------------
# Requests: a decoder is a generator that yields what it needs from the teachers or the meta-prover
# and is sent the answer, so one driver can serve one question or many in flight (batched calls).
# ----------------------------------------------------------------------------------------------
@dataclass
class ProposeRequest:
    """``teachers[teacher].propose(prefixes, n=..., ...)``; answered with its ``[len(prefixes)][n]`` proposals."""
    teacher: int
    prefixes: list[str]
    n: int
    max_new_tokens: int
    stop: object
    temperature: float
    seed: int | None
    top_p: float = 1.0


@dataclass
class ScoreRequest:
    """``scorer.score(pairs, prefixes=prefixes)``; answered with (scores, meta-prover tokens it cost)."""
    pairs: list[tuple[str, str]]
    prefixes: list[str | None]


def _temperature(cfg: CordConfig, k: int) -> float:
    """Teacher k's sampling temperature (one number for all, or one per teacher)."""
    t = cfg.temperature
    return float(t[k]) if isinstance(t, (list, tuple)) else float(t)


def _top_p(cfg: CordConfig, k: int) -> float:
    """Teacher k's nucleus-sampling mass (1: the whole distribution), where the config has one."""
    t = getattr(cfg, "top_p", None)
    if t is None:
        return 1.0
    return float(t[k]) if isinstance(t, (list, tuple)) else float(t)


def _serve_propose(teachers: Sequence[Teacher], requests: Sequence[ProposeRequest]) -> list[list[list[Proposal]]]:
    return [teachers[r.teacher].propose(r.prefixes, n=r.n, max_new_tokens=r.max_new_tokens, stop=r.stop,
                                        temperature=r.temperature, seed=r.seed,
                                        **({"top_p": r.top_p} if r.top_p != 1.0 else {})) for r in requests]


def _serve_score(scorer: Scorer, request: ScoreRequest) -> tuple[list[float], int]:
    before = scorer.tokens_processed
    scores = [float(s) for s in scorer.score(request.pairs, prefixes=request.prefixes)]
    return scores, scorer.tokens_processed - before


def serve_one(gen, teachers: Sequence[Teacher], scorer: Scorer):
    """Runs decoder generator ``gen`` to its end, answering each request with one call; returns its value."""
    reply = None
    while True:
        try:
            req = gen.send(reply)
        except StopIteration as stop:
            return stop.value
        reply = _serve_score(scorer, req) if isinstance(req, ScoreRequest) else _serve_propose(teachers, req)


def _propose_requests(num_teachers: int, beams: Sequence[Beam], *, seg: Segmentation, cfg: CordConfig,
                      seed: int):
    """Generator: every teacher proposes the next step of every active beam -> per teacher, the
    proposal of each beam. A beam near its budget may only generate what is left of it, so beams are
    grouped by that limit (one request per teacher and limit)."""
    limits: dict[int, list[int]] = {}
    for b, beam in enumerate(beams):
        left = cfg.token_budget - beam.tokens
        limits.setdefault(min(cfg.max_step_tokens, left) if cfg.max_step_tokens else left, []).append(b)
    requests, where = [], []
    for k in range(num_teachers):
        for limit, idx in limits.items():
            requests.append(ProposeRequest(k, [beams[b].text for b in idx], 1, max(1, limit), seg,
                                           _temperature(cfg, k), seed + 7919 * k, _top_p(cfg, k)))
            where.append((k, idx))
    replies = yield requests
    per_teacher: list[list[Proposal | None]] = [[None] * len(beams) for _ in range(num_teachers)]
    for (k, idx), got in zip(where, replies):
        for b, row in zip(idx, got):
            per_teacher[k][b] = row[0]
    return per_teacher


def _propose_steps(num_teachers: int, beams: Sequence[Beam], *, seg: Segmentation, names: Sequence[str],
                   cfg: CordConfig, seed: int, counters: _Counters):
    per_teacher = yield from _propose_requests(num_teachers, beams, seg=seg, cfg=cfg, seed=seed)
    counters.tokens_generated += sum(p.num_tokens for props in per_teacher for p in props)
    return [extend_beam(beam, per_teacher[k][b], k, names, token_budget=cfg.token_budget, end_marker=seg.end_marker)
            for b, beam in enumerate(beams) for k in range(num_teachers)]


def propose_steps(teachers: Sequence[Teacher], beams: Sequence[Beam], *, seg: Segmentation, names: Sequence[str],
                  cfg: CordConfig, seed: int, counters: _Counters) -> list[Beam]:
    """Every teacher proposes the next step of every active beam: B x K candidates, beam-major
    (candidate b * K + k extends beam b with teacher k's step)."""
    return serve_one(_propose_steps(len(teachers), beams, seg=seg, names=names, cfg=cfg, seed=seed,
                                    counters=counters), teachers, None)


def _score_request(candidates: Sequence[Beam], answer: str, end_marker: str) -> tuple[ScoreRequest, list[int]]:
    """The request scoring each distinct candidate text once, and per candidate the index of its pair.

    Two teachers often write the same step: their candidates are one trace, so they get one score (scored
    twice, they could differ in the last bits with their place in the batch, and which teacher gets the
    step would depend on that; with one score the earlier candidate wins the tie)."""
    pairs, prefixes, index, where = [], [], {}, []
    for c in candidates:
        text = _strip_end(c.text, end_marker)
        if text not in index:
            index[text] = len(pairs)
            pairs.append((text, answer))
            prefixes.append(c.parent if c.parent and text.startswith(c.parent) else None)
        where.append(index[text])
    return ScoreRequest(pairs, prefixes), where


def _set_scores(candidates: Sequence[Beam], scores: Sequence[float], where: Sequence[int]) -> list[float]:
    out = [scores[w] for w in where]
    for c, s in zip(candidates, out):
        c.score = s
        if c.steps:
            c.steps[-1]["score"] = s
    return out


def _score_candidates(candidates: Sequence[Beam], answer: str, *, end_marker: str, counters: _Counters):
    if not candidates:
        return []
    request, where = _score_request(candidates, answer, end_marker)
    scores, tokens = yield request
    counters.meta_prover_tokens += tokens
    return _set_scores(candidates, scores, where)


def score_candidates(scorer: Scorer, candidates: Sequence[Beam], answer: str, *,
                     end_marker: str = END_MARKER) -> list[float]:
    """Meta-prover score of each candidate trace against the ground-truth answer (each distinct text
    scored once); candidates of one parent beam share its KV cache. Sets ``beam.score`` and the last
    step's score."""
    if not candidates:
        return []
    request, where = _score_request(candidates, answer, end_marker)
    scores, _ = _serve_score(scorer, request)
    return _set_scores(candidates, scores, where)


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


def _write_answer(beam: Beam, *, cfg: CordConfig, seed: int, counters: _Counters):
    k = beam.teacher if beam.teacher is not None else 0
    ((prop,),), = yield [ProposeRequest(k, [beam.text + cfg.answer_prompt], 1, cfg.max_answer_tokens, None,
                                        _temperature(cfg, k), seed + 104729, _top_p(cfg, k))]
    counters.tokens_generated += prop.num_tokens
    return cfg.answer_prompt + prop.text


def write_answer(teachers: Sequence[Teacher], beam: Beam, *, cfg: CordConfig, seed: int, counters: _Counters) -> str:
    """The teacher that wrote the last step continues after the end marker with the final answer."""
    return serve_one(_write_answer(beam, cfg=cfg, seed=seed, counters=counters), teachers, None)


def _step_range(cfg: CordConfig):
    """0, 1, ... up to max_steps (no cap when it is None: the token budget ends every trace)."""
    return range(cfg.max_steps) if cfg.max_steps else itertools.count()


def _prompt(cfg: CordConfig, seg: Segmentation, question: str) -> str:
    return fill_prompt(cfg.prompt_template, question=question) if cfg.prompt_template else seg.prompt(question)


# ----------------------------------------------------------------------------------------------
# Decoders (generators; decode_* run one on its own)
# ----------------------------------------------------------------------------------------------
def _beam_search(question: str, answer: str, num_teachers: int, cfg: CordConfig, beam_size: int, *, seed: int,
                 seg: Segmentation, counters: _Counters, selections: list[list[str]]):
    """Generator: CoRD's beam search with ``beam_size`` beams -> (prompt, the best closed beam). Appends,
    per expansion step, the teachers of the new candidates that survived selection to ``selections``."""
    names = cfg.names()
    prompt = _prompt(cfg, seg, question)
    beams = [Beam(text=prompt)]
    for step in _step_range(cfg):
        active = [b for b in beams if not b.finished]
        if not active:
            break
        candidates = yield from _propose_steps(num_teachers, active, seg=seg, names=names, cfg=cfg,
                                               seed=seed + 31 * step, counters=counters)
        yield from _score_candidates(candidates, answer, end_marker=seg.end_marker, counters=counters)
        # Finished beams stay in the pool with their score; they compete with the new candidates.
        beams = select_beams([b for b in beams if b.finished] + candidates, beam_size)
        new = {id(c) for c in candidates}
        selections.append([b.steps[-1]["teacher"] for b in beams if id(b) in new])
    beams = [_close(b, seg.end_marker) for b in beams]
    return prompt, select_beams(beams, 1)[0]


TRAJECTORY_SEED_STRIDE = 1_000_003  # trajectory i of equal-cost greedy draws with seed + i * this


def _all_greedy(cfg: CordConfig, num_teachers: int) -> bool:
    return all(_temperature(cfg, k) == 0 for k in range(num_teachers))


def greedy_trajectories(cfg: CordConfig, num_teachers: int) -> int:
    """How many trajectories the greedy baseline decodes: ``beam_size`` at equal cost (B = 1 per
    trajectory), except at temperature 0 for every teacher, where they would all be the same one."""
    if cfg.method != "greedy" or cfg.baseline_cost == "single" or _all_greedy(cfg, num_teachers):
        return 1
    return cfg.beam_size


def cord_steps(question: str, answer: str, num_teachers: int, cfg: CordConfig, *, seed: int = 0,
               seg: Segmentation | None = None):
    """Generator of CoRD's beam search for one question (``cfg.method`` "cord": B = cfg.beam_size) or of
    the greedy baseline (B = 1, run as :func:`greedy_trajectories` independent trajectories, the best by
    the meta-prover's final score kept): yields requests (see :func:`serve_one`), returns its DecodeResult."""
    seg = seg or cfg.make_segmentation()
    counters = _Counters()
    greedy = cfg.method == "greedy"
    n = greedy_trajectories(cfg, num_teachers)
    results, selections = [], []
    for i in range(n):
        rounds: list[list[str]] = []
        prompt, beam = yield from _beam_search(question, answer, num_teachers, cfg, 1 if greedy else cfg.beam_size,
                                               seed=seed + TRAJECTORY_SEED_STRIDE * i, seg=seg, counters=counters,
                                               selections=rounds)
        results.append(beam)
        selections.append(rounds)
    best = select_beams(results, 1)[0]  # the best final score; ties: the earliest trajectory
    answer_text = yield from _write_answer(best, cfg=cfg, seed=seed, counters=counters)
    return DecodeResult(best, prompt, answer_text, counters.tokens_generated, counters.meta_prover_tokens,
                        selections=selections, trajectories=n * (1 if greedy else cfg.beam_size))


def _trace_pool(prompt: str, num_teachers: int, cfg: CordConfig, *, seed: int, seg: Segmentation,
                counters: _Counters):
    """Generator: each teacher writes ``n_curation`` complete traces (up to the token budget) -> the traces
    (teacher-major), unscored. A teacher at temperature 0 writes one (its n traces would be the same one)."""
    names = cfg.names()
    stop = StringStop([seg.end_marker])
    requests = [ProposeRequest(k, [prompt], cfg.n_curation if _temperature(cfg, k) > 0 else 1, cfg.token_budget,
                               stop, _temperature(cfg, k), seed + 7919 * k, _top_p(cfg, k))
                for k in range(num_teachers)]
    replies = yield requests
    traces: list[Beam] = []
    for k, (row,) in enumerate(replies):
        for prop in row:
            counters.tokens_generated += prop.num_tokens
            text = prop.text if prop.text.endswith(seg.end_marker) else prop.text + seg.end_marker
            steps = [{"text": s, "teacher": names[k], "score": None} for s in seg.split(prop.text)]
            traces.append(Beam(text=prompt + text, steps=steps, tokens=prop.num_tokens, finished=True,
                               teacher=k, parent=prompt))
    return traces


def random_steps(question: str, answer: str, num_teachers: int, cfg: CordConfig, *, seed: int = 0,
                 seg: Segmentation | None = None):
    """Generator of the random baseline. ``random_selection: trajectory`` (Table 5): each teacher writes
    ``n_curation`` complete traces (curation's pool and cost) and one is picked uniformly at random.
    ``step``: every step all K teachers propose (greedy CoRD's generation cost) and one proposal is
    picked at random. The meta-prover scores only the chosen trace (for the record)."""
    seg = seg or cfg.make_segmentation()
    names, counters, rng = cfg.names(), _Counters(), random.Random(seed)
    prompt = _prompt(cfg, seg, question)
    if cfg.random_selection == "trajectory":
        pool = yield from _trace_pool(prompt, num_teachers, cfg, seed=seed, seg=seg, counters=counters)
        beam, trajectories, selections = pool[rng.randrange(len(pool))], len(pool), []
    else:
        beam, rounds = Beam(text=prompt), []
        for step in _step_range(cfg):
            if beam.finished:
                break
            candidates = yield from _propose_steps(num_teachers, [beam], seg=seg, names=names, cfg=cfg,
                                                   seed=seed + 31 * step, counters=counters)
            beam = candidates[rng.randrange(len(candidates))]
            rounds.append([beam.steps[-1]["teacher"]])
        beam, trajectories, selections = _close(beam, seg.end_marker), 1, [rounds]
    (s,) = yield from _score_candidates([dataclasses.replace(beam, parent="")], answer, end_marker=seg.end_marker,
                                        counters=counters)
    beam.score = s
    answer_text = yield from _write_answer(beam, cfg=cfg, seed=seed, counters=counters)
    return DecodeResult(beam, prompt, answer_text, counters.tokens_generated, counters.meta_prover_tokens,
                        selections=selections, trajectories=trajectories)


def curation_steps(question: str, answer: str, num_teachers: int, cfg: CordConfig, *, seed: int = 0,
                   seg: Segmentation | None = None):
    """Generator of curation: each teacher writes n_curation complete traces (up to the token budget); the
    meta-prover keeps the best (Eq. 3); its teacher writes the final answer."""
    seg = seg or cfg.make_segmentation()
    counters = _Counters()
    prompt = _prompt(cfg, seg, question)
    traces = yield from _trace_pool(prompt, num_teachers, cfg, seed=seed, seg=seg, counters=counters)
    yield from _score_candidates(traces, answer, end_marker=seg.end_marker, counters=counters)
    best = select_beams(traces, 1)[0]
    answer_text = yield from _write_answer(best, cfg=cfg, seed=seed, counters=counters)
    return DecodeResult(best, prompt, answer_text, counters.tokens_generated, counters.meta_prover_tokens,
                        trajectories=len(traces))


STEPS = {"cord": cord_steps, "greedy": cord_steps, "random": random_steps, "curation": curation_steps}
# Baselines with modules of their own; they take this module's classes at call time (no import cycle).
from distillkit.methods.cord.integration import integration_steps  # noqa: E402
from distillkit.methods.cord.mcts import mcts_steps  # noqa: E402

STEPS.update(integration=integration_steps, mcts=mcts_steps)


def decode_one(question: str, answer: str, teachers: Sequence[Teacher], scorer: Scorer, cfg: CordConfig, *,
               seed: int = 0, seg: Segmentation | None = None) -> DecodeResult:
    """CoRD beam search for one question (``cfg.method`` "cord" or "greedy"; B = cfg.beam_size)."""
    return serve_one(cord_steps(question, answer, len(teachers), cfg, seed=seed, seg=seg), teachers, scorer)


def decode_random(question: str, answer: str, teachers: Sequence[Teacher], scorer: Scorer, cfg: CordConfig, *,
                  seed: int = 0, seg: Segmentation | None = None) -> DecodeResult:
    """Random step selection (see :func:`random_steps`) for one question."""
    return serve_one(random_steps(question, answer, len(teachers), cfg, seed=seed, seg=seg), teachers, scorer)


def decode_curation(question: str, answer: str, teachers: Sequence[Teacher], scorer: Scorer, cfg: CordConfig, *,
                    seed: int = 0, seg: Segmentation | None = None) -> DecodeResult:
    """Curation (see :func:`curation_steps`) for one question."""
    return serve_one(curation_steps(question, answer, len(teachers), cfg, seed=seed, seg=seg), teachers, scorer)


DECODERS = {"cord": decode_one, "greedy": decode_one, "random": decode_random, "curation": decode_curation}


# ----------------------------------------------------------------------------------------------
# Many questions in flight
# ----------------------------------------------------------------------------------------------
def _stop_key(stop) -> object:
    if stop is None:
        return None
    if isinstance(stop, StringStop):
        return ("strings", tuple(stop.strings))
    return ("object", id(stop))


def _propose_key(req: ProposeRequest) -> tuple:
    # Sampled requests keep their own seed (a question's proposals must not depend on which others are in
    # flight), so only greedy requests of different questions share a call.
    return (req.teacher, req.n, req.max_new_tokens, _stop_key(req.stop), req.temperature, req.top_p,
            req.seed if req.temperature > 0 else None)


def _served(teacher: Teacher) -> bool:
    """Whether ``teacher`` answers ``apropose`` natively concurrently (a served teacher), rather than with
    the default in-process one-at-a-time worker thread."""
    own = getattr(type(teacher), "apropose", None)
    return own is not None and own is not Teacher.apropose


class _LoopThread:
    """One event loop in a thread of its own for a whole decode: served teachers keep their HTTP clients and
    connections across rounds, and it works where the caller already runs a loop (a notebook)."""

    def __init__(self):
        self._loop = None
        self._thread = None

    def run(self, coro):
        import asyncio
        import threading

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="cord-teachers", daemon=True)
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = None


def _serve_propose_many(teachers: Sequence[Teacher], requests: dict[int, list[ProposeRequest]],
                        loop: _LoopThread) -> dict[int, list]:
    """Answers every in-flight question's proposal requests with one ``propose`` call per teacher and
    request kind (greedy requests of all questions concatenated). Served teachers are asked all at once
    (``apropose``); in-process ones one after another (they generate one call at a time anyway, and their
    speed-up is the batching across questions)."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, reqs in requests.items():
        for j, req in enumerate(reqs):
            groups.setdefault(_propose_key(req), []).append((i, j))
    replies = {i: [None] * len(reqs) for i, reqs in requests.items()}
    calls = []
    for members in groups.values():
        first = requests[members[0][0]][members[0][1]]
        kwargs = dict(n=first.n, max_new_tokens=first.max_new_tokens, stop=first.stop, temperature=first.temperature,
                      seed=first.seed)
        if first.top_p != 1.0:
            kwargs["top_p"] = first.top_p
        calls.append((members, first.teacher, [p for i, j in members for p in requests[i][j].prefixes], kwargs))

    results: list = [None] * len(calls)
    served = [c for c, (_, k, _, _) in enumerate(calls) if _served(teachers[k])]
    if served:
        import asyncio

        async def ask_all():
            return await asyncio.gather(*[teachers[calls[c][1]].apropose(calls[c][2], **calls[c][3]) for c in served])

        for c, got in zip(served, loop.run(ask_all())):
            results[c] = got
    for c, (_, k, prefixes, kwargs) in enumerate(calls):
        if results[c] is None:
            results[c] = teachers[k].propose(prefixes, **kwargs)
    for (members, _, _, _), got in zip(calls, results):
        at = 0
        for i, j in members:
            size = len(requests[i][j].prefixes)
            replies[i][j] = got[at:at + size]
            at += size
    return replies


def _serve_score_many(scorer: Scorer, requests: dict[int, ScoreRequest]) -> dict[int, tuple[list[float], int]]:
    """Scores the candidates of every in-flight question in one call when the scorer reports each pair's
    tokens (``last_pair_tokens``, as MetaProver does); else one call per question."""
    if not requests:
        return {}
    if len(requests) == 1 or not hasattr(scorer, "last_pair_tokens"):
        return {i: _serve_score(scorer, req) for i, req in requests.items()}
    pairs = [p for req in requests.values() for p in req.pairs]
    prefixes = [p for req in requests.values() for p in req.prefixes]
    scores = [float(s) for s in scorer.score(pairs, prefixes=prefixes)]
    tokens = list(scorer.last_pair_tokens)
    out, at = {}, 0
    for i, req in requests.items():
        size = len(req.pairs)
        out[i] = (scores[at:at + size], sum(tokens[at:at + size]))
        at += size
    return out


def decode_many(items: Iterable[tuple[str, str, int]], teachers: Sequence[Teacher], scorer: Scorer,
                cfg: CordConfig, *, seg: Segmentation | None = None, in_flight: int = 1
                ) -> Iterator[tuple[int, DecodeResult]]:
    """Decodes ``items`` ((question, answer, seed) each, with ``cfg.method``), up to ``in_flight`` questions
    at a time -> (index in items, result), as each question finishes (not in input order).

    Each question's search stays sequential; every round, the proposal requests of all questions in flight
    go to each teacher as one batched call (greedy ones; sampled ones keep their own seed), and all their
    candidates go to the meta-prover in one call. With in_flight=1 the calls are those of decode_one.
    """
    if not isinstance(in_flight, int) or in_flight < 1:
        raise ValueError(f"in_flight={in_flight!r}: expected an integer >= 1")
    steps = STEPS[cfg.method]
    seg = seg or cfg.make_segmentation()
    queue = enumerate(items)
    active: dict[int, list] = {}  # index -> [generator, its pending request]

    def admit() -> None:
        while len(active) < in_flight:
            item = next(queue, None)
            if item is None:
                return
            i, (question, answer, seed) = item
            gen = steps(question, answer, len(teachers), cfg, seed=seed, seg=seg)
            active[i] = [gen, next(gen)]  # every decoder asks for proposals before it returns

    loop = _LoopThread()
    try:
        admit()
        while active:
            score_reqs = {i: a[1] for i, a in active.items() if isinstance(a[1], ScoreRequest)}
            replies = _serve_score_many(scorer, score_reqs)
            replies.update(_serve_propose_many(
                teachers, {i: a[1] for i, a in active.items() if i not in score_reqs}, loop))
            finished = []
            for i in sorted(active):
                try:
                    active[i][1] = active[i][0].send(replies[i])
                except StopIteration as stop:
                    finished.append((i, stop.value))
                    del active[i]
            admit()
            yield from finished
    finally:
        loop.close()
