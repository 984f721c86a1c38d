"""Padded vocabularies (vocab_size) and per-side logit transforms (logit_scale, softcap) of the fused-linear
ops, the logits-level ops, the loss modules and the scoring op: every backend against the float64 formula,
the formula against the eager computation on sliced / transformed logits, and the whole against real tiny
Gemma-2 and Cohere models (the skew KL of model(...).logits)."""
import pytest
import torch
from _backends import backends_on

import distillkit
from _tolerance import assert_eager_budget
from distillkit._errors import InputError
from distillkit.losses import FusedLinearSkewKLLoss, FusedLinearSkewReverseKLLoss, logit_transform_from_config
from distillkit.reference import fused_linear as ref
from distillkit.reference import scoring as ref_scoring
from distillkit.reference import skew_kl as ref_skl

FUNCS = {False: distillkit.fused_linear_skew_kl, True: distillkit.fused_linear_skew_reverse_kl}
STUDENT = ("student_hidden", "student_weight", "student_bias")


def _case(n, h_s, h_t, v_s, v_t, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = {"student_hidden": torch.randn(n, h_s, generator=g), "student_weight": torch.randn(v_s, h_s, generator=g),
         "student_bias": torch.randn(v_s, generator=g), "teacher_hidden": torch.randn(n, h_t, generator=g),
         "teacher_weight": torch.randn(v_t, h_t, generator=g), "teacher_bias": torch.randn(v_t, generator=g)}
    labels = torch.randint(0, min(v_s, v_t), (n,), generator=g)
    labels[::4] = -100
    weights = torch.rand(n, generator=g) + 0.5
    return {k: v.to(device, dtype) for k, v in c.items()}, labels.to(device), weights.to(device, dtype)


def _run(fn, c, labels, weights, upstream, dtype=None, **kw):
    leaves = {k: v.detach().to(dtype or v.dtype).clone() for k, v in c.items()}
    for k in STUDENT:
        leaves[k].requires_grad_(True)
    loss = fn(leaves["student_hidden"], leaves["student_weight"], leaves["teacher_hidden"], leaves["teacher_weight"],
              labels, weights.to(dtype or weights.dtype), student_bias=leaves["student_bias"],
              teacher_bias=leaves["teacher_bias"], **kw)
    (loss * upstream).sum().backward()
    return loss, [leaves[k].grad for k in STUDENT]


def _close(got, want64, baseline, what):
    assert_eager_budget(got, baseline, want64, out_dtype=torch.float32, scale="tensor", what=what)


def _check_backend(backend, c, labels, weights, reverse, reduction, **kw):
    """backend's loss and gradients vs the float64 reference, within plain PyTorch's float32 budget."""
    up = torch.tensor(2.5, dtype=torch.float64) if reduction != "none" else torch.linspace(
        0.5, 2.0, labels.numel(), dtype=torch.float64)
    up = up.to(labels.device)
    kw = dict(alpha=0.2, temperature=1.3, reduction=reduction, **kw)
    want = _run(ref.fused_linear_skew, c, labels, weights, up, dtype=torch.float64, reverse=reverse, **kw)
    base = _run(ref.fused_linear_skew, c, labels, weights, up.float(), reverse=reverse, **kw)
    got = _run(FUNCS[reverse], c, labels, weights, up.float(), backend=backend, chunk_size=5, **kw)
    _close(got[0], want[0], base[0], "loss")
    for name, g, w, b in zip(STUDENT, got[1], want[1], base[1]):
        _close(g, w, b, f"grad {name}")
    return got


# ---- padded vocabularies ---------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_padded_vocab_matches_float64_formula(backend, device, interpreted, reverse, reduction):
    small = interpreted
    vocab = 57 if small else 301
    c, labels, weights = _case(11 if small else 29, 8, 12, vocab + 4, vocab + 7, device)  # both sides padded
    _, grads = _check_backend(backend, c, labels, weights, reverse, reduction, vocab_size=vocab)
    g_w, g_b = grads[1], grads[2]
    assert g_w.shape == c["student_weight"].shape and bool((g_w[vocab:] == 0).all()) and bool((g_b[vocab:] == 0).all())
    assert bool((g_w[:vocab] != 0).any())


def test_padded_vocab_formula_is_the_shared_ids():
    """The float64 reference with vocab_size = the skew KL of the logits restricted to ids [0, vocab_size)."""
    c, labels, weights = _case(9, 6, 5, 23, 27, "cpu", dtype=torch.float64, seed=1)
    for reverse in (False, True):
        got = ref.fused_linear_skew(c["student_hidden"], c["student_weight"], c["teacher_hidden"],
                                    c["teacher_weight"], labels, weights, student_bias=c["student_bias"],
                                    teacher_bias=c["teacher_bias"], vocab_size=20, reverse=reverse, alpha=0.3)
        z_s = (c["student_hidden"] @ c["student_weight"].T + c["student_bias"])[:, :20]
        z_t = (c["teacher_hidden"] @ c["teacher_weight"].T + c["teacher_bias"])[:, :20]
        eager = (ref_skl.skew_reverse_kl if reverse else ref_skl.skew_kl)(z_s, z_t, labels, weights, alpha=0.3)
        torch.testing.assert_close(got, eager, rtol=1e-13, atol=0)


@pytest.mark.devices("cpu")
def test_vocab_size_errors(backend, device):
    c, labels, _ = _case(6, 4, 4, 30, 32, device)
    args = (c["student_hidden"], c["student_weight"], c["teacher_hidden"], c["teacher_weight"], labels)
    with pytest.raises(InputError, match=r"V=30.*V=32.*vocab_size=len\(tokenizer\)"):
        distillkit.fused_linear_skew_kl(*args, backend=backend)
    with pytest.raises(InputError, match="vocab_size=31 exceeds"):
        distillkit.fused_linear_skew_reverse_kl(*args, vocab_size=31, backend=backend)
    for bad in (0, -3, True, 2.0):
        with pytest.raises(InputError, match="vocab_size must be a positive int"):
            distillkit.fused_linear_skew_kl(*args, vocab_size=bad, backend=backend)
    with pytest.raises(InputError, match="student_bias must be"):
        distillkit.fused_linear_skew_kl(*args, vocab_size=30, student_bias=c["teacher_bias"], backend=backend)
    z_s, z_t = torch.randn(6, 30), torch.randn(6, 32)
    with pytest.raises(InputError, match=r"V=30.*V=32.*vocab_size"):
        distillkit.skew_kl(z_s, z_t, backend=backend)
    with pytest.raises(InputError, match="vocab_size=33 exceeds"):
        distillkit.skew_reverse_kl(z_s, z_t, vocab_size=33, backend=backend)


@pytest.mark.parametrize("reverse", [False, True])
def test_logits_level_vocab_size(backend, device, reverse):
    g = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(10, 61, generator=g).to(device), torch.randn(10, 64, generator=g).to(device)
    labels = torch.randint(0, 57, (10,), generator=g).to(device)
    labels[3] = -100
    fn = distillkit.skew_reverse_kl if reverse else distillkit.skew_kl
    ref_fn = ref_skl.skew_reverse_kl if reverse else ref_skl.skew_kl
    s = z_s.clone().requires_grad_(True)
    got = fn(s, z_t, labels, vocab_size=57, alpha=0.2, backend=backend)
    (got * 1.7).backward()
    s64 = z_s.double()[:, :57].requires_grad_(True)
    want = ref_fn(s64, z_t.double()[:, :57], labels, alpha=0.2)
    (want * 1.7).backward()
    s32 = z_s[:, :57].clone().requires_grad_(True)
    base = ref_fn(s32, z_t[:, :57], labels, alpha=0.2)
    (base * 1.7).backward()
    _close(got, want, base, "loss")
    _close(s.grad[:, :57], s64.grad, s32.grad, "grad")
    assert bool((s.grad[:, 57:] == 0).all())
    # the reference takes the same keyword
    torch.testing.assert_close(ref_fn(z_s.double(), z_t.double(), labels, alpha=0.2, vocab_size=57), want)


# ---- logit transforms ------------------------------------------------------------------------------

TRANSFORMS = {
    "both-softcap": dict(student_logit_scale=0.7, student_softcap=3.0, teacher_logit_scale=1.3, teacher_softcap=2.0),
    "scale-only": dict(student_logit_scale=0.0625, teacher_logit_scale=4.0),
    "student-softcap": dict(student_softcap=1.5),
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_transforms_match_float64_formula(backend, device, interpreted, reverse, transform):
    small = interpreted
    c, labels, weights = _case(11 if small else 29, 8, 12, 57 if small else 301, 57 if small else 301, device,
                               seed=3)
    c["student_weight"] *= 3  # logits well into the softcap's curve
    _check_backend(backend, c, labels, weights, reverse, "mean", **TRANSFORMS[transform])


def test_transforms_with_padding_and_none_reduction(backend, device, interpreted):
    c, labels, weights = _case(9, 8, 6, 50, 53, device, seed=4)
    _check_backend(backend, c, labels, weights, True, "none", vocab_size=47, **TRANSFORMS["both-softcap"])


def test_reference_transform_is_the_formula():
    c, labels, weights = _case(7, 5, 6, 19, 19, "cpu", dtype=torch.float64, seed=5)
    got = ref.fused_linear_skew(c["student_hidden"], c["student_weight"], c["teacher_hidden"], c["teacher_weight"],
                                labels, alpha=0.1, temperature=2.0, **TRANSFORMS["both-softcap"])
    z_s = 3.0 * torch.tanh(0.7 * (c["student_hidden"] @ c["student_weight"].T) / 3.0)
    z_t = 2.0 * torch.tanh(1.3 * (c["teacher_hidden"] @ c["teacher_weight"].T) / 2.0)
    p, q = torch.softmax(z_t / 2.0, -1), torch.softmax(z_s / 2.0, -1)
    d = (p * (p.log() - (0.1 * p + 0.9 * q).log())).sum(-1)
    kept = labels != -100
    torch.testing.assert_close(got, d[kept].mean(), rtol=1e-13, atol=0)


@pytest.mark.devices("cpu")
def test_transform_errors(backend, device):
    c, labels, _ = _case(6, 4, 4, 30, 30, device)
    args = (c["student_hidden"], c["student_weight"], c["teacher_hidden"], c["teacher_weight"], labels)
    for kw, name in ((dict(student_logit_scale=0.0), "student_logit_scale"),
                     (dict(teacher_logit_scale=float("nan")), "teacher_logit_scale"),
                     (dict(student_softcap=-1.0), "student_softcap"), (dict(teacher_softcap=0.0), "teacher_softcap")):
        with pytest.raises(InputError, match=name):
            distillkit.fused_linear_skew_kl(*args, backend=backend, **kw)
    with pytest.raises(InputError, match="softcap"):
        distillkit.answer_logprobs(c["student_hidden"], c["student_weight"], labels.clamp(min=0), softcap=0.0)


def test_modules_forward_vocab_size_and_transforms():
    c, labels, weights = _case(12, 8, 8, 40, 44, "cpu", seed=6)
    args = (c["student_hidden"], c["student_weight"], c["teacher_hidden"], c["teacher_weight"], labels, weights)
    opts = dict(alpha=0.4, reduction="sum", backend="reference", vocab_size=37, **TRANSFORMS["both-softcap"])
    for module, fn in ((FusedLinearSkewKLLoss, distillkit.fused_linear_skew_kl),
                       (FusedLinearSkewReverseKLLoss, distillkit.fused_linear_skew_reverse_kl)):
        got = module(**opts)(*args, student_bias=c["student_bias"], teacher_bias=c["teacher_bias"])
        want = fn(*args, student_bias=c["student_bias"], teacher_bias=c["teacher_bias"], **opts)
        assert got.item() == want.item()
        plain = fn(*args, student_bias=c["student_bias"], teacher_bias=c["teacher_bias"], alpha=0.4, reduction="sum",
                   backend="reference", vocab_size=37)
        assert abs(got.item() - plain.item()) > 1e-3  # the transforms reached the op
    from distillkit.losses import SkewKLLoss, SkewReverseKLLoss

    z_s, z_t = torch.randn(5, 40), torch.randn(5, 44)
    for module, fn in ((SkewKLLoss, distillkit.skew_kl), (SkewReverseKLLoss, distillkit.skew_reverse_kl)):
        assert module(vocab_size=37)(z_s, z_t).item() == fn(z_s, z_t, vocab_size=37).item()


def test_torch_compile_with_vocab_size_and_softcap():
    c, labels, _ = _case(8, 8, 8, 40, 44, "cpu", seed=7)
    backend = "cpu" if "cpu" in backends_on("cpu") else "reference"
    loss_fn = FusedLinearSkewKLLoss(backend=backend, chunk_size=3, vocab_size=37, **TRANSFORMS["both-softcap"])

    def step(h, w):
        return loss_fn(h, w, c["teacher_hidden"], c["teacher_weight"], labels)

    results = []
    for compiled in (False, True):
        h, w = c["student_hidden"].clone().requires_grad_(True), c["student_weight"].clone().requires_grad_(True)
        fn = torch.compile(step, backend="aot_eager", fullgraph=True) if compiled else step
        fn(h, w).backward()
        results.append((h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# ---- configs and real models -------------------------------------------------------------------------

def test_logit_transform_from_config_per_family():
    from transformers import (
        CohereConfig,
        Gemma2Config,
        Gemma3Config,
        Gemma3TextConfig,
        GraniteConfig,
        LlamaConfig,
        PretrainedConfig,
    )

    assert logit_transform_from_config(Gemma2Config(final_logit_softcapping=30.0)) == dict(logit_scale=1.0,
                                                                                            softcap=30.0)
    assert logit_transform_from_config(Gemma2Config(final_logit_softcapping=None))["softcap"] is None
    assert logit_transform_from_config(Gemma3TextConfig(final_logit_softcapping=12.5))["softcap"] == 12.5
    multimodal = Gemma3Config(text_config=dict(final_logit_softcapping=7.0))
    assert logit_transform_from_config(multimodal)["softcap"] == 7.0
    assert logit_transform_from_config(CohereConfig(logit_scale=0.0625)) == dict(logit_scale=0.0625, softcap=None)
    assert logit_transform_from_config(GraniteConfig(logits_scaling=8.0)) == dict(logit_scale=0.125, softcap=None)
    assert logit_transform_from_config(LlamaConfig()) == dict(logit_scale=1.0, softcap=None)
    with pytest.raises(InputError, match="logits_scaling"):  # unknown direction: refuse, never guess
        logit_transform_from_config(PretrainedConfig(logits_scaling=2.0))
    loss = FusedLinearSkewReverseKLLoss.from_configs(GraniteConfig(logits_scaling=4.0),
                                                     Gemma2Config(final_logit_softcapping=5.0), vocab_size=7)
    assert (loss.student_logit_scale, loss.student_softcap, loss.teacher_logit_scale, loss.teacher_softcap,
            loss.vocab_size) == (0.25, None, 1.0, 5.0, 7)


def _tiny(family: str, seed: int):
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=5.0, **common))
    else:
        model = CohereForCausalLM(CohereConfig(logit_scale=0.0625, **common))
    for p in model.parameters():  # large logits, so that the transforms matter
        p.data.mul_(4.0)
    return model.double()


@pytest.mark.parametrize(("student_family", "teacher_family"), [("gemma2", "cohere"), ("cohere", "gemma2")])
@pytest.mark.parametrize("reverse", [False, True])
def test_real_models_fused_equals_eager_on_their_logits(student_family, teacher_family, reverse):
    """The fused loss from the models' final hidden states (transforms read from their configs) equals the
    eager skew KL of model(...).logits: values and the gradient of every student parameter, float64."""
    student, teacher = _tiny(student_family, 0), _tiny(teacher_family, 1)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :2] = -100
    loss_fn = (FusedLinearSkewReverseKLLoss if reverse else FusedLinearSkewKLLoss).from_configs(
        student.config, teacher.config, alpha=0.1, temperature=1.5, chunk_size=4)
    out = student(ids, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    fused = loss_fn(out.hidden_states[-1], student.lm_head.weight, t_out.hidden_states[-1], teacher.lm_head.weight,
                    labels)
    fused_grads = torch.autograd.grad(fused, list(student.parameters()), retain_graph=True)
    eager_fn = ref_skl.skew_reverse_kl if reverse else ref_skl.skew_kl
    eager = eager_fn(out.logits, t_out.logits, labels, alpha=0.1, temperature=1.5)
    eager_grads = torch.autograd.grad(eager, list(student.parameters()))
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=0)
    for (name, _), g, w in zip(student.named_parameters(), fused_grads, eager_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12, msg=name)
    # the models' transforms change the loss: without them the fused loss would be another number
    plain = distillkit.fused_linear_skew_kl(out.hidden_states[-1].detach(), student.lm_head.weight.detach(),
                                            t_out.hidden_states[-1], teacher.lm_head.weight, labels, alpha=0.1,
                                            temperature=1.5) if not reverse else None
    if plain is not None:
        assert abs(plain.item() - eager.item()) > 0.05 * abs(eager.item())


def test_scoring_with_transforms(backend, device, interpreted):
    g = torch.Generator().manual_seed(8)
    m, v = (5, 60) if interpreted else (13, 301)
    h = torch.randn(m, 16, generator=g).to(device)
    w = (torch.randn(v, 16, generator=g) * 2).to(device)
    b = torch.randn(v, generator=g).to(device)
    ids = torch.randint(0, v, (m,), generator=g).to(device)
    for kw in (dict(logit_scale=0.0625), dict(softcap=3.0), dict(logit_scale=2.0, softcap=5.0)):
        got = distillkit.answer_logprobs(h, w, ids, bias=b, backend=backend, **kw)
        want = ref_scoring.answer_logprobs(h.double(), w.double(), ids, bias=b.double(), compute_dtype=torch.float64,
                                           **kw)
        base = ref_scoring.answer_logprobs(h, w, ids, bias=b, compute_dtype=torch.float32, **kw)
        assert_eager_budget(got, base, want, scale="tensor", what=f"answer_logprobs {kw}")


def test_scoring_transform_from_config_matches_model():
    model = _tiny("gemma2", 3)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hidden, answers = out.hidden_states[-1][0, :-1], ids[0, 1:]
    got = distillkit.answer_logprobs(hidden, model.lm_head.weight, answers,
                                     **logit_transform_from_config(model.config))
    want = torch.log_softmax(out.logits[0, :-1], -1).gather(1, answers[:, None]).squeeze(1)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.backends("cpu", "triton", "cuda")
@pytest.mark.no_interpreter
@pytest.mark.parametrize("reverse", [False, True])
def test_bf16_with_padding_and_transforms(backend, device, reverse):
    """bfloat16 inputs: the transforms run in float32 inside the loop; judged against plain PyTorch in bfloat16."""
    c, labels, weights = _case(29, 16, 12, 301, 307, device, dtype=torch.bfloat16, seed=9)
    kw = dict(alpha=0.2, vocab_size=297, **TRANSFORMS["both-softcap"])
    up = torch.tensor(1.5, dtype=torch.float64, device=device)
    want = _run(ref.fused_linear_skew, c, labels, weights, up, dtype=torch.float64, reverse=reverse, **kw)
    base = _run(ref.fused_linear_skew, c, labels, weights, up.bfloat16(), reverse=reverse,
                compute_dtype=torch.bfloat16, **kw)
    got = _run(FUNCS[reverse], c, labels, weights, up.float(), backend=backend, chunk_size=8, **kw)
    assert got[0].dtype == torch.float32
    _close(got[0], want[0], base[0], "loss")
    for name, g, w, b in zip(STUDENT, got[1], want[1], base[1]):
        assert g.dtype == torch.bfloat16, name
        _close(g, w, b, f"grad {name}")
