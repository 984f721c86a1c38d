"""One training run of a tiny Llama for the trainer's distributed tests: run as a script, under torchrun (strategy
ddp / fsdp) or as one plain process (strategy none). Examples of different lengths, so the ranks' shards of a
global batch hold different numbers of kept tokens; the run's per-rank token counts go to tokens-rank<r>.json and
the final model is exported (LoRA merged) to <out>/export."""
import argparse
import json
import os
import signal

import torch

from distillkit.pipeline.data import Example, SFTCollator, sft_loss
from distillkit.pipeline.train import TrainConfig, Trainer
from distillkit.world.tiny import build_tokenizer, tiny_causal_lm


def examples(n=24):
    # responses of 1 to 6 repeated words: micro-batches (and ranks) hold different numbers of kept tokens
    return [Example(str(i), f"{i % 7} + {i % 5} =", " " + " ".join([str((i % 7 + i % 5) % 10)] * (1 + i % 6)) + ".",
                    str(i % 7 + i % 5)) for i in range(n)]


def model(tok, dtype):
    return tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=0, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).to(dtype)


def run(out, strategy="none", dtype="float32", batch_size=2, grad_accum=1, steps=3, save_every=0, kill_at=0, lora_r=0,
        token_weighted=True):
    """Trains and exports; returns the model. token_weighted=False hides num_tokens from the Trainer (each
    micro-batch then weighs the same: the per-rank average the tests show to differ)."""
    tok = build_tokenizer()
    m = model(tok, getattr(torch, dtype))
    cfg = TrainConfig(output_dir=out, max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=3e-3,
                      save_every=save_every, log_every=1, progress=False, strategy=strategy, lora_r=lora_r,
                      lora_alpha=2.0 * max(lora_r, 1), lora_target_modules=["q_proj", "v_proj", "gate_proj"])
    rank = int(os.environ.get("RANK", 0))
    counts = []

    def loss_fn(mod, batch):
        loss, metrics = sft_loss(mod, batch)
        counts.append(metrics["num_tokens"])
        if not token_weighted:
            metrics = {k: v for k, v in metrics.items() if k != "num_tokens"}
        return loss, metrics

    def on_step(step, metrics):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(m, cfg, examples(), SFTCollator(tok), loss_fn, on_step=on_step)
    trainer.train()
    with open(os.path.join(out, f"tokens-rank{rank}.json"), "w") as f:
        json.dump(counts, f)
    trainer.export(os.path.join(out, "export"), tok, max_shard_size="20KB")
    return m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="none")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    run(a.out, a.strategy, a.dtype, a.batch_size, a.grad_accum, a.steps, a.save_every, a.kill_at, a.lora_r)


if __name__ == "__main__":
    main()
