"""Teacher hit rates during expansion (the paper's Figures 2, 4 and 5): every beam's surviving candidates at
every step are counted, beside the final trace's steps; summary.json and the plot carry both."""
from __future__ import annotations

import json

import pytest

from distillkit.methods.cord import CordConfig, run
from distillkit.methods.cord.decode import decode_one
from distillkit.methods.cord.summary import expansion_hit_rates, hit_rates, summarize
from distillkit.teachers.base import Proposal, Teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class StepTeacher(Teacher):
    """Step d of teacher X is "X<d>|" ("X<d></think>" from step ``finish_at`` on), 3 tokens; answers 5."""

    def __init__(self, name: str, finish_at: int = 2):
        self.name, self.finish_at = name, finish_at

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        out = []
        for p in prefixes:
            if p.endswith("</think>"):
                out.append([Proposal(f" The final answer is {self.name}.", 5, True, "eos")] * n)
                continue
            d = p.count("|")
            done = d >= self.finish_at
            out.append([Proposal(f"{self.name}{d}" + ("</think>" if done else "|"), 3, done, "boundary")] * n)
        return out


class SumScorer:
    """Score = sum of ``table[step]`` over the context's steps; one token per character."""

    def __init__(self, table):
        self.table, self.tokens_processed = table, 0

    def score(self, pairs, *, prefixes=None):
        import torch

        out = []
        for ctx, _ in pairs:
            self.tokens_processed += len(ctx)
            body = ctx.split("<think>\n", 1)[-1]
            out.append(sum(self.table.get(s, 0.0) for s in body.replace("</think>", "|").split("|") if s))
        return torch.tensor(out, dtype=torch.float64)


def config(**kw) -> CordConfig:
    base = dict(teachers=["A", "B", "C"], meta_prover="M", input_path="in.jsonl", output_path="out.jsonl",
                segmentation="line-break", beam_size=2, token_budget=100, temperature=0.0, progress=False)
    base.update(kw)
    return CordConfig(**base)


# A wins every step of the final trace, but B's candidates survive beside it in the other beam.
TABLE = {"A0": 1.0, "B0": 0.9, "C0": 0.0, "A1": 1.0, "B1": 0.5, "C1": 0.0, "A2": 1.0, "B2": 0.2, "C2": 0.1}


def test_expansion_counts_the_survivors_of_every_beam():
    res = decode_one("Q?", "7", [StepTeacher("A"), StepTeacher("B"), StepTeacher("C")], SumScorer(TABLE), config())
    assert [s["teacher"] for s in res.beam.steps] == ["A", "A", "A"]  # the final trace: only A
    # step 0: A0 (1.0), B0 (0.9) survive; step 1: A0A1 (2.0) and B0A1 (1.9) beat A0B1 (1.5): A and A;
    # step 2: A0A1A2 (3.0) and B0A1A2 (2.9): A and A
    assert res.selections == [[["A", "B"], ["A", "A"], ["A", "A"]]]
    rec = {"steps": res.beam.steps, "selections": res.selections}
    final = hit_rates([rec], ["A", "B", "C"], bins=3)
    during = expansion_hit_rates([rec], ["A", "B", "C"], bins=3)
    assert final == {"A": [1.0, 1.0, 1.0], "B": [0.0, 0.0, 0.0], "C": [0.0, 0.0, 0.0]}
    assert during == {"A": [0.5, 1.0, 1.0], "B": [0.5, 0.0, 0.0], "C": [0.0, 0.0, 0.0]}


def test_expansion_hit_rates_bin_each_trajectory_by_its_own_length():
    recs = [{"selections": [[["A", "B"], ["B", "B"]], [["C"], ["C"], ["A"], ["B"]]]}, {"selections": []},
            {"steps": [{"teacher": "A"}]}]
    got = expansion_hit_rates(recs, ["A", "B", "C"], bins=2)
    # bin 0: A, B (traj 0 step 0) + C, C (traj 1 steps 0-1) -> A 1/4, B 1/4, C 2/4
    # bin 1: B, B + A, B -> A 1/4, B 3/4
    assert got == {"A": [0.25, 0.25], "B": [0.25, 0.75], "C": [0.5, 0.0]}
    assert expansion_hit_rates([{"selections": []}], ["A"], bins=2) == {"A": [None, None]}
    s = summarize([{**r, "tokens_generated": 1, "meta_prover_tokens": 1} for r in recs], ["A", "B", "C"])
    assert s["expansion_teacher_share"] == {"A": 2 / 8, "B": 4 / 8, "C": 2 / 8}
    assert s["trajectories_per_question"] is None  # no record counted its trajectories


def test_run_writes_both_hit_rates_to_the_summary_and_the_plot(tmp_path):
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(2):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {i}?", "answer": str(i)}) + "\n")
    cfg = config(input_path=str(tmp_path / "in.jsonl"), output_path=str(tmp_path / "o.jsonl"))
    summary = run(cfg, teachers=[StepTeacher("A"), StepTeacher("B"), StepTeacher("C")], meta_prover=SumScorer(TABLE))
    saved = json.loads((tmp_path / "o.jsonl.summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert all(r["selections"] == [[["A", "B"], ["A", "A"], ["A", "A"]]] for r in records)
    assert saved["hit_rates_expansion"] == summary["hit_rates_expansion"]
    assert all(r in (0.0, None) for r in saved["hit_rates"]["B"])  # B wrote no step of a final trace
    assert max(r for r in saved["hit_rates_expansion"]["B"] if r is not None) == 0.5  # B survives at step 0
    assert saved["expansion_teacher_share"] == {"A": 5 / 6, "B": 1 / 6, "C": 0.0}
    assert saved["teacher_share"]["B"] == 0.0
    png = (tmp_path / "o.jsonl.hit_rates.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_both_panels(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from distillkit.methods.cord import summary as S

    seen = []
    real = Figure.savefig

    def spy(self, *a, **kw):
        seen.append([ax.get_title() for ax in self.axes])
        seen.append([len(ax.lines) for ax in self.axes])
        return real(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    recs = [{"steps": [{"teacher": "A"}, {"teacher": "B"}], "selections": [[["A", "B"], ["B"]]],
             "tokens_generated": 3, "meta_prover_tokens": 4, "correct": True, "predictive_perplexity": 0.5}]
    S.plot_hit_rates({**summarize(recs, ["A", "B"]), "method": "cord"}, str(tmp_path / "p.png"))
    titles, lines = seen
    assert len(titles) == 2 and "expansion" in titles[1] and "final" in titles[0]
    assert lines == [2, 2]  # one line per teacher in each panel
