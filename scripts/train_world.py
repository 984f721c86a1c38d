"""Trains the tiny models shipped in distillkit/world/assets/ (CPU, one thread: 17 minutes measured on a busy
2-core machine).

    nice -n 5 python scripts/train_world.py --out distillkit/world/assets          # the shipped run
    python scripts/train_world.py --out /tmp/world --scale 0.1                      # a quick smoke run

Models (all Llama, character tokenizer of distillkit.world.tiny, saved as float16 safetensors with
their tokenizer in Hugging Face format; reload with distillkit.world.load_model(name)):

  base              hidden 128, 2 layers, trained on correct 3-step traces (not shipped)
  teacher-carry     base fine-tuned on traces that err on every carry step (a + b >= 10)
  teacher-borrow    ... on every borrow step (a - b < 0)
  teacher-overflow  ... on every overflow step (a * b >= 10)
  meta-prover       base fine-tuned to write the final answer after a partial trace (0-3 steps,
                    correct or flawed): the answer the written steps lead to, computed correctly
  student-base      hidden 64, 2 layers, trained on 2-step problems only: knows the format and the
                    arithmetic but not 3-step problems (what distillation then teaches it)

Every model is evaluated after the float16 round trip on the first EVAL_N held-out problems
(seed EVAL_SEED, never trained on); the numbers go to <out>/manifest.json, which the tests check.
Seeds are fixed; the run is deterministic with one thread.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time

import torch

from distillkit.world import problems as W
from distillkit.world.tiny import build_tokenizer, tiny_causal_lm

log = logging.getLogger("train_world")

EVAL_SEED = 12345     # held-out problems: generate_problems(EVAL_N, seed=EVAL_SEED)
EVAL_N = 512
TRAIN_SEED = 1
TEACHER = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)
STUDENT = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)


# ----------------------------------------------------------------------------------------------
# Data: (prompt, response) pairs tokenised into right-padded tensors, loss on response tokens only
# ----------------------------------------------------------------------------------------------
def encode_pairs(tok, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels [N, T] int64: bos + prompt + response + eos."""
    rows = []
    for prompt, response in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        rows.append(([tok.bos_token_id] + p + r + [tok.eos_token_id], 1 + len(p)))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, n_prompt) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, n_prompt:len(row)] = ids[i, n_prompt:len(row)]
    return ids, mask, labels


def trace_pairs(probs: list[W.Problem], flaw: str | None) -> list[tuple[str, str]]:
    return [(p.prompt, W.trace(p, flaw)) for p in probs]


def meta_pairs(probs: list[W.Problem], rng: random.Random) -> list[tuple[str, str]]:
    """(prompt + k written steps + "</think>", " The final answer is X.") with X what those steps lead to.

    The prefix is correct or follows one flaw, so the meta-prover learns to read the running value
    the trace has reached and finish the remaining operations; a wrong step then makes the true
    answer unlikely, which is what CoRD's scoring relies on.
    """
    out = []
    flaws = [None, *W.FLAWS]
    for p in probs:
        k = rng.randint(0, len(p.ops))
        flaw = rng.choice(flaws)
        rows = W.steps(p, flaw)[:k]
        value = rows[-1][3] if rows else p.start
        for op, b in p.ops[k:]:  # the remaining operations, computed correctly
            value = W.apply_op(value, op, b)
        context = p.prompt + W.trace(p, flaw, num_steps=k, close=False) + W.END_MARKER
        out.append((context, W.ANSWER_TEMPLATE.format(answer=value)))
    return out


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(model, data, *, steps: int, lr: float, batch_size: int, seed: int, name: str,
          warmup: int = 50) -> dict:
    ids, mask, labels = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    t0, ema = time.perf_counter(), None
    for step in range(steps):
        frac = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr * frac
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=g)
        width = int(mask[idx].sum(1).max())
        loss = model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width], labels=labels[idx, :width]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if step % 200 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.0f s)", name, step, steps, ema, time.perf_counter() - t0)
    model.eval()
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "final_loss_ema": round(ema, 4),
            "train_s": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------------------------
