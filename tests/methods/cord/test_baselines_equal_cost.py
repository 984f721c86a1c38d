"""CoRD's baselines at equal cost (the paper's Section 5, Appendix G.4.2, Table 5): greedy as B independent
one-beam trajectories (the meta-prover's best kept), random as a trajectory-level pick among complete
traces, curation as n sampled traces per teacher ranked by Eq. 3, and the per-question teacher and
meta-prover tokens every summary reports. Fake teachers whose samples follow the seed; one test on the
shipped world's models."""
from __future__ import annotations

import collections
import json

import pytest

from distillkit import InputError
from distillkit.methods.cord import CordConfig, run
from distillkit.methods.cord.decode import (
    TRAJECTORY_SEED_STRIDE,
    decode_curation,
    decode_one,
    decode_random,
    greedy_trajectories,
)
from distillkit.teachers.base import Proposal, Teacher, as_boundary

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class SampledTeacher(Teacher):
    """Step d of teacher X is "X<d>" at temperature 0 and "X<d>v<v>" when sampled, v = seed % 3, then "|"
    ("</think>" from step ``finish_at`` on); ``cost`` tokens a step. Complete traces (stop at </think>):
    sample j of n is "X0v<j>|X1</think>" (2 x cost tokens). Answers: "The final answer is X." (5)."""

    def __init__(self, name: str, *, cost: int = 3, finish_at: int = 2):
        self.name, self.cost, self.finish_at = name, cost, finish_at
        self.calls: list[dict] = []

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        self.calls.append(dict(prefixes=list(prefixes), n=n, seed=seed, temperature=temperature))
        out = []
        for p in prefixes:
            if p.endswith("</think>"):
                out.append([Proposal(f" The final answer is {self.name}.", 5, True, "eos")] * n)
            elif as_boundary(stop).stop_strings() == ["</think>"]:
                tag = (lambda j: f"v{(seed + j) % 7}") if temperature > 0 else (lambda j: "")
                out.append([Proposal(f"{self.name}0{tag(j)}|{self.name}1</think>", 2 * self.cost, True, "stop")
                            for j in range(n)])
            else:
                d = p.count("|") + p.count("</think>")
                done = d >= self.finish_at
                tag = f"v{seed % 3}" if temperature > 0 else ""
                out.append([Proposal(f"{self.name}{d}{tag}" + ("</think>" if done else "|"), self.cost, done,
                                     "end" if done else "boundary")] * n)
        return out


class TableScorer:
    """Score = the sum over the context's steps of ``table[step]`` (0 for unknown steps); one token per
    context character."""

    def __init__(self, table: dict[str, float]):
        self.table, self.tokens_processed, self.calls = table, 0, []

    def score(self, pairs, *, prefixes=None):
        import torch

        self.calls.append(list(pairs))
        out = []
        for ctx, _answer in pairs:
            self.tokens_processed += len(ctx)
            body = ctx.split("<think>\n", 1)[-1]
            out.append(sum(self.table.get(s, 0.0) for s in body.replace("</think>", "|").split("|") if s))
        return torch.tensor(out, dtype=torch.float64)


def config(**kw) -> CordConfig:
    base = dict(teachers=["A", "B"], meta_prover="M", input_path="in.jsonl", output_path="out.jsonl",
                segmentation="line-break", beam_size=4, token_budget=100, temperature=0.7, progress=False)
    base.update(kw)
    return CordConfig(**base)


def teachers():
    return [SampledTeacher("A"), SampledTeacher("B")]


# a table under which the trajectories differ in score (the samples' tags decide)
TABLE = {"A0v0": 0.1, "A0v1": 0.5, "A0v2": 0.2, "B0v0": 0.3, "B1v2": 0.9, "A1v1": 0.4, "B2v0": 0.05}


# ----------------------------------------------------------------------------------------------
# Greedy at equal cost
# ----------------------------------------------------------------------------------------------
def test_equal_cost_greedy_is_b_trajectories_and_keeps_the_best():
    cfg = config(method="greedy")
    assert greedy_trajectories(cfg, 2) == 4
    got = decode_one("Q?", "7", teachers(), TableScorer(TABLE), cfg, seed=11)
    # trajectory i is the single greedy trajectory under seed + i * stride, answer written once
    single = [decode_one("Q?", "7", teachers(), TableScorer(TABLE), config(method="greedy", baseline_cost="single"),
                         seed=11 + TRAJECTORY_SEED_STRIDE * i) for i in range(4)]
    assert len({r.beam.text for r in single}) > 1  # sampled: the trajectories differ
    answer_tokens = 5
    assert got.trajectories == 4 and len(got.selections) == 4
    assert got.tokens_generated == sum(r.tokens_generated - answer_tokens for r in single) + answer_tokens
    # every trajectory: 3 steps, K = 2 proposals of 3 tokens each -> 18 teacher tokens a trajectory
    assert got.tokens_generated == 4 * 3 * 2 * 3 + answer_tokens
    assert got.meta_prover_tokens == sum(r.meta_prover_tokens for r in single)
    best = max(range(4), key=lambda i: (single[i].beam.score, -i))
    assert got.beam.text == single[best].beam.text and got.beam.score == single[best].beam.score
    assert [rounds for rounds in got.selections] == [r.selections[0] for r in single]
    assert all(len(survivors) == 1 for rounds in got.selections for survivors in rounds)  # one beam each


