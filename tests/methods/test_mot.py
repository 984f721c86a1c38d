"""MoT: filtering, a K=2 round equals two manual SFT runs + average_, torchrun equals one process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillkit.merge import average_
from distillkit.methods.mot import MotConfig, load_teacher_datasets, run
from distillkit.pipeline.data import SFTCollator, load_examples, sft_loss
from distillkit.pipeline.train import TrainConfig, Trainer
from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mot")
    tok = build_tokenizer()
    student = save_tiny_checkpoint(root / "student", tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    rows_a, rows_b = [], []
    for i in range(12):
        a, b = i % 5, i % 3
        rows_a.append({"id": f"a{i}", "question": f"{a} + {b}", "answer": str(a + b),
                       "response": f" {a} + {b} = {a + b}</think> The final answer is {a + b}."})
        wrong = i % 4 == 0  # a wrong trace that MoT must drop
        rows_b.append({"id": f"b{i}", "question": f"{a} * {b}", "answer": str(a * b),
                       "response": f" {a} * {b} = {a * b + wrong}</think> The final answer is {a * b + wrong}."})
    data = [_write(root / "a.jsonl", rows_a), _write(root / "b.jsonl", rows_b)]
    evals = _write(root / "eval.jsonl", [{"id": "e0", "question": "2 + 2", "answer": "4"},
                                         {"id": "e1", "question": "1 * 3", "answer": "3"}])
    return root, student, data, evals


def _cfg(root, student, data, evals, name, **kw):
    base = dict(student=student, teacher_data=data, output_dir=str(root / name), rounds=1, steps_per_round=4,
                batch_size=4, lr=2e-3, eval_data=evals, max_new_tokens=8, progress=False, seed=5)
    base.update(kw)
    return MotConfig(**base)


def test_teacher_datasets_keep_only_correct_traces(setup):
    root, student, data, evals = setup
    a, b = load_teacher_datasets(_cfg(root, student, data, evals, "f"))
    assert len(a) == 12 and len(b) == 9
    assert all(" + " in ex.prompt for ex in a)


@pytest.mark.slow
@pytest.mark.timeout(300)  # a MoT round trained twice: 59 s measured
def test_round_equals_manual_sft_then_average(setup):
    root, student, data, evals = setup
    cfg = _cfg(root, student, data, evals, "mot")
    history = run(cfg)
    assert len(history) == 1 and {"accuracy", "train_loss_teacher0", "train_loss_teacher1"} <= set(history[0])
    assert os.path.exists(root / "mot" / "mot_rounds.png") and os.path.isdir(root / "mot" / "final")

    tok = build_tokenizer()
    branches = []
    for k, path in enumerate(data):
        model = AutoModelForCausalLM.from_pretrained(student)
        exs = load_examples(path, prompt_template=cfg.prompt_template, only_correct=True,
                            is_correct=lambda r, a: r.rstrip(".").endswith(a))
        tcfg = TrainConfig(output_dir=str(root / f"manual{k}"), max_steps=4, batch_size=4, lr=2e-3,
                           seed=cfg.train.seed + k, progress=False)
        Trainer(model, tcfg, exs, SFTCollator(tok, cfg.max_length), sft_loss).train()
        branches.append(model)
    average_(branches[0], branches)
    merged = AutoModelForCausalLM.from_pretrained(root / "mot" / "final")
    for (name, want), got in zip(branches[0].state_dict().items(), merged.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)  # the same computations, same process: exact


@pytest.mark.slow
@pytest.mark.timeout(300)  # two rounds of branch training and a TIES merge: 84 s measured
def test_rerun_skips_finished_rounds_and_ties_merge(setup):
    root, student, data, evals = setup
    cfg = _cfg(root, student, data, evals, "ties", merge="ties", density=0.5, rounds=2, steps_per_round=2)
    first = run(cfg)
    mtime = os.path.getmtime(root / "ties" / "round0" / "merged" / "model.safetensors")
    again = run(cfg)
    assert again == first
    assert os.path.getmtime(root / "ties" / "round0" / "merged" / "model.safetensors") == mtime


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)  # torchrun with 2 ranks plus a single run: 179 s measured
def test_torchrun_two_ranks_equals_single_process(setup):
    root, student, data, evals = setup
    single = _cfg(root, student, data, evals, "single", eval_data=None)
    run(single)
    out = root / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "distillkit.cli", "mot", "--student", student, "--teacher-data", *data, "--output-dir", str(out),
           "--rounds", "1", "--steps-per-round", "4", "--batch-size", "4", "--lr", "2e-3", "--seed", "5",
           "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = AutoModelForCausalLM.from_pretrained(root / "single" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    for k in a:
        # each rank trains its branch alone, as the single process does; a two-term mean rounds the same in any order
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_bad_config(setup):
    root, student, data, evals = setup
    with pytest.raises(ValueError, match="merge="):
        _cfg(root, student, data, evals, "x", merge="slerp")
    with pytest.raises(ValueError, match="weights has 1 entries"):
        _cfg(root, student, data, evals, "x", weights=[1.0])
    with pytest.raises(ValueError, match="student"):
        MotConfig(teacher_data=data)


def test_example_config_loads_and_names_unknown_fields(tmp_path):
    from pathlib import Path

    from distillkit.pipeline.config import load_config

    cfg = load_config(MotConfig, str(Path(__file__).resolve().parents[2] / "configs" / "mot.yaml"))
    assert cfg.rounds == 3 and len(cfg.teacher_data) == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: s\nteacher_data: [a]\nround: 2\n")
    with pytest.raises(ValueError, match="unknown config field.*'round'"):
        load_config(MotConfig, str(bad))


def test_rerun_with_another_config_is_refused_and_more_rounds_extend(setup, tmp_path, monkeypatch):
    import dataclasses

    from distillkit import InputError
    from distillkit.methods import mot

    root, student, data, evals = setup
    cfg = _cfg(root, student, data, evals, "reconfig", steps_per_round=1, eval_data=None,
               output_dir=str(tmp_path / "reconfig"))
    first = run(cfg)
    metrics = tmp_path / "reconfig" / "mot_metrics.json"
    before = metrics.read_text()
    with pytest.raises(InputError, match=r"lr: 0\.002 -> 0\.001"):
        run(dataclasses.replace(cfg, lr=1e-3))
    assert metrics.read_text() == before
    # more rounds extend the run (round 1 is kept, round 2 trains); fewer are then refused
    assert run(dataclasses.replace(cfg, rounds=2))[0] == first[0]
    with pytest.raises(InputError, match=r"rounds: 2 -> 1"):
        run(cfg)
    # records checked before any training
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"id": "e0", "question": "2 + 2", "answer": null}\n')
    monkeypatch.setattr(mot, "merge_round_local", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(InputError, match=r"eval\.jsonl:1 \(id 'e0'\): answer=None"):
        run(dataclasses.replace(cfg, output_dir=str(tmp_path / "bad"), eval_data=str(bad)))
    assert len(first) == 1
