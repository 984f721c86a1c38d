"""Named shapes for the benchmark suites. CPU shapes fit the 2-core CI machine; GPU shapes are the
ones users train at."""
# fused-linear / logits-level loss shapes: (tokens N, hidden H, vocabulary V)
CPU_LOSS = {"llama-tiny": (2048, 512, 32000), "fused-linear-cpu": (4096, 512, 32000)}
GPU_LOSS = {"llama3-8b": (8192, 4096, 128256), "qwen2.5-7b": (8192, 3584, 152064)}
# merge: total parameters per model copy
CPU_MERGE_PARAMS = 64 * 2**20
GPU_MERGE_PARAMS = 1_500_000_000