def test_greedy_single_cost_and_temperature_zero_decode_one_trajectory():
    single = decode_one("Q?", "7", teachers(), TableScorer(TABLE), config(method="greedy", baseline_cost="single"),
                        seed=3)
    assert single.trajectories == 1 and single.tokens_generated == 3 * 2 * 3 + 5
    # temperature 0: the B trajectories would all be this one, so it is decoded once (and says so)
    cfg0 = config(method="greedy", temperature=0.0)
    assert greedy_trajectories(cfg0, 2) == 1
    zero = decode_one("Q?", "7", teachers(), TableScorer(TABLE), cfg0, seed=3)
    assert zero.trajectories == 1 and zero.tokens_generated == 3 * 2 * 3 + 5 and len(zero.selections) == 1
    # one sampled teacher is enough for the trajectories to differ
    assert greedy_trajectories(config(method="greedy", temperature=[0.0, 0.6]), 2) == 4
    # cord itself is one search of B beams
    assert greedy_trajectories(config(method="cord"), 2) == 1


def test_baseline_options_are_checked():
    with pytest.raises(InputError, match="baseline_cost='half'"):
        config(method="greedy", baseline_cost="half")
    with pytest.raises(InputError, match="random_selection='beam'"):
        config(method="random", random_selection="beam")
    assert config(method="greedy", beam_size=8).beam_size == 8  # greedy keeps B: its trajectory count


# ----------------------------------------------------------------------------------------------
# Random: post-hoc, trajectory level
# ----------------------------------------------------------------------------------------------
def test_random_picks_one_complete_trajectory_uniformly_from_the_pool():
    cfg = config(method="random", n_curation=2)
    picks = collections.Counter()
    curation_best = decode_curation("Q?", "7", teachers(), TableScorer(TABLE), config(method="curation",
                                                                                      n_curation=2), seed=0)
    for seed in range(120):
        ts, scorer = teachers(), TableScorer(TABLE)
        res = decode_random("Q?", "7", ts, scorer, cfg, seed=seed)
        # the pool: 2 complete traces per teacher, one call each, paid in full
        assert [c["n"] for t in ts for c in t.calls[:1]] == [2, 2]
        assert res.trajectories == 4 and res.tokens_generated == 2 * 2 * 6 + 5
        # one trace, not a per-step mix: every step is one teacher's, and the trace is one that teacher wrote
        assert len({s["teacher"] for s in res.beam.steps}) == 1 and res.beam.text.endswith("1</think>")
        assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 1  # only the chosen trace is scored
        assert res.selections == []  # no step-wise selection
        picks[(res.beam.steps[0]["teacher"], res.beam.text)] += 1
    teachers_picked = collections.Counter(t for t, _ in picks.elements())
    assert set(teachers_picked) == {"A", "B"}
    assert 30 <= teachers_picked["A"] <= 90  # uniform over the pool, 120 draws
    # the pick ignores the scores: curation's best is not always the one taken
    assert sum(n for (_, text), n in picks.items() if text != curation_best.beam.text) > 0


def test_random_step_selection_is_the_per_step_coin():
    cfg = config(method="random", random_selection="step", temperature=0.0)
    texts = set()
    for seed in range(12):
        res = decode_random("Q?", "7", teachers(), TableScorer({}), cfg, seed=seed)
        assert res.trajectories == 1 and res.tokens_generated == 3 * 2 * 3 + 5
        assert [len(r) for r in res.selections[0]] == [1, 1, 1]
        texts.add(tuple(s["teacher"] for s in res.beam.steps))
    assert any(len(set(t)) > 1 for t in texts)  # teachers mix within one trace


