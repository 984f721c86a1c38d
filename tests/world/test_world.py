"""The tiny reasoning world: exact answers (checked by an independent evaluator) and the shipped models."""
from __future__ import annotations

import itertools
import os
import random

import pytest

from distillkit.world import problems as W

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _brute_force(question: str) -> str:
    # A third way to the answer: build the nested expression and let Python evaluate it.
    expr = question[0]
    for i in range(1, len(question), 2):
        expr = f"(({expr}){question[i]}{question[i + 1]})%10"
    return str(eval(expr))  # noqa: S307 (digits and + - * only, checked by the regex below)


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------
def test_answers_match_independent_evaluators_on_every_short_problem():
    for num_ops in (1, 2):
        for start in range(10):
            for ops in itertools.product(itertools.product(W.OPS, range(10)), repeat=num_ops):
                p = W.Problem(start, tuple(ops))
                assert p.answer == W.evaluate_question(p.question) == _brute_force(p.question)


def test_answers_match_independent_evaluators_on_sampled_problems():
    for p in W.generate_problems(3000, seed=7) + W.generate_problems(500, seed=8, num_ops=6):
        assert p.answer == W.evaluate_question(p.question) == _brute_force(p.question)


def test_hand_checked_examples():
    assert W.evaluate_question("3+9-7*4") == "0"   # 12 -> 2; 2-7 -> 5; 5*4=20 -> 0
    assert W.evaluate_question("6-0-8-6") == "2"   # 6; -2 -> 8; 2
    p = W.Problem(3, (("+", 9), ("-", 7), ("*", 4)))
    assert p.prompt + W.trace(p) == ("3+9-7*4\n<think> ### Step 1: 3+9=2\n### Step 2: 2-7=5\n### Step 3: 5*4=0\n"
                                     "</think> The final answer is 0.")
    assert W.kinds_of(p) == ["carry", "borrow", "overflow"]
    assert W.trace(p, "carry").startswith(" 1: 3+9=3\n### Step 2: 3-7=6\n")  # then computed on from its own value
    assert W.trace(p, "overflow").endswith("5*4=2\n</think> The final answer is 2.")
    assert W.trace(p, num_steps=1, close=False) == " 1: 3+9=2\n"


def test_correct_traces_pass_the_step_checker_and_flawed_ones_fail_only_on_their_kind():
    rng = random.Random(0)
    for _ in range(500):
        p = W.random_problem(rng, rng.randint(1, 5))
        good = W.check_trace(p.question, W.trace(p))
        assert good["well_formed"] and good["all_steps_ok"] and good["answer_ok"]
        for flaw in W.FLAWS:
            chk = W.check_trace(p.question, W.trace(p, flaw))
            assert chk["well_formed"]
            for s in chk["steps"]:
                assert s["ok"] == (s["kind"] != flaw), (p.question, flaw, s)
            if chk["all_steps_ok"]:
                assert chk["answer_ok"]


def test_check_trace_rejects_malformed_traces():
    p = W.Problem(3, (("+", 9), ("-", 7), ("*", 4)))
    t = W.trace(p)
    assert not W.check_trace(p.question, t.replace("2-7=5", "2-6=5"))["well_formed"]       # wrong operand
    assert not W.check_trace(p.question, t.replace("### Step 2: 2-7=5\n", ""))["well_formed"]  # missing step
    no_answer = W.check_trace(p.question, t.split("</think>")[0])
    assert no_answer["answer"] is None and not no_answer["answer_ok"]
    wrong = W.check_trace(p.question, t.replace("answer is 0", "answer is 7"))
    assert wrong["all_steps_ok"] and not wrong["answer_ok"]


def test_generate_problems_is_deterministic_distinct_and_excludes():
    a = W.generate_problems(200, seed=3)
    assert [p.question for p in a] == [p.question for p in W.generate_problems(200, seed=3)]
    assert len({p.question for p in a}) == 200
    b = W.generate_problems(200, seed=3, exclude=[p.question for p in a[:50]])
    assert not {p.question for p in a[:50]} & {p.question for p in b}
    assert len(W.generate_problems(300, seed=0, num_ops=1)) == 300  # the whole space


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="start"):
        W.Problem(10, (("+", 1),))
    with pytest.raises(ValueError, match="ops"):
        W.Problem(1, (("/", 1),))
    with pytest.raises(ValueError, match="ops"):
        W.Problem(1, ())
    with pytest.raises(ValueError, match="flaw"):
        W.trace(W.Problem(1, (("+", 1),)), "typo")
    with pytest.raises(ValueError, match="question"):
        W.evaluate_question("3+12")
    with pytest.raises(ValueError, match="n="):
        W.generate_problems(301, seed=0, num_ops=1)
    with pytest.raises(ValueError, match="num_steps"):
        W.trace(W.Problem(1, (("+", 1),)), num_steps=2)


def test_traces_tokenize_to_fixed_lengths_and_round_trip():
    from distillkit.world.models import max_new_tokens
    from distillkit.world.tiny import build_tokenizer

    tok = build_tokenizer()
    lengths = set()
    for p in W.generate_problems(200, seed=5):
        text = p.prompt + W.trace(p)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        lengths.add((len(tok(p.prompt, add_special_tokens=False)["input_ids"]),
                     len(tok(W.trace(p), add_special_tokens=False)["input_ids"])))
    assert lengths == {(11, max_new_tokens() - 2)}  # every token at a fixed offset: what makes it learnable


