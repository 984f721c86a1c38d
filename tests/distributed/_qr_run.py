"""One QR-Distill training run for the methods' distributed tests: run as a script, under torchrun (strategy ddp)
or as one plain process (strategy none), on paths given as a file (no teachers), two tiny students of two
architectures and a learned router over a tiny BERT encoder's features (--routing: topk by default, deterministic;
bernoulli draws each path's noise from (seed, its position in the stream of paths), so every rank routes its own
slice as one process routes the same micro-batch). write_setup builds the students, the encoder and
the paths."""
import argparse
import json
import os

import torch

from distillkit.methods.qr_distill import QRDistillConfig, run


def write_setup(root: str) -> dict:
    from transformers import BertConfig, BertModel

    from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint

    tok = build_tokenizer()
    small = dict(num_layers=1, num_heads=2)
    students = [save_tiny_checkpoint(os.path.join(root, "llama32"), arch="llama", tokenizer=tok, hidden_size=32,
                                     seed=1, **small),
                save_tiny_checkpoint(os.path.join(root, "qwen48"), arch="qwen2", tokenizer=tok, hidden_size=48,
                                     seed=2, **small)]
    bert = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(bert).save_pretrained(os.path.join(root, "encoder"))
    tok.save_pretrained(os.path.join(root, "encoder"))
    paths = os.path.join(root, "paths.jsonl")
    with open(paths, "w", encoding="utf-8") as f:
        for i in range(16):
            a, b = i % 7, i % 4
            steps = " ".join([f"{a} + {b} = {a + b}."] * (1 + i % 3))  # paths of different lengths
            f.write(json.dumps({"id": f"p{i}", "question": f"{a} + {b}", "answer": str(a + b),
                                "style": ("forward", "backward")[i % 2],
                                "response": f" {steps} The final answer is {a + b}."}) + "\n")
    return {"students": students, "encoder": os.path.join(root, "encoder"), "paths": paths}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="none")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--routing", default="topk")
    a = p.parse_args()
    torch.set_num_threads(1)
    root = a.root
    cfg = QRDistillConfig(paths_input=os.path.join(root, "paths.jsonl"), teachers=[], output_dir=a.out,
                          students=[os.path.join(root, "llama32"), os.path.join(root, "qwen48")], routing=a.routing,
                          router_encoder=os.path.join(root, "encoder"), router_capacity_factor=None,
                          max_steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=3e-3, seed=3,
                          progress=False, log_every=1, device="cpu", strategy=a.strategy)
    run(cfg)


if __name__ == "__main__":
    main()
