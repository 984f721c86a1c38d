"""Merge benchmark: in-place weighted average of K model copies.

Providers: every distillkit backend runnable here, `torch.stack(...).mean(0)` per tensor (what a
hand-written merge does) and `torch._foreach_mul_/_foreach_add_` (PyTorch's multi-tensor ops).
Roofline: bytes moved = (K + 1) x model bytes (K reads, one write), against a copy measured in the
same run (bytes read + written). Goals: CPU backend >= 0.8 of copy bandwidth and >= 2x the stack
baseline; GPU >= 0.9 of copy bandwidth.

Checkpoint merge (test_checkpoint_merge_peak_rss): `merge_checkpoints` on three 58M-parameter fp32
Llama-layout checkpoints sharded at ~100 MB, against mergekit's linear merge of the same files when
mergekit is installed; each merge runs in a fresh interpreter and reports its peak RSS (VmHWM,
imports included). Goal: distillkit's peak <= 0.7x mergekit's.

    pytest bench/bench_merge.py -q -s      (DISTILLKIT_BENCH_PARAMS overrides the model size)
    pytest bench/bench_merge.py -q -s -k checkpoint      (the checkpoint merge alone)

Cases: K in {2, 4} x {fp32, bf16} by default; the anchor and tiny profiles (bench/shapes.py) run K=4 bf16 alone,
at 1e9 parameters and at a toy size.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import shapes
from _util import Row, child_peak_rss, copy_bandwidth_gbs, device, median_time_s, peak_extra_bytes, report
from distillkit._backend import backends, runnable_backends
from distillkit.ops.merge import average_group_

DEV = device()
PARAMS = int(os.environ.get("DISTILLKIT_BENCH_PARAMS", shapes.merge_params(DEV.type == "cuda")))
KS, DTYPES = shapes.merge_cases(DEV.type == "cuda", [torch.bfloat16, torch.float32] if DEV.type == "cuda"
                                else [torch.float32, torch.bfloat16])
ROWS: list[Row] = []
_COPY = {}


def _model(dtype, seed):
    """A transformer-like parameter list: a few large matrices and many small vectors."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    small = [torch.randn(4096, generator=g) for _ in range(64)]
    n_small = sum(t.numel() for t in small)
    per_big = (PARAMS - n_small) // 8
    big = [torch.randn(per_big, generator=g) for _ in range(8)]
    return [t.to(device=DEV, dtype=dtype) for t in big + small]


def _providers():
    table = backends()
    out = []
    for name in ("cuda", "triton", "cpu", "reference"):
        if name in runnable_backends(DEV):
            out.append((name, name))
        else:
            print(f"[bench_merge] backend {name} skipped: {table[name][1]}")
    return out + [("eager: stack.mean", "eager"), ("eager: _foreach", "eager")]


def _run(provider, target, sources, weights):
    if provider == "eager: stack.mean":
        for i, t in enumerate(target):
            t.copy_(torch.stack([s[i] for s in sources]).mul_(
                torch.tensor(weights, dtype=t.dtype, device=t.device).view(-1, *([1] * t.dim()))).sum(0))
    elif provider == "eager: _foreach":
        torch._foreach_mul_(target, 0.0)
        for w, s in zip(weights, sources):
            torch._foreach_add_(target, s, alpha=w)
    else:
        average_group_(target, sources, weights, backend=provider)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("k", KS)
def test_merge(benchmark, k, dtype):
    if "bw" not in _COPY:
        _COPY["bw"] = copy_bandwidth_gbs(dev=DEV)
    sources = [_model(dtype, s) for s in range(k)]
    target = [torch.zeros_like(t) for t in sources[0]]  # touched: first-touch page faults are not a temporary
    weights = [1.0 / k] * k
    nbytes = (k + 1) * sum(t.numel() * t.element_size() for t in target)
    case = f"K={k} {str(dtype).split('.')[-1]} {PARAMS / 1e6:.0f}M params"
    times = {}
    for label, backend in _providers():
        fn = lambda: _run(label, target, sources, weights)  # noqa: E731
        peak, _ = peak_extra_bytes(fn, DEV)
        t = median_time_s(fn, DEV, warmup=1, repeats=3 if DEV.type == "cpu" else 20)
        times[label] = t
        ROWS.append(Row("merge", case, label, backend, t, peak, roofline_fraction=nbytes / t / 1e9 / _COPY["bw"],
                        extra={"GB/s": nbytes / t / 1e9, "copy GB/s": _COPY["bw"]}))
    for r in ROWS:
        if r.case == case:
            r.ratio_to_eager = r.time_s / times["eager: stack.mean"]
    best = runnable_backends(DEV)[0]
    benchmark.extra_info.update({r.provider: r.time_s for r in ROWS if r.case == case})
    benchmark.pedantic(lambda: _run(best, target, sources, weights), rounds=3, iterations=1)


