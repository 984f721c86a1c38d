"""`distillkit merge` option checking: sizes with units, options foreign to the method, --out a file."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from distillkit._errors import InputError
from distillkit.merge.cli import cli


def _ckpt(path, seed):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path)
    tensors = {f"layers.{i}.w": torch.randn(16, 16, generator=g) for i in range(4)}  # 1 KiB each
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.fixture
def paths(tmp_path):
    return [_ckpt(tmp_path / f"m{i}", i) for i in range(2)]


@pytest.mark.parametrize("size,shards", [("2KiB", 2), ("2kb", 4), ("500M", 1), ("1024", 4), ("3k", 2)])
def test_max_shard_size_units(paths, tmp_path, size, shards):
    out = tmp_path / "out"
    assert cli([*paths, "-o", str(out), "--max-shard-size", size, "--quiet"]) == 0
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) == shards, files
    if shards > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == files
    got = {}
    for f in files:
        got.update(load_file(out / f))
    assert len(got) == 4


@pytest.mark.parametrize("size", ["abc", "0", "12XB", "-3M"])
def test_bad_max_shard_size_names_the_option(paths, tmp_path, size):
    with pytest.raises(InputError, match=f"^--max-shard-size: '{size}'"):
        cli([*paths, "-o", str(tmp_path / "out"), f"--max-shard-size={size}", "--quiet"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,extra,flag", [
    ("average", ["--density", "0.5"], "--density"),
    ("average", ["--base", "BASE"], "--base"),
    ("average", ["--lam", "0.5"], "--lam"),
    ("average", ["--seed", "3"], "--seed"),
    ("ties", ["--base", "BASE", "--no-normalize"], "--no-normalize"),
    ("ties", ["--base", "BASE", "--seed", "3"], "--seed"),
    ("dare", ["--base", "BASE", "--backend", "cpu"], "--backend"),
])
def test_options_foreign_to_the_method_are_errors(paths, tmp_path, method, extra, flag):
    extra = [paths[0] if a == "BASE" else a for a in extra]
    with pytest.raises(InputError, match=f"^{flag} does not apply to method '{method}'"):
        cli([*paths, "-o", str(tmp_path / "out"), "--method", method, *extra, "--quiet"])
    assert not (tmp_path / "out").exists()


def test_method_options_that_apply_are_accepted(paths, tmp_path):
    assert cli([*paths, "-o", str(tmp_path / "a"), "--no-normalize", "--weights", "0.5", "0.25", "--backend",
                "reference", "--quiet"]) == 0
    assert cli([*paths, "-o", str(tmp_path / "t"), "--method", "ties", "--base", paths[0], "--density", "0.5",
                "--lam", "0.5", "--quiet"]) == 0
    srcs = [load_file(os.path.join(p, "model.safetensors")) for p in paths]
    got = load_file(tmp_path / "a" / "model.safetensors")
    torch.testing.assert_close(got["layers.1.w"], 0.5 * srcs[0]["layers.1.w"] + 0.25 * srcs[1]["layers.1.w"])


def test_out_an_existing_file_with_overwrite_is_an_error(paths, tmp_path):
    target = tmp_path / "out"
    target.write_text("keep me")
    with pytest.raises(InputError, match="^--out: .* is a file, not a directory"):
        cli([*paths, "-o", str(target), "--overwrite", "--quiet"])
    assert target.read_text() == "keep me"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
