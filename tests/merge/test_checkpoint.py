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
    # exact: the sum of two bf16 values and its halving are exact in float32, then one rounding to bf16
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
        if partial.exists() and sum(1 for _ in partial.glob("*.safetensors")) >= 3:
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


# ---- issue 12: bounded open shards, index consistency, interrupted overwrite, sizes, method options ----

import shutil  # noqa: E402

from distillkit._errors import InputError  # noqa: E402
from distillkit.merge import checkpoint as ckpt_mod  # noqa: E402


def _open_input_shards(paths):
    """Input shard files this process has open or mapped right now (from /proc)."""
    roots = [os.path.realpath(p) for p in paths]
    seen = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            seen.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as f:
        seen.update(line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6)
    return {s for s in seen if s.endswith(".safetensors") and any(s.startswith(r + os.sep) for r in roots)}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts open files through /proc")
def test_merge_keeps_one_shard_per_checkpoint_open(tmp_path, monkeypatch):
    k, shards = 3, 3
    paths = [_write_ckpt(tmp_path / f"m{i}", _tensors(i), shards=shards) for i in range(k)]
    counts = []
    real = ckpt_mod.average_group_

    def counting(*args, **kwargs):  # called once per floating tensor, while its sources are being read
        counts.append(len(_open_input_shards(paths)))
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "average_group_", counting)
    out = merge_checkpoints(paths, tmp_path / "out", progress=False)
    assert len(counts) == 5
    assert 1 <= max(counts) <= k, counts  # never all k * shards input files at once
    assert not _open_input_shards(paths)  # everything closed afterwards
    srcs = [_load_dir(p) for p in paths]
    torch.testing.assert_close(_load_dir(out)["layers.1.w"], sum(s["layers.1.w"] for s in srcs) / 3)


def _rewrite_index(path, edit):
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))