# Evaluation (also used by the tests through distillkit.world.models)
# ----------------------------------------------------------------------------------------------
def save_fp16(model, tok, path: str):
    """Saves ``model`` as float16 safetensors + tokenizer and returns the float32 reload."""
    from distillkit.teachers.hf import load_causal_lm

    if os.path.isdir(path):
        shutil.rmtree(path)
    half = tiny_causal_lm(len(tok), **_config_kwargs(model), pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    half.load_state_dict(model.state_dict())
    half.half().save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    reloaded, _ = load_causal_lm(path, dtype="float32")
    return reloaded


def _config_kwargs(model) -> dict:
    c = model.config
    return dict(hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                intermediate_size=c.intermediate_size)


def main(argv=None) -> int:
    from distillkit.world.models import evaluate_meta_prover, evaluate_traces

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (distillkit/world/assets for the shipped run)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every step count (0.1: smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    steps = lambda n: max(10, int(n * args.scale))  # noqa: E731
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    tok = build_tokenizer()
    held_out = W.generate_problems(EVAL_N, seed=EVAL_SEED)
    exclude = [p.question for p in held_out]
    rng = random.Random(TRAIN_SEED)
    pool = W.generate_problems(60000, seed=TRAIN_SEED, exclude=exclude)
    manifest = {"eval": {"seed": EVAL_SEED, "n": EVAL_N, "num_ops": W.NUM_OPS}, "models": {},
                "torch": torch.__version__, "threads": args.threads, "scale": args.scale}
    import transformers
    manifest["transformers"] = transformers.__version__

    def record(name, model, info, evaluate):
        path = os.path.join(args.out, name)
        reloaded = save_fp16(model, tok, path)
        info = {**info, "config": _config_kwargs(model), "params": sum(p.numel() for p in model.parameters()),
                **evaluate(reloaded)}
        manifest["models"][name] = info
        log.info("%s: %s", name, {k: v for k, v in info.items() if k != "config"})
        with open(os.path.join(args.out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)

    ev_traces = lambda m: evaluate_traces(m, tok, held_out)  # noqa: E731

    # 1. the base: correct traces
    base = tiny_causal_lm(len(tok), **TEACHER, seed=TRAIN_SEED, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    info = train(base, encode_pairs(tok, trace_pairs(pool, None)), steps=steps(1200), lr=3e-3, batch_size=64,
                 seed=TRAIN_SEED, name="base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_eval = ev_traces(base)
    manifest["base"] = {**info, **base_eval}
    log.info("base: %s", manifest["base"])

    # 2. teachers with complementary flaws: fine-tuned from the base on traces that err on one kind
    for i, flaw in enumerate(W.FLAWS):
        base.load_state_dict(base_state)
        data = encode_pairs(tok, trace_pairs(pool[:20000], flaw))
        info = train(base, data, steps=steps(600), lr=1e-3, batch_size=64, seed=TRAIN_SEED + 10 + i,
                     name=f"teacher-{flaw}", warmup=20)
        record(f"teacher-{flaw}", base, {**info, "flaw": flaw, "init": "base"}, ev_traces)

    # 3. the meta-prover
    base.load_state_dict(base_state)
    data = encode_pairs(tok, meta_pairs(pool, rng))
    info = train(base, data, steps=steps(1500), lr=1e-3, batch_size=64, seed=TRAIN_SEED + 20,
                 name="meta-prover", warmup=20)
    record("meta-prover", base, {**info, "init": "base"},
           lambda m: evaluate_meta_prover(m, tok, held_out))

    # 4. the student's starting point: 2-step problems only
    two_held = W.generate_problems(256, seed=EVAL_SEED, num_ops=2)
    two_step = W.generate_problems(8000, seed=TRAIN_SEED + 30, num_ops=2, exclude=[p.question for p in two_held])
    student = tiny_causal_lm(len(tok), **STUDENT, seed=TRAIN_SEED + 31, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    info = train(student, encode_pairs(tok, trace_pairs(two_step, None)), steps=steps(1500), lr=3e-3,
                 batch_size=64, seed=TRAIN_SEED + 32, name="student-base")
    record("student-base", student, {**info, "init": "random", "trained_on": "2-step problems"},
           lambda m: {**ev_traces(m), "two_step": evaluate_traces(m, tok, two_held)})
    manifest["total_s"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    log.info("done in %.0f s", manifest["total_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
