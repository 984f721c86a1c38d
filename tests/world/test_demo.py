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
    expected = {"cord", "greedy", "curation", "random", "sft: cord", "sft: greedy", "sft: curation", "sft: random",
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
    assert report.count("- Table") + report.count("- QR") == len(demo.PAPER_ORDERINGS)
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
    assert again["timing"]["sections"]["cord"]["jobs"] == len(demo.CORD_METHODS) * (3 + 1)  # 3 slices + merge
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
