"""Fused-linear skew KL / skew reverse KL: every backend runnable here against the float64 formula
(logits = hidden @ weight.T + bias, then the skew-KL definitions), and against the logits-level op."""
import pytest
import torch

import distillkit
from _tolerance import assert_eager_budget
from distillkit._backend import backends
from distillkit.losses import FusedLinearSkewKLLoss, FusedLinearSkewReverseKLLoss
from distillkit.ops import fused_linear as fl
from distillkit.reference import fused_linear as ref

# (backend, device) pairs come from tests/ops/conftest.py; FAST narrows them to the fused backends
AVAILABLE = [name for name, (ok, _) in backends().items() if ok]
FAST = pytest.mark.backends("cpu", "triton", "cuda")
FUNCS = {False: distillkit.fused_linear_skew_kl, True: distillkit.fused_linear_skew_reverse_kl}


def _case(n=41, h_s=24, h_t=32, vocab=1271, dtype=torch.float32, seed=0, bias=True, lead=None, ignore_every=5,
          device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (n,)
    c = {
        "student_hidden": torch.randn(*shape, h_s, generator=g),
        "student_weight": torch.randn(vocab, h_s, generator=g) * 0.4,
        "teacher_hidden": torch.randn(*shape, h_t, generator=g),
        "teacher_weight": torch.randn(vocab, h_t, generator=g) * 0.4,
        "student_bias": torch.randn(vocab, generator=g) if bias else None,
        "teacher_bias": torch.randn(vocab, generator=g) if bias else None,
    }
    c = {k: (v.to(dtype) if v is not None else None) for k, v in c.items()}
    labels = torch.randint(0, vocab, shape, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    weights = torch.rand(*shape, generator=g) + 0.5
    c = {k: (v.to(device) if v is not None else None) for k, v in c.items()}
    return c, labels.to(device), weights.to(device)


STUDENT = ("student_hidden", "student_weight", "student_bias")


def _run(fn, c, labels, weights, upstream, dtype=None, **kw):
    """Loss and gradients of student hidden/weight/bias for sum(upstream * loss)."""
    leaves = {k: (v.detach().to(dtype) if dtype is not None and v is not None else
                  (v.detach().clone() if v is not None else None)) for k, v in c.items()}
    for k in STUDENT:
        if leaves[k] is not None:
            leaves[k].requires_grad_(True)
    loss = fn(leaves["student_hidden"], leaves["student_weight"], leaves["teacher_hidden"], leaves["teacher_weight"],
              labels, weights if weights is None or dtype is None else weights.to(dtype),
              student_bias=leaves["student_bias"], teacher_bias=leaves["teacher_bias"], **kw)
    (loss * upstream).sum().backward()
    grads = [leaves[k].grad for k in STUDENT if leaves[k] is not None]
    return loss, grads


def _upstream(reduction, labels):
    # an incoming gradient that is not 1 (and differs per token for "none"), on the labels' device
    shape = labels.shape
    if reduction == "none":
        return torch.linspace(0.5, 2.0, int(torch.Size(shape).numel()), dtype=torch.float64,
                              device=labels.device).reshape(shape)
    return torch.tensor(2.5, dtype=torch.float64, device=labels.device)


def _reference64(c, labels, weights, upstream, **kw):
    return _run(ref.fused_linear_skew, c, labels, weights, upstream, dtype=torch.float64, **kw)


def _assert_close_to_64(got, want64, baseline, what):
    """got's error vs float64 is at most 2 x plain PyTorch's (baseline) error in the same dtype, with a
    floor of a few float32 ulps (the kernels accumulate in float32 whatever the input dtype); one scale for
    the whole tensor (per row, Triton's weight gradient measured 2.1e-6 against PyTorch's 6.4e-7 + floor)."""
    assert_eager_budget(got, baseline, want64, out_dtype=torch.float32, scale="tensor", what=what)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_formula(backend, device, interpreted, reverse, reduction):
    small = interpreted  # the interpreter is slow
    c, labels, weights = _case(n=13 if small else 41, h_s=8 if small else 24, h_t=12 if small else 32,
                               vocab=97 if small else 1271, device=device)
    up = _upstream(reduction, labels)
    kw = dict(alpha=0.1, temperature=1.3, reduction=reduction)
    want_loss, want_grads = _reference64(c, labels, weights, up, reverse=reverse, **kw)
    base_loss, base_grads = _run(ref.fused_linear_skew, c, labels, weights, up.float(), reverse=reverse, **kw)
    got_loss, got_grads = _run(FUNCS[reverse], c, labels, weights, up.float(), backend=backend, chunk_size=6, **kw)
    assert got_loss.dtype == torch.float32 and got_loss.shape == want_loss.shape
    _assert_close_to_64(got_loss, want_loss, base_loss, "loss")
    for name, g, w, b in zip(STUDENT, got_grads, want_grads, base_grads):
        assert g.dtype == torch.float32
        _assert_close_to_64(g, w, b, f"grad {name}")


@FAST
@pytest.mark.parametrize("reverse", [False, True])
def test_equals_logits_level_op(backend, device, interpreted, reverse):
    """The fused-linear op and the logits-level op on logits built eagerly agree (values and gradients)."""
    small = interpreted
    c, labels, weights = _case(n=9 if small else 41, h_s=8 if small else 24, vocab=97 if small else 1271, seed=2,
                               device=device)
    kw = dict(alpha=0.5, temperature=1.0, reduction="mean", backend=backend)
    got_loss, got_grads = _run(FUNCS[reverse], c, labels, weights, 3.0, chunk_size=4, **kw)

    def logits_level(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, weights, *,
                     student_bias, teacher_bias, **kw):
        z_s = student_hidden @ student_weight.T + student_bias
        z_t = (teacher_hidden @ teacher_weight.T + teacher_bias).detach()
        op = distillkit.skew_reverse_kl if reverse else distillkit.skew_kl
        return op(z_s, z_t, labels, weights=weights, **kw)

    want_loss, want_grads = _run(logits_level, c, labels, weights, 3.0, **kw)
    # both paths are float32 computations of one quantity: each within plain PyTorch's float32 budget
    kw.pop("backend")
    up = torch.tensor(3.0, dtype=torch.float64, device=device)
    true_loss, true_grads = _reference64(c, labels, weights, up, reverse=reverse, **kw)
    base_loss, base_grads = _run(ref.fused_linear_skew, c, labels, weights, 3.0, reverse=reverse, **kw)
    for path, loss, grads in (("fused", got_loss, got_grads), ("logits-level", want_loss, want_grads)):
        _assert_close_to_64(loss, true_loss, base_loss, "loss")
        for name, g, w, b in zip(STUDENT, grads, true_grads, base_grads):
            _assert_close_to_64(g, w, b, f"{path} grad {name}")


@FAST
def test_detach_mixture(backend, device):
    c, labels, weights = _case(n=11, h_s=8, vocab=97, seed=4, device=device)
    up = torch.tensor(1.0, dtype=torch.float64, device=device)
    for detach in (False, True):
        kw = dict(alpha=0.3, reduction="sum", detach_mixture=detach)
        want_loss, want_grads = _reference64(c, labels, weights, up, reverse=True, **kw)
        got_loss, got_grads = _run(distillkit.fused_linear_skew_reverse_kl, c, labels, weights, 1.0, backend=backend,
                                   chunk_size=5, **kw)
        base_loss, base_grads = _run(ref.fused_linear_skew, c, labels, weights, 1.0, reverse=True, **kw)
        _assert_close_to_64(got_loss, want_loss, base_loss, "loss")
        for name, g, w, b in zip(STUDENT, got_grads, want_grads, base_grads):
            _assert_close_to_64(g, w, b, f"grad {name}")


@FAST
@pytest.mark.no_interpreter
@pytest.mark.parametrize("reverse", [False, True])
def test_bf16_inputs(backend, device, reverse):
    c, labels, weights = _case(n=41, h_s=24, vocab=1271, dtype=torch.bfloat16, seed=6, device=device)
    up = _upstream("mean", labels)
    want_loss, want_grads = _reference64(c, labels, weights, up, reverse=reverse)
    # plain PyTorch in bf16 throughout: the error budget
    base_loss, base_grads = _run(ref.fused_linear_skew, c, labels, weights, up.bfloat16(), reverse=reverse,
                                 compute_dtype=torch.bfloat16)
    got_loss, got_grads = _run(FUNCS[reverse], c, labels, weights, up.float(), backend=backend, chunk_size=16)
    assert got_loss.dtype == torch.float32
    _assert_close_to_64(got_loss, want_loss, base_loss, "loss")
    for name, g, w, b in zip(STUDENT, got_grads, want_grads, base_grads):
        assert g.dtype == torch.bfloat16, name
        _assert_close_to_64(g, w, b, f"grad {name}")


@pytest.mark.no_interpreter
def test_3d_input_and_chunk_sizes(backend, device):
    c, labels, weights = _case(lead=(3, 7), h_s=16, vocab=301, seed=8, device=device)
    up = _upstream("none", labels)
    want_loss, want_grads = _reference64(c, labels, weights, up, reduction="none")
    base_loss, base_grads = _run(ref.fused_linear_skew, c, labels, weights, up.float(), reduction="none")
    for chunk in (1, 4, 21, 100, None):  # one row, not dividing N, exactly N, more than N, automatic
        got_loss, got_grads = _run(distillkit.fused_linear_skew_kl, c, labels, weights, up.float(), backend=backend,
                                   reduction="none", chunk_size=chunk)
        assert got_loss.shape == (3, 7)
        _assert_close_to_64(got_loss, want_loss, base_loss, "loss")
        for name, g, w, b in zip(STUDENT, got_grads, want_grads, base_grads):
            _assert_close_to_64(g, w, b, f"grad {name} (chunk {chunk})")


@pytest.mark.no_interpreter
def test_all_ignored_and_no_bias(backend, device):
    c, labels, weights = _case(n=10, vocab=64, bias=False, seed=9, device=device)
    labels[:] = -100
    for red in ("mean", "sum"):
        loss, grads = _run(distillkit.fused_linear_skew_kl, c, labels, weights, 1.0, backend=backend, reduction=red)
        assert loss.item() == 0.0
        assert all(bool((g == 0).all()) for g in grads)
    loss, _ = _run(distillkit.fused_linear_skew_reverse_kl, c, labels, None, 1.0, backend=backend, reduction="none")
    assert bool((loss == 0).all())


@FAST
def test_teacher_gets_no_gradient_and_frozen_parts(backend, device):
    c, labels, weights = _case(n=8, h_s=8, vocab=97, seed=10, device=device)
    th = c["teacher_hidden"].clone().requires_grad_(True)
    tw = c["teacher_weight"].clone().requires_grad_(True)
    sw = c["student_weight"].clone()  # frozen lm_head: only the hidden state gets a gradient
    sh = c["student_hidden"].clone().requires_grad_(True)
    loss = distillkit.fused_linear_skew_kl(sh, sw, th, tw, labels, backend=backend)
    loss.backward()
    assert th.grad is None and tw.grad is None and sh.grad is not None
    with torch.no_grad():  # no gradient work at all under no_grad
        out = distillkit.fused_linear_skew_kl(sh, sw, th, tw, labels, backend=backend)
    assert not out.requires_grad


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(11)
    sh = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    sw = torch.randn(13, 4, dtype=torch.float64, generator=g, requires_grad=True)
    sb = torch.randn(13, dtype=torch.float64, generator=g, requires_grad=True)
    th = torch.randn(5, 6, dtype=torch.float64, generator=g)
    tw = torch.randn(13, 6, dtype=torch.float64, generator=g)
    labels = torch.tensor([1, -100, 3, 4, 5])
    weights = torch.rand(5, dtype=torch.float64, generator=g)
    cases = [("cpu", False, "mean"), ("cpu", True, "none"), ("reference", True, "sum")]
    for backend, reverse, reduction in [c for c in cases if c[0] in AVAILABLE]:
        def f(sh, sw, sb):
            return FUNCS[reverse](sh, sw, th, tw, labels, weights, student_bias=sb, alpha=0.2, temperature=0.7,
                                  reduction=reduction, chunk_size=2, backend=backend)
        # float64 finite differences: truncation ~eps^2 |f'''| plus rounding ~2^-52 |f| / eps, both ~1e-10 here,
        # far below these bounds (and a wrong gradient is off by O(1))
        assert torch.autograd.gradcheck(f, (sh, sw, sb), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_torch_compile_training_step():
    """A compiled step (student body + FusedLinearSkewKLLoss + optimizer) matches the eager step."""
    backend = "cpu" if "cpu" in AVAILABLE else "reference"
    torch.manual_seed(12)
    vocab, hidden = 97, 16

    def make():
        torch.manual_seed(13)
        body = torch.nn.Linear(hidden, hidden)
        head = torch.nn.Linear(hidden, vocab)
        return body, head

    x = torch.randn(2, 5, hidden)
    teacher_h = torch.randn(2, 5, 24)
    teacher_w = torch.randn(vocab, 24) * 0.3
    labels = torch.randint(0, vocab, (2, 5))
    labels[0, 0] = -100
    loss_fn = FusedLinearSkewKLLoss(alpha=0.1, backend=backend, chunk_size=4)

    def forward(body, head):
        h = torch.tanh(body(x))
        return loss_fn(h, head.weight, teacher_h, teacher_w, labels, student_bias=head.bias)

    results = []
    for compile_it in (False, True):
        body, head = make()
        # fullgraph: the op must trace as one node (no graph break); backward runs AOTAutograd's graph
        fn = torch.compile(forward, backend="aot_eager", fullgraph=True) if compile_it else forward
        loss = fn(body, head)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in (*body.parameters(), *head.parameters())]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        sh, sw = torch.empty(6, 4), torch.empty(11, 4)
        th, tw = torch.empty(6, 5), torch.empty(11, 5)
        scale = torch.empty(6)
        loss, rows, gh, gw, gb = fl.fused_linear_skew_op(sh, sw, None, th, tw, None, scale, 0.1, 1.0, False, False,
                                                         4, "cpu", True, 3, [1.0, 0.0, 1.0, 0.0])
        assert loss.shape == () and rows.shape == (6,) and gh.shape == (6, 4) and gw.shape == (11, 4)


def test_modules_forward_options():
    c, labels, weights = _case(n=12, h_s=8, vocab=50, seed=14)
    args = (c["student_hidden"], c["student_weight"], c["teacher_hidden"], c["teacher_weight"], labels, weights)
    for module, fn, extra in [(FusedLinearSkewKLLoss, distillkit.fused_linear_skew_kl, {}),
                              (FusedLinearSkewReverseKLLoss, distillkit.fused_linear_skew_reverse_kl,
                               {"detach_mixture": False})]:
        opts = dict(alpha=0.7, temperature=2.0, ignore_index=3, reduction="sum", backend="reference",
                    chunk_size=5, **extra)
        got = module(**opts)(*args, student_bias=c["student_bias"], teacher_bias=c["teacher_bias"])
        want = fn(*args, student_bias=c["student_bias"], teacher_bias=c["teacher_bias"], **opts)
        torch.testing.assert_close(got, want)
        assert "alpha=0.7" in repr(module(**opts))


def test_default_chunk_size_bounds_logits():
    assert fl.default_chunk_size(4096, 32000, torch.device("cpu")) * 32000 <= 1 << 24
    assert fl.default_chunk_size(10, 32000, torch.device("cpu")) == 10
    assert fl.default_chunk_size(8192, 128256, torch.device("cuda")) % 128 == 0
    assert fl.default_chunk_size(5, 10**9, torch.device("cpu")) == 1


def test_bad_inputs_name_the_argument():
    c, labels, weights = _case(n=6, h_s=8, vocab=20)
    sh, sw, th, tw = c["student_hidden"], c["student_weight"], c["teacher_hidden"], c["teacher_weight"]
    f = distillkit.fused_linear_skew_kl
    with pytest.raises(ValueError, match="teacher_hidden"):
        f(sh, sw, th[:5], tw)
    with pytest.raises(ValueError, match="student_weight"):
        f(sh, sw[:, :7], th, tw)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        f(sh, sw, th, tw[:19])
    with pytest.raises(ValueError, match="student_bias"):
        f(sh, sw, th, tw, student_bias=torch.zeros(19))
    with pytest.raises(ValueError, match="labels"):
        f(sh, sw, th, tw, labels[:5])
    with pytest.raises(ValueError, match="weights"):
        f(sh, sw, th, tw, labels, weights[:5])
    with pytest.raises(ValueError, match="alpha"):
        f(sh, sw, th, tw, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        f(sh, sw, th, tw, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        f(sh, sw, th, tw, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        f(sh, sw, th, tw, chunk_size=0)
    with pytest.raises(TypeError, match="student_hidden"):
        f(sh.long(), sw, th, tw)
    bad = weights.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="weights"):
        f(sh, sw, th, tw, labels, bad, backend="cpu" if "cpu" in AVAILABLE else None)
    bad = th.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_hidden"):
        f(sh, sw, bad, tw, backend="cpu" if "cpu" in AVAILABLE else None)


def test_autocast_with_float32_parameters():
    """The usual mixed-precision set-up: float32 hidden states and lm_head weights under autocast(bfloat16).
    The op applies autocast itself (bf16 GEMMs) and returns float32 gradients for the float32 inputs,
    equal to running it on bf16 copies."""
    from distillkit.ops.fused_linear import fused_linear_skew_kl, fused_linear_skew_reverse_kl

    g = torch.Generator().manual_seed(5)
    sh = torch.randn(12, 16, generator=g)
    sw = (torch.randn(97, 16, generator=g) * 0.3)
    th, tw = torch.randn(12, 24, generator=g), torch.randn(97, 24, generator=g) * 0.3
    for fn in (fused_linear_skew_kl, fused_linear_skew_reverse_kl):
        for backend in [b for b in ("cpu", "reference") if b in AVAILABLE]:
            a, w = sh.clone().requires_grad_(), sw.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fn(a, w, th, tw, backend=backend)
            loss.backward()
            assert loss.dtype == torch.float32 and a.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
            b16, w16 = sh.bfloat16().requires_grad_(), sw.bfloat16().requires_grad_()
            want = fn(b16, w16, th.bfloat16(), tw.bfloat16(), backend=backend)
            want.backward()
            torch.testing.assert_close(loss, want)
            torch.testing.assert_close(a.grad, b16.grad.float())
            # the same bf16 computation on both sides (the autocast path's weight gradient is bf16, then cast)
            torch.testing.assert_close(w.grad, w16.grad.float(), rtol=0, atol=0)


@pytest.mark.parametrize("reverse", [False, True])
def test_skipped_rows_may_hold_anything(backend, device, reverse):
    """As for the logits-level op: rows with an ignored label or weight 0 may hold NaN or inf hidden states;
    loss and every gradient equal the run with those rows zeroed (no 0 * NaN in the weight gradient)."""
    c, labels, weights = _case(n=11, h_s=8, h_t=12, vocab=97, seed=4, device=device)  # rows 0, 5, 10 ignored
    weights[3] = 0.0
    dirty = {k: (v.clone() if v is not None else None) for k, v in c.items()}
    clean = {k: (v.clone() if v is not None else None) for k, v in c.items()}
    for row, value in ((0, float("nan")), (5, float("inf")), (3, float("-inf"))):
        dirty["student_hidden"][row, 1] = value
        dirty["teacher_hidden"][row, 2] = value
        clean["student_hidden"][row] = 0.0
        clean["teacher_hidden"][row] = 0.0
    kw = dict(alpha=0.2, reduction="mean", backend=backend)
    got_loss, got_grads = _run(FUNCS[reverse], dirty, labels, weights, 1.0, chunk_size=4, **kw)
    want_loss, want_grads = _run(FUNCS[reverse], clean, labels, weights, 1.0, chunk_size=4, **kw)
    torch.testing.assert_close(got_loss, want_loss)
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w)
