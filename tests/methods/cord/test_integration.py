"""Integration baseline: an LLM merges the K teachers' traces (fake teachers for the exact flow, then the
world's shipped models end to end)."""
from __future__ import annotations

import pytest

from distillkit.methods.cord import CordConfig
from distillkit.methods.cord.integration import INTEGRATION_TEMPLATE, decode_integration, integration_prompt
from distillkit.teachers.base import Proposal, Teacher, as_boundary

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Recorder(Teacher):
    """Wraps a teacher (or answers with fixed texts) and records every call and every proposal."""

    def __init__(self, name, inner=None, texts=None):
        self.name, self.inner, self.texts = name, inner, list(texts or [])
        self.calls, self.proposals = [], []

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        self.calls.append(dict(prefixes=list(prefixes), max_new_tokens=max_new_tokens, stop=stop,
                               temperature=temperature))
        if self.inner is not None:
            out = self.inner.propose(prefixes, n=n, max_new_tokens=max_new_tokens, stop=stop,
                                     temperature=temperature, seed=seed)
        else:
            text = self.texts.pop(0)
            out = [[Proposal(text, len(text), True, "stop")] * n for _ in prefixes]
        self.proposals += [p for row in out for p in row]
        return out


def _cfg(**kw) -> CordConfig:
    base = dict(teachers=["A", "B"], teacher_names=["a", "b"], meta_prover="M", input_path="i", output_path="o",
                token_budget=50, max_answer_tokens=7, temperature=0.0, progress=False)
    return CordConfig(**{**base, **kw})


def test_integration_prompt_lists_every_trace():
    p = integration_prompt("1+1?", [" 1: 1+1=2\n", "two"], ["a", "b"])
    assert "2 reasoning traces" in p and "Problem:\n1+1?" in p
    assert "Trace 1 (a):\n1: 1+1=2" in p and "Trace 2 (b):\ntwo" in p
    with pytest.raises(ValueError, match="traces"):
        integration_prompt("q", [])
    with pytest.raises(ValueError, match="template"):
        integration_prompt("q", ["t"], template="no fields")


class LenScorer:
    """Score = 1 / (1 + characters of the context); counts one token per character."""

    def __init__(self):
        self.tokens_processed, self.calls = 0, []

    def score(self, pairs, *, prefixes=None):
        import torch

        self.calls.append((list(pairs), list(prefixes or [])))
        self.tokens_processed += sum(len(c) for c, _ in pairs)
        return torch.tensor([1.0 / (1 + len(c)) for c, _ in pairs])


def test_integration_flow_with_fake_models():
    a = Recorder("a", texts=[" 1: x\n### Step 2: y</think>"])
    b = Recorder("b", texts=[" 1: z</think>"])
    judge = Recorder("judge", texts=[" 1: x\n### Step 2: z</think>", " The final answer is 7."])
    scorer = LenScorer()
    res = decode_integration("Q?", "7", [a, b], scorer, _cfg(), integrator=judge)
    prompt = "Q?\n<think> ### Step"
    assert a.calls[0]["prefixes"] == [prompt] and a.calls[0]["max_new_tokens"] == 50
    assert as_boundary(a.calls[0]["stop"]).stop_strings() == ["</think>"]
    task = judge.calls[0]["prefixes"][0]
    assert task == integration_prompt("Q?", [" 1: x\n### Step 2: y", " 1: z"], ["a", "b"]) + "\n<think> ### Step"
    assert res.beam.text == prompt + " 1: x\n### Step 2: z</think>" and res.prompt == prompt
    assert [s["text"] for s in res.beam.steps] == [" 1: x\n", "### Step 2: z</think>"]
    assert {s["teacher"] for s in res.beam.steps} == {"integrator"}
    assert judge.calls[1]["prefixes"] == [task + " 1: x\n### Step 2: z</think>"]
    assert judge.calls[1]["max_new_tokens"] == 7 and res.answer_text == " The final answer is 7."
    assert res.tokens_generated == sum(p.num_tokens for r in (a, b, judge) for p in r.proposals)
    reasoning = prompt + " 1: x\n### Step 2: z"
    assert scorer.calls == [([(reasoning, "7")], [prompt])]
    assert res.beam.score == pytest.approx(1 / (1 + len(reasoning))) and res.meta_prover_tokens == len(reasoning)
    assert "{traces}" in INTEGRATION_TEMPLATE


def test_a_teacher_named_in_the_config_integrates():
    a = Recorder("a", texts=[" 1: x</think>"])
    b = Recorder("b", texts=[" 1: z</think>", " 1: x and z</think>", " 7."])  # its trace, the merge, the answer
    res = decode_integration("Q?", "7", [a, b], LenScorer(), _cfg(integrator="b"))
    assert len(b.calls) == 3 and b.calls[1]["prefixes"][0].startswith(integration_prompt("Q?", [" 1: x", " 1: z"],
                                                                                         ["a", "b"]))
    assert res.beam.text.endswith(" 1: x and z</think>") and res.answer_text == " 7."
    assert {s["teacher"] for s in res.beam.steps} == {"b"} and res.beam.teacher == 1
    with pytest.raises(ValueError, match="integrator"):
        _cfg(integrator="c")


def test_integration_on_the_world_models():
    from distillkit.methods.cord.meta_prover import MetaProver
    from distillkit.methods.cord.runner import make_record
    from distillkit.teachers.hf import HFTeacher
    from distillkit.world import models as M
    from distillkit.world import problems as W

    teachers = [Recorder(n, HFTeacher.from_pretrained(M.asset_path(n), name=n)) for n in M.TEACHERS]
    integrator = Recorder("integrator", HFTeacher.from_pretrained(M.asset_path("teacher-borrow")))  # a fourth model
    prover = MetaProver.from_pretrained(M.asset_path(M.META_PROVER), backend="reference")
    problem = W.Problem(3, (("+", 9), ("-", 7), ("*", 4)))
    cfg = _cfg(teachers=list(M.TEACHERS), teacher_names=["carry", "borrow", "overflow"],
               token_budget=M.max_new_tokens(), max_answer_tokens=8)
    res = decode_integration(problem.question, problem.answer, teachers, prover, cfg, integrator=integrator)
    task = integrator.calls[0]["prefixes"][0]
    for k, t in enumerate(teachers):
        trace = t.proposals[0].text.split("</think>")[0].strip()
        assert trace and f"Trace {k + 1} ({cfg.names()[k]}):\n{trace}" in task  # every teacher's trace, in order
    assert res.beam.text.startswith(problem.prompt) and res.beam.text.endswith("</think>")
    reasoning = res.beam.text[:-len("</think>")]
    # the same float32 score, rescored alone (another batch and padding): rounding only
    assert res.beam.score == pytest.approx(float(prover.score([(reasoning, problem.answer)])[0]), rel=1e-5)
    assert res.meta_prover_tokens > 0
    assert res.tokens_generated == sum(p.num_tokens for r in [*teachers, integrator] for p in r.proposals)
    record = make_record({"id": "0", "question": problem.question, "answer": problem.answer}, res)
    assert record["trajectory"].startswith("".join(s["text"] for s in record["steps"]))
    assert record["tokens_generated"] == res.tokens_generated
