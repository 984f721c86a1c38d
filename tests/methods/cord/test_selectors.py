"""CoRD's step selectors (the paper's Tables 5, 6, 14) on the world's shipped models: perplexity (the
meta-prover), PRM score, binary judgment, max-length; each checked against a direct computation."""
from __future__ import annotations

import pytest
import torch

from distillkit.methods.cord import CordConfig
from distillkit.methods.cord.selectors import (
    BinaryJudgeSelector,
    MaxLengthSelector,
    PRMSelector,
    make_selector,
    newest_steps,
)
from distillkit.world import models as M
from distillkit.world import problems as W
from tests._tolerance import assert_eager_budget

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROBLEM = W.Problem(3, (("+", 9), ("-", 7), ("*", 4)))  # 3+9=2, 2-7=5, 5*4=0
PROMPT = PROBLEM.prompt
PARENT = PROMPT + W.trace(PROBLEM, num_steps=2, close=False) + "### Step"
RIGHT, WRONG = " 3: 5*4=0\n", " 3: 5*4=2\n"  # the overflow teacher's flaw writes the tens digit


def _cfg(**kw) -> CordConfig:
    return CordConfig(**{"teachers": ["t"], "meta_prover": "m", "input_path": "i", "output_path": "o", **kw})


@pytest.fixture(scope="module")
def prover():
    from distillkit.methods.cord.meta_prover import MetaProver

    return MetaProver.from_pretrained(M.asset_path("meta-prover"), backend="reference")


def test_newest_steps_and_max_length():
    pairs = [(PARENT + RIGHT, "0"), (PARENT + " 3: 5*4=20 no\n", "0"), (PROMPT + " 1", "0")]
    assert newest_steps(pairs, [PARENT, PARENT, None], prompt=PROMPT) == [RIGHT, " 3: 5*4=20 no\n", " 1"]
    chars = MaxLengthSelector().score(pairs, prefixes=[PARENT, PARENT, PROMPT])
    assert chars.tolist() == [len(RIGHT), 14.0, 2.0] and int(chars.argmax()) == 1
    from distillkit.teachers.hf import load_tokenizer

    tok = load_tokenizer(M.asset_path("teacher-carry"))
    tokens = MaxLengthSelector(tok).score([(PROMPT + "### Step 2", "0"), (PROMPT + "abc", "0")], prefixes=[PROMPT] * 2)
    assert tokens.tolist() == [3.0, 3.0]  # "### Step" is one token of the world's tokenizer
    with pytest.raises(ValueError, match="prefixes"):
        MaxLengthSelector().score(pairs, prefixes=["other", None, None])


def test_perplexity_is_the_meta_prover_and_prefers_the_right_step(prover):
    assert make_selector(_cfg(), prover) is prover
    scores = prover.score([(PARENT + RIGHT, "0"), (PARENT + WRONG, "0")], prefixes=[PARENT, PARENT])
    assert scores[0] > scores[1]


def _prm_direct(model, ids: list[int], good: int, bad: int) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits[[good, bad]], -1)[0]


def test_prm_selector_reads_the_prm_after_the_newest_step(prover):
    from distillkit.judges import HFProcessRewardJudge
    from distillkit.teachers.hf import load_causal_lm

    # The world has no PRM: its meta-prover read Math-Shepherd style ("+" good, "-" bad, a step tag) stands in.
    sel = make_selector(_cfg(selector="prm", selector_model=M.asset_path("meta-prover")), prover)
    assert isinstance(sel, PRMSelector)
    model, tok = load_causal_lm(M.asset_path("meta-prover"))
    judge = HFProcessRewardJudge(model, tok, good_token="+", bad_token="-", step_tag="\n")
    sel = PRMSelector(judge, tok)
    contexts = [PARENT + RIGHT, PARENT + WRONG, PROMPT + " 1: 3+9=2\n"]  # rows of different lengths
    got = sel.score([(c, "0") for c in contexts], prefixes=[PARENT, PARENT, PROMPT])
    assert sel.last_pair_tokens == [len(tok(c)["input_ids"]) for c in contexts]
    assert sel.tokens_processed == sum(sel.last_pair_tokens)
    good, bad = judge.good_id, judge.bad_id
    rows = [list(tok(c)["input_ids"]) + judge.tag_ids for c in contexts]
    with torch.no_grad():
        eager = torch.stack([_prm_direct(model, r, good, bad) for r in rows])
        model64 = load_causal_lm(M.asset_path("meta-prover"))[0].double()
        truth = torch.stack([_prm_direct(model64, r, good, bad) for r in rows])
    assert_eager_budget(got, eager, truth)
    assert ((got > 0) & (got < 1)).all()


def _answer_logprob(model, ids: list[int], answer: list[int]) -> torch.Tensor:
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids + answer])).logits[0], -1)
    return sum(logp[len(ids) - 1 + j, a] for j, a in enumerate(answer))


