"""VCRD: one step's gradient equals the float64 reference loss's; the PRM-free and the judge's weights
reach the loss; each weighting ablation's formula; an end-to-end run writes metrics and a model and
resumes exactly; config errors name the field."""
import copy
import json
import math
import os

import pytest
import torch

from _tolerance import assert_eager_budget
from distillkit._backend import backends
from distillkit.methods import vcrd
from distillkit.methods.vcrd import (
    IGNORE_INDEX,
    WEIGHTINGS,
    VcrdConfig,
    build_rollouts,
    combine_validity,
    rollout,
    target_positions,
    vcrd_step,
)
from distillkit.methods.vcrd import runner as vcrd_runner  # the module whose run() calls these
from distillkit.methods.vcrd.judges import CallableJudge
from distillkit.reference import skew_kl as ref_skl
from distillkit.reference import validity as ref_validity
from distillkit.teachers.base import Proposal
from distillkit.teachers.hf import HFTeacher
from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint, tiny_causal_lm

PROMPTS = ["1 + 2\n<think> ### Step", "3 * 4 = ?\n<think> ### Step"]
# greedy candidates and per-term token means: the variants whose formulas these tests check against full logits
OPTS = dict(alpha=0.2, lambda_t=0.7, lambda_s=1.3, top_k=16, gamma=0.5, clip=(0.5, 2.0), chunk_size=5,
            candidate_tokens="greedy", normalization="token")


def _peaky(model, scale):
    with torch.no_grad():  # random tiny models are near-uniform: sharpen them so the divergences matter
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def world():
    tok = build_tokenizer()
    student = _peaky(tiny_causal_lm(len(tok), arch="llama", hidden_size=32, num_layers=2, num_heads=2, seed=1), 20)
    teacher = _peaky(tiny_causal_lm(len(tok), arch="qwen2", hidden_size=48, num_layers=2, num_heads=2, seed=2), 30)
    rolls = rollout(HFTeacher(teacher, tok), HFTeacher(student, tok), tok, PROMPTS, max_new_tokens=8,
                    temperature=1.0, seed=7)
    student.train()
    return tok, student, teacher, rolls


def _grads(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in
            model.named_parameters()}


def _step_grads(student, teacher, rolls, **kw):
    student.zero_grad(set_to_none=True)
    res = vcrd_step(student, teacher, rolls, **{**OPTS, **kw})
    res.loss.backward()
    return res, _grads(student)


def _full_logits(model, rolls, dtype):
    m = copy.deepcopy(model).to(dtype)
    return m, m(input_ids=rolls.input_ids, attention_mask=rolls.attention_mask).logits


def _reference_loss(z_s, z_t, rolls, weights, *, alpha, lambda_t, lambda_s, normalization="token"):
    """lambda_T mean_T(w SKL) + lambda_S mean_S(w SRKL) from full logits and the reference formulas
    (normalization "sequence": each term's sum over tokens / number of prompts, Algorithm 1);
    position t's logits predict token t + 1."""
    z_s, z_t = z_s[:, :-1], z_t[:, :-1].detach()
    labels, w = rolls.labels[:, 1:], weights[:, :-1].to(z_s.dtype)
    B = rolls.num_prompts
    total = 0
    for lam, fn, rows in ((lambda_t, ref_skl.skew_kl, slice(0, B)),
                          (lambda_s, ref_skl.skew_reverse_kl, slice(B, None))):
        d = fn(z_s[rows], z_t[rows], alpha=alpha, reduction="none")
        keep = labels[rows] != IGNORE_INDEX
        count = keep.sum().clamp(min=1) if normalization == "token" else B
        total = total + lam * torch.where(keep, d * w[rows], torch.zeros_like(d)).sum() / count
    return total


