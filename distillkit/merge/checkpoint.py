"""Streaming merge of Hugging Face safetensors checkpoints, one tensor name at a time.

Peak memory is about K copies of the largest tensor plus one output shard, never K models. The
output is written into ``.<out_dir name>.partial`` beside ``out_dir`` and renamed into place at the
end, so an interrupted merge leaves no (half-written) output directory; a rerun clears the stale
partial directory and starts over.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from distillkit.merge._named import check_density, check_weights
from distillkit.merge.ties_dare import dare_tensor, tensor_generator, ties_tensor
from distillkit.ops.merge import average_group_

log = logging.getLogger(__name__)

METHODS = ("average", "ties", "dare", "dare_ties")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class _Checkpoint:
    """Lazy access to one HF checkpoint's tensors, single-file or sharded with an index."""

    def __init__(self, path: str | os.PathLike, arg: str):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"{arg}={str(path)!r} is not a directory")
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).exists():
            files = [SINGLE_NAME]
            weight_map = None
        else:
            raise ValueError(f"{arg}={str(path)!r} has neither {SINGLE_NAME} nor {INDEX_NAME}")
        self._handles = {f: safe_open(str(self.path / f), framework="pt", device="cpu") for f in files}
        if weight_map is None:
            weight_map = {k: SINGLE_NAME for k in self._handles[SINGLE_NAME].keys()}
        self.weight_map = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.weight_map[name]].get_tensor(name)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("GIB", 2**30), ("MIB", 2**20), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def merge_checkpoints(paths, out_dir, *, method: str = "average", base=None, weights=None, density: float | None = None,
                      lam: float = 1.0, seed: int = 0, normalize: bool = True, max_shard_size="2GB",
                      backend: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Merges K Hugging Face safetensors checkpoints into ``out_dir``; returns its path.

    Args:
        paths: K checkpoint directories (model.safetensors, or shards with model.safetensors.index.json).
        method: "average" (weighted average, ``weights`` normalised unless normalize=False), "ties",
            "dare" or "dare_ties" (these need ``base`` and ``density``; see distillkit.merge.ties_dare).
        seed: DARE's randomness, one generator per tensor from (seed, name): equal to
            ``distillkit.merge.dare(..., seed=seed)`` in memory.
        max_shard_size: bytes per output shard (int, or "2GB"/"500MB"); output is model.safetensors
            when it fits in one shard, else model-0000i-of-0000N.safetensors plus an index.
        overwrite: replace an existing ``out_dir`` (only after the new one is complete).
    Config, generation config and tokenizer files are copied from the first checkpoint.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("paths is empty: nothing to merge")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"out_dir={str(out_dir)!r} exists; pass overwrite=True to replace it")
    needs_base = method != "average"
    if needs_base:
        if base is None:
            raise ValueError(f"method={method!r} needs base=<checkpoint directory>")
        density = check_density(1.0 if density is None else density)
    weights = check_weights(weights, len(paths), normalize=normalize or needs_base)
    shard_bytes = _parse_size(max_shard_size)
    if shard_bytes <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r} must be positive")

    ckpts = [_Checkpoint(p, f"paths[{k}]") for k, p in enumerate(paths)]
    base_ckpt = _Checkpoint(base, "base") if needs_base else None
    names = ckpts[0].names()
    for k, c in enumerate(ckpts[1:] + ([base_ckpt] if base_ckpt else []), start=1):
        arg = f"paths[{k}]" if k < len(ckpts) else "base"
        missing = sorted(set(names) - set(c.names()))
        extra = sorted(set(c.names()) - set(names))
        if missing or extra:
            raise ValueError(f"{arg} does not match paths[0]: missing keys {missing[:5]}, unexpected keys {extra[:5]}")

    partial = out_dir.parent / f".{out_dir.name}.partial"
    if partial.exists():
        log.warning("removing %s left by an interrupted merge", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        shards = _write_shards(names, ckpts, base_ckpt, partial, method=method, weights=weights, density=density,
                               lam=lam, seed=seed, shard_bytes=shard_bytes, backend=backend, progress=progress)
        _finish_shards(shards, partial)
        _copy_side_files(paths[0], partial)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(partial, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def _merge_one(name, parts, base_t, *, method, weights, density, lam, seed, backend):
    for k, p in enumerate(parts[1:], start=1):
        if p.shape != parts[0].shape or p.dtype != parts[0].dtype:
            raise ValueError(f"paths[{k}][{name!r}] is {p.dtype}{tuple(p.shape)}, paths[0] has "
                             f"{parts[0].dtype}{tuple(parts[0].shape)}")
    if not parts[0].is_floating_point():
        if any(not torch.equal(p, parts[0]) for p in parts[1:]):
            raise ValueError(f"{name!r} is a non-floating tensor that differs between checkpoints")
        return parts[0]
    if method == "average":
        out = torch.empty_like(parts[0])
        average_group_([out], [[p] for p in parts], weights, backend=backend)
        return out
    if base_t.shape != parts[0].shape or base_t.dtype != parts[0].dtype:
        raise ValueError(f"base[{name!r}] is {base_t.dtype}{tuple(base_t.shape)}, paths[0] has "
                         f"{parts[0].dtype}{tuple(parts[0].shape)}")
    if method == "ties":
        return ties_tensor(base_t, parts, weights, density=density, lam=lam)
    return dare_tensor(base_t, parts, weights, density=density, lam=lam, ties=method == "dare_ties",
                       generator=tensor_generator(seed, name))


def _write_shards(names, ckpts, base_ckpt, partial: Path, *, method, weights, density, lam, seed, shard_bytes,
                  backend, progress) -> list[tuple[str, list[str], int]]:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    shards: list[tuple[str, list[str], int]] = []  # (temporary file name, tensor names, bytes)
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0

    def flush():
        nonlocal current, current_bytes
        if not current:
            return
        fname = f"shard-{len(shards):05d}.tmp"
        save_file(current, str(partial / fname), metadata={"format": "pt"})
        shards.append((fname, list(current), current_bytes))
        current, current_bytes = {}, 0

    for name in tqdm(names, desc=f"merge ({method})", unit="tensor", disable=not progress):
        parts = [c.get(name) for c in ckpts]
        base_t = base_ckpt.get(name) if base_ckpt is not None else None
        merged = _merge_one(name, parts, base_t, method=method, weights=weights, density=density, lam=lam,
                            seed=seed, backend=backend)
        nbytes = merged.numel() * merged.element_size()
        if current and current_bytes + nbytes > shard_bytes:
            flush()
        current[name] = merged.contiguous()
        current_bytes += nbytes
        del parts, base_t
    flush()
    return shards


def _finish_shards(shards, partial: Path) -> None:
    if len(shards) == 1:
        os.replace(partial / shards[0][0], partial / SINGLE_NAME)
        return
    n = len(shards)
    weight_map, total = {}, 0
    for i, (tmp, tensor_names, nbytes) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(partial / tmp, partial / final)
        weight_map.update({t: final for t in tensor_names})
        total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(src: Path, dst: Path) -> None:
    """config.json, generation_config.json, tokenizer files...: every plain file that is not weights."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name != INDEX_NAME:
            shutil.copy2(f, dst / f.name)
