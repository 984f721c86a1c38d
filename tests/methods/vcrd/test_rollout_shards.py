"""VCRD's offline rollouts in shards: --num-shards N --shard-index i draw the rollouts of one shard of the prompt
batches and stop before training; `distillkit vcrd --merge-shards OUT_DIR SHARD_DIR...` gives the rollouts of one
unsharded run, on which the unsharded run then trains, without drawing any, to the same weights bit for bit; bad
merges are refused by name."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from distillkit import InputError
from distillkit.methods import vcrd
from distillkit.methods.vcrd import VcrdConfig
from distillkit.methods.vcrd import runner as vcrd_runner
from distillkit.pipeline.runs import RUN_CONFIG_NAME, config_values, shard_of
from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint

NUM_PROMPTS, BATCH, SHARDS = 7, 2, 3  # 4 batches of the unsharded run (2, 2, 2, 1 prompts) over 3 shards


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcrd-shards")
    tok = build_tokenizer()
    student = save_tiny_checkpoint(root / "student", tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    teacher = save_tiny_checkpoint(root / "teacher", arch="qwen2", tokenizer=tok, hidden_size=48, num_layers=2,
                                   num_heads=2, seed=4)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i} + {i}", "answer": str(2 * i)}) + "\n"
                               for i in range(NUM_PROMPTS)))
    return root, student, teacher, str(prompts)


def _cfg(ckpts, name, **kw) -> VcrdConfig:
    root, student, teacher, prompts = ckpts
    base = dict(student=student, teacher=teacher, prompts=prompts, output_dir=str(root / name), steps=2,
                batch_size=BATCH, lr=1e-2, rollout_tokens=6, temperature=1.0, top_k=8, eval_data=None,
                save_every=0, progress=False, seed=5)
    base.update(kw)
    return VcrdConfig(**base)


def _rows(out_dir):
    with open(os.path.join(out_dir, "rollouts.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def shards(ckpts):
    """The shard runs' output_dirs (each drawn by run() with num_shards=3)."""
    root, student, teacher, prompts = ckpts
    dirs = []
    for i in range(SHARDS):
        cfg = _cfg(ckpts, f"shard{i}", num_shards=SHARDS, shard_index=i)
        if i == 0:  # the command line's flags
            assert vcrd_runner.cli([
                "--student", student, "--teacher", teacher, "--prompts", prompts, "--output-dir", cfg.output_dir,
                "--max-steps", "2", "--batch-size", str(BATCH), "--lr", "1e-2", "--rollout-tokens", "6",
                "--temperature", "1.0", "--top-k", "8", "--save-every", "0", "--seed", "5",
                "--num-shards", str(SHARDS), "--shard-index", "0"]) == 0
            with open(os.path.join(cfg.output_dir, RUN_CONFIG_NAME)) as f:
                recorded = json.load(f)["config"]
            assert {**recorded, "progress": False} == json.loads(json.dumps(config_values(cfg)))
        else:
            summary = vcrd.run(cfg)
            assert summary["shard"] == {"index": i, "of": SHARDS} and summary["sides"] == ["teacher", "student"]
        assert not os.path.exists(os.path.join(cfg.output_dir, "final"))  # stopped before training
        dirs.append(cfg.output_dir)
    return dirs


