"""A reduced `distillkit demo`: every method runs end to end on the shipped tiny world (~1-2 min), once on one
thread and once on two workers, which must give the same numbers."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

from distillkit.world import demo

SMALL = dict(n_distill=12, n_eval=16, beam_size=2, sft_steps=8, sft_seeds=1, batch_size=8, mot_rounds=2, vcrd_steps=2,
             vcrd_sft_steps=4, qr_steps=4, seed=0, threads=1)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    return out, demo.run(demo.DemoConfig(out=out, **SMALL))


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module's reduced demo run (its fixture): 71 s on the shared 2-core CPU (214 s before)
def test_reduced_demo_runs_every_method_and_writes_the_report(small_run):
    out, result = small_run
    rows = result["rows"]
    expected = {"cord", "greedy", "curation", "random", "integration", "mcts",
                "sft: cord", "sft: greedy", "sft: curation", "sft: random",
                "sft: best single teacher", "sft: union of teachers", "mot", "vcrd: start", "vcrd: clamped_ratio",
                "vcrd: uniform",
                "qr: learned routing", "qr: random routing", "student-base (no distillation)"}
    assert expected <= set(rows)
    for name, row in rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0, name
    with open(result["report"], encoding="utf-8") as f:
        report = f.read()
    for name in expected:
        assert f"| {name} |" in report
    assert "Orderings against the papers" in report
    checks = [line for line in report.splitlines() if ": paper " in line]
    assert len(checks) == len(demo.PAPER_ORDERINGS)  # every ordering's rows are in the reduced run
    assert all("**holds**" in line or "**does not hold**" in line for line in checks)
    assert all(f"- **{m}**:" in report for m in ("CoRD", "MoT", "VCRD", "QR-Distill"))
    # the CoRD rows at equal budget: tokens per question and the score apart on right and wrong traces
    assert "## CoRD and its baselines at equal budget" in report
    for m in (*demo.CORD_METHODS, *demo.CORD_SEARCHES):
        c = result["cord"][m]
        assert c["mean_tokens_generated"] > 0 and c["mean_meta_prover_tokens"] > 0 and c["cpu_s"] > 0, m
        assert f"| {m} | {c['accuracy']:.3f} |" in report, m
        assert "teacher /" in rows[m]["detail"] and "meta-prover tokens per question" in rows[m]["detail"], m
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["rows"]["cord"]["accuracy"] == rows["cord"]["accuracy"]
    # every section's time is in the report's header and in results.json, for one run to measure
    assert set(saved["timing"]["sections"]) == {"teacher traces", *demo.SECTIONS}
    for name, s in result["timing"]["sections"].items():
        assert s["cpu_s"] > 0 and s["wall_s"] > 0, name
        assert re.search(rf"\| {name} \| {s['jobs']} \| {s['cpu_s']:.1f} \| {s['wall_s']:.1f} \|", report), name
    assert saved["timing"]["workers"] == 1
    # CoRD's traces are CoRD records the students train on
    with open(os.path.join(out, "traces", "cord.jsonl"), encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert {"prompt", "trajectory", "correct", "steps"} <= set(first)


@pytest.mark.slow
@pytest.mark.timeout(900)  # pays the reduced demo run (71 s measured) when selected alone
def test_cord_beats_a_single_flawed_teacher_even_when_small(small_run):
    rows = small_run[1]["rows"]
    best_single = max(rows[f"trace: {n}"]["accuracy"] for n in ("teacher-carry", "teacher-borrow", "teacher-overflow"))
    assert rows["cord"]["accuracy"] >= best_single


@pytest.mark.slow
@pytest.mark.timeout(900)  # a second demo run (CoRD one question at a time): 108 s measured on the shared 2-core CPU
def test_two_workers_and_cord_in_slices_give_the_numbers_of_one_thread(small_run, tmp_path):
    # every job runs on one torch thread, side by side or one after another, and CoRD decodes each question
    # under its own seed: the same numbers, bit for bit, from 2 workers and 3 CoRD slices per method
    _, first = small_run
    threads = torch.get_num_threads()
    # ... and from CoRD jobs decoding one question at a time instead of all of a slice's at once
    again = demo.run(demo.DemoConfig(out=str(tmp_path), **{**SMALL, "threads": 2, "cord_shard": 5,
                                                            "cord_in_flight": 1}))
    assert again["timing"]["workers"] == 2
    cord_rows = len(demo.CORD_METHODS) + len(demo.CORD_SEARCHES)
    assert again["timing"]["sections"]["cord"]["jobs"] == cord_rows * (3 + 1)  # 3 slices + merge
    assert torch.get_num_threads() == threads  # the caller's setting comes back
    assert list(again["rows"]) == list(first["rows"])
    for name, row in again["rows"].items():
        assert row["accuracy"] == first["rows"][name]["accuracy"], name
        assert re.sub(r"; \d+ s$", "", row["detail"]) == re.sub(r"; \d+ s$", "", first["rows"][name]["detail"]), name


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="n_distill"):
        demo.DemoConfig(n_distill=0)
    with pytest.raises(ValueError, match="vcrd_sft_steps"):
        demo.DemoConfig(vcrd_sft_steps=-1)
    with pytest.raises(ValueError, match="sections"):
        demo.DemoConfig(sections=("cord", "nope"))
    with pytest.raises(ValueError, match="n_distill \\+ n_eval"):
        demo.DemoConfig(n_distill=400, n_eval=400)
    with pytest.raises(ValueError, match="threads"):
        demo.DemoConfig(threads=0)
    with pytest.raises(ValueError, match="cord_shard"):
        demo.DemoConfig(cord_shard=0)
    # by default the demo uses every core it may run on
    assert demo.DemoConfig().threads == len(os.sched_getaffinity(0))


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        demo.cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--sft-steps", 320), ("--n-eval", 192), ("--lr", 0.002), ("--out", "distillkit-demo"),
                            ("--threads", len(os.sched_getaffinity(0))), ("--sections", "['cord', 'sft', 'mot'")]:
        assert re.search(rf"{option} [A-Z_\[{{](?:(?!--).)*?\(default: {re.escape(str(default))}", text), option
    # every option of the demo, with the value its config takes when the option is not given
    cfg = demo.DemoConfig()
    for f in dataclasses.fields(demo.DemoConfig):
        option, default = "--" + f.name.replace("_", "-"), getattr(cfg, f.name)
        assert re.search(rf"{option} [A-Z_\[{{](?:(?!--).)*?\(default: {re.escape(str(default))}\)", text), option


def test_cli_checks_its_config_like_every_command(tmp_path, capsys):
    """The demo's flags go through parse_config: a bad value or an output folder that is a file is one line and exit 2,
    before anything runs."""
    with pytest.raises(SystemExit) as exc:
        demo.cli(["--threads", "0"])
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == \
        "distillkit demo: threads=0: expected an integer >= 1"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        demo.cli(["--out", str(blocker)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith(f"distillkit demo: --out {blocker}: is a file")


# ----------------------------------------------------------------------------------------------
# The report's orderings and columns, on synthetic rows (fast)
# ----------------------------------------------------------------------------------------------
def test_orderings_say_holds_or_does_not_hold_with_the_numbers():
    rows = {"cord": {"accuracy": 0.9}, "greedy": {"accuracy": 0.8}, "curation": {"accuracy": 0.85},
            "random": {"accuracy": 0.5}, "mcts": {"accuracy": 0.9}, "integration": {"accuracy": 0.1},
            "qr: learned routing": {"accuracy": 0.2, "mean_accuracy": 0.15},
            "qr: random routing": {"accuracy": 0.18, "mean_accuracy": 0.16}}
    lines = {line.split(": paper ")[1].split(";")[0]: line for line in demo.check_orderings(rows)}
    assert "here cord 0.900, greedy 0.800, curation 0.850: **does not hold**." in lines["cord > greedy > curation"]
    assert "here greedy 0.800, random 0.500: **holds**." in lines["greedy > random"]
    assert "here cord 0.900, mcts 0.900: **does not hold** (a tie)." in lines["cord > mcts"]
    # QR-Distill: the best student's accuracy and the students' mean are two orderings, each on its own key
    qr = [line for line in demo.check_orderings(rows) if line.startswith("- QR-Distill")]
    assert len(qr) == 2 and "learned routing 0.200, qr: random routing 0.180: **holds**" in qr[0]
    assert "learned routing 0.150, qr: random routing 0.160: **does not hold**" in qr[1]
    # orderings whose rows this run lacks (no SFT, MoT, VCRD here) are left out, not guessed
    assert len(demo.check_orderings(rows)) == 7
    verdicts = demo.method_verdicts(rows)
    assert [v.split(":")[0] for v in verdicts] == ["- **CoRD**", "- **QR-Distill**"]
    assert verdicts[0].startswith("- **CoRD**: 3 of 5 of its paper's orderings hold here")
    assert "cord > mcts (accuracy: cord 0.900, mcts 0.900) does not hold" in verdicts[0]
    assert verdicts[1].startswith("- **QR-Distill**: 1 of 2") and "(mean accuracy: " in verdicts[1]
    # each verdict follows the numbers: flip them and it flips
    rows["mcts"]["accuracy"] = 0.89
    assert "cord > mcts (accuracy: cord 0.900, mcts 0.890) holds" in demo.method_verdicts(rows)[0]
    results = demo.ordering_results({"vcrd: clamped_ratio": {"accuracy": 0.4}, "vcrd: uniform": {"accuracy": 0.3},
                                     "vcrd: start": {"accuracy": 0.45}})
    assert [(r["ordering"].order, r["holds"]) for r in results] == [
        (("vcrd: clamped_ratio", "vcrd: uniform"), True), (("vcrd: clamped_ratio", "vcrd: start"), False)]


def test_explanations_follow_this_runs_numbers():
    rows = {"trace: a": {"accuracy": 0.6}, "trace: b": {"accuracy": 0.5},
            "cord": {"accuracy": 1.0, "teacher_tokens": 167, "meta_prover_tokens": 218, "score_correct": 0.999,
                     "score_wrong": None},
            "mcts": {"accuracy": 1.0, "teacher_tokens": 183, "meta_prover_tokens": 354},
            "integration": {"accuracy": 0.1, "well_formed": 0.0},
            "qr: learned routing": {"accuracy": 0.147, "mean_accuracy": 0.14, "split": {"s0": 0.55, "s1": 0.45}},
            "qr: random routing": {"accuracy": 0.16, "mean_accuracy": 0.155},
            "mot": {"accuracy": 0.30}, "sft: best single teacher": {"accuracy": 0.31, "per_seed": [0.28, 0.31, 0.34]}}
    text = "\n".join(demo.explain(rows))
    assert "Integration (0.100) is below every teacher's own traces (0.500-0.600)" in text
    assert "0.0% of its merged traces" in text
    assert "MCTS reaches 1.000 with 183 teacher and 354 meta-prover tokens per question, CoRD 1.000 with 167" in text
    assert "s0 0.55 / s1 0.45 over the last tenth of its steps: within [0.3, 0.7]" in text
    assert "Random routing (students' mean 0.155, best 0.160) does at least as well as learned routing (mean " \
           "0.140, best 0.147)" in text and "nothing to specialise on" in text
    assert "MoT's merge: mot 0.300 vs sft: best single teacher 0.310, a gap of 0.010 inside the spread" in text
    # where the numbers go the paper's way, no reason is given for them
    rows["mcts"]["accuracy"] = 0.975
    rows["qr: learned routing"].update(mean_accuracy=0.2, split={"s0": 0.95, "s1": 0.05})
    rows["mot"]["accuracy"] = 0.35
    text = "\n".join(demo.explain(rows))
    assert "MCTS reaches" not in text and "Random routing" not in text and "MoT's merge" not in text
    assert "outside [0.3, 0.7]" in text
    # a lead of learned routing no larger than the gap between two identical students under random routing
    rows["qr: random routing"]["students"] = {"s0": 0.19, "s1": 0.12}
    assert "Learned routing's lead on the students' mean (0.045) is no larger than the gap between the two " \
           "random-routing students (0.070)" in "\n".join(demo.explain(rows))
    rows["qr: random routing"]["students"] = {"s0": 0.16, "s1": 0.15}
    assert "Learned routing's lead" not in "\n".join(demo.explain(rows))


def test_score_by_outcome_separates_right_and_wrong_traces():
    records = [{"correct": True, "predictive_perplexity": 0.9}, {"correct": True, "predictive_perplexity": 0.7},
               {"correct": False, "predictive_perplexity": 0.2}, {"correct": False, "predictive_perplexity": None}]
    got = demo.score_by_outcome(records)
    assert got["score_correct"] == pytest.approx(0.8) and got["score_wrong"] == pytest.approx(0.2)
    assert got["wrong"] == 2
    assert demo.score_by_outcome(records[:2])["score_wrong"] is None  # no wrong trace: no mean, not 0
    table = demo.cord_table({"cord": {"lucky": 3}}, {"cord": {
        "accuracy": 0.5, "well_formed": 1.0, "all_steps_ok": 0.4, "mean_tokens_generated": 166.6,
        "mean_meta_prover_tokens": 218.2, "score_correct": 0.8, "score_wrong": None, "wrong": 0, "cpu_s": 6.21}})
    assert table[2] == "| cord | 0.500 | 1.000 | 0.400 | 3 | 167 | 218 | 0.800 | - (0) | 6.2 |"


@pytest.mark.parametrize("method", ["integration", "mcts"])
def test_integration_and_mcts_in_flight_give_the_results_of_one_question_at_a_time(method):
    """The demo runs Integration and MCTS through CoRD's runner: on the world models, decode_many's results for
    several questions at once equal serve_one's, question by question (the batched calls are greedy)."""
    from distillkit.methods.cord import CordConfig, question_seed
    from distillkit.methods.cord.decode import decode_many, serve_one
    from distillkit.methods.cord.integration import integration_steps
    from distillkit.methods.cord.mcts import mcts_steps
    from distillkit.methods.cord.meta_prover import MetaProver
    from distillkit.teachers.hf import HFTeacher
    from distillkit.world import models as M

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = demo.DemoConfig(out="unused")
        questions = demo.question_rows(demo.split_questions(cfg)[0][:5])
        teachers = [HFTeacher.from_pretrained(M.asset_path(n), name=n, batch_size=16) for n in M.TEACHERS]
        prover = MetaProver.from_pretrained(M.asset_path(M.META_PROVER), backend="reference")
        c = CordConfig(input_path="q", output_path="o", method=method, mcts_token_budget=60,
                       **demo.cord_settings(cfg))
        steps = {"integration": integration_steps, "mcts": mcts_steps}[method]
        seg = c.make_segmentation()

        def gens():
            return [steps(q["question"], q["answer"], 3, c, seed=question_seed(c.seed, q["id"]), seg=seg)
                    for q in questions]

        items = [(q["question"], q["answer"], question_seed(c.seed, q["id"])) for q in questions]
        together = [r for _, r in sorted(decode_many(items, teachers, prover, c, seg=seg, in_flight=3),
                                         key=lambda x: x[0])]
        alone = [serve_one(g, teachers, prover) for g in gens()]
    finally:
        torch.set_num_threads(threads)
    assert len(together) == len(alone) == 5
    for a, b in zip(alone, together):
        assert (b.beam.text, b.answer_text, b.tokens_generated, b.meta_prover_tokens) == \
            (a.beam.text, a.answer_text, a.tokens_generated, a.meta_prover_tokens)
        assert b.beam.score == pytest.approx(a.beam.score, rel=1e-5, abs=1e-6)  # batched scoring: last bits
        assert b.tokens_generated > 0 and b.meta_prover_tokens > 0
    if method == "mcts":  # the budget bounds the search: at most one expansion (K steps) past it, plus the answer
        assert all(r.tokens_generated <= 60 + 3 * 16 + 8 for r in together)
    with pytest.raises(ValueError, match="in_flight"):
        list(decode_many(items, teachers, prover, c, seg=seg, in_flight=0))