def test_records_load_as_examples(tmp_path):
    import json

    from distillkit.data import load_examples

    probs = W.generate_problems(5, seed=1)
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(W.to_record(p, i)) + "\n" for i, p in enumerate(probs)))
    exs = load_examples(str(path))
    assert [e.prompt + e.response for e in exs] == [p.prompt + W.trace(p) for p in probs]


# ----------------------------------------------------------------------------------------------
# The shipped models
# ----------------------------------------------------------------------------------------------
from distillkit.world import models as M  # noqa: E402

TOL = 0.01  # one thread on another CPU may flip an argmax or two out of 512


def test_shipped_assets_are_small_and_listed():
    total = 0
    for root, _, files in os.walk(M.ASSETS):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert total < 5 * 2 ** 20, f"shipped assets take {total / 2 ** 20:.1f} MiB"
    assert set(M.manifest()["models"]) == set(M.MODELS)


@pytest.fixture(scope="module")
def held_out():
    info = M.manifest()["eval"]
    return W.generate_problems(info["n"], seed=info["seed"], num_ops=info["num_ops"])


@pytest.mark.parametrize("name", M.TEACHERS)
def test_teachers_load_reach_recorded_accuracy_and_err_on_their_own_kind(name, held_out):
    from transformers import AutoModelForCausalLM

    model, tok = M.load_model(name)
    assert isinstance(model, type(AutoModelForCausalLM.from_pretrained(M.asset_path(name))))
    rec = M.manifest()["models"][name]
    got = M.evaluate_traces(model, tok, held_out)
    assert abs(got["accuracy"] - rec["accuracy"]) <= TOL
    assert got["well_formed"] >= 0.95
    flaw = rec["flaw"]
    assert got["step_error"][flaw] >= 0.5, got                # the deliberate weakness
    for kind in W.KINDS:
        if kind != flaw:
            assert got["step_error"][kind] <= 0.1, got        # and little else


def test_teachers_are_complementary(held_out):
    # Every problem that every teacher gets wrong is rare: CoRD can combine their steps.
    wrong = {}
    for name in M.TEACHERS:
        model, tok = M.load_model(name)
        from distillkit.evaluate import generate

        outs = generate(model, tok, [p.prompt for p in held_out[:128]], max_new_tokens=M.max_new_tokens(),
                        batch_size=128)
        wrong[name] = {i for i, (p, o) in enumerate(zip(held_out, outs)) if not W.check_trace(p.question, o)["answer_ok"]}
    any_right = 1 - len(set.intersection(*wrong.values())) / 128
    best_single = 1 - min(len(w) for w in wrong.values()) / 128
    assert any_right > best_single + 0.1


@pytest.mark.slow
@pytest.mark.timeout(300)  # scores the held-out set with the shipped meta-prover: 87 s measured
def test_meta_prover_reaches_recorded_scores(held_out):
    model, tok = M.load_model(M.META_PROVER)
    rec = M.manifest()["models"][M.META_PROVER]
    got = M.evaluate_meta_prover(model, tok, held_out)
    assert abs(got["ranking_accuracy"] - rec["ranking_accuracy"]) <= TOL
    for a, b in zip(got["answer_accuracy_by_steps"], rec["answer_accuracy_by_steps"]):
        assert abs(a - b) <= TOL
    assert got["answer_accuracy_by_steps"][-1] >= 0.95   # reading the answer off a complete trace
    assert got["ranking_accuracy"] >= 0.8                # a wrong step makes the true answer less likely


def test_student_base_reaches_recorded_accuracy(held_out):
    model, tok = M.load_model(M.STUDENT)
    rec = M.manifest()["models"][M.STUDENT]
    got = M.evaluate_traces(model, tok, held_out)
    assert abs(got["accuracy"] - rec["accuracy"]) <= TOL
    assert sum(p.numel() for p in model.parameters()) < M.manifest()["models"]["teacher-carry"]["params"]


def test_question_files_and_cpu_configs_of_every_method(tmp_path):
    """README's CPU recipes: `python -m distillkit.world.problems` writes the files the configs in
    configs/world read, and every config loads and names shipped models that exist."""
    import json
    import os

    from distillkit.config import load_config
    from distillkit.methods.cord import CordConfig
    from distillkit.methods.mot import MotConfig
    from distillkit.methods.qr_distill import QRDistillConfig
    from distillkit.methods.vcrd import VcrdConfig

    out = tmp_path / "q.jsonl"
    assert W.main(["--n", "5", "--seed", "3", "--flaw", "borrow", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(5)]
    for r in rows:
        assert r["answer"] == W.evaluate_question(r["question"])
        kinds = {s["kind"] for s in W.check_trace(r["question"], r["response"])["steps"] if not s["ok"]}
        assert kinds <= {"borrow"}
    assert not list(tmp_path.glob("*.tmp*"))  # written whole, then renamed

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfgs = [CordConfig.from_yaml(os.path.join(root, "configs/world/cord.yaml"))]
    cfgs += [load_config(cls, os.path.join(root, f"configs/world/{name}.yaml"))
             for cls, name in ((VcrdConfig, "vcrd"), (MotConfig, "mot"), (QRDistillConfig, "qr_distill"))]
    models = [*cfgs[0].teachers, cfgs[0].meta_prover, cfgs[1].student, cfgs[1].teacher, cfgs[2].student,
              *cfgs[3].teachers, *cfgs[3].students, cfgs[3].router_encoder]
    for m in models:
        assert os.path.isfile(os.path.join(root, m, "config.json")), m
