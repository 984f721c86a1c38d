"""Runs of distillkit.integrations.hf.SkewKLTrainer for the multi-process tests: as a plain script (one process),
under torchrun, or under ``accelerate launch``; rank 0 writes what it saw to --out (torch.save).

    train        one SGD step (per-device batch --batch, accumulation --accum) on the 8 fixed examples;
                 saves world size, distributed type and every parameter's change
    both         train, then fsdp2-loss, in one launch (--out a folder)
    fsdp2-loss   the trainer's loss on a fixed batch of 4 (each rank its slice) with the student sharded by
                 fully_shard (each decoder layer, the lm_head in its own group with --own-head, then the root)
                 and the teacher sharded the way the trainer shards it under FSDP2; saves the global loss and
                 the full gradients (one process: the same, unsharded)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _hf_fixtures as fx  # noqa: E402


def _args(out_dir, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=out_dir, max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                max_grad_norm=0.0, weight_decay=0.0, report_to=[], save_strategy="no", logging_strategy="no",
                use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def train(opts):
    from distillkit.integrations.hf import SkewKLTrainer

    tok = fx.tokenizer()
    student, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = _args(os.path.dirname(opts.out), per_device_train_batch_size=opts.batch,
                 gradient_accumulation_steps=opts.accum)
    trainer = SkewKLTrainer(model=student, teacher_model=teacher, args=args, train_dataset=fx.examples(len(tok), 8),
                            processing_class=tok, alpha=0.1, reverse=opts.reverse)
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save({"world_size": trainer.accelerator.num_processes,
                    "distributed_type": str(trainer.accelerator.distributed_type),
                    "steps": {n: (p.detach() - before[n]) for n, p in student.named_parameters()}}, opts.out)


def fsdp2_loss(opts):
    import torch.distributed as dist

    from distillkit.integrations._common import shard_fsdp2
    from distillkit.integrations.hf import SkewKLTrainer

    tok = fx.tokenizer()
    student, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok) + 6, seed=1, hidden=48)  # padded teacher
    trainer = SkewKLTrainer(model=student, teacher_model=teacher, args=_args(os.path.dirname(opts.out)),
                            processing_class=tok, alpha=0.1, reverse=opts.reverse)
    world = trainer.accelerator.num_processes
    rank = trainer.accelerator.process_index
    inputs = fx.batch(len(tok), n=4)
    count = inputs["labels"][:, 1:].ne(-100).sum()
    model = student
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in student.model.layers:
            fully_shard(layer)
        if opts.own_head:
            fully_shard(student.lm_head)
        fully_shard(student)
        trainer.teacher_model = shard_fsdp2(teacher)
        rows = inputs["input_ids"].shape[0] // world
        inputs = {k: v[rank * rows:(rank + 1) * rows] for k, v in inputs.items()}
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=count)
    loss.backward()
    grads = {}
    for name, p in student.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    total = loss.detach() / world  # each rank's loss carries the factor world (DDP/FSDP average the gradients)
    if world > 1:
        dist.all_reduce(total)
    if rank == 0:
        torch.save({"world_size": world, "loss": total, "grads": grads}, opts.out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "fsdp2-loss", "both"])
    parser.add_argument("--out", required=True, help="file; for 'both' a folder (train.pt, fsdp2.pt)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--reverse", action="store_true")
    parser.add_argument("--own-head", action="store_true")
    opts = parser.parse_args()
    torch.manual_seed(0)
    if opts.mode == "both":  # one launch for the two checks (a launch costs ~20 s of imports on 2 cores)
        folder = opts.out
        train(argparse.Namespace(**{**vars(opts), "out": os.path.join(folder, "train.pt")}))
        fsdp2_loss(argparse.Namespace(**{**vars(opts), "out": os.path.join(folder, "fsdp2.pt")}))
    else:
        (train if opts.mode == "train" else fsdp2_loss)(opts)


if __name__ == "__main__":
    main()