@pytest.mark.timeout(120)
def test_shards_cover_every_prompt_once_and_merge_into_the_unsharded_run(ckpts, shards, monkeypatch, capsys):
    whole = _cfg(ckpts, "whole")
    vcrd.run(whole)
    expected = _rows(whole.output_dir)
    assert [r["id"] for r in expected] == [str(i) for i in range(NUM_PROMPTS)]

    # every prompt in exactly one shard, whole batches, each batch in the shard its prompts' hash names
    seen = []
    for i, d in enumerate(shards):
        ids = [int(r["id"]) for r in _rows(d)]
        seen += ids
        for b in {k // BATCH for k in ids}:
            batch = [p["prompt"] for p in expected[b * BATCH:(b + 1) * BATCH]]
            assert shard_of("\x1f".join(batch), SHARDS) == i
            assert set(range(b * BATCH, min(NUM_PROMPTS, (b + 1) * BATCH))) <= set(ids)
    assert sorted(seen) == list(range(NUM_PROMPTS))
    assert sum(1 for d in shards if _rows(d)) >= 2  # the split is a real one here

    out = str(ckpts[0] / "merged")
    assert vcrd_runner.cli(["--merge-shards", out, *shards[::-1]]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == NUM_PROMPTS
    assert _rows(out) == expected  # the same texts, token counts and stop reasons, in the unsharded order

    # the unsharded config on the merged directory trains without drawing a rollout, to the same weights
    def no_drawing(*a, **k):
        raise AssertionError("the merged run drew rollouts")

    monkeypatch.setattr(vcrd_runner, "_propose_all", no_drawing)
    summary = vcrd.run(dataclasses.replace(whole, output_dir=out))
    assert summary["step"] == 2
    final, merged = _state(os.path.join(whole.output_dir, "final")), _state(os.path.join(out, "final"))
    for k in final:
        torch.testing.assert_close(merged[k], final[k], rtol=0, atol=0, msg=k)


@pytest.mark.timeout(120)
def test_shards_with_an_sft_stage_draw_the_teacher_side_and_merge(ckpts, monkeypatch):
    # the student's offline rollouts come from the fine-tuned student: the unsharded run draws them after SFT
    whole = _cfg(ckpts, "sft-whole", sft_steps=1, steps=1)
    vcrd.run(whole)
    dirs = []
    for i in range(2):
        cfg = dataclasses.replace(whole, output_dir=str(ckpts[0] / f"sft-shard{i}"), num_shards=2, shard_index=i)
        assert vcrd.run(cfg)["sides"] == ["teacher"]
        assert all("student" not in r for r in _rows(cfg.output_dir))
        dirs.append(cfg.output_dir)
    out = str(ckpts[0] / "sft-merged")
    assert vcrd_runner.merge_rollout_shards(out, dirs)["sides"] == ["teacher"]
    drawn, real = [], vcrd_runner._propose_all
    monkeypatch.setattr(vcrd_runner, "_propose_all", lambda *a: drawn.append(a[4]) or real(*a))
    vcrd.run(dataclasses.replace(whole, output_dir=out))
    assert drawn == [1]  # the student's side only: the teacher's came from the shards
    assert _rows(out) == _rows(whole.output_dir)
    final, merged = _state(os.path.join(whole.output_dir, "final")), _state(os.path.join(out, "final"))
    for k in final:
        torch.testing.assert_close(merged[k], final[k], rtol=0, atol=0, msg=k)


def _copy(shards, tmp_path):
    dirs = []
    for i, d in enumerate(shards):
        dirs.append(str(tmp_path / f"s{i}"))
        shutil.copytree(d, dirs[-1])
    return dirs


def _rewrite(path, edit):
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rows = edit(rows)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _merge(tmp_path, name, dirs):
    return vcrd_runner.merge_rollout_shards(str(tmp_path / name), dirs)


def test_bad_merges_are_refused_by_name(ckpts, shards, tmp_path):
    nonempty = [i for i, d in enumerate(shards) if _rows(d)]
    a, b = nonempty[:2]
    with pytest.raises(InputError, match="give all 3"):
        _merge(tmp_path, "m1", shards[:2])
    with pytest.raises(InputError, match=f"both shard {b}"):
        _merge(tmp_path, "m2", [shards[a], shards[b], shards[b]])
    with pytest.raises(InputError, match="not empty"):
        vcrd_runner.merge_rollout_shards(shards[0], shards)
    with pytest.raises(InputError, match="no run config"):
        _merge(tmp_path, "m3", [*shards[:2], str(tmp_path)])

    dirs = _copy(shards, tmp_path / "mixed")  # a shard made with another temperature
    _rewrite_cfg = os.path.join(dirs[b], RUN_CONFIG_NAME)
    with open(_rewrite_cfg) as f:
        rec = json.load(f)
    rec["config"]["temperature"] = 0.5
    with open(_rewrite_cfg, "w") as f:
        json.dump(rec, f)
    with pytest.raises(InputError, match="different configs: temperature"):
        _merge(tmp_path, "m4", dirs)

    dirs = _copy(shards, tmp_path / "overlap")  # a prompt in two shards
    extra = _rows(dirs[a])[0]
    _rewrite(os.path.join(dirs[b], "rollouts.jsonl"), lambda rows: [*rows, extra])
    with pytest.raises(InputError, match=f"id '{extra['id']}' is in two shards"):
        _merge(tmp_path, "m5", dirs)

    dirs = _copy(shards, tmp_path / "gap")  # a shard killed before it wrote all its prompts
    _rewrite(os.path.join(dirs[a], "rollouts.jsonl"), lambda rows: rows[:-1])
    with pytest.raises(InputError, match="1 of 7 ids are in no shard"):
        _merge(tmp_path, "m6", dirs)

    dirs = _copy(shards, tmp_path / "half")  # a shard killed after its teacher side, before its student side
    _rewrite(os.path.join(dirs[a], "rollouts.jsonl"), lambda rows: [{k: v for k, v in r.items() if k != "student"}
                                                                     for r in rows])
    with pytest.raises(InputError, match="has no student rollout: its shard has not finished"):
        _merge(tmp_path, "m7", dirs)

    dirs = _copy(shards, tmp_path / "prompts")  # rollouts of other prompts
    _rewrite(os.path.join(dirs[a], "rollouts.jsonl"), lambda rows: [{**r, "prompt": r["prompt"] + " x"}
                                                                     for r in rows])
    with pytest.raises(InputError, match="is not the input's prompt"):
        _merge(tmp_path, "m8", dirs)
    assert not any(os.path.exists(tmp_path / f"m{i}" / "rollouts.jsonl") for i in range(1, 9))


@pytest.mark.parametrize("kw, match", [
    (dict(num_shards=0), "num_shards=0"),
    (dict(num_shards=2, shard_index=2), r"shard_index=2: expected an integer in \[0, num_shards=2\)"),
    (dict(num_shards=2, rollouts="online"), "rollouts='online' with sft_steps=0 draws none"),
])
def test_shard_config_errors_name_the_field(kw, match):
    with pytest.raises(InputError, match=match):
        VcrdConfig(student="s", teacher="t", prompts="p", **kw)
