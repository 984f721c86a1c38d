"""One MoT run for the methods' distributed tests: run as a script, under torchrun (strategy ddp / fsdp: every
branch data-parallel over all ranks) or as one plain process (strategy none). --float64 trains and merges in
float64 (the tests' truth). write_setup builds the tiny student and three teachers' traces."""
import argparse
import json
import os

import torch

from distillkit.methods import mot


def write_setup(root) -> tuple[str, list[str]]:
    """A tiny student and three teachers' JSONL traces (each with wrong traces MoT drops) in ``root``."""
    from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint

    student = save_tiny_checkpoint(os.path.join(root, "student"), tokenizer=build_tokenizer(), hidden_size=32,
                                   num_layers=2, num_heads=2, seed=3)
    paths = []
    for t, op in enumerate(("+", "*", "-")):
        path = os.path.join(root, f"teacher{t}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i in range(12):
                a, b = i % 5, i % 3
                value = {"+": a + b, "*": a * b, "-": a - b}[op]
                wrong = int(i % 4 == t)
                # responses of different lengths: ranks hold different numbers of kept tokens
                steps = " ".join([f"{a} {op} {b} = {value + wrong}"] * (1 + i % 3))
                f.write(json.dumps({"id": f"{t}-{i}", "question": f"{a} {op} {b}", "answer": str(value),
                                    "response": f" {steps}</think> The final answer is {value + wrong}."}) + "\n")
        paths.append(path)
    return student, paths


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--student", required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="none")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--merge", default="average")
    p.add_argument("--float64", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.float64:
        from transformers import AutoModelForCausalLM

        mot._load = lambda path, device: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).to(device)
        mot._float32_safetensors = lambda path: False  # TIES / DARE's base: the student loaded as the branches
    cfg = mot.MotConfig(student=a.student, teacher_data=a.data, output_dir=a.out, rounds=a.rounds,
                        steps_per_round=a.steps, merge=a.merge, density=0.7, batch_size=a.batch_size,
                        grad_accum=a.grad_accum, lr=3e-3, seed=5, progress=False, device="cpu", strategy=a.strategy)
    mot.run(cfg)


if __name__ == "__main__":
    main()