def test_report():
    if not ROWS:
        pytest.skip("no merge rows measured")
    report(ROWS, "merge")
    goal = 0.9 if DEV.type == "cuda" else 0.8
    for r in ROWS:
        if r.provider in ("cpu", "cuda"):
            verdict = "meets" if r.roofline_fraction >= goal and (r.ratio_to_eager or 1) <= 0.5 else "MISSES"
            print(f"goal ({goal:.0%} of copy, >= 2x stack) {verdict}: {r.case} {r.provider} "
                  f"{r.roofline_fraction:.0%} of {r.extra['copy GB/s']:.1f} GB/s, {1 / r.ratio_to_eager:.1f}x stack")


# ---- streaming checkpoint merge: peak RSS of the whole process, distillkit vs mergekit ----
CKPT_LLAMA = {"hidden_size": 640, "intermediate_size": 1600, "num_hidden_layers": 8, "num_attention_heads": 10,
              "num_key_value_heads": 10, "vocab_size": 16000}  # 58.2M parameters, 233 MB in fp32
CKPT_K = 3
CKPT_INPUT_SHARD_BYTES = 100 * 10**6
CKPT_OUTPUT_SHARD_BYTES = 2 * 10**9  # distillkit's default; mergekit is given the same
CKPT_GOAL = 0.7  # distillkit's peak RSS / mergekit's, at most
if shapes.profile() == "tiny":  # the dry run checks the code path at a toy size
    CKPT_LLAMA = {**CKPT_LLAMA, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000}
    CKPT_INPUT_SHARD_BYTES = 200_000


def _llama_shapes() -> dict[str, tuple[int, ...]]:
    h, i, v = CKPT_LLAMA["hidden_size"], CKPT_LLAMA["intermediate_size"], CKPT_LLAMA["vocab_size"]
    shapes_ = {"model.embed_tokens.weight": (v, h)}
    for layer in range(CKPT_LLAMA["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes_.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        shapes_.update({p + f"self_attn.{n}_proj.weight": (h, h) for n in "qkvo"})
        shapes_.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                        p + "mlp.down_proj.weight": (h, i)})
    shapes_.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes_


def _write_llama_checkpoint(path: str, seed: int) -> None:
    """A Llama-layout fp32 checkpoint with random weights, sharded at CKPT_INPUT_SHARD_BYTES, with its index."""
    from safetensors.torch import save_file

    os.makedirs(path)
    g = torch.Generator().manual_seed(seed)
    groups, current, used = [], {}, 0
    for name, shape in _llama_shapes().items():
        t = torch.randn(shape, generator=g) * 0.02
        if current and used + t.numel() * 4 > CKPT_INPUT_SHARD_BYTES:
            groups.append(current)
            current, used = {}, 0
        current[name] = t
        used += t.numel() * 4
    groups.append(current)
    weight_map, total = {}, 0
    for n, tensors in enumerate(groups, start=1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "float32", **CKPT_LLAMA}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


_DISTILLKIT_IMPORT = "import torch\nfrom distillkit.merge import merge_checkpoints\n"
_MERGEKIT_IMPORT = ("import torch, yaml\nfrom mergekit.config import MergeConfiguration\n"
                    "from mergekit.merge import run_merge\nfrom mergekit.options import MergeOptions\n")


def _distillkit_merge(paths, out) -> str:
    return _DISTILLKIT_IMPORT + (f"merge_checkpoints({paths!r}, {out!r}, max_shard_size={CKPT_OUTPUT_SHARD_BYTES}, "
                                 "progress=False)\n")


