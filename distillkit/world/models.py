"""The tiny models shipped with distillkit (trained by scripts/train_world.py) and their evaluation.

    from distillkit.world.models import load_model, asset_path, manifest
    model, tok = load_model("teacher-carry")          # float32, eval mode, char tokenizer
    manifest()["models"]["teacher-carry"]["accuracy"]  # what the training script recorded

Names: ``teacher-carry``, ``teacher-borrow``, ``teacher-overflow`` (each errs on one kind of step,
see :mod:`distillkit.world.problems`), ``meta-prover`` and ``student-base``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from distillkit.world import problems as W

# DISTILLKIT_WORLD_ASSETS points at another run of scripts/train_world.py (e.g. a retrained set).
ASSETS = os.environ.get("DISTILLKIT_WORLD_ASSETS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TEACHERS = ("teacher-carry", "teacher-borrow", "teacher-overflow")
META_PROVER = "meta-prover"
STUDENT = "student-base"
MODELS = (*TEACHERS, META_PROVER, STUDENT)


def asset_path(name: str) -> str:
    """The folder of a shipped model (a Hugging Face checkpoint: config, safetensors, tokenizer)."""
    if name not in MODELS:
        raise ValueError(f"name={name!r}: expected one of {MODELS}")
    path = os.path.join(ASSETS, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: shipped model missing; run scripts/train_world.py --out {ASSETS}")
    return path


def manifest() -> dict:
    """What scripts/train_world.py recorded: configs, training steps and times, accuracies."""
    with open(os.path.join(ASSETS, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def load_model(name: str, *, dtype: str = "float32"):
    """(model in eval mode, tokenizer) of a shipped model, loaded with ``from_pretrained``."""
    from distillkit.teachers.hf import load_causal_lm

    return load_causal_lm(asset_path(name), dtype=dtype)


def max_new_tokens(num_ops: int = W.NUM_OPS) -> int:
    """Tokens a complete response takes (10 for step 1, 11 for each later step, 6 for the answer) plus
    eos and one spare."""
    return 11 * num_ops - 1 + 6 + 2


def evaluate_traces(model, tokenizer, probs: Sequence[W.Problem], *, batch_size: int = 128) -> dict:
    """Greedy traces of ``probs`` checked by :func:`distillkit.world.problems.check_trace`.

    Returns {"accuracy" (final answer right), "well_formed", "step_error": {kind: fraction of that
    kind's well-placed steps written wrong}, "n"}.
    """
    from distillkit.evaluate import generate

    if not probs:
        raise ValueError("probs: expected at least one problem")
    num_ops = max(len(p.ops) for p in probs)
    outputs = generate(model, tokenizer, [p.prompt for p in probs], max_new_tokens=max_new_tokens(num_ops),
                       batch_size=batch_size)
    checks = [W.check_trace(p.question, out) for p, out in zip(probs, outputs)]
    wrong = {k: 0 for k in W.KINDS}
    total = {k: 0 for k in W.KINDS}
    for c in checks:
        for s in c["steps"]:
            if s["consistent"]:
                total[s["kind"]] += 1
                wrong[s["kind"]] += not s["ok"]
    return {"n": len(probs),
            "accuracy": round(sum(c["answer_ok"] for c in checks) / len(checks), 4),
            "well_formed": round(sum(c["well_formed"] for c in checks) / len(checks), 4),
            "step_error": {k: round(wrong[k] / total[k], 4) if total[k] else None for k in W.KINDS}}


@torch.no_grad()
def answer_logprobs(model, tokenizer, contexts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """log p(answer digit | context + " The final answer is ") for one-digit answers -> float32 [N].

    ``contexts`` end with "</think>" (the meta-prover template's context part).
    """
    if len(contexts) != len(answers):
        raise ValueError(f"answers: expected {len(contexts)} entries, got {len(answers)}")
    texts = [c + W.ANSWER_TEMPLATE.format(answer=a)[:-1] for c, a in zip(contexts, answers)]
    enc = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):  # right padding: the answer digit is each row's last token
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    last = mask.sum(1) - 1
    rows = torch.arange(len(enc))
    return torch.log_softmax(logits[rows, last - 1], -1)[rows, ids[rows, last]]


def evaluate_meta_prover(model, tokenizer, probs: Sequence[W.Problem], *, batch_size: int = 256) -> dict:
    """How well a meta-prover tells a correct partial trace from a flawed one.

    Returns {"answer_accuracy_by_steps": [k -> fraction whose argmax answer after k correct steps is
    the truth], "ranking_accuracy": fraction of (problem, k, flaw) with a flawed prefix that differs
    from the correct one where the true answer is likelier after the correct prefix, "n"}.
    """
    num_ops = len(probs[0].ops)
    digits = [str(d) for d in range(W.MODULUS)]
    by_k = []
    for k in range(num_ops + 1):
        ctx = [p.prompt + W.trace(p, num_steps=k, close=False) + W.END_MARKER for p in probs]
        lp = torch.cat([torch.stack([answer_logprobs(model, tokenizer, ctx[i:i + batch_size], [d] * len(ctx[i:i + batch_size]))
                                     for d in digits], 1) for i in range(0, len(ctx), batch_size)])
        truth = torch.tensor([int(p.answer) for p in probs])
        by_k.append(round(float((lp.argmax(1) == truth).float().mean()), 4))
    good, bad = [], []
    for p in probs:
        for k in range(1, num_ops + 1):
            right = W.trace(p, num_steps=k, close=False)
            for flaw in W.FLAWS:
                wrong = W.trace(p, flaw, num_steps=k, close=False)
                if wrong != right:
                    good.append((p.prompt + right + W.END_MARKER, p.answer))
                    bad.append((p.prompt + wrong + W.END_MARKER, p.answer))
    wins = []
    for i in range(0, len(good), batch_size):
        g = answer_logprobs(model, tokenizer, [c for c, _ in good[i:i + batch_size]], [a for _, a in good[i:i + batch_size]])
        b = answer_logprobs(model, tokenizer, [c for c, _ in bad[i:i + batch_size]], [a for _, a in bad[i:i + batch_size]])
        wins.append(g > b)
    ranking = float(torch.cat(wins).float().mean()) if wins else float("nan")
    return {"n": len(probs), "answer_accuracy_by_steps": by_k, "ranking_accuracy": round(ranking, 4),
            "ranking_pairs": len(good)}
