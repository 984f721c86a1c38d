"""MetaProver benchmark: one CoRD scoring step, B beams x K teachers = C candidates.

Each candidate is beam prefix (P tokens) + proposed step (S tokens) + answer prompt + answer
(M tokens); the C candidates of one beam share its prefix.
  providers  "eager": what a user writes, model(...).logits over the whole padded batch,
             float32 log_softmax, gather at the answer positions, no cache reuse;
             "no-reuse": MetaProver running every candidate in full (answer-position lm_head only);
             "reuse": MetaProver running each beam prefix once and the candidates' suffixes on a
             copy of its KV cache.
  shapes     CPU: hidden 256, 4 layers, V=32000 fp32, P=384, S=48, B=K=4;
             GPU: hidden 1024, 8 layers, V=128256 bf16, P=2048, S=128, B=K=4 (bench/shapes.py; the tiny
             profile a toy model).
  metrics    tokens run through the model body, median time, peak extra memory, ratio to eager
             (same run), roofline fraction = FLOPs of the minimal work (body over the reuse token
             count + lm_head at the answer rows) at the dense matmul rate measured in this run / time.

    pytest bench/bench_meta_prover.py -q -s
"""
from __future__ import annotations

import random

import pytest
import torch

import shapes
from _util import Row, device, matmul_flops, median_time_s, peak_extra_bytes, report
from distillkit.methods.meta_prover import MetaProver
from distillkit.world.tiny import build_tokenizer, tiny_causal_lm

DEV = device()
SHAPE = dict(shapes.meta_prover_shape(DEV.type == "cuda"),
             dtype=torch.bfloat16 if DEV.type == "cuda" else torch.float32)
ANSWER = "1234"
ROWS: list[Row] = []


def _text(rng: random.Random, n: int) -> str:
    # One token per character with the tiny tokenizer: n characters are n tokens.
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz  ,.0123456789") for _ in range(n))


def _workload():
    rng = random.Random(0)
    beams = [f"Q{b}: " + _text(rng, SHAPE["prefix"] - 5) for b in range(SHAPE["beams"])]
    pairs, prefixes = [], []
    for beam in beams:
        for _ in range(SHAPE["teachers"]):
            pairs.append((beam + _text(rng, SHAPE["step"]), ANSWER))
            prefixes.append(beam)
    return pairs, prefixes


def eager_scores(model, prover: MetaProver, pairs, batch: int) -> torch.Tensor:
    """Full logits for every position of the padded batch, float32 log_softmax, gather."""
    out = []
    for i in range(0, len(pairs), batch):
        enc = [prover.encode(c, a) for c, a in pairs[i:i + batch]]
        width = max(len(ids) for ids, _ in enc)
        ids = torch.zeros(len(enc), width, dtype=torch.long)
        for r, (row, _) in enumerate(enc):
            ids[r, :len(row)] = torch.tensor(row)
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids.to(DEV)).logits.float(), dim=-1)
        for r, (row, start) in enumerate(enc):
            pos = torch.arange(start - 1, len(row) - 1, device=DEV)
            tgt = torch.tensor(row[start:], device=DEV)
            out.append(logp[r, pos, tgt].mean().exp().cpu())
        del logp
    return torch.stack(out)


def test_meta_prover(benchmark):
    tok = build_tokenizer()
    model = tiny_causal_lm(SHAPE["vocab"], hidden_size=SHAPE["hidden"], num_layers=SHAPE["layers"],
                           num_heads=SHAPE["heads"], seed=0).to(DEV, SHAPE["dtype"])
    pairs, prefixes = _workload()
    body_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    flops = matmul_flops(SHAPE["dtype"], n=4096 if DEV.type == "cuda" else 1024, dev=DEV)
    c = len(pairs)
    case = (f"C={c} (B={SHAPE['beams']} K={SHAPE['teachers']}) P={SHAPE['prefix']} S={SHAPE['step']} "
            f"H={SHAPE['hidden']} L={SHAPE['layers']} V={SHAPE['vocab']} {str(SHAPE['dtype']).split('.')[-1]}")
    provers = {"reuse": MetaProver(model, tok, reuse_prefix_cache=True, batch_size=SHAPE["batch"]),
               "no-reuse": MetaProver(model, tok, reuse_prefix_cache=False, batch_size=SHAPE["batch"])}
    calls = {name: (lambda p=p: p.score(pairs, prefixes=prefixes)) for name, p in provers.items()}
    calls["eager"] = lambda: eager_scores(model, provers["no-reuse"], pairs, SHAPE["batch"])
    rows, outs, tokens, peaks = {}, {}, {}, {}
    names = ("eager", "no-reuse", "reuse")
    for name in names:
        peaks[name], outs[name] = peak_extra_bytes(calls[name], DEV)
        if name in provers:
            before = provers[name].stats.tokens_processed
            calls[name]()
            tokens[name] = provers[name].stats.tokens_processed - before
        else:
            tokens[name] = sum(len(provers["reuse"].encode(ctx, a)[0]) for ctx, a in pairs)
    # Providers alternate round by round, so a change in machine load hits all of them alike.
    times = {name: [] for name in names}
    for _ in range(3):
        for name in names:
            times[name].append(median_time_s(calls[name], DEV, warmup=0, repeats=1))
    for name in names:
        t = sorted(times[name])[len(times[name]) // 2]
        rows[name] = Row("meta_prover", case, name, "eager" if name == "eager" else "meta_prover", t, peaks[name],
                         extra={"tokens_processed": tokens[name], "threads": torch.get_num_threads()})
    backend_used = provers["reuse"].backend or "auto"
    from distillkit._backend import select_backend

    auto = select_backend("answer_logprobs", DEV, provers["reuse"].backend)
    minimal = 2.0 * body_params * tokens["reuse"] + 2.0 * c * len(ANSWER) * SHAPE["vocab"] * SHAPE["hidden"]
    for name, r in rows.items():
        r.ratio_to_eager = r.time_s / rows["eager"].time_s
        r.roofline_fraction = minimal / flops / r.time_s
        r.extra["scoring_backend"] = "lm_head over all positions" if name == "eager" else f"{backend_used} -> {auto}"
        r.extra["max_abs_diff_vs_eager"] = (outs[name].double() - outs["eager"].double()).abs().max().item()
        ROWS.append(r)
    benchmark.extra_info.update({n: r.time_s for n, r in rows.items()})
    benchmark.pedantic(calls["reuse"], rounds=1, iterations=1)
    for name, r in rows.items():
        print(f"  {name:<9} scoring backend {r.extra['scoring_backend']}: {r.extra['tokens_processed']:6d} tokens, "
              f"{r.time_s * 1e3:8.1f} ms, {r.ratio_to_eager:.2f}x eager, peak {r.peak_bytes / 2**20:.0f} MiB, "
              f"{r.roofline_fraction:.0%} of the minimal-work matmul floor, "
              f"|S - S_eager| {r.extra['max_abs_diff_vs_eager']:.1e}")
    assert rows["reuse"].extra["tokens_processed"] < rows["no-reuse"].extra["tokens_processed"]
    torch.testing.assert_close(outs["reuse"].double(), outs["eager"].double(), rtol=2e-2 if DEV.type == "cuda"
                               else 1e-4, atol=1e-6)


def test_meta_prover_report():
    if not ROWS:
        pytest.skip("nothing measured")
    report(ROWS, "meta_prover")
