"""Sharded CoRD runs: --num-shards N --shard-index i split the questions by a stable hash of their id, and
`distillkit cord --merge-shards OUT SHARD...` gives the records, summary and plot of one unsharded run."""
from __future__ import annotations

import json
import os

import pytest
import torch

from distillkit import InputError
from distillkit.methods.cord import CordConfig, cli, load_done, run
from distillkit.pipeline.runs import shard_of
from distillkit.teachers.base import Proposal, Teacher


class Teacher3(Teacher):
    """Step d of teacher X is "X<d>|", the third ends the reasoning; the answer " The final answer is 1."."""

    def __init__(self, name):
        self.name = name

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        out = []
        for p in prefixes:
            if p.endswith("</think>"):
                out.append([Proposal(" The final answer is 1.", 5, True, "eos")] * n)
                continue
            d = p.count("|")
            out.append([Proposal(f"{self.name}{d}" + ("</think>" if d >= 2 else "|"), 2, d >= 2)] * n)
        return out


class Scorer:
    tokens_processed = 0

    def score(self, pairs, *, prefixes=None):
        self.tokens_processed += len(pairs)
        return torch.tensor([float(c.count("B") + len(c) % 3) for c, _ in pairs])


def _cfg(tmp_path, out, **kw) -> CordConfig:
    return CordConfig(**{**dict(teachers=["A", "B"], meta_prover="M", input_path=str(tmp_path / "in.jsonl"),
                                output_path=str(out), segmentation="line-break", beam_size=2, max_steps=5,
                                token_budget=100, max_step_tokens=10, temperature=0.0, n_curation=1,
                                progress=False), **kw})


def _run(cfg):
    return run(cfg, teachers=[Teacher3("A"), Teacher3("B")], meta_prover=Scorer())


@pytest.fixture
def questions(tmp_path):
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(9):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {i}?", "answer": "1"}) + "\n")
    return [f"q{i}" for i in range(9)]


def test_shards_merge_into_the_unsharded_run(tmp_path, questions, capsys):
    whole = _run(_cfg(tmp_path, tmp_path / "whole.jsonl"))
    shards = []
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        _run(_cfg(tmp_path, out, num_shards=3, shard_index=i))
        got = [r["id"] for r in load_done(str(out))]
        assert sorted(got) == sorted(q for q in questions if shard_of(q, 3) == i)
        shards.append(str(out))
    merged = tmp_path / "merged.jsonl"
    assert cli(["--merge-shards", str(merged), *shards[::-1]]) == 0
    assert "records:" in capsys.readouterr().out
    assert merged.read_text() == (tmp_path / "whole.jsonl").read_text()  # input order, the same records
    with open(str(merged) + ".summary.json") as f:
        summary = json.load(f)
    assert summary == json.loads(json.dumps(whole))
    assert os.path.getsize(str(merged) + ".hit_rates.png") > 0
    # the merged output is the unsharded run's: rerunning that config has nothing left to do (no models)
    run(_cfg(tmp_path, merged), teachers=[], meta_prover=None)
    assert merged.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_merge_refuses_missing_overlapping_and_unfinished_shards(tmp_path, questions):
    shards = []
    for i in range(2):
        out = tmp_path / f"shard{i}.jsonl"
        _run(_cfg(tmp_path, out, num_shards=2, shard_index=i))
        shards.append(str(out))
    with pytest.raises(InputError, match="give all 2"):
        cli(["--merge-shards", str(tmp_path / "m1.jsonl"), shards[0]])
    with pytest.raises(InputError, match="both shard 0"):
        cli(["--merge-shards", str(tmp_path / "m2.jsonl"), shards[0], shards[0]])
    with pytest.raises(InputError, match="no run config"):
        cli(["--merge-shards", str(tmp_path / "m3.jsonl"), shards[0], str(tmp_path / "in.jsonl")])
    lines = open(shards[1]).read().splitlines(keepends=True)
    with open(shards[1], "w") as f:
        f.writelines(lines[:-1])  # shard 1 not finished
    with pytest.raises(InputError, match="1 of 9 ids are in no shard"):
        cli(["--merge-shards", str(tmp_path / "m4.jsonl"), *shards])
    with pytest.raises(InputError, match="exists"):
        cli(["--merge-shards", shards[0], *shards])
    other = tmp_path / "other.jsonl"
    _run(_cfg(tmp_path, other, num_shards=2, shard_index=1, beam_size=1))
    with pytest.raises(InputError, match="different configs: beam_size: 2 vs 1"):
        cli(["--merge-shards", str(tmp_path / "m5.jsonl"), shards[0], str(other)])
    assert not any(os.path.exists(tmp_path / f"m{i}.jsonl") for i in range(1, 6))


def test_shard_flags_are_checked(tmp_path):
    with pytest.raises(InputError, match="shard_index=2"):
        _cfg(tmp_path, tmp_path / "o.jsonl", num_shards=2, shard_index=2)
    with pytest.raises(InputError, match="num_shards=0"):
        _cfg(tmp_path, tmp_path / "o.jsonl", num_shards=0)
