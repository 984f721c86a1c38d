"""MCTS step search (the paper's Table 6 baseline): UCT mechanics with fake teachers and scores, the token
budget, and a search on the world's shipped models."""
from __future__ import annotations

import pytest
import torch

from distillkit.methods.cord import CordConfig
from distillkit.methods.cord.decode import Beam
from distillkit.methods.cord.mcts import Node, backup, best_trace, decode_mcts, select_leaf
from distillkit.teachers.base import Proposal, Teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class StepTeacher(Teacher):
    """Step d of teacher X is "X<d>|" (d counted by '|' in the prefix), "X<d></think>" from ``finish_at`` on;
    each step costs ``cost`` tokens; after '</think>' it answers "X"."""

    def __init__(self, name, *, cost=2, finish_at=None):
        self.name, self.cost, self.finish_at, self.calls = name, cost, finish_at, []

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        self.calls.append(list(prefixes))
        out = []
        for p in prefixes:
            if p.endswith("</think>"):
                out.append([Proposal(f" The final answer is {self.name}.", 3, True, "eos")] * n)
                continue
            d = p.count("|")
            done = self.finish_at is not None and d >= self.finish_at
            out.append([Proposal(f"{self.name}{d}" + ("</think>" if done else "|"), min(self.cost, max_new_tokens),
                                 done, "end" if done else "boundary")] * n)
        return out


class TableScorer:
    """Score = mean of the table's values of the trace's steps (unknown steps 0.5)."""

    def __init__(self, table):
        self.table, self.tokens_processed, self.calls = table, 0, []

    def score(self, pairs, *, prefixes=None):
        self.calls.append([c for c, _ in pairs])
        out = []
        for ctx, _ in pairs:
            self.tokens_processed += len(ctx)
            steps = [s for s in ctx.split("<think>\n", 1)[-1].split("|") if s]
            out.append(sum(self.table.get(s, 0.5) for s in steps) / max(1, len(steps)))
        return torch.tensor(out)


def _cfg(**kw):
    base = dict(teachers=["A", "B"], meta_prover="M", input_path="i", output_path="o", segmentation="line-break",
                token_budget=100, beam_size=2, temperature=0.0, max_answer_tokens=5, progress=False)
    return CordConfig(**{**base, **kw})


def test_uct_without_exploration_follows_the_best_child_and_returns_the_best_finished_trace():
    teachers = [StepTeacher("A", finish_at=2), StepTeacher("B", finish_at=2)]
    scorer = TableScorer({"A0": 0.9, "A1": 0.9, "A2": 0.9, "B0": 0.1, "B1": 0.1, "B2": 0.1})
    res = decode_mcts("Q?", "7", teachers, scorer, _cfg(), exploration=0.0)
    assert res.beam.text == "Q?\n<think>\nA0|A1|A2</think>" and res.beam.finished
    assert [s["teacher"] for s in res.beam.steps] == ["A", "A", "A"]
    # expansions: the root, then always the A child (greedy in Q)
    assert teachers[0].calls[:3] == [["Q?\n<think>\n"], ["Q?\n<think>\nA0|"], ["Q?\n<think>\nA0|A1|"]]
    assert res.answer_text == " The final answer is A." and res.beam.score == pytest.approx(0.9)
    assert res.meta_prover_tokens == scorer.tokens_processed


def test_exploration_visits_the_weaker_branch_and_the_budget_stops_the_search():
    teachers = [StepTeacher("A", cost=2), StepTeacher("B", cost=2)]  # never finish
    scorer = TableScorer({"A0": 0.6, "B0": 0.4})
    res = decode_mcts("Q?", "7", teachers, scorer, _cfg(), exploration=2.0, total_token_budget=40)
    expanded = [p[0] for t in teachers[:1] for p in t.calls[:-1]]  # teacher A sees every expanded leaf
    assert any(p.startswith("Q?\n<think>\nB0|") for p in expanded)  # the weaker first step was explored too
    # every expansion costs K x 2 = 4 tokens: the search stops once 40 are spent (10 expansions), then the answer
    assert len(expanded) == 10 and res.tokens_generated == 40 + 3
    # nothing finished: the most visited path, closed
    assert res.beam.text.endswith("</think>") and res.beam.finished
    assert decode_mcts("Q?", "7", teachers, scorer, _cfg(), max_iterations=2).tokens_generated == 8 + 3


def test_per_trace_budget_and_step_cap_finish_children():
    teachers = [StepTeacher("A", cost=4)]
    res = decode_mcts("Q?", "7", teachers, TableScorer({}), _cfg(teachers=["A"], token_budget=10))
    assert res.beam.text == "Q?\n<think>\nA0|A1|A2|</think>" and res.beam.tokens == 10  # 4 + 4 + 2
    capped = decode_mcts("Q?", "7", teachers, TableScorer({}), _cfg(teachers=["A"], max_steps=2))
    assert len(capped.beam.steps) == 2 and capped.beam.text.endswith("</think>")
    with pytest.raises(ValueError, match="exploration"):
        decode_mcts("Q?", "7", teachers, TableScorer({}), _cfg(teachers=["A"]), exploration=-1)
    with pytest.raises(ValueError, match="total_token_budget"):
        decode_mcts("Q?", "7", teachers, TableScorer({}), _cfg(teachers=["A"]), total_token_budget=0)


