"""MCTS step search: the paper's Table 6 baseline, over the same step proposals and scores as CoRD.

A node is a partial trace (the prompt plus chosen steps). One iteration:

1. select: from the root, go down to a leaf, at each node taking the child of highest UCT
   ``Q + c * sqrt(ln N(parent) / N(child))`` (Q: the mean value of the child's subtree);
2. expand: every teacher proposes the leaf's next step (K children, as one CoRD step of one beam);
3. evaluate: the meta-prover scores each child (predictive perplexity of the ground-truth answer after the
   child's trace, in (0, 1]); that score is the child's value;
4. back up: the best child value is added to every node on the path to the root.

A child finishes at ``"</think>"``, at EOS or when its trace's token budget is spent (then ``"</think>"`` is
appended), as in CoRD. The search stops when the teachers have generated ``total_token_budget`` tokens (default:
what CoRD may spend on one question, B x K x the per-trace budget), when no unfinished leaf is left, or after
``max_iterations``. The result is the finished trace of highest score (none finished: the most visited path,
closed); the teacher that wrote its last step writes the answer.

    res = decode_mcts(question, answer, teachers, meta_prover, cfg)   # cfg.mcts_exploration, mcts_token_budget
    distillkit cord --config ... --method mcts [--mcts-exploration 1.0]

:func:`mcts_steps` is the same search in the decode loop's request protocol (``decode.decode_many``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distillkit._errors import InputError
from distillkit.methods.cord.config import CordConfig
from distillkit.methods.cord.segmentation import Segmentation
from distillkit.pipeline.data import fill_prompt
from distillkit.teachers.base import Teacher

if TYPE_CHECKING:  # decode imports this module's generator at its end; the classes are taken at call time
    from distillkit.methods.cord.decode import Beam


@dataclass
class Node:
    """A partial trace in the search tree."""
    beam: Beam
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def uct(self, exploration: float) -> float:
        if self.visits == 0:
            return math.inf
        parent_visits = max(1, self.parent.visits if self.parent is not None else 1)
        return self.q + exploration * math.sqrt(math.log(parent_visits) / self.visits)


def _temperature(cfg: CordConfig, k: int) -> float:
    t = cfg.temperature
    return float(t[k]) if isinstance(t, (list, tuple)) else float(t)


def _top_p(cfg: CordConfig, k: int) -> float:
    t = getattr(cfg, "top_p", 1.0)
    return float(t[k]) if isinstance(t, (list, tuple)) else float(t)


def _strip_end(text: str, end_marker: str) -> str:
    return text[:-len(end_marker)] if text.endswith(end_marker) else text


def select_leaf(root: Node, exploration: float) -> Node | None:
    """The unexpanded, unfinished node UCT leads to from ``root``; None when every leaf below is finished."""
    node = root
    while node.children:
        open_children = [c for c in node.children if _has_open_leaf(c)]
        if not open_children:
            return None
        node = max(open_children, key=lambda c: (c.uct(exploration), -node.children.index(c)))
    return None if node.beam.finished else node


def _has_open_leaf(node: Node) -> bool:
    if not node.children:
        return not node.beam.finished
    return any(_has_open_leaf(c) for c in node.children)


def expansion_requests(node: Node, num_teachers: int, *, seg: Segmentation, cfg: CordConfig, seed: int) -> list:
    """One proposal request per teacher: the next step of ``node``'s trace."""
    from distillkit.methods.cord.decode import ProposeRequest

    limit = max(1, cfg.step_token_limit(node.beam.tokens))
    return [ProposeRequest(k, [node.beam.text], 1, limit, seg, _temperature(cfg, k), seed + 7919 * k, _top_p(cfg, k))
            for k in range(num_teachers)]


def add_children(node: Node, proposals: Sequence, *, seg: Segmentation, names: Sequence[str],
                 cfg: CordConfig) -> list[Node]:
    """``node``'s children, one per teacher's proposal (``proposals[k]``); a child finishes at the end marker or
    EOS, when its trace's budget is spent, or at ``cfg.max_steps``."""
    from distillkit.methods.cord.decode import Beam

    beam, children = node.beam, []
    for k, prop in enumerate(proposals):
        tokens = beam.tokens + prop.num_tokens
        finished = prop.finished or tokens >= cfg.token_budget or (
            cfg.max_steps is not None and len(beam.steps) + 1 >= cfg.max_steps)
        text = beam.text + prop.text
        if finished and not text.endswith(seg.end_marker):
            text += seg.end_marker
        child = Beam(text=text, steps=beam.steps + [{"text": prop.text, "teacher": names[k], "score": None}],
                     tokens=tokens, finished=finished, teacher=k, parent=beam.text)
        children.append(Node(child, parent=node))
    node.children = children
    return children


def score_request(children: Sequence[Node], answer: str, end_marker: str):
    """The meta-prover's request for the children of one node (they share its KV prefix)."""
    from distillkit.methods.cord.decode import ScoreRequest

    pairs = [(_strip_end(c.beam.text, end_marker), answer) for c in children]
    prefixes = [c.beam.parent if p.startswith(c.beam.parent) else None for c, (p, _) in zip(children, pairs)]
    return ScoreRequest(pairs, prefixes)


