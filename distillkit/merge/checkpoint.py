"""Streaming merge of Hugging Face safetensors checkpoints, one tensor name at a time.

Memory. Every input's header is read first (names, dtypes, shapes, offsets), so the output shards are
laid out before anything is merged and each output file's header is written ahead of its data. Then
one tensor name at a time: its K (+ base) copies are read from their shards with plain file reads
into fresh buffers (no mmap, so no page of an input stays mapped), merged, appended to the output
file and dropped. An input shard file is open only while its tensors are read, at most one per
checkpoint at a time (tensors are visited grouped by their source shards). Peak memory above the
interpreter is about (K + 2) copies of the largest tensor (K inputs, the base, the result): never K
models, nor one output shard.

Atomic output. The merge is written into ``.<out_dir name>.partial`` beside ``out_dir`` and renamed
into place when complete; an interrupted merge leaves no (half-written) ``out_dir``, and the next
run removes the stale partial directory and starts over. With ``overwrite`` the old output is first
renamed to ``.<out_dir name>.old``, the new one renamed into place, then the old one deleted. A kill
between those steps leaves ``.<name>.old`` behind; the next merge into the same ``out_dir`` repairs
it before anything else: if ``out_dir`` is missing (killed between the two renames) the old output
is renamed back into place, otherwise (killed after the second rename) the leftover is deleted.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from distillkit._errors import InputError
from distillkit.merge._named import check_density, check_weights
from distillkit.merge.ties_dare import dare_tensor, tensor_generator, ties_tensor
from distillkit.ops.merge import average_group_

log = logging.getLogger(__name__)

METHODS = ("average", "ties", "dare", "dare_ties")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header

# Which methods each optional argument means something to; given to another method it is an error.
_TASK_VECTOR_METHODS = ("ties", "dare", "dare_ties")
METHOD_OPTIONS = {
    "base": _TASK_VECTOR_METHODS,
    "density": _TASK_VECTOR_METHODS,
    "lam": _TASK_VECTOR_METHODS,
    "seed": ("dare", "dare_ties"),
    "normalize": ("average",),
    "backend": ("average",),  # TIES / DARE run eager torch ops; only the average has kernels
}

# safetensors dtype names <-> torch dtypes
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

# Sizes: SI prefixes are decimal, IEC prefixes binary; "B" (any case) is bytes, never bits.
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS.update({_p: 10 ** (3 * _i), _p + "b": 10 ** (3 * _i), _p + "i": 2 ** (10 * _i), _p + "ib": 2 ** (10 * _i)})
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(size, arg: str = "max_shard_size") -> int:
    """A byte count from an int (bytes) or a string: a number and an optional unit, case-insensitive.

    Decimal (as Hugging Face's ``max_shard_size`` reads "5GB"): K, KB = 10^3; M, MB = 10^6;
    G, GB = 10^9; T, TB = 10^12. Binary: Ki, KiB = 2^10; Mi, MiB = 2^20; Gi, GiB = 2^30;
    Ti, TiB = 2^40. No unit or B: bytes ("4096"). Fractions are allowed ("1.5GB") and rounded down.
    Unlike Hugging Face, a lowercase "b" is still bytes ("5Gb" = 5 * 10^9, not gigabits).
    Raises InputError naming ``arg`` unless the result is a positive whole number of bytes.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise InputError(f"{arg}: expected an int or a string like '500MB', got {type(size).__name__}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.fullmatch(size)
        if m is None or m.group(2).lower() not in _SIZE_UNITS:
            raise InputError(f"{arg}: {size!r} is not a size; use e.g. 500MB, 2GiB, 500M, 4096")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if value <= 0:
        raise InputError(f"{arg}: {size!r} must be at least 1 byte")
    return value


def check_method_options(method: str, given: dict[str, str]) -> None:
    """Raises InputError when an option in ``given`` (option -> the name to print) does not apply to ``method``."""
    for option, shown in given.items():
        applies_to = METHOD_OPTIONS[option]
        if method not in applies_to:
            raise InputError(f"{shown} does not apply to method {method!r} (only to {', '.join(applies_to)})")


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor lies: its shard file (name inside the checkpoint) and absolute byte range."""
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    nbytes: int


def _read_header(path: Path, arg: str) -> dict[str, _TensorInfo]:
    """The tensors of one safetensors file, from its header alone (the data is not touched)."""
    where = f"{arg}: {path.name}"
    file_bytes = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > min(_MAX_HEADER_BYTES, file_bytes - 8):
            raise InputError(f"{where} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{where} is not a safetensors file ({exc})") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _DTYPES[meta["dtype"]], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: tensor {name!r} has an unreadable header entry {meta!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes or begin < 0 or 8 + n + end > file_bytes:
            raise InputError(f"{where}: tensor {name!r} has data_offsets {meta['data_offsets']} that do not fit "
                             f"{meta['dtype']}{list(shape)} in a {file_bytes}-byte file")
        out[name] = _TensorInfo(path.name, dtype, shape, 8 + n + begin, nbytes)
    return out


class _Checkpoint:
    """The tensor table of one HF checkpoint, single-file or sharded with an index; reads nothing else."""

    def __init__(self, path: str | os.PathLike, arg: str):
        self.path, self.arg = Path(path), arg
        if not self.path.is_dir():
            raise InputError(f"{arg}={str(path)!r} is not a directory")
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"{arg}: {INDEX_NAME} has no readable weight_map ({exc!r})") from None
            self.tensors = self._from_index(weight_map)
        elif (self.path / SINGLE_NAME).exists():
            self.tensors = _read_header(self.path / SINGLE_NAME, arg)
        else:
            raise InputError(f"{arg}={str(path)!r} has neither {SINGLE_NAME} nor {INDEX_NAME}")
        self.files = sorted({t.file for t in self.tensors.values()})

    def _from_index(self, weight_map: dict[str, str]) -> dict[str, _TensorInfo]:
        tensors = {}
        for file in sorted(set(weight_map.values())):
            if not (self.path / file).is_file():
                raise InputError(f"{self.arg}: {INDEX_NAME} lists shard {file!r}, which does not exist")
            header = _read_header(self.path / file, self.arg)
            listed = {n for n, f in weight_map.items() if f == file}
            unlisted = sorted(set(header) - listed)
            if unlisted:  # a tensor the index does not point at: which copy is meant is unknowable
                raise InputError(f"{self.arg}: shard {file!r} holds tensors {unlisted[:5]} that {INDEX_NAME} "
                                 f"does not list in it")
            absent = sorted(listed - set(header))
            if absent:
                raise InputError(f"{self.arg}: {INDEX_NAME} lists tensors {absent[:5]} in shard {file!r}, "
                                 f"which does not hold them")
            tensors.update(header)
        return {n: tensors[n] for n in weight_map}


def _open_shard(path: Path):
    """Opens one input shard for reading (tests patch this to count open shards)."""
    return open(path, "rb", buffering=0)


class _ShardReader:
    """Reads tensors of one checkpoint, keeping only the shard file of the last read open."""

    def __init__(self, ckpt: _Checkpoint):
        self.ckpt = ckpt
        self._file: str | None = None
        self._handle = None

    def get(self, name: str) -> torch.Tensor:
        """A fresh tensor (its own memory, not a view of any file) holding ``name``."""
        info = self.ckpt.tensors[name]
        if info.file != self._file:
            self.close()
            self._handle = _open_shard(self.ckpt.path / info.file)
            self._file = info.file
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self._handle.seek(info.begin)
        got = self._handle.readinto(buf.numpy()) if info.nbytes else 0
        if got != info.nbytes:
            raise InputError(f"{self.ckpt.arg}: {info.file} ended inside tensor {name!r}")
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._file = None, None


def merge_checkpoints(paths, out_dir, *, method: str = "average", base=None, weights=None, density: float | None = None,
                      lam: float | None = None, seed: int | None = None, normalize: bool | None = None,
                      max_shard_size="2GB", backend: str | None = None, overwrite: bool = False,
                      progress: bool = True) -> Path:
    """Merges K Hugging Face safetensors checkpoints into ``out_dir``; returns its path.

    Args:
        paths: K checkpoint directories (model.safetensors, or shards with model.safetensors.index.json).
        method: "average" (weighted average, ``weights`` normalised unless normalize=False), "ties",
            "dare" or "dare_ties" (these need ``base`` and take ``density`` (default 1) and ``lam``
            (default 1); see distillkit.merge.ties_dare).
        seed: DARE's randomness (default 0), one generator per tensor from (seed, name): equal to
            ``distillkit.merge.dare(..., seed=seed)`` in memory. TIES is deterministic and ignores it.
        normalize, backend: average only.
        max_shard_size: bytes per output shard, an int or a string (see ``parse_size``: "2GB" is
            2 * 10^9, "2GiB" 2 * 2^30); output is model.safetensors when it fits in one shard, else
            model-0000i-of-0000N.safetensors plus an index.
        overwrite: replace an existing ``out_dir`` directory (only after the new one is complete).
    An argument that does not apply to ``method`` (e.g. ``density`` with "average") raises InputError.
    Config, generation config and tokenizer files are copied from the first checkpoint.
    """
    if method not in METHODS:
        raise InputError(f"method={method!r}: expected one of {METHODS}")
    given = {"base": base, "density": density, "lam": lam, "normalize": normalize, "backend": backend}
    if method != "ties":  # MoT passes its seed to every method; TIES has no randomness to seed
        given["seed"] = seed
    check_method_options(method, {k: k for k, v in given.items() if v is not None})
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("paths is empty: nothing to merge")
    out_dir = Path(out_dir)
    _repair_interrupted_replace(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise InputError(f"out_dir={str(out_dir)!r} exists; pass overwrite=True to replace it")
        if not out_dir.is_dir():
            raise InputError(f"out_dir={str(out_dir)!r} is a file, not a directory; overwrite replaces only a "
                             "directory (an earlier merge): remove the file or choose another out_dir")
    needs_base = method != "average"
    if needs_base:
        if base is None:
            raise InputError(f"method={method!r} needs base=<checkpoint directory>")
        density = check_density(1.0 if density is None else density)
    weights = check_weights(weights, len(paths), normalize=normalize is not False)
    shard_bytes = parse_size(max_shard_size, "max_shard_size")

    ckpts = [_Checkpoint(p, f"paths[{k}]") for k, p in enumerate(paths)]
    base_ckpt = _Checkpoint(base, "base") if needs_base else None
    sources = ckpts + ([base_ckpt] if base_ckpt else [])
    _check_same_tensors(sources)
    order = _reading_order(sources)
    layout = _layout_shards(order, ckpts[0].tensors, shard_bytes)

    partial = out_dir.parent / f".{out_dir.name}.partial"
    if partial.exists():
        log.warning("removing %s left by an interrupted merge", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        merge_one = _Merger(ckpts, base_ckpt, method=method, weights=weights, density=density,
                            lam=1.0 if lam is None else float(lam), seed=0 if seed is None else int(seed),
                            backend=backend)
        try:
            _write_shards(layout, ckpts[0].tensors, merge_one, partial, method=method, progress=progress)
        finally:
            merge_one.close()
        _copy_side_files(paths[0], partial)
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.parent / f".{out_dir.name}.old"
            os.replace(out_dir, old)
            os.replace(partial, out_dir)  # a kill before this line: the next run renames old back
            shutil.rmtree(old)  # a kill from here on: the next run deletes what is left of old
        else:
            os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def _repair_interrupted_replace(out_dir: Path) -> None:
    """Finishes or undoes an overwrite that was killed between its renames (see the module docstring)."""
    old = out_dir.parent / f".{out_dir.name}.old"
    if not (old.exists() or old.is_symlink()):
        return
    if out_dir.exists() or out_dir.is_symlink():
        log.warning("removing %s: an earlier merge was killed after putting the new %s in place", old, out_dir)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        log.warning("restoring %s from %s: an earlier merge was killed while replacing it", out_dir, old)
        os.replace(old, out_dir)


def _check_same_tensors(sources: list[_Checkpoint]) -> None:
    """Same names, dtypes and shapes in every checkpoint (and the base), from the headers alone."""
    first = sources[0].tensors
    for c in sources[1:]:
        missing = sorted(set(first) - set(c.tensors))
        extra = sorted(set(c.tensors) - set(first))
        if missing or extra:
            raise InputError(f"{c.arg} does not match paths[0]: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
        for name, t in first.items():
            o = c.tensors[name]
            if o.dtype != t.dtype or o.shape != t.shape:
                raise InputError(f"{c.arg}[{name!r}] is {o.dtype}{o.shape}, paths[0] has {t.dtype}{t.shape}")


def _reading_order(sources: list[_Checkpoint]) -> list[str]:
    """Tensor names grouped by the tuple of shards they come from, in file order within a group."""
    file_rank = [{f: i for i, f in enumerate(c.files)} for c in sources]

    def key(name):
        return (tuple(r[c.tensors[name].file] for r, c in zip(file_rank, sources)), sources[0].tensors[name].begin)

    return sorted(sources[0].tensors, key=key)


def _layout_shards(order: list[str], infos: dict[str, _TensorInfo], shard_bytes: int) -> list[list[str]]:
    """Output shards as lists of names: a new shard when the next tensor would overflow a non-empty one."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in order:
        nbytes = infos[name].nbytes
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    # within a shard, wider dtypes first (as safetensors' writer does), so every tensor stays aligned
    return [sorted(s, key=lambda n: -infos[n].dtype.itemsize) for s in shards]


class _Merger:
    """name -> merged tensor, reading each source's copy through its own one-open-shard reader."""

    def __init__(self, ckpts, base_ckpt, *, method, weights, density, lam, seed, backend):
        self.readers = [_ShardReader(c) for c in ckpts]
        self.base_reader = _ShardReader(base_ckpt) if base_ckpt is not None else None
        self.method, self.weights, self.density, self.lam, self.seed, self.backend = (
            method, weights, density, lam, seed, backend)

    def __call__(self, name: str) -> torch.Tensor:
        parts = [r.get(name) for r in self.readers]
        base_t = self.base_reader.get(name) if self.base_reader is not None else None
        return _merge_one(name, parts, base_t, method=self.method, weights=self.weights, density=self.density,
                          lam=self.lam, seed=self.seed, backend=self.backend)

    def close(self) -> None:
        for r in self.readers + ([self.base_reader] if self.base_reader else []):
            r.close()


def _merge_one(name, parts, base_t, *, method, weights, density, lam, seed, backend):
    if not parts[0].is_floating_point():
        if any(not torch.equal(p, parts[0]) for p in parts[1:]):
            raise InputError(f"{name!r} is a non-floating tensor that differs between checkpoints")
        return parts[0]
    if method == "average":
        out = torch.empty_like(parts[0])
        average_group_([out], [[p] for p in parts], weights, backend=backend)
        return out
    if method == "ties":
        return ties_tensor(base_t, parts, weights, density=density, lam=lam)
    return dare_tensor(base_t, parts, weights, density=density, lam=lam, ties=method == "dare_ties",
                       generator=tensor_generator(seed, name))


def _write_shards(layout: list[list[str]], infos: dict[str, _TensorInfo], merge_one, partial: Path, *, method,
                  progress) -> None:
    """Writes each output shard header first, then streams the merged tensors into it; adds the index."""
    from tqdm.auto import tqdm

    n = len(layout)
    files = [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    bar = tqdm(total=sum(len(s) for s in layout), desc=f"merge ({method})", unit="tensor", disable=not progress)
    with bar:
        for fname, names in zip(files, layout):
            _write_shard(partial / fname, names, infos, merge_one, bar)
    if n > 1:
        weight_map = {name: fname for fname, names in zip(files, layout) for name in names}
        total = sum(infos[name].nbytes for name in weight_map)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_shard(path: Path, names: list[str], infos: dict[str, _TensorInfo], merge_one, bar) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = infos[name]
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, like safetensors' own files
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            merged = merge_one(name)
            t = infos[name]
            if merged.dtype != t.dtype or tuple(merged.shape) != t.shape:  # a merge rule broke its contract
                raise RuntimeError(f"merging {name!r} gave {merged.dtype}{tuple(merged.shape)}, expected {t.dtype}{t.shape}")
            f.write(merged.contiguous().reshape(-1).view(torch.uint8).numpy())
            del merged
            bar.update(1)


def _copy_side_files(src: Path, dst: Path) -> None:
    """config.json, generation_config.json, tokenizer files...: every plain file that is not weights."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name != INDEX_NAME:
            shutil.copy2(f, dst / f.name)