def test_binary_selector_is_the_judges_yes_probability():
    from distillkit.teachers.hf import load_causal_lm

    path = M.asset_path("teacher-carry")  # a world teacher as the judge LLM
    model, tok = load_causal_lm(path)
    sel = BinaryJudgeSelector(model, tok, yes="yes", no="no", batch_size=2)
    contexts = [PARENT + RIGHT, PARENT + WRONG, PROMPT + " 1: 3+9=2\n"]
    prefixes = [PARENT, PARENT, PROMPT]
    got = sel.score([(c, "0") for c in contexts], prefixes=prefixes)
    questions = [sel.question(p, c[len(p):]) for c, p in zip(contexts, prefixes)]
    assert "The last step above was:\n 3: 5*4=2\n" in questions[1] and questions[1].startswith(PARENT)
    assert sel.last_pair_tokens == [2 * len(tok(q)["input_ids"]) + 5 for q in questions]  # "yes" 3, "no" 2 chars
    assert sel.tokens_processed == sum(sel.last_pair_tokens)

    def direct(m):
        y, n = tok("yes", add_special_tokens=False)["input_ids"], tok("no", add_special_tokens=False)["input_ids"]
        out = []
        for q in questions:
            ids = list(tok(q)["input_ids"])
            out.append(torch.sigmoid(_answer_logprob(m, ids, y) - _answer_logprob(m, ids, n)))
        return torch.stack(out)

    with torch.no_grad():
        eager = direct(model)
        truth = direct(load_causal_lm(path)[0].double())
    assert_eager_budget(got, eager, truth)
    assert isinstance(make_selector(_cfg(selector="binary", selector_model=path), None), BinaryJudgeSelector)
    with pytest.raises(ValueError, match="yes"):
        BinaryJudgeSelector(model, tok, yes="no", no="no")
    with pytest.raises(ValueError, match="template"):
        BinaryJudgeSelector(model, tok, template="{context} only")


def test_make_selector_max_length_and_names():
    assert isinstance(make_selector(_cfg(selector="max_length"), None), MaxLengthSelector)
    cfg = _cfg()
    cfg.selector = "coin"  # past the config's own check
    with pytest.raises(ValueError, match="selector"):
        make_selector(cfg, None)


def test_a_selector_ranks_the_beams_of_many_questions_in_flight():
    """The decode loop takes a selector where it takes the meta-prover: with max_length, the longest of the
    teachers' steps wins every step, one question at a time and several in flight alike."""
    from distillkit.methods.cord.decode import decode_many
    from distillkit.teachers.base import Proposal, Teacher

    class Writes(Teacher):
        def __init__(self, name, text):
            self.name, self.text = name, text

        def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
            done = [p.count("|") >= 2 for p in prefixes]
            return [[Proposal(self.text + ("</think>" if d else "|"), 2, d, "end" if d else "boundary")] * n
                    for d in done]

    teachers = [Writes("short", "ab"), Writes("long", "abcdef")]
    cfg = _cfg(teachers=["short", "long"], segmentation="line-break", beam_size=1, temperature=0.0, token_budget=50,
               max_answer_tokens=3)
    items = [(f"Q{i}", "0", i) for i in range(3)]
    for flight in (1, 3):
        got = dict(decode_many(items, teachers, MaxLengthSelector(), cfg, in_flight=flight))
        for i, res in got.items():
            assert [s["teacher"] for s in res.beam.steps] == ["long", "long", "long"], (flight, i)
            assert res.meta_prover_tokens == 0


def test_records_keep_the_meta_provers_score_under_another_selector(prover):
    from distillkit.methods.cord.decode import Beam, DecodeResult
    from distillkit.methods.cord.selectors import score_for_record

    res = DecodeResult(Beam(text=PARENT + RIGHT + "</think>", score=11.0, finished=True), PROMPT, " 0", 5, 0)
    same = score_for_record(_cfg(), prover, res, "0", "</think>")
    assert same is res and res.beam.score == 11.0  # perplexity: already the meta-prover's score
    before = prover.tokens_processed
    score_for_record(_cfg(selector="max_length"), prover, res, "0", "</think>")
    spent = prover.tokens_processed - before
    want = float(prover.score([(PARENT + RIGHT, "0")])[0])
    # the same float32 score, rescored without the kept prefix: rounding only
    assert res.beam.score == pytest.approx(want, rel=1e-6) and res.meta_prover_tokens == spent > 0


def test_the_run_ranks_with_the_configured_selector_and_records_the_meta_provers_score(tmp_path):
    import json

    from distillkit.methods.cord import load_done, run
    from distillkit.teachers.base import Proposal, Teacher

    class Writes(Teacher):
        def __init__(self, name, text):
            self.name, self.text = name, text

        def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
            out = []
            for p in prefixes:
                if p.endswith("</think>"):
                    out.append([Proposal(" 7", 1, True, "eos")] * n)
                else:
                    out.append([Proposal(self.text + "</think>", 2, True, "end")] * n)
            return out

    class PrefersShort:
        tokens_processed = 0

        def score(self, pairs, *, prefixes=None):
            self.tokens_processed += len(pairs)
            return torch.tensor([1.0 / len(c) for c, _ in pairs])

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "q0", "question": "Q", "answer": "7"}) + "\n")
    base = dict(teachers=["short", "long"], input_path=str(path), segmentation="line-break", beam_size=1,
                temperature=0.0, token_budget=20, max_answer_tokens=2, progress=False)
    picked = {}
    for selector in ("perplexity", "max_length"):
        cfg = _cfg(**base, selector=selector, output_path=str(tmp_path / f"{selector}.jsonl"))
        run(cfg, teachers=[Writes("short", "ab"), Writes("long", "abcdef")], meta_prover=PrefersShort())
        (rec,) = load_done(cfg.output_path)
        picked[selector] = rec["steps"][-1]["teacher"]
        ctx = rec["prompt"] + rec["trajectory"].split("</think>")[0]
        assert rec["predictive_perplexity"] == pytest.approx(1.0 / len(ctx))  # always the meta-prover's score
    assert picked == {"perplexity": "short", "max_length": "long"}