def test_rollouts_mask_prompt_and_padding(world):
    tok, _, _, rolls = world
    B = len(PROMPTS)
    assert rolls.input_ids.shape[0] == 2 * B and rolls.num_prompts == B and len(rolls.texts) == 2 * B
    for i in range(2 * B):
        p = tok(PROMPTS[i % B])["input_ids"]
        n = int(rolls.attention_mask[i].sum())
        assert rolls.input_ids[i, :len(p)].tolist() == p
        assert (rolls.labels[i, :len(p)] == IGNORE_INDEX).all() and (rolls.labels[i, n:] == IGNORE_INDEX).all()
        assert rolls.labels[i, len(p):n].tolist() == rolls.input_ids[i, len(p):n].tolist()
        assert 0 < n - len(p) <= 8
    # hand-made proposals: EOS appended when generation ended with it, the budget respected
    props_t = [Proposal("12", 3, True, "eos"), Proposal("abcdefghij", 8, False, "length")]
    props_s = [Proposal("", 0, False, "length"), Proposal("x", 2, True, "eos")]
    r = build_rollouts(tok, PROMPTS, props_t, props_s, max_new_tokens=4)
    rollout_ids = [r.labels[i][r.labels[i] != IGNORE_INDEX].tolist() for i in range(4)]
    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]
    assert rollout_ids == [enc("12") + [tok.eos_token_id], enc("abcd"), [], enc("x") + [tok.eos_token_id]]
    assert target_positions(r.labels).sum() == sum(len(x) for x in rollout_ids)


def test_rollouts_are_reproducible_from_the_seed(world):
    tok, student, teacher, rolls = world
    again = rollout(HFTeacher(teacher, tok), HFTeacher(student, tok), tok, PROMPTS, max_new_tokens=8,
                    temperature=1.0, seed=7)
    student.train()
    assert torch.equal(again.input_ids, rolls.input_ids) and again.texts == rolls.texts
    assert again.texts[:2] != again.texts[2:]  # the student's rollouts are its own


# the default kernel backend here is "cpu" (the C++ extension), "reference" is the eager fallback; the
# Triton interpreter is covered at the op level (tests/ops), too slow to repeat through whole models
@pytest.mark.parametrize("case", ["uniform", "clamped_ratio", "ratio", "judge:r_s_minus_r_t",
                                  "clamped_ratio@reference", "clamped_ratio#sequence", "judge:ratio#sequence"])
def test_step_gradient_matches_float64_reference(world, case):
    _, student, teacher, rolls = world
    judge, backend = None, None
    case, _, normalization = case.partition("#")
    normalization = normalization or "token"
    case, _, backend = case.partition("@")
    if backend and not backends()[backend][0]:
        pytest.skip(f"backend {backend}: {backends()[backend][1]}")
    weighting = case
    if case.startswith("judge:"):
        weighting = case.split(":")[1]
        judge = CallableJudge(lambda p, t: ((t * 7 + p) % 11).float() / 10)
    res, got = _step_grads(student, teacher, rolls, judge=judge, weighting=weighting, backend=backend or None,
                           normalization=normalization)
    assert res.metrics["tokens_teacher_prefix"] > 0 and res.metrics["tokens_student_prefix"] > 0
    # the same weights (constants) in the float64 reference and the float32 eager baseline
    errs, losses = {}, {}
    for dtype in (torch.float64, torch.float32):
        s, z_s = _full_logits(student, rolls, dtype)
        _, z_t = _full_logits(teacher, rolls, dtype)
        loss = _reference_loss(z_s, z_t, rolls, res.weights.weight, alpha=OPTS["alpha"],
                               lambda_t=OPTS["lambda_t"], lambda_s=OPTS["lambda_s"], normalization=normalization)
        loss.backward()
        losses[dtype] = loss.detach()
        errs[dtype] = _grads(s)
    want = errs[torch.float64]
    assert_eager_budget(res.loss, losses[torch.float32], losses[torch.float64], what="loss")
    assert abs(float(losses[torch.float64])) > 1e-3  # a loss that is not trivially ~0 (r_s - r_t may be < 0)
    for name, g64 in want.items():
        assert g64.abs().max().item() > 0, name
        # STYLE habit 6: no worse than twice plain PyTorch float32 (plus a few float32 ulps of the tensor's scale)
        assert_eager_budget(got[name], errs[torch.float32][name], g64, out_dtype=torch.float32, scale="tensor",
                            what=name)


def test_step_never_builds_full_vocabulary_logits(world):
    _, student, teacher, rolls = world
    heads_called = []
    # the models' own forwards run (so a DDP / FSDP2 wrapper's hooks do), their heads on one position only
    hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, args, out: heads_called.append(out.shape[-2]))
             for m in (student, teacher)]
    try:
        _step_grads(student, teacher, rolls, weighting="clamped_ratio")
        _step_grads(student, teacher, rolls, judge=CallableJudge(lambda p, t: torch.full(t.shape, 0.5)),
                    weighting="ratio")
    finally:
        for h in hooks:
            h.remove()
    # hidden states + fused-linear kernels only (weights: chunks of rows); no [R, L, V] logits
    assert heads_called == [1] * 4 and rolls.input_ids.shape[1] > 1


