"""Every backend refuses the same bad input with the same InputError naming the same argument, and gives the same
finite result where the bad values sit in rows that count for nothing (ignored label, or weight 0).

One table per op family (logits-level skew KL, fused-linear skew KL, answer scoring) x every backend that runs
here (reference, cpu, and triton under TRITON_INTERPRET=1, which tests/conftest.py sets), plus empty batches and
the value checks under torch.compile.
"""
import numpy as np
import pytest
import torch
from _backends import backends_on

import distillkit
from _tolerance import assert_eager_budget
from distillkit._errors import InputError
from distillkit.reference import skew_kl as ref_skew

BACKENDS = backends_on("cpu")  # the value checks run on CPU tensors only (on CUDA they would cost a sync)
NAN, INF = float("nan"), float("inf")

LOGIT_OPS = {"skew_kl": distillkit.skew_kl, "skew_reverse_kl": distillkit.skew_reverse_kl}
FUSED_OPS = {"fused_linear_skew_kl": distillkit.fused_linear_skew_kl,
             "fused_linear_skew_reverse_kl": distillkit.fused_linear_skew_reverse_kl}


def _error_on_every_backend(call) -> str:
    """call(backend) must raise InputError on every backend, with one message; returns it."""
    messages = {}
    for backend in BACKENDS:
        with pytest.raises(InputError) as info:
            call(backend)
        messages[backend] = str(info.value)
    assert len(set(messages.values())) == 1, messages
    return next(iter(messages.values()))


# ---- logits-level skew KL -------------------------------------------------------------------------

def _logits(n=4, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g), torch.randn(n, vocab, generator=g),
            torch.randint(0, vocab, (n,), generator=g), torch.rand(n, generator=g) + 0.5)


def _set(x, row, value, col=5):
    x = x.clone()
    if value == "all -inf":
        x[row] = -INF
    else:
        x[row, col] = value
    return x


# case -> (mutation of (student, teacher, labels, weights), text the error names)
LOGIT_CASES = {
    "teacher NaN": (lambda s, t, lab, w: (s, _set(t, 1, NAN), lab, w), "teacher_logits row 1"),
    "student NaN": (lambda s, t, lab, w: (_set(s, 2, NAN), t, lab, w), "teacher_logits row 2"),
    "teacher +inf": (lambda s, t, lab, w: (s, _set(t, 1, INF), lab, w), "teacher_logits row 1"),
    "student +inf": (lambda s, t, lab, w: (_set(s, 3, INF), t, lab, w), "teacher_logits row 3"),
    "teacher all -inf": (lambda s, t, lab, w: (s, _set(t, 0, "all -inf"), lab, w), "teacher_logits row 0"),
    "student all -inf": (lambda s, t, lab, w: (_set(s, 1, "all -inf"), t, lab, w), "teacher_logits row 1"),
    "label = V": (lambda s, t, lab, w: (s, t, lab.index_fill(0, torch.tensor([2]), 23), w), "labels[2]"),
    "label negative": (lambda s, t, lab, w: (s, t, lab.index_fill(0, torch.tensor([1]), -1), w), "labels[1]"),
    "weights NaN": (lambda s, t, lab, w: (s, t, lab, w.index_fill(0, torch.tensor([3]), NAN)), "weights[3]"),
}


@pytest.mark.parametrize("op", LOGIT_OPS)
@pytest.mark.parametrize("case", LOGIT_CASES)
def test_logits_bad_input_same_error_on_every_backend(op, case):
    mutate, names = LOGIT_CASES[case]
    s, t, lab, w = mutate(*_logits())
    message = _error_on_every_backend(lambda backend: LOGIT_OPS[op](s, t, lab, w, backend=backend))
    assert names in message


@pytest.mark.parametrize("op", LOGIT_OPS)
@pytest.mark.parametrize("value", [NAN, INF, "all -inf"])
@pytest.mark.parametrize("skip_by", ["label", "weight 0"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_rows_that_count_for_nothing_may_hold_anything(op, value, skip_by, reduction):
    """Row 1 counts for nothing: NaN / inf there, in both logits tensors, gives exactly the loss and gradient of the
    same input with finite values there, on every backend, and a zero gradient for that row."""
    s, t, lab, w = _logits(seed=1)
    if skip_by == "label":
        lab[1] = -100
    else:
        w[1] = 0.0
    dirty_s, dirty_t = _set(s, 1, value), _set(t, 1, value, col=7)
    results = {}
    for backend in BACKENDS:
        out = []
        for student, teacher in ((s, t), (dirty_s, dirty_t)):
            x = student.clone().requires_grad_(True)
            loss = LOGIT_OPS[op](x, teacher, lab, w, alpha=0.2, reduction=reduction, backend=backend)
            loss.backward(torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape))
            out.append((loss.detach(), x.grad))
        (clean_loss, clean_grad), (loss, grad) = out
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), backend
        torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0, msg=backend)
        torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0, msg=backend)
        assert (grad[1] == 0).all(), backend
        results[backend] = loss
    # the same result on every backend: against float64, no worse than twice plain float32 PyTorch's error (+ 4
    # ulp), the suite's one rule (an element-wise budget without the floor failed on an AMD EPYC: 1.8e-7 vs 1.3e-7)
    f64 = getattr(ref_skew, op)(s.double(), t.double(), lab, w.double(), alpha=0.2, reduction=reduction)
    f32 = getattr(ref_skew, op)(s, t, lab, w, alpha=0.2, reduction=reduction)
    for backend, loss in results.items():
        assert_eager_budget(loss, f32, f64, what=f"{backend} loss")


