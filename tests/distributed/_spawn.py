"""Two gloo ranks on 127.0.0.1 for the distributed op tests: run(fn, *args) spawns them with
torch.multiprocessing and re-raises a rank's failure in the test; tiny_llama builds the same tiny model on
every rank (seeded, from its config class: nothing is downloaded)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run(fn, *args) -> None:
    """fn(rank, *args) on 2 gloo ranks; an exception in a rank fails the caller (mp.spawn raises it)."""
    mp.spawn(_entry, args=(free_port(), fn, args), nprocs=WORLD, join=True)


def tiny_llama(hidden: int, vocab: int, seed: int, dtype=torch.float64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)