def set_values(children: Sequence[Node], scores: Sequence[float]) -> list[float]:
    """Each child's score is its value (one visit)."""
    out = []
    for c, s in zip(children, scores):
        s = float(s)
        c.beam.score = s
        c.beam.steps[-1]["score"] = s
        c.visits, c.value_sum = 1, (s if not math.isnan(s) else 0.0)
        out.append(s)
    return out


def backup(node: Node, value: float) -> None:
    """Adds ``value`` to ``node`` and every ancestor."""
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


def _nodes(root: Node):
    stack = [root]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children)


def best_trace(root: Node, end_marker: str) -> Beam:
    """The finished trace of highest score (ties: the earlier created); none finished: the most visited path
    from the root, closed with ``end_marker``."""
    finished = [n.beam for n in _nodes(root) if n.beam.finished and n is not root]
    scored = [b for b in finished if not math.isnan(b.score)]
    if scored:
        return max(scored, key=lambda b: b.score)
    node = root
    while node.children:
        node = max(node.children, key=lambda c: (c.visits, c.q))
    from distillkit.methods.cord.decode import Beam

    b = node.beam
    text = b.text if b.text.endswith(end_marker) else b.text + end_marker
    return Beam(text=text, steps=b.steps, tokens=b.tokens, finished=True, score=b.score, teacher=b.teacher,
                parent=b.parent)


def mcts_steps(question: str, answer: str, num_teachers: int, cfg: CordConfig, *, seed: int = 0,
               seg: Segmentation | None = None, exploration: float | None = None,
               total_token_budget: int | None = None, max_iterations: int | None = None):
    """Generator of the MCTS search for one question in the decode loop's request protocol (see the module
    docstring): yields proposal and scoring requests, returns a DecodeResult.

    exploration: UCT's c (default ``cfg.mcts_exploration``); total_token_budget: teacher tokens the search may
    generate (default ``cfg.mcts_token_budget``, else ``cfg.beam_size * K * cfg.token_budget``, CoRD's bound);
    max_iterations: an optional cap on expansions.
    """
    from distillkit.methods.cord.decode import Beam, DecodeResult, ProposeRequest

    if num_teachers < 1:
        raise InputError("teachers: expected at least one teacher")
    c = cfg.mcts_exploration if exploration is None else exploration
    if not (isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c < math.inf):
        raise InputError(f"exploration={c!r}: expected a finite number >= 0")
    budget = total_token_budget if total_token_budget is not None else cfg.mcts_token_budget
    budget = cfg.beam_size * num_teachers * cfg.token_budget if budget is None else budget
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise InputError(f"total_token_budget={budget!r}: expected an integer >= 1")
    seg = seg or cfg.make_segmentation()
    names = cfg.names()
    prompt = fill_prompt(cfg.prompt_template, question=question) if cfg.prompt_template else seg.prompt(question)
    root = Node(Beam(text=prompt))
    spent, scorer_tokens, iteration = 0, 0, 0
    while spent < budget and (max_iterations is None or iteration < max_iterations):
        leaf = select_leaf(root, c)
        if leaf is None:
            break
        replies = yield expansion_requests(leaf, num_teachers, seg=seg, cfg=cfg, seed=seed + 31 * iteration)
        proposals = [rows[0][0] for rows in replies]
        spent += sum(p.num_tokens for p in proposals)
        children = add_children(leaf, proposals, seg=seg, names=names, cfg=cfg)
        scores, used = yield score_request(children, answer, seg.end_marker)
        scorer_tokens += used
        values = set_values(children, scores)
        backup(leaf, max((v for v in values if not math.isnan(v)), default=0.0))
        iteration += 1
    best = best_trace(root, seg.end_marker)
    k = best.teacher if best.teacher is not None else 0
    (rows,) = yield [ProposeRequest(k, [best.text + cfg.answer_prompt], 1, cfg.max_answer_tokens, None,
                                    _temperature(cfg, k), seed + 104729, _top_p(cfg, k))]
    ans = rows[0][0]
    return DecodeResult(best, prompt, cfg.answer_prompt + ans.text, spent + ans.num_tokens, scorer_tokens)


def decode_mcts(question: str, answer: str, teachers: Sequence[Teacher], scorer, cfg: CordConfig, *,
                seed: int = 0, seg: Segmentation | None = None, exploration: float | None = None,
                total_token_budget: int | None = None, max_iterations: int | None = None):
    """MCTS over the teachers' step proposals for one question (:func:`mcts_steps`) -> DecodeResult."""
    from distillkit.methods.cord.decode import serve_one

    if not teachers:
        raise InputError("teachers: expected at least one teacher")
    return serve_one(mcts_steps(question, answer, len(teachers), cfg, seed=seed, seg=seg, exploration=exploration,
                                total_token_budget=total_token_budget, max_iterations=max_iterations),
                     teachers, scorer)