def test_prm_free_weights_equal_full_logit_formulas(world):
    _, student, teacher, rolls = world
    mask = target_positions(rolls.labels)

    def formulas(dtype):
        """r_s, r_t and each weighting from full logits in `dtype` (float64: the truth; float32: plain PyTorch)."""
        with torch.no_grad():
            z_s = _full_logits(student, rolls, dtype)[1]
            z_t = _full_logits(teacher, rolls, dtype)[1]
        a_s = z_s.argmax(-1, keepdim=True)
        log_p = torch.log_softmax(z_t, -1)
        r_s = log_p.gather(-1, a_s).squeeze(-1).exp()
        top = log_p.topk(OPTS["top_k"], -1).values.exp()
        r_t = (top * top).sum(-1)
        return {"uniform": torch.ones_like(r_s), "ratio": r_s / (r_t + 1e-8), "r_s": r_s,
                "r_s_minus_r_t": r_s - r_t, "r_t": r_t,
                "clamped_ratio": ref_validity.teacher_likelihood_validity(z_t, z_s, top_k=OPTS["top_k"], gamma=0.5,
                                                                          clip=(0.5, 2.0), compute_dtype=dtype)}

    want, eager = formulas(torch.float64), formulas(torch.float32)

    def check(got, name):
        # positive per-token numbers: relative per element; r_s - r_t cancels: on the tensor's scale
        assert_eager_budget(got[mask], eager[name][mask], want[name][mask], out_dtype=torch.float32,
                            scale="tensor" if name == "r_s_minus_r_t" else "element", what=name)

    for weighting in WEIGHTINGS:
        res = vcrd_step(student, teacher, rolls, weighting=weighting, **OPTS)
        w = res.weights
        assert (w.weight[~mask] == 0).all()
        check(w.r_s, "r_s")
        check(w.r_t, "r_t")
        check(w.weight, weighting)
    # the clamped weights are not all saturated (else this test would not see the ratio)
    clamped = want["clamped_ratio"][mask]
    assert ((clamped > 0.5 + 1e-6) & (clamped < 2.0 - 1e-6)).any()


class _RecordingJudge:
    def __init__(self, fn):
        self.calls, self.fn = [], fn

    def __call__(self, prefix_ids, token_ids, mask=None):
        self.calls.append((prefix_ids.clone(), token_ids.clone(), mask.clone()))
        return torch.where(mask, self.fn(prefix_ids, token_ids), torch.zeros(()))


def test_judge_scores_the_greedy_tokens_of_each_position(world):
    _, student, teacher, rolls = world
    judge = _RecordingJudge(lambda p, t: ((t * 3 + p) % 7).float() / 6)
    res = vcrd_step(student, teacher, rolls, judge=judge, weighting="ratio", **OPTS)
    mask = target_positions(rolls.labels)
    with torch.no_grad():
        a_s = _full_logits(student, rolls, torch.float64)[1].argmax(-1)
        a_t = _full_logits(teacher, rolls, torch.float64)[1].argmax(-1)
    (p1, t1, m1), (p2, t2, m2) = judge.calls
    assert torch.equal(p1, rolls.input_ids) and torch.equal(p2, rolls.input_ids)
    assert torch.equal(m1, mask) and torch.equal(m2, mask)
    assert torch.equal(t1[mask], a_s[mask]) and torch.equal(t2[mask], a_t[mask])
    r_s, r_t = judge.fn(p1, t1)[mask], judge.fn(p2, t2)[mask]
    torch.testing.assert_close(res.weights.weight[mask], r_s / (r_t + 1e-8))


def test_judge_weights_reach_the_loss(world):
    _, student, teacher, rolls = world
    # r_s = 0 everywhere with w = r_s: the student-prefix term (the only one here) is exactly 0
    zero = CallableJudge(lambda p, t: torch.zeros(t.shape))
    res, grads = _step_grads(student, teacher, rolls, judge=zero, weighting="r_s", lambda_t=0.0)
    assert float(res.loss.detach()) == 0.0 and res.metrics["loss_student_prefix"] == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())
    # a constant judge c scales the uniform gradient by c; a varying judge changes its direction
    _, uniform = _step_grads(student, teacher, rolls, weighting="uniform")
    const = CallableJudge(lambda p, t: torch.full(t.shape, 0.25))
    _, scaled = _step_grads(student, teacher, rolls, judge=const, weighting="r_s")
    varying = CallableJudge(lambda p, t: (t % 5).float() / 4)
    _, other = _step_grads(student, teacher, rolls, judge=varying, weighting="r_s")
    def flat(g):
        return torch.cat([v.flatten() for v in g.values()])
    # 0.25 is a power of two: scaling every weight by it commutes with every float rounding, so exactly
    torch.testing.assert_close(flat(scaled), 0.25 * flat(uniform), rtol=0, atol=0)
    cos = torch.nn.functional.cosine_similarity(flat(other), flat(uniform), dim=0)
    assert cos < 0.999
    # and the PRM-free weights change the gradient too
    _, prm_free = _step_grads(student, teacher, rolls, weighting="r_s")
    assert torch.nn.functional.cosine_similarity(flat(prm_free), flat(uniform), dim=0) < 0.999


