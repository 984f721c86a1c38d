"""Streaming safetensors merge: equal to the in-memory merge, sharded I/O, atomic output, CLI."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from distillkit.cli import main as cli_main
from distillkit.merge import average_, dare, merge_checkpoints, ties


def _write_ckpt(path, tensors, shards=1):
    os.makedirs(path, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "toy", "seed": str(path)}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{}")
    return path


def _load_dir(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _tensors(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g).to(dtype),
        "layers.0.w": torch.randn(16, 16, generator=g).to(dtype),
        "layers.0.b": torch.randn(16, generator=g).to(dtype),
        "layers.1.w": torch.randn(16, 48, generator=g).to(dtype),
        "head.weight": torch.randn(50, 16, generator=g).to(dtype),
        "position_ids": torch.arange(8),
    }


@pytest.fixture
def ckpts(tmp_path):
    a = _write_ckpt(tmp_path / "a", _tensors(1))
    b = _write_ckpt(tmp_path / "b", _tensors(2), shards=3)  # sharded input
    c = _write_ckpt(tmp_path / "c", _tensors(3))
    base = _write_ckpt(tmp_path / "base", _tensors(0))
    return [a, b, c], base


def test_streaming_average_equals_in_memory_exactly(ckpts, tmp_path):
    paths, _ = ckpts
    weights = [0.2, 0.3, 0.5]
    out = merge_checkpoints(paths, tmp_path / "out", weights=weights, max_shard_size=1500, progress=False)
    got = _load_dir(out)
    srcs = [_load_dir(p) for p in paths]
    want = {k: v.clone() for k, v in srcs[0].items()}
    average_(want, srcs, weights, backend="cpu")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # same kernel, same order: bit-identical
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert len(set(index["weight_map"].values())) > 1
    assert all((out / f).exists() for f in index["weight_map"].values())
    assert json.loads((out / "config.json").read_text())["seed"] == str(paths[0])  # side files from the first
    assert (out / "tokenizer.json").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_streaming_ties_and_dare_equal_in_memory(ckpts, tmp_path):
    paths, base = ckpts
    srcs = [_load_dir(p) for p in paths]
    b = _load_dir(base)
    out = merge_checkpoints(paths, tmp_path / "ties", method="ties", base=base, density=0.4, lam=0.9, progress=False)
    want = ties(b, srcs, density=0.4, lam=0.9)
    got = _load_dir(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "model.safetensors").exists()  # fits in one shard: HF's single-file layout
    out = merge_checkpoints(paths, tmp_path / "dare", method="dare_ties", base=base, density=0.5, seed=3,
                            progress=False)
    want = dare(b, srcs, density=0.5, ties=True, seed=3)
    got = _load_dir(out)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bf16_checkpoints_stay_bf16(tmp_path):
    paths = [_write_ckpt(tmp_path / f"m{i}", _tensors(i, torch.bfloat16)) for i in range(2)]
    got = _load_dir(merge_checkpoints(paths, tmp_path / "out", progress=False))
    assert got["layers.0.w"].dtype == torch.bfloat16
    want = ((_tensors(0, torch.bfloat16)["layers.0.w"].float() + _tensors(1, torch.bfloat16)["layers.0.w"].float()) / 2)
    torch.testing.assert_close(got["layers.0.w"], want.bfloat16(), rtol=0, atol=0)


def test_bad_inputs(ckpts, tmp_path):
    paths, base = ckpts
    with pytest.raises(ValueError, match="exists"):
        merge_checkpoints(paths, paths[0], progress=False)
    with pytest.raises(ValueError, match="needs base"):
        merge_checkpoints(paths, tmp_path / "x", method="ties", progress=False)
    with pytest.raises(ValueError, match="method="):
        merge_checkpoints(paths, tmp_path / "x", method="slerp", progress=False)
    odd = _tensors(9)
    del odd["layers.1.w"]
    _write_ckpt(tmp_path / "odd", odd)
    with pytest.raises(ValueError, match="paths\\[1\\].*missing keys \\['layers.1.w'\\]"):
        merge_checkpoints([paths[0], tmp_path / "odd"], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="density"):
        merge_checkpoints(paths, tmp_path / "x", method="dare", base=base, density=0, progress=False)
    with pytest.raises(ValueError, match="is not a directory"):
        merge_checkpoints([tmp_path / "nope"], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()


def test_overwrite_replaces_only_when_complete(ckpts, tmp_path):
    paths, _ = ckpts
    out = merge_checkpoints(paths[:2], tmp_path / "out", progress=False)
    first = _load_dir(out)["layers.0.w"].clone()
    merge_checkpoints(paths, tmp_path / "out", overwrite=True, progress=False)
    assert not torch.equal(_load_dir(out)["layers.0.w"], first)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_killed_merge_leaves_no_output_and_rerun_succeeds(tmp_path):
    big = {f"layer.{i}.w": torch.randn(256, 1024) for i in range(120)}  # 120 MiB per checkpoint
    paths = [_write_ckpt(tmp_path / f"m{i}", {k: v + i for k, v in big.items()}) for i in range(3)]
    out = tmp_path / "merged"
    script = textwrap.dedent(f"""
        from distillkit.merge import merge_checkpoints
        merge_checkpoints({[str(p) for p in paths]!r}, {str(out)!r}, max_shard_size=4_000_000, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    partial = tmp_path / ".merged.partial"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the merge has written some shards
        if partial.exists() and sum(1 for _ in partial.glob("*.tmp")) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("merge finished before it could be killed; make the test checkpoints larger")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    merge_checkpoints(paths, out, max_shard_size=4_000_000, progress=False)  # rerun clears the partial dir
    assert not partial.exists()
    got = _load_dir(out)
    torch.testing.assert_close(got["layer.7.w"], big["layer.7.w"] + 1.0)


def test_cli(ckpts, tmp_path, capsys):
    paths, base = ckpts
    rc = cli_main(["merge", *map(str, paths), "-o", str(tmp_path / "cli"), "--method", "dare", "--base", str(base),
                   "--density", "0.5", "--seed", "2", "--quiet"])
    assert rc == 0
    assert "merged 3 checkpoints (dare)" in capsys.readouterr().out
    want = dare(_load_dir(base), [_load_dir(p) for p in paths], density=0.5, seed=2)
    got = _load_dir(tmp_path / "cli")
    assert all(torch.equal(got[k], want[k]) for k in want)
