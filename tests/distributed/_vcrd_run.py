"""One VCRD run on the world models for the methods' distributed tests: run as a script, under torchrun (strategy
ddp / fsdp) or as one plain process (strategy none). Online rollouts sampled at temperature 1 and sampled candidate
tokens, so every slice's randomness shows; --kill-at K ends the process (SIGKILL) as step K + 1 starts, after step
K's checkpoint; --float64 trains the student and the teacher in float64 (the tests' truth)."""
import argparse
import json
import os
import signal

import torch

from distillkit.methods import vcrd
from distillkit.methods.vcrd import runner
from distillkit.world.models import asset_path
from distillkit.world.problems import generate_problems

# the shapes the tests use: 2 ranks x 1 micro-batch of 2 prompts = 1 process x 2 micro-batches of 2
ARGS = dict(rollout_tokens=8, temperature=1.0, top_k=8, lr=5e-3, seed=3, progress=False, log_every=1)


def write_prompts(path: str, n: int = 8) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(generate_problems(n, seed=11)):
            f.write(json.dumps({"id": f"q{i}", "question": p.question, "answer": str(p.answer)}) + "\n")
    return path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="none")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--float64", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.float64:
        load = runner.load_models

        def load_float64(*args, **kw):
            student, teacher, *rest = load(*args, **kw)
            return (student.double(), teacher.double(), *rest)

        runner.load_models = load_float64
    if a.kill_at:
        step, calls = runner.vcrd_step, []

        def dies(*args, **kw):
            calls.append(1)
            if len(calls) == a.kill_at * a.grad_accum + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(*args, **kw)

        runner.vcrd_step = dies
    cfg = vcrd.VcrdConfig(student=asset_path("student-base"), teacher=asset_path("teacher-carry"), prompts=a.prompts,
                          output_dir=a.out, rollouts="online", max_steps=a.steps, batch_size=a.batch_size,
                          grad_accum=a.grad_accum, save_every=a.save_every, strategy=a.strategy, lora_r=a.lora_r,
                          lora_alpha=4.0 * max(a.lora_r, 1), device="cpu", **ARGS)
    vcrd.run(cfg)


if __name__ == "__main__":
    main()