def test_index_that_disagrees_with_its_shards_is_an_error(tmp_path):
    good = _write_ckpt(tmp_path / "good", _tensors(1))
    unlisted = _write_ckpt(tmp_path / "unlisted", _tensors(2), shards=2)
    _rewrite_index(unlisted, lambda wm: wm.pop("layers.0.b"))  # tensor still in its shard
    with pytest.raises(InputError, match=r"paths\[1\]: shard .* holds tensors \['layers.0.b'\] that "
                                         r"model.safetensors.index.json does not list"):
        merge_checkpoints([good, unlisted], tmp_path / "x", progress=False)
    moved = _write_ckpt(tmp_path / "moved", _tensors(2), shards=2)
    _rewrite_index(moved, lambda wm: wm.update({"layers.0.b": "model-00002-of-00002.safetensors"
                                                if wm["layers.0.b"].startswith("model-00001") else
                                                "model-00001-of-00002.safetensors"}))
    with pytest.raises(InputError, match="does not list|does not hold"):
        merge_checkpoints([good, moved], tmp_path / "x", progress=False)
    gone = _write_ckpt(tmp_path / "gone", _tensors(2), shards=2)
    os.remove(gone / "model-00002-of-00002.safetensors")
    with pytest.raises(InputError, match=r"paths\[1\]: .*lists shard 'model-00002-of-00002.safetensors', which does "
                                         r"not exist"):
        merge_checkpoints([good, gone], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()


def test_overwrite_refuses_an_existing_file(ckpts, tmp_path):
    paths, _ = ckpts
    target = tmp_path / "out"
    target.write_text("not a checkpoint")
    with pytest.raises(InputError, match="out_dir=.* is a file, not a directory"):
        merge_checkpoints(paths, target, overwrite=True, progress=False)
    assert target.read_text() == "not a checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_kill_between_renames_old_output_is_restored(ckpts, tmp_path):
    paths, _ = ckpts
    out = merge_checkpoints(paths[:2], tmp_path / "out", progress=False)
    first = _load_dir(out)["layers.0.w"].clone()
    # the state a kill between `out -> .out.old` and `.out.partial -> out` leaves behind
    os.replace(out, tmp_path / ".out.old")
    (tmp_path / ".out.partial").mkdir()
    with pytest.raises(InputError, match="exists"):  # the old output is back, so plain rerun refuses as before
        merge_checkpoints(paths, out, progress=False)
    assert torch.equal(_load_dir(out)["layers.0.w"], first)
    assert not (tmp_path / ".out.old").exists()
    os.replace(out, tmp_path / ".out.old")
    merge_checkpoints(paths, out, overwrite=True, progress=False)  # rerun of the killed command
    want = sum(_load_dir(p)["layers.0.w"] for p in paths) / 3
    torch.testing.assert_close(_load_dir(out)["layers.0.w"], want)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_kill_after_renames_leftover_old_is_removed(ckpts, tmp_path):
    paths, _ = ckpts
    out = merge_checkpoints(paths, tmp_path / "out", progress=False)
    merged = _load_dir(out)["layers.0.w"].clone()
    # the state a kill after `.out.partial -> out`, during the removal of the old output, leaves behind
    shutil.copytree(out, tmp_path / ".out.old")
    os.remove(tmp_path / ".out.old" / "config.json")
    with pytest.raises(InputError, match="exists"):
        merge_checkpoints(paths[:2], out, progress=False)
    assert not (tmp_path / ".out.old").exists()
    assert torch.equal(_load_dir(out)["layers.0.w"], merged)


@pytest.mark.parametrize("size,want", [
    ("500M", 500 * 10**6), ("500MB", 500 * 10**6), ("500mb", 500 * 10**6), ("2KiB", 2048), ("2kib", 2048),
    ("2Ki", 2048), ("2K", 2000), ("1.5GB", 1_500_000_000), ("5GiB", 5 * 2**30), ("5Gb", 5 * 10**9), (" 3 MiB ", 3 * 2**20),
    ("4096", 4096), ("4096B", 4096), (4096, 4096), ("1T", 10**12),
])
def test_parse_size_units(size, want):
    assert ckpt_mod.parse_size(size) == want


@pytest.mark.parametrize("size", ["abc", "", "0", "0.1", "-1", "5XB", "1e3", "M", "2 G B", True, 1.5, 0, -5, None])
def test_parse_size_refuses_non_sizes(size):
    with pytest.raises(InputError, match="^max_shard_size: "):
        ckpt_mod.parse_size(size)


def test_options_that_do_not_apply_to_the_method_are_errors(ckpts, tmp_path):
    paths, base = ckpts
    for method, kwargs, name in [("average", {"density": 0.5}, "density"), ("average", {"base": base}, "base"),
                                 ("average", {"lam": 2.0}, "lam"), ("average", {"seed": 1}, "seed"),
                                 ("ties", {"base": base, "normalize": False}, "normalize"),
                                 ("dare", {"base": base, "backend": "cpu"}, "backend")]:
        with pytest.raises(InputError, match=f"^{name} does not apply to method '{method}'"):
            merge_checkpoints(paths, tmp_path / "x", method=method, progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_mixed_dtypes_write_aligned_loadable_shards(tmp_path):
    from safetensors import safe_open

    def tensors(seed):
        g = torch.Generator().manual_seed(seed)
        return {"a.bf16": torch.randn(3, 5, generator=g).bfloat16(), "b.mask": torch.tensor([True, False, True]),
                "c.f32": torch.randn(7, generator=g), "d.scalar": torch.randn((), generator=g),
                "e.empty": torch.zeros(0, 4), "f.f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
                "g.i8": torch.arange(5, dtype=torch.int8)}

    paths = [_write_ckpt(tmp_path / f"m{i}", tensors(i)) for i in range(2)]
    out = merge_checkpoints(paths, tmp_path / "out", progress=False)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    want = {k: v.clone() for k, v in tensors(0).items()}
    average_(want, [tensors(0), tensors(1)], backend="cpu")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    raw = (out / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    for k, meta in json.loads(raw[8:8 + n]).items():
        if k != "__metadata__":
            assert meta["data_offsets"][0] % got[k].element_size() == 0, k
