"""QR-Distill path generation in shards: --num-shards N --shard-index i write one shard's paths and stop before
training; `distillkit qr-distill --merge-shards OUT_DIR SHARD_DIR...` gives the paths of one unsharded run, which
then trains on them without generating anything."""
from __future__ import annotations

import json
import os

import pytest

from distillkit import InputError
from distillkit.methods.qr_distill import QRDistillConfig, collect_paths, run
from distillkit.methods.qr_distill.runner import cli
from distillkit.pipeline.runs import RUN_CONFIG_NAME, begin_dir_run, shard_of
from distillkit.teachers.base import Proposal, Teacher


class CountingTeacher(Teacher):
    """Writes " <question> = 1. The final answer is 1." for every prompt; counts the prompts."""

    def __init__(self, name="t"):
        self.name, self.prompts = name, 0

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        self.prompts += len(prefixes)
        return [[Proposal(f" seed {seed} j{j}. The final answer is 1.", 9, True, "eos") for j in range(n)]
                for _ in prefixes]


def _cfg(tmp_path, name, **kw) -> QRDistillConfig:
    base = dict(input_path=str(tmp_path / "q.jsonl"), output_dir=str(tmp_path / name), teachers=["t1", "t2"],
                teacher_names=["t1", "t2"], students=["s0", "s1"], styles=["vanilla", "backward"],
                paths_per_style=2, temperature=0.7, routing="random", progress=False)
    base.update(kw)
    return QRDistillConfig(**base)


@pytest.fixture
def questions(tmp_path):
    with open(tmp_path / "q.jsonl", "w") as f:
        for i in range(7):
            f.write(json.dumps({"id": f"q{i}", "question": f"{i} + 0", "answer": "1"}) + "\n")


def test_path_shards_merge_into_the_unsharded_paths(tmp_path, questions, capsys):
    whole = _cfg(tmp_path, "whole")
    collect_paths(whole, teachers=[CountingTeacher("t1"), CountingTeacher("t2")])
    shard_dirs = []
    for i in range(3):
        cfg = _cfg(tmp_path, f"shard{i}", num_shards=3, shard_index=i)
        summary = run(cfg, teachers=[CountingTeacher("t1"), CountingTeacher("t2")])
        assert summary["shard"] == {"index": i, "of": 3}  # stopped before training: no students loaded
        with open(cfg.paths_file()) as f:
            qids = {json.loads(line)["qid"] for line in f}
        assert qids == {f"q{k}" for k in range(7) if shard_of(f"q{k}", 3) == i}
        shard_dirs.append(cfg.output_dir)
    out = str(tmp_path / "merged")
    assert cli(["--merge-shards", out, *shard_dirs[::-1]]) == 0
    assert json.loads(capsys.readouterr().out.split("\npaths:")[0])["total"] == 7 * 2 * 2 * 2
    with open(os.path.join(out, "paths.jsonl")) as a, open(whole.paths_file()) as b:
        assert a.read() == b.read()  # the same records (seeds by question id), in the unsharded order
    # the unsharded config on the merged directory: accepted as its own run, nothing left to generate
    merged = _cfg(tmp_path, "merged")
    begin_dir_run(merged, out)
    idle = [CountingTeacher("t1"), CountingTeacher("t2")]
    assert len(collect_paths(merged, teachers=idle)) == 7 * 8 and idle[0].prompts == idle[1].prompts == 0
    assert os.path.isfile(os.path.join(out, RUN_CONFIG_NAME))


def test_path_merge_refuses_missing_and_overlapping_shards(tmp_path, questions):
    dirs = []
    for i in range(2):
        cfg = _cfg(tmp_path, f"s{i}", num_shards=2, shard_index=i)
        run(cfg, teachers=[CountingTeacher("t1"), CountingTeacher("t2")])
        dirs.append(cfg.output_dir)
    with pytest.raises(InputError, match="give all 2"):
        cli(["--merge-shards", str(tmp_path / "m1"), dirs[0]])
    with pytest.raises(InputError, match="both shard 1"):
        cli(["--merge-shards", str(tmp_path / "m2"), dirs[1], dirs[1]])
    with pytest.raises(InputError, match="not empty"):
        cli(["--merge-shards", dirs[0], *dirs])
    with pytest.raises(InputError, match="no run config"):
        cli(["--merge-shards", str(tmp_path / "m3"), dirs[0], str(tmp_path)])