def test_weighting_formulas_on_hand_made_validities():
    r_s = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0, 0.3], dtype=torch.float64)
    r_t = torch.tensor([0.5, 0.1, 0.5, 0.3, 0.0, 0.6], dtype=torch.float64)
    eps, gamma, (lo, hi) = 1e-8, 0.5, (0.5, 2.0)

    def clamped(a, b, g):
        x = -math.inf if a == 0 else g * math.log(a / (b + eps))
        return math.exp(min(max(x, math.log(lo)), math.log(hi)))

    pairs = list(zip(r_s.tolist(), r_t.tolist()))
    want = {
        "uniform": [1.0] * 6,
        "ratio": [a / (b + eps) for a, b in pairs],
        "r_s": [a for a, _ in pairs],
        "r_s_minus_r_t": [a - b for a, b in pairs],
        "clamped_ratio": [clamped(a, b, gamma) for a, b in pairs],
    }
    # literals written to 9 significant digits: approx's relative 1e-6 is their own precision
    assert want["clamped_ratio"] == pytest.approx([0.5, 1.41421356, 1.0, 1.73205081, 2.0, 0.70710678])
    for weighting, values in want.items():
        got = combine_validity(r_s, r_t, weighting, gamma=gamma, clip=(lo, hi), eps=eps)
        # float64 on both sides, a handful of roundings (log, div, mul, exp) with condition ~1 on these values:
        # ~10 x 2^-52 ~ 2e-15, well under 1e-12
        torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64), rtol=1e-12, atol=0,
                                   msg=weighting)
    # gamma = 0: the weight is exp(clip(0)) even where r_s = 0
    torch.testing.assert_close(combine_validity(r_s, r_t, "clamped_ratio", gamma=0.0, clip=(0.5, 2.0)),
                               torch.ones_like(r_s))
    torch.testing.assert_close(combine_validity(r_s, r_t, "clamped_ratio", gamma=1.0, clip=(1.2, 3.0)),
                               torch.tensor([1.2, 2.0, 1.2, 3.0, 3.0, 1.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="weighting"):
        combine_validity(r_s, r_t, "softmax")


def test_sequence_normalization_is_per_prompt_sums_and_the_default(world):
    _, student, teacher, rolls = world
    opts = {k: v for k, v in OPTS.items() if k != "normalization"}
    seq = vcrd_step(student, teacher, rolls, **opts).metrics  # the default: Algorithm 1
    tok = vcrd_step(student, teacher, rolls, **opts, normalization="token").metrics
    B = rolls.num_prompts
    for side in ("teacher_prefix", "student_prefix"):
        # sum over tokens / B against the mean over tokens: the two differ by (tokens of the side) / B
        n = tok[f"tokens_{side}"]
        assert seq[f"loss_{side}"] == pytest.approx(tok[f"loss_{side}"] * n / B, rel=1e-5)
    # the teacher and student rollouts differ in length here, so the lambda_T : lambda_S balance changes
    assert tok["tokens_teacher_prefix"] != tok["tokens_student_prefix"]
    with pytest.raises(ValueError, match="normalization"):
        vcrd_step(student, teacher, rolls, **opts, normalization="batch")


def _hand_made(vocab=5, rows=4000):
    """Identity heads: hidden state = logits, one fixed student and teacher distribution on every row."""
    z_s = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])[:vocab]
    z_t = torch.tensor([0.0, 1.5, 1.0, 0.2, -2.0])[:vocab]
    h_s, h_t = z_s.expand(1, rows, vocab).clone(), z_t.expand(1, rows, vocab).clone()
    head = (torch.eye(vocab), None)
    ids = torch.zeros(1, rows, dtype=torch.long)
    mask = torch.ones(1, rows, dtype=torch.bool)
    return h_s, h_t, head, ids, mask, z_s, z_t


