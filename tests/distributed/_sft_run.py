"""SFT on CoRD traces (the demo's SFT step: the correct records of CoRD runs, the world's student-base, the shared
trainer) for the methods' distributed tests: run as a script, under torchrun (strategy ddp / fsdp) or as one plain
process (strategy none); --float64 trains in float64 (the tests' truth). write_cord_records writes CoRD-style
records (prompt + trajectory, some flawed and marked incorrect)."""
import argparse
import json
import os

import torch

from distillkit.world import problems as W


def write_cord_records(path: str, n: int = 16) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(W.generate_problems(n, seed=21)):
            text = W.trace(p)
            if i % 4 == 3:  # a wrong final answer: the demo's SFT drops it
                text = text[:text.rindex(" ") + 1] + f"{(int(p.answer) + 1) % 10}."
            final = text.rsplit(" ", 1)[-1].rstrip(".")
            f.write(json.dumps({"id": f"q{i}", "question": p.question, "answer": p.answer, "prompt": p.prompt,
                                "trajectory": text, "final_answer": final, "correct": final == p.answer}) + "\n")
    return path


def main():
    from distillkit.pipeline.data import SFTCollator, sft_loss
    from distillkit.pipeline.train import TrainConfig, Trainer
    from distillkit.world import models as M
    from distillkit.world.demo import correct_examples

    p = argparse.ArgumentParser()
    p.add_argument("--traces", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="none")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--float64", action="store_true")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    examples = correct_examples([a.traces])
    model, tok = M.load_model(M.STUDENT)
    if a.float64:
        model = model.double()
    cfg = TrainConfig(output_dir=a.out, max_steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=3e-3,
                      warmup_steps=1, seed=7, progress=False, log_every=1, strategy=a.strategy,
                      max_grad_norm=a.max_grad_norm)
    trainer = Trainer(model.train(), cfg, examples, SFTCollator(tok), sft_loss)
    trainer.train()
    trainer.export(os.path.join(a.out, "export"), tok)


if __name__ == "__main__":
    main()
