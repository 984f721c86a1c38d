"""Named shapes for the benchmark suites. CPU shapes fit the 2-core CI machine; GPU shapes are the
ones users train at.

A profile picks which set a run uses: ``DISTILLKIT_BENCH_SHAPES`` (or ``pytest bench --shapes NAME``, which
sets it) is one of
  default  the device's own: the GPU shapes on a CUDA device, the CPU shapes elsewhere;
  anchor   issue 19's GPU anchors only (skew KL and fused-linear N=8192 H=4096 V=128256 bf16, scoring
           llama3-8b's head at M in {64, 1024}, merge K=4 bf16 1e9 parameters): what bench/gpu_check.py times;
  tiny     the same cases at toy sizes, for bench/gpu_check.py --dry-run on a CPU (checks code paths only).
The profile changes sizes and which cases run, never what a suite measures.
"""
import os

# fused-linear / logits-level loss shapes: (tokens N, hidden H, vocabulary V)
CPU_LOSS = {"llama-tiny": (2048, 512, 32000), "fused-linear-cpu": (4096, 512, 32000)}
GPU_LOSS = {"llama3-8b": (8192, 4096, 128256), "qwen2.5-7b": (8192, 3584, 152064)}
TINY_LOSS = {"toy": (16, 32, 1000)}
# scoring: lm_head (vocabulary V, hidden H) per model
CPU_HEADS = {"llama-tiny": (32000, 512)}
GPU_HEADS = {"llama3-8b": (128256, 4096), "qwen2.5-7b": (152064, 3584)}
TINY_HEADS = {"toy": (1000, 32)}
# merge: total parameters per model copy
CPU_MERGE_PARAMS = 64 * 2**20
GPU_MERGE_PARAMS = 1_500_000_000
ANCHOR_MERGE_PARAMS = 1_000_000_000
TINY_MERGE_PARAMS = 1 << 20
# meta-prover workload (bench/bench_meta_prover.py)
CPU_META = dict(hidden=256, layers=4, heads=4, vocab=32000, prefix=384, step=48, beams=4, teachers=4, batch=8)
GPU_META = dict(hidden=1024, layers=8, heads=16, vocab=128256, prefix=2048, step=128, beams=4, teachers=4, batch=4)
TINY_META = dict(hidden=32, layers=1, heads=2, vocab=1000, prefix=24, step=8, beams=2, teachers=2, batch=4)

PROFILES = ("default", "anchor", "tiny")


def profile() -> str:
    name = os.environ.get("DISTILLKIT_BENCH_SHAPES", "") or "default"
    if name not in PROFILES:
        raise ValueError(f"DISTILLKIT_BENCH_SHAPES={name!r}: expected one of {PROFILES}")
    return name


def loss_shape(on_gpu: bool, cpu_name: str) -> tuple[str, tuple[int, int, int]]:
    """(case name, (N, H, V)) for the loss suites; cpu_name picks the CPU default's entry."""
    p = profile()
    if p == "tiny":
        return "toy", TINY_LOSS["toy"]
    if p == "anchor" or on_gpu:
        return "llama3-8b", GPU_LOSS["llama3-8b"]
    return cpu_name, CPU_LOSS[cpu_name]


def lm_heads(on_gpu: bool) -> dict[str, tuple[int, int]]:
    p = profile()
    if p == "tiny":
        return dict(TINY_HEADS)
    if p == "anchor":
        return {"llama3-8b": GPU_HEADS["llama3-8b"]}
    return dict(GPU_HEADS if on_gpu else CPU_HEADS)


def merge_params(on_gpu: bool) -> int:
    return {"tiny": TINY_MERGE_PARAMS, "anchor": ANCHOR_MERGE_PARAMS}.get(
        profile(), GPU_MERGE_PARAMS if on_gpu else CPU_MERGE_PARAMS)


def merge_cases(on_gpu: bool, default_dtypes: list) -> tuple[list[int], list]:
    """(K values, dtypes) for the merge suite: the anchor (and its toy copy) is K=4 bf16 alone."""
    import torch

    if profile() in ("anchor", "tiny"):
        return [4], [torch.bfloat16]
    return [2, 4], default_dtypes


def meta_prover_shape(on_gpu: bool) -> dict:
    p = profile()
    if p == "tiny":
        return dict(TINY_META)
    return dict(GPU_META if on_gpu or p == "anchor" else CPU_META)