def test_candidate_tokens_are_sampled_from_each_model_with_a_seed():
    from distillkit.methods.vcrd import validity_weights

    h_s, h_t, head, ids, mask, z_s, z_t = _hand_made()
    judge = _RecordingJudge(lambda p, t: (t.float() + 1) / 10)
    kw = dict(judge=judge, weighting="ratio", chunk_rows=512)
    validity_weights(h_s, h_t, head, head, ids, mask, **kw, seed=3)  # the default: sample
    (_, a_s, _), (_, a_t, _) = judge.calls
    for a, z in ((a_s, z_s), (a_t, z_t)):
        freq = torch.bincount(a[0], minlength=5).double() / a.shape[1]
        p = torch.softmax(z.double(), 0)
        # 4000 draws: 5 standard errors of a frequency, sqrt(p (1 - p) / n) <= 0.008
        assert (freq - p).abs().max() < 0.04, (freq, p)
    assert not torch.equal(a_s, a_t)
    judge.calls.clear()
    validity_weights(h_s, h_t, head, head, ids, mask, **kw, seed=3)
    validity_weights(h_s, h_t, head, head, ids, mask, **kw, seed=4)
    assert torch.equal(judge.calls[0][1], a_s) and torch.equal(judge.calls[1][1], a_t)  # reproducible
    assert not torch.equal(judge.calls[2][1], a_s)  # another seed, other tokens
    judge.calls.clear()
    validity_weights(h_s, h_t, head, head, ids, mask, **kw, candidate_tokens="greedy")
    assert (judge.calls[0][1] == z_s.argmax()).all() and (judge.calls[1][1] == z_t.argmax()).all()
    # PRM-free: r_s = p_T(a_S) at the sampled student token
    vw = validity_weights(h_s, h_t, head, head, ids, mask, weighting="r_s", top_k=5, seed=3, chunk_rows=512)
    p_t = torch.softmax(z_t, 0)
    torch.testing.assert_close(vw.r_s[0], p_t[a_s[0]])
    with pytest.raises(ValueError, match="candidate_tokens"):
        validity_weights(h_s, h_t, head, head, ids, mask, candidate_tokens="beam")


def test_judge_weight_is_the_raw_ratio_and_prm_free_the_clipped_one():
    from distillkit.methods.vcrd import validity_weights

    h_s, h_t, head, ids, mask, z_s, z_t = _hand_made(rows=8)
    # a judge rates every student token 0.9, every teacher token 0.1: Eq. 1 gives 9, beyond the [0.5, 2] clip
    judge = CallableJudge(lambda p, t: torch.full(t.shape, 0.9))
    both = CallableJudge(lambda p, t: torch.where(t == int(z_s.argmax()), 0.9, 0.1))
    vw = validity_weights(h_s, h_t, head, head, ids, mask, judge=both, candidate_tokens="greedy")  # default: auto
    torch.testing.assert_close(vw.weight, torch.full((1, 8), 0.9 / (0.1 + 1e-8)))
    vw = validity_weights(h_s, h_t, head, head, ids, mask, judge=judge, candidate_tokens="greedy")
    torch.testing.assert_close(vw.weight, torch.full((1, 8), 0.9 / (0.9 + 1e-8)))
    # the clipped form stays reachable with a judge, and is auto's choice without one
    vw = validity_weights(h_s, h_t, head, head, ids, mask, judge=both, candidate_tokens="greedy",
                          weighting="clamped_ratio")
    assert float(vw.weight.max()) == pytest.approx(2.0)
    auto = validity_weights(h_s, h_t, head, head, ids, mask, top_k=5, candidate_tokens="greedy")
    clamped = validity_weights(h_s, h_t, head, head, ids, mask, top_k=5, candidate_tokens="greedy",
                               weighting="clamped_ratio")
    torch.testing.assert_close(auto.weight, clamped.weight, rtol=0, atol=0)
    assert VcrdConfig(student="s", teacher="t", prompts="p").weighting == "auto"


# ---- end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcrd")
    tok = build_tokenizer()
    student = save_tiny_checkpoint(root / "student", tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    teacher = save_tiny_checkpoint(root / "teacher", arch="qwen2", tokenizer=tok, hidden_size=48, num_layers=2,
                                   num_heads=2, seed=4)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i} + {i}", "answer": str(2 * i)}) + "\n"
                               for i in range(3)))
    return root, student, teacher, str(prompts)


