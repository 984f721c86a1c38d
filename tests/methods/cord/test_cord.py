"""CoRD decoder: beam mechanics with fake deterministic teachers and scorers, baselines, the answer
extractor, the config, an end-to-end run on tiny Hugging Face models, and kill/resume."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distillkit import InputError
from distillkit.methods import cord
from distillkit.methods.cord import (
    Beam,
    CordConfig,
    answers_match,
    decode_curation,
    decode_one,
    decode_random,
    extract_answer,
    load_done,
    normalize_answer,
    run,
    select_beams,
)
from distillkit.pipeline.config import build_parser
from distillkit.teachers.base import Proposal, Teacher, as_boundary

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------------------------
class FakeTeacher(Teacher):
    """Step d (0-based, counted by '|' in the prefix) of teacher X is "X<d>|"; from ``finish_at``
    on it writes "X<d></think>". Each step costs ``cost`` tokens. The answer (prefix ending in
    '</think>') is "The final answer is X." Records every call."""

    def __init__(self, name: str, *, cost: int = 3, finish_at: int | None = None):
        self.name, self.cost, self.finish_at = name, cost, finish_at
        self.calls: list[dict] = []

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        self.calls.append(dict(prefixes=list(prefixes), n=n, max_new_tokens=max_new_tokens, stop=stop))
        out = []
        for p in prefixes:
            if p.endswith("</think>"):
                out.append([Proposal(f" The final answer is {self.name}.", 5, True, "eos")] * n)
                continue
            if as_boundary(stop).stop_strings() == ["</think>"]:  # a complete trace (curation)
                text = f"{self.name}0|{self.name}1</think>"
                out.append([Proposal(text, min(2 * self.cost, max_new_tokens), True, "stop")] * n)
                continue
            d = p.count("|") + p.count("</think>")
            done = self.finish_at is not None and d >= self.finish_at
            text = f"{self.name}{d}" + ("</think>" if done else "|")
            cost = min(self.cost, max_new_tokens)
            out.append([Proposal(text, cost, done, "end" if done else "boundary")] * n)
        return out


class FakeScorer:
    """Score = sum of the per-step values in ``table`` for each step "X<d>" of the context (unknown
    steps score 0), so a test fixes which candidate wins. Counts one token per context character."""

    def __init__(self, table: dict[str, float]):
        self.table = table
        self.tokens_processed = 0
        self.calls: list[tuple[list, list]] = []

    def score(self, pairs, *, prefixes=None):
        self.calls.append((list(pairs), list(prefixes or [])))
        out = []
        for ctx, _answer in pairs:
            assert not ctx.endswith("</think>")  # the template adds it
            self.tokens_processed += len(ctx)
            body = ctx.split("<think>\n", 1)[-1]
            steps = [s for s in body.replace("</think>", "|").split("|") if s]
            out.append(sum(self.table.get(s, 0.0) for s in steps))
        return torch.tensor(out)


def config(**kw) -> CordConfig:
    base = dict(teachers=["A", "B", "C"], meta_prover="M", input_path="in.jsonl", output_path="out.jsonl",
                segmentation="line-break", beam_size=2, max_steps=6, token_budget=100, max_step_tokens=10,
                progress=False)
    base.update(kw)
    return CordConfig(**base)


# ----------------------------------------------------------------------------------------------
# Beam mechanics
# ----------------------------------------------------------------------------------------------
def test_select_beams_orders_keeps_top_b_and_dedupes():
    pool = [Beam(text=t, score=s) for t, s in [("a", 0.1), ("b", 0.5), ("c", 0.5), ("b", 0.4), ("d", float("nan")),
                                                ("e", 0.9)]]
    assert [b.text for b in select_beams(pool, 3)] == ["e", "b", "c"]  # ties: pool order
    assert [b.text for b in select_beams(pool, 10)] == ["e", "b", "c", "a", "d"]  # NaN last, "b" once


def test_decode_one_follows_the_scores_and_ends_at_think():
    teachers = [FakeTeacher("A", finish_at=3), FakeTeacher("B", finish_at=3), FakeTeacher("C", finish_at=3)]
    # Best path: B0 then A1 then C2, then the finishing step; C3 > A3 > B3.
    table = {"B0": 1.0, "A0": 0.9, "A1": 1.0, "C2": 1.0, "B2": 0.5, "C3": 0.3, "A3": 0.2}
    scorer = FakeScorer(table)
    res = decode_one("Q?", "7", teachers, scorer, config(beam_size=2), seed=0)
    assert [s["text"] for s in res.beam.steps] == ["B0|", "A1|", "C2|", "C3</think>"]
    assert [s["teacher"] for s in res.beam.steps] == ["B", "A", "C", "C"]
    assert res.beam.text == "Q?\n<think>\nB0|A1|C2|C3</think>" and res.beam.finished
    assert res.beam.score == pytest.approx(3.3)
    assert [s["score"] for s in res.beam.steps] == pytest.approx([1.0, 2.0, 3.0, 3.3])
    # Step 1 has one beam (K candidates), then B beams x K teachers, beam-major.
    sizes = [len(pairs) for pairs, _ in scorer.calls]
    assert sizes == [3, 6, 6, 6]
    pairs, prefixes = scorer.calls[1]
    assert [p[0][len("Q?\n<think>\n"):] for p in pairs] == ["B0|A1|", "B0|B1|", "B0|C1|", "A0|A1|", "A0|B1|", "A0|C1|"]
    assert prefixes == ["Q?\n<think>\nB0|"] * 3 + ["Q?\n<think>\nA0|"] * 3  # KV-reuse prefixes = parent beams
    assert all(a == "7" for p, _ in scorer.calls for _, a in p)
    # The last step's teacher (C) wrote the answer, after the end marker.
    assert res.answer_text == " The final answer is C."
    assert teachers[2].calls[-1]["prefixes"] == ["Q?\n<think>\nB0|A1|C2|C3</think>"]
    assert res.tokens_generated == 3 * 3 + 3 * (3 * 6) + 5
    assert res.meta_prover_tokens == scorer.tokens_processed


def test_finished_beam_competes_and_search_stops_when_top_b_are_finished():
    teachers = [FakeTeacher("A", finish_at=1), FakeTeacher("B")]
    scorer = FakeScorer({"A1": 5.0, "B0": 1.0, "A0": 0.5})
    res = decode_one("Q?", "7", teachers, scorer, config(teachers=["A", "B"], beam_size=1), seed=0)
    # B0 wins step 1; then A finishes (A1</think>, score 6) and beats B1 (1.0): decoding stops there.
    assert res.beam.text.endswith("B0|A1</think>") and res.answer_text.endswith("A.")
    assert len(scorer.calls) == 2


def test_token_budget_ends_with_think_appended():
    teachers = [FakeTeacher("A", cost=4), FakeTeacher("B", cost=4)]
    scorer = FakeScorer({"A0": 1, "A1": 1, "A2": 1})
    res = decode_one("Q?", "7", teachers, scorer, config(teachers=["A", "B"], beam_size=1, token_budget=10,
                                                          max_step_tokens=6), seed=0)
    # 4 + 4 tokens, then only 2 remain: the third step may generate 2 tokens, then the budget is spent.
    assert [c["max_new_tokens"] for c in teachers[0].calls[:3]] == [6, 6, 2]
    assert res.beam.tokens == 10 and res.beam.finished
    assert res.beam.text == "Q?\n<think>\nA0|A1|A2|</think>"
    assert [s["text"] for s in res.beam.steps] == ["A0|", "A1|", "A2|"]
    assert res.answer_text.endswith("A.")


def test_max_steps_closes_the_beam():
    teachers = [FakeTeacher("A")]
    res = decode_one("Q?", "7", teachers, FakeScorer({}), config(teachers=["A"], max_steps=2), seed=0)
    assert res.beam.text == "Q?\n<think>\nA0|A1|</think>" and len(res.beam.steps) == 2


def test_greedy_is_beam_one_and_random_and_curation_baselines():
    # greedy searches one beam; at equal cost it runs beam_size trajectories (one when all are greedy-decoded,
    # where they would be the same trajectory); tests/methods/cord/test_baselines_equal_cost.py has the rest
    assert cord.decode.greedy_trajectories(config(method="greedy", beam_size=8, temperature=0.7), 3) == 8
    assert cord.decode.greedy_trajectories(config(method="greedy", beam_size=8, temperature=0.0), 3) == 1
    teachers = [FakeTeacher("A", finish_at=2), FakeTeacher("B", finish_at=2)]
    cfg = config(teachers=["A", "B"], method="random", random_selection="step")  # the per-step coin
    a = decode_random("Q?", "7", teachers, FakeScorer({}), cfg, seed=5)
    b = decode_random("Q?", "7", teachers, FakeScorer({}), cfg, seed=5)
    assert a.beam.text == b.beam.text and a.beam.finished and len(a.beam.steps) == 3
    picks = {tuple(s["teacher"] for s in decode_random("Q?", "7", teachers, FakeScorer({}), cfg, seed=s).beam.steps)
             for s in range(12)}
    assert len(picks) > 1  # the seed changes the random choices
    assert a.tokens_generated == 3 * 2 * 3 + 5  # all K propose each step: the same cost as greedy CoRD
    scorer = FakeScorer({"B0": 1.0, "A0": 0.2})
    teachers = [FakeTeacher("A", finish_at=2), FakeTeacher("B", finish_at=2)]
    c = decode_curation("Q?", "7", teachers, scorer, config(teachers=["A", "B"], method="curation",
                                                            temperature=0.8, n_curation=3), seed=0)
    assert c.beam.text == "Q?\n<think>\nB0|B1</think>" and c.answer_text.endswith("B.")
    assert [s["text"] for s in c.beam.steps] == ["B0|B1</think>"]  # one line-break step
    # 3 samples per teacher, identical here: each distinct trace is scored once
    assert len(scorer.calls[0][0]) == 2 and scorer.calls[0][1] == ["Q?\n<think>\n"] * 2
    assert teachers[0].calls[0]["n"] == 3 and c.tokens_generated == 2 * 3 * 6 + 5


# ----------------------------------------------------------------------------------------------
# Answers and config
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    (" The final answer is 42.", "42"),
    ("so... The final answer is: \\boxed{3/4}. Done", "3/4"),
    ("**Final Answer**\n\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("it is 12, no 13", "13"),
    ("no number", None),
    ("The final answer is $-1,000$\n", "-1,000"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_normalize_and_match():
    assert normalize_answer(" 7.0 ") == "7" and normalize_answer("$1,000.$") == "1000"
    assert answers_match("-1,000", -1000) and answers_match("7", "7.") and not answers_match(None, "7")
    assert not answers_match("7", "8")


def test_config_checks(tmp_path):
    for bad, match in [(dict(teachers=[]), "teachers"), (dict(method="beam"), "method"),
                       (dict(beam_size=0), "beam_size"), (dict(segmentation="x"), "segmentation"),
                       (dict(temperature=-1.0), "temperature"), (dict(template="{context}"), "template"),
                       (dict(teacher_names=["a"]), "teacher_names"), (dict(scoring_backend="gpu"), "scoring_backend"),
                       (dict(prefix_phrases=["wait"]), "prefix_phrases"), (dict(max_steps=True), "max_steps"),
                       (dict(meta_prover=""), "meta_prover"), (dict(prompt_template="no q"), "prompt_template")]:
        with pytest.raises(ValueError, match=match):
            config(**bad)
    path = tmp_path / "c.yaml"
    path.write_text("teachers: [a, b]\nmeta_prover: m\ninput_path: i\noutput_path: o\nbeam_szie: 3\n")
    with pytest.raises(ValueError, match="beam_szie"):
        CordConfig.from_yaml(str(path))
    assert cord.cli(["--config", str(path)]) == 2
    help_ = build_parser(CordConfig, "distillkit cord", "CoRD.").format_help()  # the parser parse_config builds
    assert "--beam-size" in help_ and "beams B kept per step" in help_
    # The shipped example config parses.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    shipped = CordConfig.from_yaml(os.path.join(root, "configs", "cord.yaml"))
    assert shipped.method == "cord" and len(shipped.teachers) >= 2


# ----------------------------------------------------------------------------------------------
# Resumable output
# ----------------------------------------------------------------------------------------------
def _write_questions(path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n")


class CrashingTeacher(FakeTeacher):
    def __init__(self, name, crash_on: str, **kw):
        super().__init__(name, **kw)
        self.crash_on = crash_on

    def propose(self, prefixes, **kw):
        if any(self.crash_on in p for p in prefixes):
            raise RuntimeError("injected crash")
        return super().propose(prefixes, **kw)


def test_crash_and_resume_gives_the_same_records(tmp_path):
    _write_questions(tmp_path / "in.jsonl", 5)
    kw = dict(teachers=["A", "B"], input_path=str(tmp_path / "in.jsonl"))
    table = {"A0": 1, "B1": 1, "A2": 1}
    mk = lambda: [FakeTeacher("A", finish_at=3), FakeTeacher("B", finish_at=3)]  # noqa: E731
    ref_cfg = config(output_path=str(tmp_path / "ref.jsonl"), **kw)
    run(ref_cfg, teachers=mk(), meta_prover=FakeScorer(table))
    out = tmp_path / "out.jsonl"
    cfg = config(output_path=str(out), questions_in_flight=1, **kw)  # one at a time: q0..q2 done at the crash
    with pytest.raises(RuntimeError, match="injected"):
        run(cfg, teachers=[CrashingTeacher("A", "3 + 4", finish_at=3), FakeTeacher("B", finish_at=3)],
            meta_prover=FakeScorer(table))
    assert len(out.read_text().splitlines()) == 3
    with open(out, "a") as f:
        f.write('{"id": "q3", "question": "half a rec')  # a torn write from a crash
    summary = run(cfg, teachers=mk(), meta_prover=FakeScorer(table))
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text()
    # A0 B1 A2 A3 (tie: first teacher)
    assert summary["records"] == 5 and summary["teacher_share"] == {"A": 0.75, "B": 0.25}
    # Rerunning does nothing new (and needs no models).
    run(cfg, teachers=[], meta_prover=None)
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text()
    assert [r["id"] for r in load_done(str(out))] == [f"q{i}" for i in range(5)]


# ----------------------------------------------------------------------------------------------
# Tiny Hugging Face models, end to end
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("cord_world")
    tok = build_tokenizer()
    paths = [save_tiny_checkpoint(root / name, arch=arch, seed=seed, tokenizer=tok, hidden_size=32)
             for name, arch, seed in [("t0", "llama", 0), ("t1", "qwen2", 1), ("meta", "llama", 2)]]
    _write_questions(root / "in.jsonl", 6)
    return root, paths


def _tiny_config(root, paths, out, **kw) -> dict:
    base = dict(teachers=paths[:2], teacher_names=["t0", "t1"], meta_prover=paths[2],
                input_path=str(root / "in.jsonl"), output_path=str(out), beam_size=2, segmentation="line-break",
                max_steps=4, token_budget=20, max_step_tokens=6, max_answer_tokens=6, progress=False)
    base.update(kw)
    return base


@pytest.mark.parametrize("method", ["cord", "greedy", "curation", "random"])
def test_end_to_end_tiny_models(tiny_world, tmp_path, method):
    from distillkit.methods.cord.meta_prover import MetaProver
    from distillkit.teachers.hf import load_causal_lm

    root, paths = tiny_world
    out = tmp_path / f"{method}.jsonl"
    cfg = CordConfig(**_tiny_config(root, paths, out, method=method, limit=3,
                                    temperature=0.7 if method == "curation" else 0.0, n_curation=2))
    summary = run(cfg)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    model, tok = load_causal_lm(paths[2])
    prover = MetaProver(model, tok, reuse_prefix_cache=False)
    for r in records:
        assert set(r) >= {"id", "question", "answer", "trajectory", "steps", "final_answer", "correct",
                          "predictive_perplexity", "tokens_generated", "meta_prover_tokens"}
        assert r["trajectory"].startswith("".join(s["text"] for s in r["steps"])) and "</think>" in r["trajectory"]
        assert all(s["teacher"] in ("t0", "t1") for s in r["steps"]) and r["steps"]
        assert r["tokens_generated"] > 0 and r["meta_prover_tokens"] > 0
        assert r["correct"] == answers_match(r["final_answer"], r["answer"])
        # The recorded score is the meta-prover's score of the chosen reasoning.
        reasoning = r["prompt"] + r["trajectory"][:r["trajectory"].index("</think>")]
        want = float(prover.score([(reasoning, r["answer"])])[0])
        assert r["predictive_perplexity"] == pytest.approx(want, rel=1e-4)
        if method in ("greedy", "random"):
            assert len(r["steps"]) <= cfg.max_steps
    assert summary["records"] == 3 and 0 <= summary["accuracy"] <= 1
    assert set(summary["hit_rates"]) == {"t0", "t1"} and len(summary["hit_rates"]["t0"]) == cord.HIT_RATE_BINS
    saved = json.loads((tmp_path / f"{method}.jsonl.summary.json").read_text())
    assert saved["records"] == 3
    png = (tmp_path / f"{method}.jsonl.hit_rates.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _write_yaml(path, cfg: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(cfg))


@pytest.mark.slow
@pytest.mark.timeout(600)  # three CLI processes: 206 s measured on the shared 2-core CPU
def test_sigkill_midway_then_resume_matches_uninterrupted(tiny_world, tmp_path):
    root, paths = tiny_world
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    # One question in flight: with many, the meta-prover's batch holds other questions after the resume, which
    # moves scores in the last bits (test_in_flight.py checks traces against one at a time, scores by tolerance)
    _write_yaml(tmp_path / "out.yaml", _tiny_config(root, paths, out, questions_in_flight=1))
    cmd = [sys.executable, "-m", "distillkit.cli", "cord", "--config"]
    proc = subprocess.Popen(cmd + [str(tmp_path / "out.yaml")], env=_cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(out.read_bytes().splitlines()) if out.exists() else 0
    assert killed and 2 <= partial < 6, f"the run was not caught midway ({partial} records)"
    subprocess.run(cmd + [str(tmp_path / "out.yaml")], env=_cli_env(), check=True, capture_output=True)
    # The uninterrupted reference runs in this process (one thread, as the subprocesses).
    run(CordConfig(**_tiny_config(root, paths, ref, questions_in_flight=1)))
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = [json.loads(line) for line in ref.read_text().splitlines()]
    assert [r["id"] for r in got] == [f"q{i}" for i in range(6)]  # none lost, none duplicated
    assert got == want


# ----------------------------------------------------------------------------------------------
# Resume keeps every record; reruns keep their config; input records checked before any model
# ----------------------------------------------------------------------------------------------
def _fake_run(cfg):
    table = {"A0": 1, "B1": 1, "A2": 1}
    return run(cfg, teachers=[FakeTeacher("A", finish_at=3), FakeTeacher("B", finish_at=3)],
               meta_prover=FakeScorer(table))


def test_resume_keeps_records_after_a_blank_line_or_a_missing_newline(tmp_path):
    _write_questions(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    cfg = config(teachers=["A", "B"], input_path=str(tmp_path / "in.jsonl"), output_path=str(out), limit=3)
    _fake_run(cfg)
    lines = out.read_bytes().splitlines(keepends=True)
    # a blank line and an unparsable line in the middle, and a last record without its newline
    out.write_bytes(lines[0] + b"\n" + b"garbage\n" + lines[1] + lines[2].rstrip(b"\n"))
    assert [r["id"] for r in load_done(str(out))] == ["q0", "q1", "q2"]
    assert out.read_bytes() == lines[0] + b"\n" + b"garbage\n" + lines[1] + lines[2]  # nothing deleted
    # a record without an id (not one of this run's) is skipped, not a KeyError
    with open(out, "ab") as f:
        f.write(b'{"question": "no id"}\n')
    summary = run(dataclasses.replace(cfg, limit=5), teachers=[FakeTeacher("A", finish_at=3),
                                                               FakeTeacher("B", finish_at=3)],
                  meta_prover=FakeScorer({"A0": 1}))
    assert [r["id"] for r in load_done(str(out))] == [f"q{i}" for i in range(5)] and summary["records"] == 5
    # a torn tail is kept aside in <output>.torn, not deleted
    with open(out, "ab") as f:
        f.write(b'{"id": "q5", "quest')
    before = out.read_bytes()
    assert len(load_done(str(out))) == 5
    assert out.read_bytes() == before[:-len(b'{"id": "q5", "quest')]
    assert (tmp_path / "out.jsonl.torn").read_bytes() == b'{"id": "q5", "quest\n'


def test_limit_zero_processes_no_question(tmp_path):
    _write_questions(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    summary = run(config(input_path=str(tmp_path / "in.jsonl"), output_path=str(out), limit=0),
                  teachers=[], meta_prover=None)  # no model is needed for no question
    assert summary["records"] == 0 and not out.exists()
    assert cord.read_questions(str(tmp_path / "in.jsonl"), 2)[-1]["id"] == "q1"
    with pytest.raises(InputError, match="limit"):
        config(limit=-1)
    with pytest.raises(InputError, match="limit"):
        cord.read_questions(str(tmp_path / "in.jsonl"), -1)


@pytest.mark.parametrize("bad,match", [
    ({"id": "q1", "question": "1 + 1?", "answer": None}, r"in\.jsonl:2 \(id 'q1'\): answer=None"),
    ({"question": "1 + 1?", "answer": "2"}, r"in\.jsonl:2: missing field\(s\) \['id'\]"),
    ({"id": None, "question": "1 + 1?", "answer": "2"}, r"in\.jsonl:2: id=None"),
    ({"id": "q1", "question": None, "answer": "2"}, r"in\.jsonl:2 \(id 'q1'\): question=None"),
    (["q1", "1 + 1?", "2"], r"in\.jsonl:2: expected a JSON object"),
])
def test_bad_question_records_are_refused_naming_the_line_before_any_model(tmp_path, bad, match):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "q0", "question": "0 + 1?", "answer": "1"}) + "\n" + json.dumps(bad) + "\n")
    cfg = config(input_path=str(path), output_path=str(tmp_path / "out.jsonl"))
    with pytest.raises(InputError, match=match):
        run(cfg)  # teachers "A", "B", "C" are no checkpoints: loading any model would fail otherwise
    assert not (tmp_path / "out.jsonl").exists()


def test_answers_are_never_compared_with_the_text_none():
    assert not answers_match(None, "7")
    with pytest.raises(InputError, match="truth"):
        answers_match("None", None)


def test_rerun_with_another_config_is_refused_unless_overwrite(tmp_path):
    _write_questions(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out.jsonl"
    cfg = config(teachers=["A", "B"], input_path=str(tmp_path / "in.jsonl"), output_path=str(out), limit=2)
    _fake_run(cfg)
    done = out.read_text()
    with pytest.raises(InputError, match=r"beam_size: 2 -> 3; seed: 0 -> 1.*--overwrite"):
        _fake_run(dataclasses.replace(cfg, beam_size=3, seed=1))
    with pytest.raises(InputError, match=r"limit: 2 -> 1"):  # a smaller limit would leave records outside it
        _fake_run(dataclasses.replace(cfg, limit=1))
    assert out.read_text() == done
    # may change: progress, summary / plot paths, a larger limit
    _fake_run(dataclasses.replace(cfg, progress=False, summary_path=str(tmp_path / "s.json"), limit=3))
    assert len(load_done(str(out))) == 3
    # overwrite: the old records, summary and plot are moved aside (nothing deleted), the run starts afresh
    summary = _fake_run(dataclasses.replace(cfg, beam_size=3, limit=3, overwrite=True))
    assert summary["records"] == 3
    aside = {p.name.split(".replaced-")[0]: p for p in tmp_path.iterdir() if ".replaced-" in p.name}
    assert sorted(aside) == ["out.jsonl", "out.jsonl.hit_rates.png", "out.jsonl.run_config.json",
                             "out.jsonl.summary.json"]
    assert len(aside["out.jsonl"].read_text().splitlines()) == 3
    recorded = json.loads((tmp_path / "out.jsonl.run_config.json").read_text())["config"]
    assert recorded["beam_size"] == 3
    # the demo's way of starting afresh (remove the records only) needs no overwrite
    out.unlink()
    _fake_run(dataclasses.replace(cfg, beam_size=4))
