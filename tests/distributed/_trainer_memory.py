"""Per-rank memory of FSDP2 training on the CPU, for README "Scaling out": run under
``torchrun --nproc_per_node N tests/distributed/_trainer_memory.py --hidden 512 --layers 8``. Prints one JSON line
per rank: peak RSS while building the (full) model, peak RSS during training (the high-water mark reset through
/proc/self/clear_refs once the model is sharded), and this rank's bytes of parameters + gradients + AdamW state."""
import argparse
import json
import os

import torch

from distillkit.pipeline.data import SFTCollator, sft_loss
from distillkit.pipeline.train import TrainConfig, Trainer
from distillkit.world.tiny import build_tokenizer, tiny_causal_lm


def _status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def main():
    from _trainer_run import examples

    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=0, help="0: the world tokenizer's")
    p.add_argument("--out", default="/tmp/fsdp-memory")
    a = p.parse_args()
    torch.set_num_threads(1)
    tok = build_tokenizer()
    model = tiny_causal_lm(a.vocab or len(tok), hidden_size=a.hidden, num_layers=a.layers, num_heads=4,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    build_peak = _status_kib("VmHWM")
    cfg = TrainConfig(output_dir=os.path.join(a.out, os.environ.get("WORLD_SIZE", "1")), max_steps=3, batch_size=2,
                      progress=False, strategy="fsdp", resume=False)
    trainer = Trainer(model, cfg, examples(), SFTCollator(tok), sft_loss)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS: the full model built above is gone, the shards stay
    trainer.train()
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                      "params": n_params, "build_peak_mib": round(build_peak / 1024),
                      "train_peak_mib": round(_status_kib("VmHWM") / 1024),
                      "state_mib": round(local * 4 * 4 / 2**20, 1)}), flush=True)


if __name__ == "__main__":
    main()