# ----------------------------------------------------------------------------------------------
# Curation: 4 sampled traces per teacher, the best by the meta-prover's score
# ----------------------------------------------------------------------------------------------
def test_curation_samples_four_traces_per_teacher_and_keeps_the_best():
    cfg = config(method="curation")
    assert cfg.n_curation == 4  # the paper's
    ts, scorer = teachers(), TableScorer({"A0v2": 0.2, "A0v5": 0.8, "B0v1": 0.4})
    res = decode_curation("Q?", "7", ts, scorer, cfg, seed=0)
    assert [t.calls[0]["n"] for t in ts] == [4, 4] and res.trajectories == 8
    assert res.tokens_generated == 8 * 6 + 5
    pool = {text for text, _ in scorer.calls[0]}
    assert len(pool) == 8  # eight distinct sampled traces, each scored once
    best = max(pool, key=lambda text: scorer.score([(text, "7")]).item())
    assert res.beam.text.startswith(best) and res.answer_text.endswith(f"{res.beam.steps[0]['teacher']}.")
    with pytest.raises(InputError, match="n_curation=4 with temperature=0"):
        config(method="curation", temperature=0.0)


# ----------------------------------------------------------------------------------------------
# Summaries: teacher and meta-prover tokens per question, every method
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cord", "greedy", "curation", "random"])
def test_every_summary_reports_tokens_per_question(tmp_path, method):
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {i}?", "answer": str(i)}) + "\n")
    cfg = config(method=method, input_path=str(tmp_path / "in.jsonl"), output_path=str(tmp_path / "o.jsonl"))
    summary = run(cfg, teachers=teachers(), meta_prover=TableScorer(TABLE))
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert summary["teacher_tokens_per_question"] == sum(r["tokens_generated"] for r in records) / 3
    assert summary["meta_prover_tokens_per_question"] == sum(r["meta_prover_tokens"] for r in records) / 3
    assert summary["meta_prover_tokens_per_question"] > 0
    want = {"cord": 4, "greedy": 4, "curation": 8, "random": 8}[method]  # CoRD: its B beams; greedy: B runs
    assert summary["trajectories_per_question"] == want and all(r["trajectories"] == want for r in records)
    saved = json.loads((tmp_path / "o.jsonl.summary.json").read_text())
    assert saved["teacher_tokens_per_question"] == summary["teacher_tokens_per_question"]


# ----------------------------------------------------------------------------------------------
# The shipped world's models
# ----------------------------------------------------------------------------------------------
def test_equal_cost_greedy_on_the_world_models(tmp_path):
    from distillkit.methods.cord.meta_prover import MetaProver
    from distillkit.teachers.hf import HFTeacher
    from distillkit.world import models as M
    from distillkit.world import problems as W

    info = M.manifest()["eval"]
    probs = W.generate_problems(2, seed=info["seed"], num_ops=info["num_ops"])
    with open(tmp_path / "q.jsonl", "w") as f:
        for i, p in enumerate(probs):
            f.write(json.dumps({"id": f"q{i}", "question": p.question, "answer": p.answer}) + "\n")
    ts = [HFTeacher.from_pretrained(M.asset_path(n), name=n) for n in M.TEACHERS]
    prover = MetaProver.from_pretrained(M.asset_path(M.META_PROVER), backend="reference")
    base = dict(teachers=[M.asset_path(n) for n in M.TEACHERS], teacher_names=list(M.TEACHERS),
                meta_prover=M.asset_path(M.META_PROVER), input_path=str(tmp_path / "q.jsonl"), beam_size=3,
                max_steps=W.NUM_OPS + 1, token_budget=M.max_new_tokens(), max_step_tokens=16, max_answer_tokens=8,
                temperature=0.8, scoring_backend="reference", progress=False, method="greedy")
    out = {}
    for cost in ("equal", "single"):
        cfg = CordConfig(**base, baseline_cost=cost, output_path=str(tmp_path / f"{cost}.jsonl"))
        out[cost] = (run(cfg, teachers=ts, meta_prover=prover),
                     {r["id"]: r for r in map(json.loads, (tmp_path / f"{cost}.jsonl").read_text().splitlines())})
    (eq_sum, eq), (one_sum, one) = out["equal"], out["single"]
    assert eq_sum["trajectories_per_question"] == 3 and one_sum["trajectories_per_question"] == 1
    for q in eq:
        assert len(eq[q]["selections"]) == 3 and len(one[q]["selections"]) == 1
        # trajectory 0 is the single run's trajectory (same seeds): the best of three scores at least as well
        assert eq[q]["selections"][0] == one[q]["selections"][0]
        assert eq[q]["predictive_perplexity"] >= one[q]["predictive_perplexity"] - 1e-6
        assert eq[q]["tokens_generated"] > 2 * one[q]["tokens_generated"] - 2 * 8
    assert eq_sum["meta_prover_tokens_per_question"] > 2 * one_sum["meta_prover_tokens_per_question"]