def test_tree_helpers():
    root = Node(Beam(text="p"))
    a, b = Node(Beam(text="pa", score=0.2), parent=root), Node(Beam(text="pb</think>", finished=True, score=0.7),
                                                              parent=root)
    root.children = [a, b]
    a.visits, a.value_sum, b.visits, b.value_sum = 1, 0.2, 1, 0.7
    assert select_leaf(root, 0.0) is a  # b is finished: only a is open
    backup(a, 0.5)
    assert (a.visits, a.value_sum, root.visits) == (2, pytest.approx(0.7), 1)
    assert best_trace(root, "</think>").text == "pb</think>"
    b.beam.finished = False
    b.beam.score = float("nan")
    assert best_trace(root, "</think>").text == "pa</think>"  # nothing finished: most visited, closed


def test_mcts_on_the_world_models():
    from distillkit.methods.cord.meta_prover import MetaProver
    from distillkit.teachers.hf import HFTeacher
    from distillkit.world import models as M
    from distillkit.world import problems as W

    teachers = [HFTeacher.from_pretrained(M.asset_path(n), name=n) for n in M.TEACHERS]
    prover = MetaProver.from_pretrained(M.asset_path(M.META_PROVER), backend="reference")
    cfg = CordConfig(teachers=list(M.TEACHERS), meta_prover="m", input_path="i", output_path="o",
                     token_budget=M.max_new_tokens(), max_step_tokens=16, max_answer_tokens=8, temperature=0.0,
                     beam_size=2, progress=False)
    for problem in W.generate_problems(3, seed=11):
        res = decode_mcts(problem.question, problem.answer, teachers, prover, cfg, exploration=0.5)
        assert res.beam.finished and res.beam.text.startswith(problem.prompt)
        reasoning = res.beam.text[:-len("</think>")]
        # the same float32 score, rescored alone (another batch and padding): rounding only
        assert res.beam.score == pytest.approx(float(prover.score([(reasoning, problem.answer)])[0]), rel=1e-5)
        assert res.tokens_generated <= cfg.beam_size * 3 * cfg.token_budget + 3 * 16 + cfg.max_answer_tokens
        check = W.check_trace(problem.question, res.beam.text[len(problem.prompt):] + res.answer_text)
        assert check["well_formed"], res.beam.text


@pytest.mark.parametrize("method", ["mcts", "integration"])
def test_generators_run_in_the_decode_loops_many_in_flight_driver(monkeypatch, method):
    """mcts_steps / integration_steps speak the decode loop's request protocol: decode_many with several
    questions in flight gives each question the result it gets alone."""
    from distillkit.methods.cord import decode
    from distillkit.methods.cord.integration import integration_steps
    from distillkit.methods.cord.mcts import mcts_steps

    monkeypatch.setitem(decode.STEPS, method, {"mcts": mcts_steps, "integration": integration_steps}[method])
    cfg = _cfg(teachers=["A", "B"], token_budget=8)
    cfg.method = method  # past the config's METHODS check: the driver reads STEPS
    items = [(f"Q{i}?", "7", 100 + i) for i in range(4)]

    def results(in_flight):
        teachers = [StepTeacher("A", finish_at=2), StepTeacher("B", finish_at=3)]
        scorer = TableScorer({"A0": 0.9, "B1": 0.8, "A2": 0.3})
        got = dict(decode.decode_many(items, teachers, scorer, cfg, in_flight=in_flight))
        return {i: (r.beam.text, r.answer_text, r.tokens_generated, r.meta_prover_tokens) for i, r in got.items()}

    alone, together = results(1), results(3)
    assert sorted(alone) == [0, 1, 2, 3] and together == alone
    assert all(text.startswith(f"Q{i}?\n<think>\n") and text.endswith("</think>") for i, (text, *_) in alone.items())


@pytest.mark.parametrize("method", ["mcts", "integration"])
def test_distillkit_cord_runs_the_method(tmp_path, method):
    """`--method mcts | integration` goes through the run (config, decode loop, records, summary)."""
    import json

    from distillkit.methods.cord import load_done, run

    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Q{i}?", "answer": "7"}) + "\n" for i in range(3)))
    cfg = _cfg(method=method, input_path=str(path), output_path=str(tmp_path / "out.jsonl"), token_budget=8,
               questions_in_flight=2)
    summary = run(cfg, teachers=[StepTeacher("A", finish_at=2), StepTeacher("B", finish_at=3)],
                  meta_prover=TableScorer({"A0": 0.9, "B1": 0.8}))
    records = load_done(cfg.output_path)
    assert summary["method"] == method and summary["records"] == 3 and len(records) == 3
    for r in records:
        assert r["trajectory"].split("</think>")[0] and r["tokens_generated"] > 0 and r["meta_prover_tokens"] > 0