def _mergekit_merge(paths, out) -> str:
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths]}
    options = {"cuda": False, "copy_tokenizer": False, "write_model_card": False, "lazy_unpickle": False,
               "out_shard_size": CKPT_OUTPUT_SHARD_BYTES, "quiet": True}  # 0.1.5 counts out_shard_size in bytes
    return _MERGEKIT_IMPORT + (
        f"options = {{k: v for k, v in {options!r}.items() if k in MergeOptions.model_fields}}\n"
        f"run_merge(MergeConfiguration.model_validate({config!r}), {out!r}, options=MergeOptions(**options))\n")


def _load_tensor(out_dir: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    index = os.path.join(out_dir, "model.safetensors.index.json")
    fname = json.load(open(index))["weight_map"][name] if os.path.exists(index) else "model.safetensors"
    with safe_open(os.path.join(out_dir, fname), framework="pt") as f:
        return f.get_tensor(name).clone()


def test_checkpoint_merge_peak_rss(tmp_path):
    if shapes.profile() == "anchor":
        pytest.skip("the checkpoint merge's peak RSS is a host-memory comparison with mergekit, not a GPU anchor")
    paths = [str(tmp_path / f"m{k}") for k in range(CKPT_K)]
    for k, p in enumerate(paths):
        _write_llama_checkpoint(p, seed=k)
    n_params = sum(torch.Size(s).numel() for s in _llama_shapes().values())
    case = f"K={CKPT_K} fp32 {n_params / 1e6:.1f}M params, shards ~{CKPT_INPUT_SHARD_BYTES // 10**6} MB"
    runs = {"distillkit": (_DISTILLKIT_IMPORT, _distillkit_merge(paths, str(tmp_path / "out-distillkit")))}
    if importlib.util.find_spec("mergekit") is not None:
        runs["mergekit linear"] = (_MERGEKIT_IMPORT, _mergekit_merge(paths, str(tmp_path / "out-mergekit")))
    else:
        print("[bench_merge] mergekit is not installed: distillkit's peak RSS alone, no ratio")
    rows, peaks = [], {}
    for provider, (imports, merge) in runs.items():
        imported = child_peak_rss(imports)
        merged = child_peak_rss(merge)
        peaks[provider] = merged["peak_bytes"]
        rows.append(Row("merge_checkpoint", case, provider, "cpu" if provider == "distillkit" else "torch eager",
                        merged["elapsed_s"], merged["peak_bytes"],
                        extra={"import_peak_bytes": imported["peak_bytes"],
                               "merge_peak_above_import_bytes": merged["peak_bytes"] - imported["peak_bytes"]}))
    # both merges computed the same mean: check one tensor against float64
    name = f"model.layers.{CKPT_LLAMA['num_hidden_layers'] - 1}.mlp.down_proj.weight"
    srcs = [_load_tensor(p, name) for p in paths]
    want = sum(s.double() for s in srcs) / len(srcs)
    eager_err = ((sum(srcs) / len(srcs)).double() - want).abs().max().item()
    for r in rows:
        out = tmp_path / ("out-distillkit" if r.provider == "distillkit" else "out-mergekit")
        err = (_load_tensor(str(out), name).double() - want).abs().max().item()
        r.extra["max_abs_err_vs_fp64"] = err
        assert err <= 2 * eager_err + 1e-30, (r.provider, err, eager_err)
    if "mergekit linear" in peaks:
        ratio = peaks["distillkit"] / peaks["mergekit linear"]
        rows[0].extra["peak_ratio_to_mergekit"] = ratio
    report(rows, "merge_checkpoint")
    for r in rows:
        print(f"{r.provider:<16} peak RSS {r.peak_bytes / 2**20:7.1f} MiB (imports alone "
              f"{r.extra['import_peak_bytes'] / 2**20:6.1f} MiB), {r.time_s:6.1f} s")
    if "mergekit linear" in peaks:
        verdict = "meets" if ratio <= CKPT_GOAL else "MISSES"
        print(f"goal (peak RSS <= {CKPT_GOAL}x mergekit's) {verdict}: {ratio:.2f}x")
