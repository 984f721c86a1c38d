"""Resumable-run plumbing (distillkit.pipeline.runs): JSONL resume keeps every complete record, a torn tail is
kept aside, and a rerun's config is compared with the one the run was started with."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from distillkit import InputError
from distillkit.pipeline.runs import (
    RUN_CONFIG_NAME,
    append_record,
    begin_dir_run,
    begin_run,
    check_shard_configs,
    config_differences,
    merge_shard_records,
    read_records,
    select_shard,
    shard_of,
    write_records_atomic,
)


def _rec(i: int) -> bytes:
    return json.dumps({"id": f"q{i}", "v": i}).encode() + b"\n"


def test_every_complete_record_survives_and_only_the_torn_tail_moves(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    middle_bad = b'{"id": "qX", "v": \n'  # a complete line that does not parse: kept, skipped
    torn = b'{"id": "q9", "v'
    body = _rec(0) + b"\n" + _rec(1) + b"   \n" + middle_bad + b"[1, 2]\n" + _rec(2) + b'{"v": 7}\n' + _rec(3)
    path.write_bytes(body + torn)
    with caplog.at_level(logging.WARNING, logger="distillkit.pipeline.runs"):
        got = read_records(str(path), key="id")
    assert [r["id"] for r in got] == ["q0", "q1", "q2", "q3"]
    assert path.read_bytes() == body  # only the torn tail was cut
    assert (tmp_path / "out.jsonl.torn").read_bytes() == torn + b"\n"
    assert "line 5, 6, 8" in caplog.text and "torn" in caplog.text
    # appending continues on a line boundary; a second torn tail is appended to the same .torn file
    with open(path, "a", encoding="utf-8") as f:
        append_record(f, {"id": "q4"})
    path.write_bytes(path.read_bytes() + b'{"id": "q5"')
    assert [r["id"] for r in read_records(str(path), key="id")] == ["q0", "q1", "q2", "q3", "q4"]
    assert (tmp_path / "out.jsonl.torn").read_bytes() == torn + b'\n{"id": "q5"\n'


def test_a_last_record_missing_only_its_newline_is_kept_and_repaired(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(_rec(0) + _rec(1)[:-1])
    assert [r["id"] for r in read_records(str(path))] == ["q0", "q1"]
    assert path.read_bytes() == _rec(0) + _rec(1)
    assert not (tmp_path / "out.jsonl.torn").exists()
    assert read_records(str(tmp_path / "missing.jsonl")) == []


@dataclasses.dataclass
class _Cfg:
    lr: float = 0.1
    steps: int = 3
    limit: int | None = None
    names: list = dataclasses.field(default_factory=lambda: ["a"])
    save_every: int = 1
    progress: bool = True
    overwrite: bool = False


def test_config_differences_name_fields_and_allow_free_and_growing_ones():
    old = {"lr": 0.1, "steps": 3, "limit": 5, "names": ["a"], "save_every": 1, "progress": True,
           "overwrite": False}
    grows = {"limit": lambda a, b: b is None or (a is not None and b >= a)}
    assert config_differences(old, _Cfg(limit=5), extendable=grows) == []
    assert config_differences(old, _Cfg(lr=0.2, names=("a", "b"), limit=5, progress=False, overwrite=True,
                                        save_every=9), free=("save_every",), extendable=grows) == \
        ["lr: 0.1 -> 0.2", "names: ['a'] -> ['a', 'b']"]
    assert config_differences(old, _Cfg(limit=None), extendable=grows) == []  # None: every question
    assert config_differences(old, _Cfg(limit=4), extendable=grows) == ["limit: 5 -> 4"]
    assert config_differences(old, _Cfg(limit=4)) == ["limit: 5 -> 4"]
    # a field added after the run was recorded: unchanged at its default, named otherwise
    older = {k: v for k, v in old.items() if k != "save_every"}
    assert config_differences(older, _Cfg(limit=5)) == []
    assert config_differences(older, _Cfg(limit=5, save_every=2)) == ["save_every: (not recorded) -> 2"]


def test_dir_run_refuses_another_config_and_overwrite_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    begin_dir_run(_Cfg(), str(out))
    assert json.loads((out / RUN_CONFIG_NAME).read_text())["config"]["lr"] == 0.1
    begin_dir_run(_Cfg(lr=0.5), str(out))  # nothing written yet besides the record: nothing to protect
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(InputError, match=r"lr: 0\.5 -> 0\.2; steps: 3 -> 4.*--overwrite"):
        begin_dir_run(_Cfg(lr=0.2, steps=4), str(out))
    assert json.loads((out / RUN_CONFIG_NAME).read_text())["config"]["lr"] == 0.5  # unchanged by the refusal
    begin_dir_run(_Cfg(lr=0.5, progress=False, overwrite=True), str(out))  # same config: resumes, nothing moves
    assert (out / "metrics.jsonl").exists()
    moved = begin_dir_run(_Cfg(lr=0.2, overwrite=True), str(out))
    assert len(moved) == 1 and os.path.basename(moved[0]).startswith("run.replaced-")
    assert (tmp_path / os.path.basename(moved[0]) / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert os.listdir(out) == [RUN_CONFIG_NAME]
    assert json.loads((out / RUN_CONFIG_NAME).read_text())["config"]["lr"] == 0.2


def test_a_run_recorded_before_run_configs_is_checked_against_its_summary(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"config": {"lr": 0.1, "steps": 3}}))
    with pytest.raises(InputError, match="steps: 3 -> 5"):
        begin_dir_run(_Cfg(steps=5), str(out), previous_from="summary.json")
    begin_dir_run(_Cfg(), str(out), previous_from="summary.json")
    assert (out / RUN_CONFIG_NAME).exists()


def test_unreadable_run_config_is_refused_not_replaced(tmp_path):
    record = tmp_path / "r.json"
    record.write_text('{"config": ')
    with pytest.raises(InputError, match="cannot be read"):
        begin_run(_Cfg(), str(record), run_exists=True, outputs=[], what="x")
    assert record.read_text() == '{"config": '


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------
def test_shards_split_by_a_stable_hash_of_the_id():
    items = [{"id": f"q{i}"} for i in range(200)]
    shards = [select_shard(items, 3, i) for i in range(3)]
    assert sorted((it["id"] for sh in shards for it in sh), key=lambda k: int(k[1:])) == [it["id"] for it in items]
    assert all(40 < len(sh) < 90 for sh in shards)  # roughly even
    # by id, not position: reversing or cutting the input moves no item to another shard
    assert [it["id"] for it in select_shard(items[::-1], 3, 1)] == [it["id"] for it in shards[1]][::-1]
    assert select_shard(items[:50], 3, 1) == [it for it in shards[1] if int(it["id"][1:]) < 50]
    # the same on every machine and Python: SHA-256 of str(id), first 8 bytes, big-endian, modulo N
    assert [shard_of(k, 7) for k in ("q0", "q1", 12345)] == [shard_of("q0", 7), shard_of("q1", 7), shard_of("12345", 7)]
    assert shard_of("q0", 1000) == int.from_bytes(__import__("hashlib").sha256(b"q0").digest()[:8], "big") % 1000
    assert select_shard(items, 1, 0) == items
    for bad in [(0, 0), (2, 2), (2, -1), (True, 0)]:
        with pytest.raises(InputError, match="num_shards|shard_index"):
            select_shard(items, *bad)


def test_merge_puts_records_in_input_order_and_refuses_overlaps_and_gaps(tmp_path):
    ids = [f"q{i}" for i in range(6)]
    paths = []
    for i in range(2):
        path = tmp_path / f"s{i}.jsonl"
        write_records_atomic(str(path), [{"id": k, "shard": i} for k in reversed(ids) if shard_of(k, 2) == i])
        paths.append(str(path))
    merged = merge_shard_records(paths, ids)
    assert [r["id"] for r in merged] == ids and all(r["shard"] == shard_of(r["id"], 2) for r in merged)
    with pytest.raises(InputError, match="in two shards"):
        merge_shard_records([paths[0], paths[0]], ids)
    with pytest.raises(InputError, match="in no shard"):
        merge_shard_records(paths[:1], ids)
    with pytest.raises(InputError, match="not in the input"):
        merge_shard_records(paths, ids[:-1])
    with pytest.raises(InputError, match="no such shard"):
        merge_shard_records([str(tmp_path / "nope.jsonl")], ids)


def test_shard_configs_must_come_from_one_sharded_run():
    base = {"input_path": "q.jsonl", "num_shards": 2, "beam_size": 4}
    a, b = ("a", {**base, "shard_index": 0, "output_path": "a"}), ("b", {**base, "shard_index": 1, "output_path": "b"})
    assert check_shard_configs([a, b])["beam_size"] == 4
    with pytest.raises(InputError, match="both shard 0"):
        check_shard_configs([a, ("c", {**a[1]})])
    with pytest.raises(InputError, match="num_shards=2; give all 2"):
        check_shard_configs([a])
    with pytest.raises(InputError, match="beam_size: 4 vs 2"):
        check_shard_configs([a, ("b", {**b[1], "beam_size": 2})])
    with pytest.raises(InputError, match="different num_shards"):
        check_shard_configs([a, ("b", {**b[1], "num_shards": 3})])
