"""CoRD with many questions in flight: the same traces as one question at a time (the shipped world's models,
every method), batched generate equal to unbatched, meta-prover tokens charged per question, served teachers
asked at once, sampled proposals never batched across questions, and a crash keeping the finished records."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from _tolerance import assert_eager_budget
from distillkit.methods.cord import CordConfig, load_done, run
from distillkit.methods.cord.decode import decode_many
from distillkit.teachers.base import Proposal, Teacher, as_boundary

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------
# The shipped world's models
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from distillkit.methods.cord.meta_prover import MetaProver
    from distillkit.teachers.hf import HFTeacher
    from distillkit.world import models as M
    from distillkit.world import problems as W

    root = tmp_path_factory.mktemp("in_flight")
    info = M.manifest()["eval"]
    probs = W.generate_problems(6, seed=info["seed"], num_ops=info["num_ops"])
    with open(root / "q.jsonl", "w") as f:
        for i, p in enumerate(probs):
            f.write(json.dumps({"id": f"q{i}", "question": p.question, "answer": p.answer}) + "\n")
    # small batches on purpose: a merged call is split over several generate / scoring forwards
    teachers = [HFTeacher.from_pretrained(M.asset_path(n), name=n, batch_size=7) for n in M.TEACHERS]
    prover = MetaProver.from_pretrained(M.asset_path(M.META_PROVER), backend="reference", batch_size=5)
    base = dict(teachers=[M.asset_path(n) for n in M.TEACHERS], teacher_names=list(M.TEACHERS),
                meta_prover=M.asset_path(M.META_PROVER), input_path=str(root / "q.jsonl"), beam_size=3,
                max_steps=W.NUM_OPS + 1, token_budget=M.max_new_tokens(), max_step_tokens=16, max_answer_tokens=8,
                temperature=0.0, n_curation=1, scoring_backend="reference", progress=False)
    return root, teachers, prover, base


@pytest.mark.parametrize("method", ["cord", "greedy", "curation", "random"])
def test_many_in_flight_gives_the_traces_of_one_at_a_time(world, method):
    from distillkit.methods.cord.meta_prover import MetaProver
    from distillkit.world import models as M

    root, teachers, prover, base = world
    runs = {}
    for flight in (1, 4):
        cfg = CordConfig(**base, method=method, questions_in_flight=flight,
                         output_path=str(root / f"{method}-{flight}.jsonl"))
        calls_before = prover.stats.calls
        run(cfg, teachers=teachers, meta_prover=prover)
        runs[flight] = ({r["id"]: r for r in load_done(cfg.output_path)}, prover.stats.calls - calls_before)
    one, many = runs[1][0], runs[4][0]
    assert sorted(one) == sorted(many) == sorted(f"q{i}" for i in range(6))
    assert runs[4][1] < runs[1][1]  # the candidates of several questions went to the meta-prover together
    for q in one:
        for field in ("trajectory", "final_answer", "correct", "tokens_generated", "meta_prover_tokens"):
            assert many[q][field] == one[q][field], (q, field)
        assert [(s["text"], s["teacher"]) for s in many[q]["steps"]] == \
            [(s["text"], s["teacher"]) for s in one[q]["steps"]], q
    # scores: batched with other questions' candidates vs alone, judged against float64 scoring of the traces
    ids = sorted(one)
    truth_prover = MetaProver.from_pretrained(M.asset_path(M.META_PROVER), dtype=torch.float64, backend="reference")
    pairs = [(one[q]["prompt"] + one[q]["trajectory"].split("</think>")[0], one[q]["answer"]) for q in ids]
    truth = truth_prover.score(pairs).double()
    got = torch.tensor([many[q]["predictive_perplexity"] for q in ids], dtype=torch.float32)
    eager = torch.tensor([one[q]["predictive_perplexity"] for q in ids], dtype=torch.float32)
    assert_eager_budget(got, eager, truth, scale="element", what=f"{method} scores")


def test_batched_generate_gives_the_text_of_one_prefix_at_a_time(world):
    """Left padding and the attention mask: prefixes of different lengths in one generate call continue as
    they do alone (greedy, the same step cut and token count)."""
    _, teachers, _, base = world
    cfg = CordConfig(**base, output_path="unused.jsonl")
    seg = cfg.make_segmentation()
    with open(base["input_path"]) as f:
        questions = [json.loads(line)["question"] for line in f]
    # prompts, and prompts with one and two steps already written: lengths differ by ten tokens and more
    prefixes = [seg.prompt(q) for q in questions[:3]]
    for _ in range(2):
        steps = teachers[0].propose(prefixes[-3:], max_new_tokens=16, stop=seg)
        prefixes += [p + row[0].text for p, row in zip(prefixes[-3:], steps)]
    assert len({len(p) for p in prefixes}) >= 3
    for teacher in teachers:
        together = teacher.propose(prefixes, max_new_tokens=16, stop=seg)
        alone = [teacher.propose([p], max_new_tokens=16, stop=seg)[0] for p in prefixes]
        assert together == alone, teacher.name


def test_meta_prover_charges_each_pair_its_tokens(world):
    _, _, prover, base = world
    ctx = ["2 + 3 = 5, then 5 * 2 =", "7 - 4 = 3, then 3 + 9 = 2,"]
    pairs = [(ctx[0] + " 0", "0"), (ctx[0] + " 1", "0"), (ctx[1] + " 1", "1"), (ctx[1] + " 2", "1")]
    before = prover.tokens_processed
    joint = prover.score(pairs, prefixes=[ctx[0], ctx[0], ctx[1], ctx[1]])
    charged = list(prover.last_pair_tokens)
    assert sum(charged) == prover.tokens_processed - before
    # each question alone costs what it was charged in the joint call
    for idx in ([0, 1], [2, 3]):
        before = prover.tokens_processed
        alone = prover.score([pairs[i] for i in idx], prefixes=[ctx[idx[0] // 2]] * 2)
        assert prover.tokens_processed - before == sum(charged[i] for i in idx)
        assert torch.allclose(alone, joint[idx], rtol=1e-5, atol=0)  # float32, another batch: rounding only


# ----------------------------------------------------------------------------------------------
# Fakes: concurrency, sampled requests, crashes
# ----------------------------------------------------------------------------------------------
class StepTeacher(Teacher):
    """Writes "<name><d>|" for step d, "</think>" from step 3 on; the answer " The final answer is 1."."""

    def __init__(self, name: str, crash_on: str | None = None):
        self.name, self.crash_on, self.calls = name, crash_on, []

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        self.calls.append(dict(prefixes=list(prefixes), seed=seed, temperature=temperature))
        if self.crash_on is not None and any(self.crash_on in p for p in prefixes):
            raise RuntimeError("injected crash")
        out = []
        for p in prefixes:
            if p.endswith("</think>") or as_boundary(stop).stop_strings() == []:
                out.append([Proposal(" The final answer is 1.", 5, True, "eos")] * n)
                continue
            d = p.count("|")
            text = f"{self.name}{d}" + ("</think>" if d >= 2 else "|")
            out.append([Proposal(text, 2, d >= 2, "end" if d >= 2 else "boundary")] * n)
        return out


class ServedTeacher(StepTeacher):
    """A teacher with its own apropose (as a served one has); records how many of its kind run at once."""

    running = 0
    most_at_once = 0
    loops: set = set()

    async def apropose(self, prefixes, **kwargs):
        cls = type(self)
        cls.loops.add(id(asyncio.get_running_loop()))
        cls.running += 1
        cls.most_at_once = max(cls.most_at_once, cls.running)
        await asyncio.sleep(0.01)  # a request in flight: the other teachers' requests start meanwhile
        cls.running -= 1
        return self.propose(prefixes, **kwargs)


class LengthScorer:
    tokens_processed = 0

    def score(self, pairs, *, prefixes=None):
        self.tokens_processed += sum(len(c) for c, _ in pairs)
        return torch.tensor([float(c.count("B")) for c, _ in pairs])


def _config(tmp_path, **kw) -> CordConfig:
    base = dict(teachers=["A", "B", "C"], meta_prover="M", input_path=str(tmp_path / "in.jsonl"),
                output_path=str(tmp_path / "out.jsonl"), segmentation="line-break", beam_size=2, max_steps=5,
                token_budget=100, max_step_tokens=10, temperature=0.0, n_curation=1, progress=False)
    base.update(kw)
    return CordConfig(**base)


def _items(n: int):
    return [(f"What is {i}?", "1", 100 + i) for i in range(n)]


def test_served_teachers_are_asked_at_the_same_time(tmp_path):
    ServedTeacher.running, ServedTeacher.most_at_once, ServedTeacher.loops = 0, 0, set()
    teachers = [ServedTeacher(n) for n in "ABC"]
    got = dict(decode_many(_items(3), teachers, LengthScorer(), _config(tmp_path), in_flight=3))
    assert sorted(got) == [0, 1, 2] and all(r.beam.steps for r in got.values())
    assert ServedTeacher.most_at_once == 3 and ServedTeacher.running == 0
    assert len(ServedTeacher.loops) == 1  # one event loop for the whole decode: HTTP clients live across rounds
    # in-process teachers (the default apropose) are called one after another, as before
    plain = dict(decode_many(_items(3), [StepTeacher(n) for n in "ABC"], LengthScorer(), _config(tmp_path),
                             in_flight=3))
    assert {i: r.beam.text for i, r in plain.items()} == {i: r.beam.text for i, r in got.items()}


def test_served_teachers_inside_a_running_event_loop(tmp_path):
    async def caller():  # a notebook, or an async application, calling CoRD
        return dict(decode_many(_items(2), [ServedTeacher(n) for n in "AB"], LengthScorer(),
                                _config(tmp_path, teachers=["A", "B"]), in_flight=2))

    got = asyncio.run(caller())
    assert sorted(got) == [0, 1] and all(r.answer_text for r in got.values())


def test_sampled_proposals_keep_each_question_seed(tmp_path):
    teachers = [StepTeacher(n) for n in "AB"]
    cfg = _config(tmp_path, teachers=["A", "B"], temperature=0.7)
    many = dict(decode_many(_items(4), teachers, LengthScorer(), cfg, in_flight=4))
    seeds_per_call = [c["seed"] for c in teachers[0].calls]
    # never two questions' sampled prefixes in one call: every call holds one question's beams
    assert all(len({p.split("\n")[0] for p in c["prefixes"]}) == 1 for t in teachers for c in t.calls)
    assert len(set(seeds_per_call)) > 4
    alone_teachers = [StepTeacher(n) for n in "AB"]
    alone = dict(decode_many(_items(4), alone_teachers, LengthScorer(), cfg, in_flight=1))
    assert {i: r.beam.text for i, r in many.items()} == {i: r.beam.text for i, r in alone.items()}
    assert sorted((c["seed"], tuple(c["prefixes"])) for c in teachers[0].calls) == \
        sorted((c["seed"], tuple(c["prefixes"])) for c in alone_teachers[0].calls)


def test_greedy_proposals_of_all_questions_share_one_call_per_teacher(tmp_path):
    teachers = [StepTeacher(n) for n in "AB"]
    cfg = _config(tmp_path, teachers=["A", "B"])
    dict(decode_many(_items(6), teachers, LengthScorer(), cfg, in_flight=6))
    first = teachers[0].calls[0]["prefixes"]
    assert len(first) == 6 and len({p.split("\n")[0] for p in first}) == 6


def test_crash_keeps_finished_questions_and_resume_completes(tmp_path):
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {i}?", "answer": "1"}) + "\n")
    cfg = _config(tmp_path, teachers=["A", "B"], questions_in_flight=2)
    ref = _config(tmp_path, teachers=["A", "B"], questions_in_flight=1, output_path=str(tmp_path / "ref.jsonl"))
    run(ref, teachers=[StepTeacher("A"), StepTeacher("B")], meta_prover=LengthScorer())
    with pytest.raises(RuntimeError, match="injected"):
        run(cfg, teachers=[StepTeacher("A", crash_on="What is 3?"), StepTeacher("B")], meta_prover=LengthScorer())
    # q0, q1 finished in the first window; q2 was in flight with q3 when q3's call crashed
    assert [r["id"] for r in load_done(cfg.output_path)] == ["q0", "q1"]
    run(cfg, teachers=[StepTeacher("A"), StepTeacher("B")], meta_prover=LengthScorer())
    got = {r["id"]: r for r in load_done(cfg.output_path)}
    want = {r["id"]: r for r in load_done(ref.output_path)}
    assert got == want


def test_in_flight_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="questions_in_flight"):
        _config(tmp_path, questions_in_flight=0)
    with pytest.raises(ValueError, match="in_flight"):
        list(decode_many(_items(1), [StepTeacher("A")], LengthScorer(), _config(tmp_path, teachers=["A"]),
                         in_flight=0))
