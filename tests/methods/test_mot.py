"""MoT: filtering, a K=2 round equals two manual SFT runs + average_, torchrun equals one process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillkit._errors import InputError
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()),
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
    # data-parallel branches need a torchrun launch: refused before any model loads, naming it
    with pytest.raises(InputError, match="torchrun"):
        run(_cfg(root, student, data, evals, "x", strategy="ddp", device="cpu"))


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


# ---- the paper's protocol: one trace per prompt, the best round, sampled evaluation, TIES/DARE bases ----

def test_one_random_correct_trace_per_prompt_per_teacher(tmp_path):
    from distillkit.methods.mot import one_trace_per_prompt

    rows = []
    for q in range(6):
        for j in range(4):  # four correct traces per question, and a wrong one MoT never picks
            rows.append({"id": f"{q}-{j}", "question": f"{q} + 1", "answer": str(q + 1),
                         "response": f" trace {j}: {q} + 1 = {q + 1}</think> The final answer is {q + 1}."})
        rows.append({"id": f"{q}-bad", "question": f"{q} + 1", "answer": str(q + 1),
                     "response": " The final answer is 99."})
    path = _write(tmp_path / "t.jsonl", rows)
    base = dict(student="s", teacher_data=[path, path], seed=3)
    one = load_teacher_datasets(MotConfig(**base))
    assert MotConfig(**base).traces_per_prompt == "one"
    for exs in one:
        assert len(exs) == 6 and len({ex.prompt for ex in exs}) == 6
        assert all("99" not in ex.response for ex in exs)
    assert one == load_teacher_datasets(MotConfig(**base))  # seeded: the same draw again
    assert [ex.id for ex in one[0]] != [ex.id for ex in one[1]]  # each teacher draws its own
    picks = {tuple(ex.id for ex in one_trace_per_prompt(load_examples(path), seed)) for seed in range(8)}
    assert len(picks) > 1  # random, not the first trace
    every = load_teacher_datasets(MotConfig(**base, traces_per_prompt="all"))
    assert [len(exs) for exs in every] == [24, 24]
    with pytest.raises(ValueError, match="traces_per_prompt"):
        MotConfig(**base, traces_per_prompt="two")


@pytest.mark.slow
@pytest.mark.timeout(300)  # two rounds of two one-step branches, evaluated: 12 s measured
def test_best_round_is_returned_not_the_last(setup, tmp_path):
    from distillkit.methods.mot import best_round

    assert best_round([{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": 0.6}], "best") == 1
    assert best_round([{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": 0.7}], "best") == 1
    assert best_round([{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": 0.6}], "last") == 2
    assert best_round([{"round": 1}, {"round": 2}], "best") == 1  # not evaluated: the last
    root, student, data, evals = setup
    cfg = _cfg(root, student, data, evals, "best", rounds=2, steps_per_round=1, output_dir=str(tmp_path / "best"))
    history = run(cfg)
    chosen = best_round(history, "best")
    record = json.loads((tmp_path / "best" / "mot_metrics.json").read_text())
    assert record["final_round"] == chosen + 1
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "best" / "final").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "best" / f"round{chosen}" / "merged").state_dict()
    assert all(torch.equal(final[k], want[k]) for k in want)


def test_evaluation_averages_sampled_runs(setup, tmp_path):
    from distillkit.methods.mot import sampled_accuracy

    root, student, data, evals = setup
    model = AutoModelForCausalLM.from_pretrained(student)
    tok = build_tokenizer()
    questions = [{"id": f"e{i}", "question": f"{i} + 0", "answer": str(i % 10)} for i in range(10)]
    cfg = _cfg(root, student, data, evals, "x", eval_samples=3, eval_temperature=3.0, max_new_tokens=3)
    runs = sampled_accuracy(model, tok, questions, cfg, seed=1)
    assert len(runs) == 3 and all(0 <= a <= 1 for a in runs)
    assert runs == sampled_accuracy(model, tok, questions, cfg, seed=1)  # seeded
    assert len(set(runs)) > 1  # sampled: the runs differ
    # through a round's evaluation: the accuracy is the mean of the runs
    from distillkit.methods.mot import evaluate_round

    cfg = _cfg(root, student, data, evals, "x", eval_samples=2, eval_temperature=3.0, max_new_tokens=3)
    got = evaluate_round(cfg, tok, -1, torch.device("cpu"), [load_examples(data[0])[:2]])
    assert len(got["accuracy_samples"]) == 2
    assert got["accuracy"] == pytest.approx(sum(got["accuracy_samples"]) / 2)
    with pytest.raises(ValueError, match="eval_samples"):
        _cfg(root, student, data, evals, "x", eval_samples=0)


def _hub_cache(root, repo_id, src):
    """A Hugging Face Hub cache holding ``src``'s files as ``repo_id`` (what a download leaves on disk)."""
    import shutil

    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return str(root)