def _run_cfg(ckpts, name, **kw):
    root, student, teacher, prompts = ckpts
    base = dict(student=student, teacher=teacher, prompts=prompts, output_dir=str(root / name), steps=2,
                batch_size=2, lr=1e-2, rollout_tokens=6, temperature=1.0, top_k=8, eval_data=prompts, eval_limit=2,
                max_new_tokens=6, save_every=1, progress=False, seed=5)
    base.update(kw)
    return VcrdConfig(**base)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _final_state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.slow
@pytest.mark.timeout(300)  # full VCRD runs, killed and resumed: 101 s measured
def test_run_writes_metrics_model_and_resumes_exactly(ckpts, monkeypatch):
    cfg = _run_cfg(ckpts, "full")
    summary = vcrd.run(cfg)
    out = cfg.output_dir
    lines = [json.loads(x) for x in _read(os.path.join(out, "metrics.jsonl")).splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in ("loss", "loss_teacher_prefix", "loss_student_prefix", "w_teacher_prefix", "w_student_prefix",
                "r_s_teacher_prefix", "r_t_student_prefix", "grad_norm", "lr"):
        assert all(math.isfinite(x[key]) for x in lines), key
    assert summary["step"] == 2 and 0.0 <= summary["eval"]["accuracy"] <= 1.0 and summary["eval"]["n"] == 2
    assert json.loads(_read(os.path.join(out, "vcrd_summary.json")))["step"] == 2
    final = _final_state(os.path.join(out, "final"))
    start = _final_state(cfg.student)
    assert any(not torch.equal(final[k], start[k]) for k in final)  # it trained

    # a rerun of a finished run trains nothing and changes nothing
    calls = []
    real_step = vcrd.vcrd_step
    monkeypatch.setattr(vcrd_runner, "vcrd_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    before = _read(os.path.join(out, "metrics.jsonl"))
    vcrd.run(cfg)
    assert calls == [] and _read(os.path.join(out, "metrics.jsonl")) == before
    again = _final_state(os.path.join(out, "final"))
    assert all(torch.equal(again[k], final[k]) for k in final)

    # killed after step 1: the rerun resumes from the step-1 checkpoint and reaches the same weights
    killed = _run_cfg(ckpts, "killed")

    def dies_at_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    calls.clear()
    monkeypatch.setattr(vcrd_runner, "vcrd_step", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        vcrd.run(killed)
    assert torch.load(os.path.join(killed.output_dir, "trainer_state.pt"), weights_only=False)["step"] == 1
    calls.clear()
    monkeypatch.setattr(vcrd_runner, "vcrd_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    vcrd.run(killed)
    assert len(calls) == 1  # only step 2 was trained again
    steps = [json.loads(x)["step"] for x in _read(os.path.join(killed.output_dir, "metrics.jsonl")).splitlines()]
    assert steps == [1, 2]
    resumed = _final_state(os.path.join(killed.output_dir, "final"))
    for k in final:
        torch.testing.assert_close(resumed[k], final[k], rtol=0, atol=0, msg=k)  # resume is bit-exact


def _record_rollouts(monkeypatch):
    seen = []
    real_step = vcrd.vcrd_step

    def recording(student, teacher, rolls, **k):
        seen.append(sorted(rolls.texts[:rolls.num_prompts]) + ["|"] + sorted(rolls.texts[rolls.num_prompts:]))
        return real_step(student, teacher, rolls, **k)

    monkeypatch.setattr(vcrd_runner, "vcrd_step", recording)
    return seen


@pytest.mark.slow
@pytest.mark.timeout(300)  # two short VCRD runs: 10 s measured
def test_rollouts_are_drawn_once_offline_by_default_and_per_step_online(ckpts, monkeypatch):
    # every step's micro-batch holds all 3 prompts: offline, each step trains on the same rollouts
    seen = _record_rollouts(monkeypatch)
    cfg = _run_cfg(ckpts, "offline", steps=2, batch_size=3, eval_data=None, save_every=0)
    assert cfg.rollouts == "offline"
    vcrd.run(cfg)
    assert len(seen) == 2 and seen[0] == seen[1]
    with open(os.path.join(cfg.output_dir, "rollouts.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(x) for x in f]
    assert len(rows) == 3 and sorted(r["teacher"]["text"] for r in rows) == seen[0][:3]
    assert sorted(r["student"]["text"] for r in rows) == seen[0][4:]
    seen.clear()
    vcrd.run(_run_cfg(ckpts, "online", steps=2, batch_size=3, eval_data=None, save_every=0, rollouts="online"))
    assert len(seen) == 2 and seen[0] != seen[1]  # new rollouts every step (other seeds, a trained student)


@pytest.mark.slow
@pytest.mark.timeout(300)  # two short VCRD runs: 10 s measured
def test_sft_stage_trains_on_teacher_rollouts_before_distillation(ckpts, monkeypatch):
    from distillkit.methods.vcrd.runner import cap_prompts
    from distillkit.world.tiny import build_tokenizer

    seen = _record_rollouts(monkeypatch)
    cfg = _run_cfg(ckpts, "sft", steps=1, batch_size=3, eval_data=None, save_every=0, sft_steps=2, sft_lr=5e-2)
    vcrd.run(cfg)
    sft = [json.loads(x) for x in _read(os.path.join(cfg.output_dir, "sft", "metrics.jsonl")).splitlines()]
    assert [x["step"] for x in sft] == [1, 2] and sft[0]["lr"] == pytest.approx(5e-2)
    # the student rollouts of distillation come from the fine-tuned student: not those of the plain run
    plain = _run_cfg(ckpts, "no-sft", steps=1, batch_size=3, eval_data=None, save_every=0)
    vcrd.run(plain)
    assert seen[0][:3] == seen[1][:3] and seen[0][4:] != seen[1][4:]
    with pytest.raises(ValueError, match="sft_steps"):
        _run_cfg(ckpts, "x", sft_steps=-1)
    # the prompt cap leaves out longer prompts
    tok = build_tokenizer()
    short, long = "1 + 1", "1 + 1 + 1 + 1 + 1 + 1"
    assert cap_prompts([short, long], tok, len(tok(short)["input_ids"])) == [short]
    assert cap_prompts([short, long], tok, None) == [short, long]


@pytest.mark.slow
@pytest.mark.timeout(300)  # one short VCRD run with LoRA: 9 s measured
def test_lora_run_with_sft_stage_exports_merged_weights(ckpts):
    pytest.importorskip("peft")
    cfg = _run_cfg(ckpts, "lora", steps=1, batch_size=3, eval_data=None, save_every=0, sft_steps=1, lora_r=4,
                   lora_alpha=16.0)
    summary = vcrd.run(cfg)
    final, start = _final_state(summary["final_model"]), _final_state(cfg.student)
    assert set(final) == set(start)  # a plain checkpoint: the adapters merged
    changed = {k for k in start if not torch.equal(final[k], start[k])}
    # LoRA on q_proj / v_proj (the trainer's default targets) trains those and nothing else
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(changed)


# ---- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("student", ""), ("teacher", ""), ("prompts", ""), ("weighting", "softmax"), ("alpha", 1.5), ("clip", [2.0, 1.0]),
    ("clip", [0.5]), ("top_k", 0), ("gamma", -1.0), ("temperature", -0.5), ("steps", 0), ("backend", "gpu"),
    ("lambda_t", -1.0), ("rollout_tokens", 0), ("teacher_backend", "tgi"), ("prompt_template", "no field"),
    ("device", "tpu"), ("bf16", "maybe"), ("candidate_tokens", "beam"), ("normalization", "batch"),
    ("rollouts", "sometimes"), ("judge_type", "llm"), ("max_prompt_tokens", 0), ("sft_lr", -1.0),
])
def test_config_errors_name_the_field(field, value):
    base = dict(student="s", teacher="t", prompts="p.jsonl")
    base[field] = value
    with pytest.raises(ValueError, match=field):
        VcrdConfig(**base)
    with pytest.raises(ValueError, match="lambda_t and lambda_s"):
        VcrdConfig(student="s", teacher="t", prompts="p", lambda_t=0.0, lambda_s=0.0)


def test_cli_reports_bad_yaml_fields(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("student: s\nteacher: t\nprompts: p.jsonl\nweighting: softmax\n")
    with pytest.raises(SystemExit) as exc:
        vcrd.cli(["--config", str(path)])
    assert exc.value.code == 2 and "weighting" in capsys.readouterr().err
    path.write_text("student: s\nteacher: t\nprompts: p.jsonl\nlambda: 1\n")
    with pytest.raises(SystemExit):
        vcrd.cli(["--config", str(path)])
    assert "lambda" in capsys.readouterr().err
    # the shipped config parses (its paths are placeholders; no model is loaded here)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from distillkit.pipeline.config import load_config

    cfg = load_config(VcrdConfig, os.path.join(root, "configs", "vcrd.yaml"))
    assert cfg.weighting in WEIGHTINGS and len(cfg.clip) == 2


# ---- reruns keep their config; input records checked before any model -------------------------------

def _no_models(*a, **k):
    raise AssertionError("a model was loaded")


def test_rerun_with_another_config_is_refused_unless_overwrite(ckpts, monkeypatch):
    import dataclasses

    from distillkit import InputError

    cfg = _run_cfg(ckpts, "reconfig", steps=1, eval_data=None)
    vcrd.run(cfg)
    summary_path = os.path.join(cfg.output_dir, "vcrd_summary.json")
    before = _read(summary_path)
    monkeypatch.setattr(vcrd_runner, "load_models", _no_models)  # refused before any model loads
    with pytest.raises(InputError, match=r"lr: 0\.01 -> 0\.02; weighting: 'auto' -> 'uniform'"):
        vcrd.run(dataclasses.replace(cfg, lr=2e-2, weighting="uniform"))
    assert _read(summary_path) == before  # the finished run's record is untouched
    monkeypatch.undo()
    vcrd.run(dataclasses.replace(cfg, progress=True, log_every=5))  # display / logging only: resumes (a no-op)
    again, first = json.loads(_read(summary_path)), json.loads(before)
    assert (again["config"].pop("log_every"), again["config"].pop("progress")) == (5, True)
    del first["config"]["log_every"], first["config"]["progress"]
    assert again == first
    before = _read(summary_path)
    # overwrite: the old run is moved aside whole, the new one starts afresh
    summary = vcrd.run(dataclasses.replace(cfg, lr=2e-2, overwrite=True))
    assert summary["config"]["lr"] == 2e-2 and summary["step"] == 1
    root = os.path.dirname(cfg.output_dir)
    aside = [d for d in os.listdir(root) if d.startswith("reconfig.replaced-")]
    assert len(aside) == 1 and _read(os.path.join(root, aside[0], "vcrd_summary.json")) == before


def test_bad_input_records_are_refused_before_any_model(ckpts, tmp_path, monkeypatch):
    from distillkit import InputError

    monkeypatch.setattr(vcrd_runner, "load_models", _no_models)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "q0", "question": "1 + 1"}\n\n{"id": "q1", "question": null}\n')
    with pytest.raises(InputError, match=r"prompts\.jsonl:3 \(id 'q1'\): question=None"):
        vcrd.run(_run_cfg(ckpts, "bad-prompts", prompts=str(prompts), eval_data=None))
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"id": "e0", "question": "1 + 1", "answer": null}\n')
    with pytest.raises(InputError, match=r"eval\.jsonl:1 \(id 'e0'\): answer=None"):
        vcrd.run(_run_cfg(ckpts, "bad-eval", eval_data=str(evals)))


def test_prompts_from_a_dataset_folder_and_the_chat_template(ckpts, tmp_path):
    """prompts as a Hugging Face dataset folder with other column names (fields, split) read as the JSONL does;
    chat_template auto wraps each prompt in the tokenizer's template (system prompt first, no second BOS)."""
    datasets = pytest.importorskip("datasets")
    from distillkit.methods.vcrd.runner import load_prompts, render_prompts
    from distillkit.world.tiny import build_tokenizer

    root, student, teacher, prompts = ckpts
    rows = [json.loads(x) for x in _read(prompts).splitlines()]
    folder = str(tmp_path / "prompts")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"problem": r["question"], "solution": r["answer"], "id": r["id"]} for r in rows])}).save_to_disk(folder)
    plain = _run_cfg(ckpts, "p")
    mapped = _run_cfg(ckpts, "p", prompts=folder, split="test", fields={"question": "problem", "answer": "solution"})
    assert load_prompts(mapped) == load_prompts(plain) and len(load_prompts(plain)) == 3
    tok = build_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    auto = _run_cfg(ckpts, "p", chat_template="auto", system_prompt="Be brief.")
    got = render_prompts(load_prompts(plain), tok, auto)
    assert got[0] == f"<system>Be brief.<user>{load_prompts(plain)[0]}<assistant>"
    assert render_prompts(load_prompts(plain), tok, plain) == load_prompts(plain)
    with pytest.raises(ValueError, match="chat_template"):
        _run_cfg(ckpts, "p", chat_template="chatml")
