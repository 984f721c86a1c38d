"""`distillkit demo`: the main job, end to end on a laptop CPU with nothing downloaded.

For now it shows the merge step of Merge-of-Thought: two branches of a tiny Hugging Face model are
fine-tuned on different kinds of text, saved as checkpoints, merged with the streaming merge
(average, TIES, DARE), reloaded with ``from_pretrained``, and evaluated on both kinds of text.
The streaming average is checked against the in-memory ``average_`` kernel bit for bit.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import time

import torch

log = logging.getLogger(__name__)


def _texts(kind: str, n: int, rng: random.Random) -> list[str]:
    if kind == "add":
        out = []
        for _ in range(n):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            out.append(f"### Step 1: {a} + {b} = {a + b}</think> The final answer is {a + b}.")
        return out
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        out.append(f"### Step 1: {a} * {b} = {a * b}</think> The final answer is {a * b}.")
    return out


def _batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


def _finetune(model, tok, texts, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = texts[(step * 16) % len(texts):][:16]
        ids, mask, labels = _batch(tok, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def _loss(model, tok, texts) -> float:
    ids, mask, labels = _batch(tok, texts)
    return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def run(out_dir: str, *, steps: int = 60, seed: int = 0) -> list[tuple[str, float, float]]:
    """Builds, fine-tunes, merges and evaluates; returns rows (model, loss on addition, loss on products)."""
    from transformers import AutoModelForCausalLM

    from distillkit.merge import average_, merge_checkpoints
    from distillkit.world.tiny import build_tokenizer, tiny_causal_lm

    rng = random.Random(seed)
    tok = build_tokenizer()
    data = {k: _texts(k, 256, rng) for k in ("add", "mul")}
    held_out = {k: _texts(k, 64, rng) for k in ("add", "mul")}
    os.makedirs(out_dir, exist_ok=True)

    base = tiny_causal_lm(len(tok), hidden_size=64, num_layers=2, seed=seed, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    _finetune(base, tok, data["add"][:64] + data["mul"][:64], steps // 2, seed)  # a shared starting point
    paths = {"base": os.path.join(out_dir, "base")}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for i, kind in enumerate(("add", "mul")):
        branch = AutoModelForCausalLM.from_pretrained(paths["base"])
        _finetune(branch, tok, data[kind], steps, seed + 1 + i)
        paths[kind] = os.path.join(out_dir, f"branch-{kind}")
        branch.save_pretrained(paths[kind])
        tok.save_pretrained(paths[kind])

    merged = {}
    for method, kwargs in (("average", {}), ("ties", {"density": 0.5}), ("dare", {"density": 0.5, "seed": seed})):
        extra = {"base": paths["base"], **kwargs} if method != "average" else {}
        merged[method] = merge_checkpoints([paths["add"], paths["mul"]], os.path.join(out_dir, f"merged-{method}"),
                                           method=method, overwrite=True, progress=True, **extra)

    # the streaming merge equals the in-memory kernel on the loaded branches, bit for bit
    a, b = (AutoModelForCausalLM.from_pretrained(paths[k]) for k in ("add", "mul"))
    average_(a, [a, b])
    reloaded = AutoModelForCausalLM.from_pretrained(merged["average"])
    for (name, x), y in zip(a.state_dict().items(), reloaded.state_dict().values()):
        if not torch.equal(x, y):
            raise RuntimeError(f"streaming merge differs from average_ at {name}")

    rows = []
    for label, path in [("base", paths["base"]), ("branch: addition", paths["add"]), ("branch: products", paths["mul"])] + \
            [(f"merged: {m}", p) for m, p in merged.items()]:
        model = AutoModelForCausalLM.from_pretrained(path)
        rows.append((label, _loss(model, tok, held_out["add"]), _loss(model, tok, held_out["mul"])))
    return rows


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="distillkit demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="distillkit-demo", help="working directory for checkpoints (default ./distillkit-demo)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps per branch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    rows = run(args.out, steps=args.steps, seed=args.seed)
    print(f"\n{'model':<20} {'loss: addition':>15} {'loss: products':>15}")
    for label, la, lm in rows:
        print(f"{label:<20} {la:15.3f} {lm:15.3f}")
    print(f"\nstreaming average == in-memory average_ (bit-identical); checkpoints under {args.out}/ "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0