@pytest.mark.slow
@pytest.mark.timeout(300)  # one round of two one-step branches and a TIES merge: 8-11 s measured
@pytest.mark.parametrize("where", ["hub_id", "bfloat16_dir"])
def test_ties_in_round_one_takes_a_hub_id_or_another_dtype_as_base(setup, tmp_path, monkeypatch, where):
    import huggingface_hub.constants as hub

    from distillkit.merge import merge_checkpoints

    root, student, data, evals = setup
    bf16 = tmp_path / "student-bf16"
    AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16).save_pretrained(bf16)
    build_tokenizer().save_pretrained(bf16)
    name = str(bf16)
    if where == "hub_id":  # a Hub id resolved from the local Hub cache (offline: nothing is downloaded)
        cache = _hub_cache(tmp_path / "hub", "tiny-org/tiny-student", bf16)
        monkeypatch.setattr(hub, "HF_HUB_CACHE", cache)
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        name = "tiny-org/tiny-student"
    out = tmp_path / "ties"
    cfg = _cfg(root, name, data, evals, "x", merge="ties", density=0.5, steps_per_round=1, eval_data=None,
               output_dir=str(out))
    run(cfg)
    # the base is the student loaded as the branches are (float32): the same merge by hand
    base = tmp_path / "base32"
    AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).save_pretrained(base)
    merge_checkpoints([out / "round0" / f"branch{k}" / "model" for k in range(2)], tmp_path / "manual",
                      method="ties", base=base, weights=[1.0, 1.0], density=0.5, lam=1.0, progress=False)
    got = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "manual").state_dict()
    assert got["lm_head.weight"].dtype == torch.float32
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_inputs_from_a_dataset_folder_with_a_field_mapping_and_a_chat_template(setup, tmp_path):
    """teacher_data as a Hugging Face dataset folder with other column names (fields, split) reads the same traces
    as the JSONL; chat_template reaches the branches' collator; bad values are named."""
    datasets = pytest.importorskip("datasets")
    from distillkit.methods.mot import _collator

    root, student, data, evals = setup
    rows = [json.loads(x) for x in open(data[0])]
    renamed = [{"problem": r["question"], "solution": r["answer"], "trace": r["response"], "id": r["id"]}
               for r in rows]
    folder = str(tmp_path / "teacher0")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(renamed)}).save_to_disk(folder)
    plain = load_teacher_datasets(_cfg(root, student, data, evals, "f"))
    mapped = load_teacher_datasets(_cfg(root, student, [folder], evals, "f", split="train",
                                        fields={"question": "problem", "answer": "solution", "response": "trace"}))
    assert [(e.prompt, e.response, e.answer) for e in mapped[0]] == [(e.prompt, e.response, e.answer)
                                                                      for e in plain[0]]
    cfg = _cfg(root, student, data, evals, "f", chat_template="auto", system_prompt="Think step by step.")
    collate = _collator(cfg, build_tokenizer())
    assert (collate.chat_template, collate.system_prompt) == ("auto", "Think step by step.")
    with pytest.raises(InputError, match="chat_template"):
        _cfg(root, student, data, evals, "f", chat_template="chatml")
    with pytest.raises(InputError, match="fields"):
        _cfg(root, student, data, evals, "f", fields={"question": 3})