def test_reference_formula_skips_weight_zero_rows():
    """distillkit.reference.skew_kl itself (what every backend is tested against): a weight-0 row holding NaN gives
    the loss of the other rows, not NaN (0 * NaN)."""
    s, t, lab, w = _logits(seed=2)
    w[2] = 0.0
    clean = ref_skew.skew_kl(s, t, lab, w)
    assert torch.equal(ref_skew.skew_kl(s, _set(t, 2, NAN), lab, w), clean)
    assert torch.equal(ref_skew.skew_reverse_kl(_set(s, 2, NAN), t, lab, w), ref_skew.skew_reverse_kl(s, t, lab, w))


# ---- fused-linear skew KL ------------------------------------------------------------------------

def _fused(n=5, h_s=6, h_t=7, vocab=19, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if lead is None else lead
    return dict(student_hidden=torch.randn(*lead, h_s, generator=g),
                student_weight=torch.randn(vocab, h_s, generator=g),
                teacher_hidden=torch.randn(*lead, h_t, generator=g),
                teacher_weight=torch.randn(vocab, h_t, generator=g),
                labels=torch.randint(0, vocab, lead, generator=g), weights=torch.rand(*lead, generator=g) + 0.5,
                student_bias=torch.randn(vocab, generator=g), teacher_bias=torch.randn(vocab, generator=g))


def _with(name, index, value):
    def mutate(kw):
        x = kw[name].clone()
        x[index] = value
        return {**kw, name: x}
    return mutate


FUSED_CASES = {
    "student_weight NaN": (_with("student_weight", (3, 2), NAN), "student_weight[3, 2]"),
    "teacher_weight NaN": (_with("teacher_weight", (0, 4), NAN), "teacher_weight[0, 4]"),
    "teacher_weight +inf": (_with("teacher_weight", (5, 1), INF), "teacher_weight[5, 1]"),
    "student_weight -inf": (_with("student_weight", (7, 0), -INF), "student_weight[7, 0]"),
    "student_hidden NaN": (_with("student_hidden", (2, 3), NAN), "student_hidden row 2"),
    "teacher_hidden NaN": (_with("teacher_hidden", (1, 0), NAN), "teacher_hidden row 1"),
    "student_hidden +inf": (_with("student_hidden", (4, 1), INF), "student_hidden row 4"),
    "teacher_hidden -inf": (_with("teacher_hidden", (3, 6), -INF), "teacher_hidden row 3"),
    "student_bias NaN": (_with("student_bias", 4, NAN), "student_bias"),
    "teacher_bias +inf": (_with("teacher_bias", 2, INF), "teacher_bias"),
    "teacher_bias all -inf": (_with("teacher_bias", slice(None), -INF), "teacher_bias"),
    "student_bias all -inf": (_with("student_bias", slice(None), -INF), "student_bias"),
    "weights NaN": (_with("weights", 3, NAN), "weights[3]"),
}


@pytest.mark.parametrize("op", FUSED_OPS)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_linear_bad_input_same_error_on_every_backend(op, case):
    mutate, names = FUSED_CASES[case]
    kw = mutate(_fused())
    args = [kw.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    message = _error_on_every_backend(lambda backend: FUSED_OPS[op](*args, **kw, backend=backend))
    assert names in message


def test_fused_linear_partly_masked_bias_is_allowed():
    """A -inf bias entry masks one vocabulary entry: allowed, finite, the same on every backend."""
    kw = _with("teacher_bias", 3, -INF)(_with("student_bias", 3, -INF)(_fused(seed=4)))
    args = [kw.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    losses = {b: distillkit.fused_linear_skew_kl(*args, **kw, backend=b) for b in BACKENDS}
    assert all(torch.isfinite(x) for x in losses.values()), losses


@pytest.mark.parametrize("op", FUSED_OPS)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("skip_by", ["label", "weight 0"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_rows_that_count_for_nothing_may_hold_anything(op, value, skip_by, reduction):
    """Row 2 counts for nothing: NaN / inf in both hidden states there gives exactly the loss and gradients of the
    same input with finite values there, on every backend, and a zero hidden gradient for that row."""
    base = _fused(seed=3)
    if skip_by == "label":
        base["labels"][2] = -100
    else:
        base["weights"][2] = 0.0
    dirty = _with("teacher_hidden", (2, 1), value)(_with("student_hidden", (2, 0), value)(base))
    for backend in BACKENDS:
        out = []
        for kw in (base, dirty):
            kw = dict(kw)
            h = kw.pop("student_hidden").clone().requires_grad_(True)
            w = kw.pop("student_weight").clone().requires_grad_(True)
            b = kw.pop("student_bias").clone().requires_grad_(True)
            loss = FUSED_OPS[op](h, w, kw.pop("teacher_hidden"), kw.pop("teacher_weight"), student_bias=b,
                                 reduction=reduction, chunk_size=2, backend=backend, **kw)
            loss.backward(torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape))
            out.append((loss.detach(), h.grad, w.grad, b.grad))
        for clean, got, what in zip(out[0], out[1], ("loss", "grad hidden", "grad weight", "grad bias")):
            assert torch.isfinite(got).all(), (backend, what)
            torch.testing.assert_close(got, clean, rtol=0, atol=0, msg=f"{backend}: {what}")
        assert (out[1][1][2] == 0).all(), backend


# ---- empty batches -------------------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("op", [*LOGIT_OPS, *FUSED_OPS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(op, lead, reduction):
    """No tokens: loss 0 for mean and sum, an empty tensor of the tokens' shape for none, and gradients of the
    inputs' (empty) shapes; the same on every backend."""
    for backend in BACKENDS:
        if op in LOGIT_OPS:
            s = torch.randn(*lead, 11, requires_grad=True)
            loss = LOGIT_OPS[op](s, torch.randn(*lead, 11), torch.zeros(lead, dtype=torch.long), torch.ones(lead),
                                 reduction=reduction, backend=backend)
            grads = (s,)
        else:
            kw = _fused(lead=lead)
            h = kw.pop("student_hidden").requires_grad_(True)
            w = kw.pop("student_weight").requires_grad_(True)
            b = kw.pop("student_bias").requires_grad_(True)
            loss = FUSED_OPS[op](h, w, kw.pop("teacher_hidden"), kw.pop("teacher_weight"), student_bias=b,
                                 reduction=reduction, backend=backend, **kw)
            grads = (h, w, b)
        if reduction == "none":
            assert loss.shape == lead, backend
        else:
            assert loss.shape == () and loss.item() == 0.0, (backend, loss)
        loss.sum().backward()
        for x in grads:
            assert x.grad is not None and x.grad.shape == x.shape, backend
            assert (x.grad == 0).all(), backend  # a weight gradient from no tokens is 0


# ---- scoring -------------------------------------------------------------------------------------

def _scoring(m=4, h=8, vocab=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, h, generator=g), torch.randn(vocab, h, generator=g),
            torch.randint(0, vocab, (m,), generator=g), torch.randn(vocab, generator=g))


def _entry(x, index, value):
    x = x.clone()
    x[index] = value
    return x


SCORING_CASES = {
    "weight NaN": (lambda h, w, ids, b: (h, _entry(w, (3, 2), NAN), ids, b), "weight: entry [3, 2]"),
    "weight +inf": (lambda h, w, ids, b: (h, _entry(w, (0, 0), INF), ids, b), "weight: entry [0, 0]"),
    "weight -inf": (lambda h, w, ids, b: (h, _entry(w, (5, 7), -INF), ids, b), "weight: entry [5, 7]"),
    "bias NaN": (lambda h, w, ids, b: (h, w, ids, _entry(b, 4, NAN)), "bias: entry [4]"),
    "bias +inf": (lambda h, w, ids, b: (h, w, ids, _entry(b, 1, INF)), "bias: entry [1]"),
    "bias -inf": (lambda h, w, ids, b: (h, w, ids, _entry(b, 1, -INF)), "bias: entry [1]"),
    "hidden NaN": (lambda h, w, ids, b: (_entry(h, (2, 1), NAN), w, ids, b), "hidden: row 2"),
    "hidden +inf": (lambda h, w, ids, b: (_entry(h, (1, 1), INF), w, ids, b), "hidden: row 1"),
    "hidden -inf": (lambda h, w, ids, b: (_entry(h, (3, 0), -INF), w, ids, b), "hidden: row 3"),
}


@pytest.mark.parametrize("case", SCORING_CASES)
@pytest.mark.parametrize("op", ["answer_logprobs", "predictive_perplexity"])
def test_scoring_bad_values_same_error_on_every_backend(op, case):
    mutate, names = SCORING_CASES[case]
    hidden, weight, ids, bias = mutate(*_scoring())
    if op == "answer_logprobs":
        def call(backend):
            return distillkit.answer_logprobs(hidden, weight, ids, bias=bias, backend=backend)
    else:
        def call(backend):
            return distillkit.predictive_perplexity(hidden, weight, ids, [0, 1, 4], bias=bias, backend=backend)
    assert names in _error_on_every_backend(call)


@pytest.mark.parametrize("cu", [[0, 1.5, 4], [0.0, 2.0, 4.0], torch.tensor([0.0, 2.0, 4.0]), np.array([0.0, 2.5, 4.0]),
                                torch.tensor([0, 1, 4]).bool()],
                         ids=["list 1.5", "list of whole floats", "float tensor", "numpy float", "bool tensor"])
def test_scoring_non_integer_cu_seqlens_refused(cu):
    """Float offsets were truncated ([0, 1.5, 4] scored rows [0, 1) and [1, 4) without a word): refused."""
    hidden, weight, ids, bias = _scoring()
    message = _error_on_every_backend(
        lambda backend: distillkit.predictive_perplexity(hidden, weight, ids, cu, bias=bias, backend=backend))
    assert message.startswith("cu_seqlens")


def test_scoring_integer_cu_seqlens_forms_agree():
    hidden, weight, ids, bias = _scoring()
    want = distillkit.predictive_perplexity(hidden, weight, ids, torch.tensor([0, 1, 4]), bias=bias)
    for cu in ([0, 1, 4], np.array([0, 1, 4], dtype=np.int32), (np.int64(0), 1, 4)):
        torch.testing.assert_close(distillkit.predictive_perplexity(hidden, weight, ids, cu, bias=bias), want,
                                   rtol=0, atol=0)


def test_scoring_large_finite_values_are_not_refused():
    """The one-pass check sums rows; a sum that overflows on finite entries must not be taken for an inf."""
    hidden, weight, ids, _ = _scoring(m=2, h=4, vocab=5)
    weight = torch.full((5, 4), 3e38)
    weight[1] = -3e38
    hidden = torch.zeros(2, 4)
    for backend in BACKENDS:
        lp = distillkit.answer_logprobs(hidden, weight, torch.tensor([0, 1]), backend=backend)
        torch.testing.assert_close(lp, torch.full((2,), -float(np.log(5.0))), msg=backend)


def test_scoring_empty_batch():
    _, weight, _, bias = _scoring()
    for backend in BACKENDS:
        lp = distillkit.answer_logprobs(torch.empty(0, 8), weight, torch.empty(0, dtype=torch.long), bias=bias,
                                        backend=backend)
        assert lp.shape == (0,) and lp.dtype == torch.float32, backend


# ---- under torch.compile -------------------------------------------------------------------------

@pytest.mark.devices("cpu")
@pytest.mark.no_interpreter  # the interpreter adds nothing here
@pytest.mark.parametrize("op", [*LOGIT_OPS, *FUSED_OPS])
def test_value_checks_run_under_torch_compile(op, backend, device):
    """The checks run inside custom ops, whose bodies run eagerly in a compiled graph: a NaN teacher and an
    out-of-range label (logits ops), a NaN teacher weight and a NaN kept hidden row (fused-linear) still raise
    under torch.compile(fullgraph=True), and clean input gives the eager result."""
    torch._dynamo.reset()
    if op in LOGIT_OPS:
        s, t, lab, w = _logits(seed=5)

        def fn(s, t, lab, w):
            return LOGIT_OPS[op](s, t, lab, w, backend=backend)

        clean = (s, t, lab, w)
        bad = {"teacher_logits row 1": (s, _set(t, 1, NAN), lab, w),
               "labels[2]": (s, t, lab.index_fill(0, torch.tensor([2]), 23), w)}
    else:
        kw = _fused(seed=5)
        order = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels", "weights")

        def fn(sh, sw, th, tw, lab, w):
            return FUSED_OPS[op](sh, sw, th, tw, lab, w, backend=backend)

        clean = tuple(kw[k] for k in order)
        bad = {"teacher_weight[0, 4]": tuple(_with("teacher_weight", (0, 4), NAN)(kw)[k] for k in order),
               "student_hidden row 2": tuple(_with("student_hidden", (2, 3), NAN)(kw)[k] for k in order)}
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*clean), fn(*clean), rtol=0, atol=0)
    for names, args in bad.items():
        with pytest.raises(InputError, match=names.replace("[", r"\[")):
            compiled(*args)
