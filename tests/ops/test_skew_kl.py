"""distillkit.skew_kl / skew_reverse_kl on every backend runnable here, against float64 DistiLLM formulas.

Error budget (STYLE habit 6): a backend's error against float64 must be at most twice plain PyTorch's
error in the same dtype (the reference with upcast=False), plus a floor of a few roundings of the
output. Since the fused backends compute in float32 from half inputs, their loss must also meet a
float32-level bound whatever the input dtype.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import distillkit
from _tolerance import assert_eager_budget
from distillkit import BackendUnavailable
from distillkit._backend import backends
from distillkit.ops.skew_kl import skew_kl_rows
from distillkit.reference import skew_kl as ref

# (tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU, before triton is imported.)

# masked lanes of the interpreter's numpy tiles evaluate log(0) and inf - inf before tl.where drops them
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

_AVAILABLE = backends()
# (backend, device) pairs come from tests/ops/conftest.py (interpreter shapes are kept small: _shape)
FUSED = pytest.mark.backends("cpu", "triton", "cuda")
ON_CPU = pytest.mark.devices("cpu")  # the value checks run on CPU tensors only
LOSSES = {"skew_kl": (distillkit.skew_kl, ref.skew_kl), "skew_reverse_kl": (distillkit.skew_reverse_kl, ref.skew_reverse_kl)}
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


def _shape(backend, device):
    # odd sizes; the interpreter pays per tile, so it gets a few rows of two and a bit 256-wide tiles
    if backend == "triton" and device == "cpu":
        return (2, 3, 541)
    return (3, 41 // 3 + 1, 1271)


def _inputs(shape, dtype, device, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=g)).to(dtype)
    teacher = (scale * torch.randn(shape, generator=g) + 0.5 * student.float()).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[..., ::4] = -100
    return student.to(device), teacher.to(device), labels.to(device)


def _run(fn, student, teacher, labels, upstream, **kw):
    """(loss, dloss/dstudent) with `upstream` as the incoming gradient."""
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, teacher, labels, **kw)
    loss.backward(upstream)
    return loss.detach(), s.grad


def _truth(ref_fn, student, teacher, labels, upstream, **kw):
    if kw.get("weights") is not None:
        kw["weights"] = kw["weights"].double()
    return _run(ref_fn, student.double(), teacher.double(), labels, upstream.double(), **kw)


def _err(got, truth):
    return (got.double() - truth).abs().max().item()


def _assert_budget(what, got, plain, truth, out_dtype):
    # per-token losses: one scale for the tensor (a KL near 0 is a cancellation); gradients: per token row
    assert_eager_budget(got, plain, truth, out_dtype=out_dtype, scale="tensor" if what == "loss" else "row",
                        what=what)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64(backend, device, dtype, loss_name):
    """Per-token losses and gradients with ignored tokens, token weights, T != 1 and a non-unit, per-token
    upstream gradient."""
    fn, ref_fn = LOSSES[loss_name]
    student, teacher, labels = _inputs(_shape(backend, device), dtype, device, seed=1)
    upstream = torch.rand(labels.shape, device=device) * 2 + 0.5
    weights = torch.rand(labels.shape, device=device) + 0.25
    kw = dict(weights=weights, alpha=0.37, temperature=1.5, reduction="none")
    loss, grad = _run(fn, student, teacher, labels, upstream, backend=backend, **kw)
    plain_loss, plain_grad = _run(ref_fn, student, teacher, labels, upstream.to(dtype), upcast=False, **kw)
    true_loss, true_grad = _truth(ref_fn, student, teacher, labels, upstream, **kw)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    assert grad.dtype == dtype and grad.shape == student.shape
    _assert_budget("loss", loss, plain_loss, true_loss, torch.float32)
    _assert_budget("grad", grad, plain_grad, true_grad, dtype)
    # float32 arithmetic inside, whatever the input dtype: as accurate as plain PyTorch on float32 upcasts
    plain32_loss, _ = _run(ref_fn, student.float(), teacher.float(), labels, upstream, upcast=False, **kw)
    _assert_budget("loss", loss, plain32_loss, true_loss, torch.float32)
    assert (loss[labels == -100] == 0).all() and (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_scale_the_gradient(backend, device, reduction, loss_name):
    """Scalar reductions, with and without token weights, and an upstream gradient of 2 (as when a loss is
    scaled before backward)."""
    fn, ref_fn = LOSSES[loss_name]
    student, teacher, labels = _inputs(_shape(backend, device), torch.float32, device, seed=2)
    upstream = torch.tensor(2.0, device=device)
    for weights in (None, torch.rand(labels.shape, device=device)):
        loss, grad = _run(fn, student, teacher, labels, upstream, weights=weights, reduction=reduction,
                          backend=backend)
        true_loss, true_grad = _truth(ref_fn, student, teacher, labels, upstream, weights=weights,
                                      reduction=reduction)
        plain_loss, plain_grad = _run(ref_fn, student, teacher, labels, upstream, weights=weights,
                                      reduction=reduction, upcast=False)
        assert loss.shape == ()
        _assert_budget("loss", loss, plain_loss, true_loss, torch.float32)
        _assert_budget("grad", grad, plain_grad, true_grad, torch.float32)


def test_detached_mixture(backend, device):
    """DistiLLM-2's skew reverse KL: same value, gradient without the path through the mixture."""
    student, teacher, labels = _inputs(_shape(backend, device), torch.float32, device, seed=13)
    upstream = torch.rand(labels.shape, device=device) + 0.5
    kw = dict(alpha=0.3, reduction="none", detach_mixture=True)
    loss, grad = _run(distillkit.skew_reverse_kl, student, teacher, labels, upstream, backend=backend, **kw)
    plain_loss, plain_grad = _run(ref.skew_reverse_kl, student, teacher, labels, upstream, upcast=False, **kw)
    true_loss, true_grad = _truth(ref.skew_reverse_kl, student, teacher, labels, upstream, **kw)
    _, attached_grad = _truth(ref.skew_reverse_kl, student, teacher, labels, upstream, alpha=0.3, reduction="none")
    _assert_budget("loss", loss, plain_loss, true_loss, torch.float32)
    _assert_budget("grad", grad, plain_grad, true_grad, torch.float32)
    assert _err(attached_grad, true_grad) > 100 * _err(grad, true_grad)  # the variant is a different gradient


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_peaky_and_masked_vocabulary(backend, device, loss_name):
    """Near-one-hot softmaxes (exp underflows to 0) and -inf logits (masked vocabulary entries)."""
    fn, ref_fn = LOSSES[loss_name]
    student, teacher, labels = _inputs(_shape(backend, device), torch.float32, device, seed=3, scale=40.0)
    student[..., 7::13] = float("-inf")
    teacher[..., 5::11] = float("-inf")
    upstream = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) + 0.5).to(device)
    kw = dict(alpha=0.1, reduction="none")
    loss, grad = _run(fn, student, teacher, labels, upstream, backend=backend, **kw)
    plain_loss, plain_grad = _run(ref_fn, student, teacher, labels, upstream, upcast=False, **kw)
    true_loss, true_grad = _truth(ref_fn, student, teacher, labels, upstream, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    _assert_budget("loss", loss, plain_loss, true_loss, torch.float32)
    # where both softmaxes are one-hot on the same token the gradient cancels to ~1e-14 .. 1e-27 in float64
    # while its terms are ~upstream: judge it on the scale of those terms (as test_properties does), since
    # relative to the cancelled row any float32 computation, plain PyTorch's included, is off by 1e6 or more
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    terms = upstream.double().unsqueeze(-1) * torch.maximum(p, q).amax(-1, keepdim=True)
    scale = torch.maximum(terms, true_grad.abs().amax(-1, keepdim=True))
    assert_eager_budget(grad, plain_grad, true_grad, out_dtype=torch.float32, scale=scale, what="grad")


def test_properties(backend, device):
    """Identical inputs give 0 and zero gradient; alpha = 0 is the plain (reverse) KL; alpha = 1 skew KL is 0."""
    student, teacher, labels = _inputs(_shape(backend, device), torch.float32, device, seed=4)
    ones = torch.ones(labels.shape, device=device)
    # the exact results are 0 by cancellation: errors are measured on the scale of the cancelling terms,
    # sum_v p |log p| per token for the loss and max_v p per token row for the gradient
    p = torch.softmax(student.double(), -1)
    loss_terms = (p * p.log().abs()).sum(-1).max().item()
    grad_terms = p.amax(-1, keepdim=True)
    for (fn, ref_fn) in LOSSES.values():
        loss, grad = _run(fn, student, student, labels, ones, alpha=0.2, reduction="none", backend=backend)
        plain_loss, plain_grad = _run(ref_fn, student, student, labels, ones, alpha=0.2, reduction="none",
                                      upcast=False)
        assert_eager_budget(loss, plain_loss, torch.zeros_like(loss, dtype=torch.float64), scale=loss_terms,
                            what="identical-inputs loss")
        assert_eager_budget(grad, plain_grad, torch.zeros_like(grad, dtype=torch.float64), scale=grad_terms,
                            what="identical-inputs grad")
    log_q = torch.log_softmax(student.double(), -1)
    log_p = torch.log_softmax(teacher.double(), -1)
    forward_kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    reverse_kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    log_q32, log_p32 = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)  # plain PyTorch, float32
    kw = dict(alpha=0.0, reduction="none", backend=backend)
    assert_eager_budget(distillkit.skew_kl(student, teacher, **kw), F.kl_div(log_q32, log_p32, log_target=True,
                        reduction="none").sum(-1), forward_kl, scale="tensor", what="alpha=0 skew KL")
    assert_eager_budget(distillkit.skew_reverse_kl(student, teacher, **kw), F.kl_div(log_p32, log_q32,
                        log_target=True, reduction="none").sum(-1), reverse_kl, scale="tensor",
                        what="alpha=0 skew reverse KL")
    loss, grad = _run(distillkit.skew_kl, student, teacher, None, torch.tensor(1.0, device=device), alpha=1.0,
                      backend=backend)
    plain_loss, _ = _run(ref.skew_kl, student, teacher, None, torch.tensor(1.0, device=device), alpha=1.0,
                         upcast=False)
    q = torch.softmax(teacher.double(), -1)
    assert_eager_budget(loss, plain_loss, torch.zeros((), dtype=torch.float64),
                        scale=(q * q.log().abs()).sum(-1).mean().item(), what="alpha=1 skew KL")
    assert grad.abs().max() == 0  # the mixture is the teacher itself: no path to the student at all


@pytest.mark.parametrize("loss_name", list(LOSSES))
@FUSED
def test_no_grad_path_and_edge_batches(backend, device, loss_name):
    """The loss-only kernel equals the loss+gradient one; all-ignored and empty batches give 0."""
    fn, _ = LOSSES[loss_name]
    student, teacher, labels = _inputs(_shape(backend, device), torch.float32, device, seed=5)
    rows_s, rows_t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    scale = torch.ones(rows_s.shape[0], device=device)
    reverse = loss_name == "skew_reverse_kl"
    with_grad, _ = skew_kl_rows(rows_s, rows_t, scale, reverse=reverse, need_grad=True, backend=backend)
    without, _ = skew_kl_rows(rows_s, rows_t, scale, reverse=reverse, need_grad=False, backend=backend)
    # the two kernels group the same float32 sums differently: each within plain PyTorch's budget
    truth = ref._per_token(rows_s.double(), rows_t.double(), 0.1, 1.0, True, reverse)
    plain = ref._per_token(rows_s, rows_t, 0.1, 1.0, False, reverse)
    assert_eager_budget(with_grad, plain, truth, scale="tensor", what="loss+gradient kernel")
    assert_eager_budget(without, plain, truth, scale="tensor", what="loss-only kernel")
    all_ignored = torch.full_like(labels, -7)
    loss, grad = _run(fn, student, teacher, all_ignored, torch.tensor(1.0, device=device), ignore_index=-7,
                      backend=backend)
    assert loss.item() == 0 and grad.abs().max() == 0
    empty = student[:0]
    loss, grad = _run(fn, empty, teacher[:0], None, torch.tensor(1.0, device=device), backend=backend)
    assert loss.item() == 0 and grad.shape == empty.shape


@FUSED
def test_mixed_dtypes_promote(backend, device):
    """A float32 teacher with a bfloat16 student computes on float32 values; the gradient is bfloat16."""
    student, teacher, labels = _inputs(_shape(backend, device), torch.bfloat16, device, seed=6)
    teacher32 = teacher.float() + 1e-3 * torch.randn(teacher.shape, device=device)
    loss, grad = _run(distillkit.skew_kl, student, teacher32, labels, torch.tensor(1.0, device=device),
                      backend=backend)
    true_loss, true_grad = _truth(ref.skew_kl, student, teacher32, labels, torch.tensor(1.0, device=device))
    # plain PyTorch on the same mixed inputs promotes to float32; its gradient lands in bfloat16 as ours does
    plain_loss, plain_grad = _run(ref.skew_kl, student, teacher32, labels, torch.tensor(1.0, device=device),
                                  upcast=False)
    assert grad.dtype == torch.bfloat16 and plain_grad.dtype == torch.bfloat16
    _assert_budget("loss", loss, plain_loss, true_loss, torch.float32)
    _assert_budget("grad", grad, plain_grad, true_grad, torch.bfloat16)


@pytest.mark.skipif(not _AVAILABLE["cpu"][0], reason="distillkit._C not built")
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_cpu_gradcheck_float64(loss_name):
    """The custom op's autograd (saved gradient x upstream) by finite differences, in float64."""
    fn, _ = LOSSES[loss_name]
    student, teacher, labels = _inputs((4, 9), torch.float64, "cpu", seed=7)
    student.requires_grad_(True)
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda s: fn(s, teacher, labels, alpha=0.25, temperature=0.7, reduction=reduction, backend="cpu"),
            (student,))


@pytest.mark.skipif(not _AVAILABLE["cpu"][0], reason="distillkit._C not built")
def test_cpu_vectorised_exp_log_accuracy():
    """The CPU kernels' polynomial exp and log: a few ulp over the ranges they see; special values exact."""
    from distillkit._backend import extension

    x = torch.linspace(-87.0, 0.0, 200_001)
    e, _ = extension().skew_kl_exp_log_cpu(x)
    rel = ((e.double() - x.double().exp()) / x.double().exp()).abs().max().item()
    assert rel < 4 * EPS[torch.float32]
    y = torch.logspace(-44, 38, 200_001, dtype=torch.float64).float()
    _, lg = extension().skew_kl_exp_log_cpu(y)
    # absolute error relative to ulp(log y) (the spacing near |log y|), floor 1 ulp of 1
    err = (lg.double() - y.double().log()).abs() / y.double().log().abs().clamp_min(1.0)
    assert err.max().item() < 4 * EPS[torch.float32]
    special = torch.tensor([0.0, -1.0, float("inf"), float("nan"), float("-inf"), -100.0])
    e, lg = extension().skew_kl_exp_log_cpu(special)
    assert lg[0] == float("-inf") and lg[1].isnan() and lg[2] == float("inf") and lg[3].isnan()
    assert e[0] == 1 and e[3].isnan() and e[4] == 0 and e[5] == 0


@pytest.mark.skipif(not _AVAILABLE["cpu"][0], reason="distillkit._C not built")
def test_cpu_value_checks():
    student, teacher, labels = _inputs((3, 5, 17), torch.float32, "cpu", seed=8)
    bad_labels = labels.clone()
    bad_labels[1, 2] = 17
    with pytest.raises(ValueError, match="labels"):
        distillkit.skew_kl(student, teacher, bad_labels, backend="cpu")
    nan_teacher = teacher.clone()
    nan_teacher[2, 1, 3] = float("nan")
    labels[2, 1] = 0
    with pytest.raises(ValueError, match="NaN"):
        distillkit.skew_reverse_kl(student, nan_teacher, labels, backend="cpu")
    labels[2, 1] = -100  # an ignored row may hold anything
    assert torch.isfinite(distillkit.skew_reverse_kl(student, nan_teacher, labels, backend="cpu"))


def test_argument_validation():
    s, t, labels = _inputs((2, 3, 11), torch.float32, "cpu", seed=9)
    with pytest.raises(TypeError, match="student_logits"):
        distillkit.skew_kl(s.numpy(), t)
    with pytest.raises(TypeError, match="teacher_logits"):
        distillkit.skew_kl(s, t.long())
    with pytest.raises(ValueError, match="student_logits"):  # non-floating logits: a ValueError as well
        distillkit.skew_kl(s.long(), t)
    with pytest.raises(distillkit.InputError, match="labels"):
        distillkit.skew_kl(s, t, labels.float())
    nan_weights = torch.ones(2, 3)
    nan_weights[1, 2] = float("nan")
    for backend in ("reference", *(["cpu"] if _AVAILABLE["cpu"][0] else [])):
        with pytest.raises(ValueError, match=r"weights\[5\]"):
            distillkit.skew_kl(s, t, labels, nan_weights, backend=backend)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        distillkit.skew_kl(s, t[..., :10])
    with pytest.raises(ValueError, match="teacher_logits shape"):
        distillkit.skew_kl(s, t[:1])
    with pytest.raises(TypeError, match="labels"):
        distillkit.skew_kl(s, t, labels.float())
    with pytest.raises(ValueError, match="labels shape"):
        distillkit.skew_kl(s, t, labels[0])
    with pytest.raises(TypeError, match="weights"):
        distillkit.skew_kl(s, t, labels, labels)
    with pytest.raises(ValueError, match="weights shape"):
        distillkit.skew_kl(s, t, labels, torch.ones(2, 3, 1))
    with pytest.raises(TypeError, match="detach_mixture"):
        distillkit.skew_reverse_kl(s, t, detach_mixture=1)
    for alpha in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="alpha"):
            distillkit.skew_kl(s, t, alpha=alpha)
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            distillkit.skew_reverse_kl(s, t, temperature=temperature)
    with pytest.raises(ValueError, match="reduction"):
        distillkit.skew_kl(s, t, reduction="batchmean")
    with pytest.raises(TypeError, match="ignore_index"):
        distillkit.skew_kl(s, t, ignore_index=1.0)
    with pytest.raises(ValueError, match="backend"):
        distillkit.skew_kl(s, t, backend="numpy")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="cuda"):
            distillkit.skew_kl(s, t, backend="cuda")


def test_row_primitive(backend, device):
    """skew_kl_rows (the fused-linear losses' primitive): D per row and d(sum scale D)/dz; scale-0 rows are
    skipped whatever they hold; need_grad=False returns no gradient."""
    student, teacher, _ = _inputs((7, 301), torch.float32, device, seed=14)
    scale = torch.rand(7, device=device) + 0.1
    scale[2] = 0
    student[2, 5] = float("nan")
    teacher[2, :] = float("-inf")
    for reverse, detach in ((False, False), (True, False), (True, True)):
        d, dz = skew_kl_rows(student, teacher, scale, alpha=0.2, temperature=0.8, reverse=reverse,
                             detach_mixture=detach, backend=backend)
        s64 = student.double().requires_grad_(True)
        true_d = ref._per_token(s64, teacher.double(), 0.2, 0.8, True, reverse, detach)
        kept = scale != 0
        true_d = torch.where(kept, true_d, torch.zeros_like(true_d))
        (true_dz,) = torch.autograd.grad((true_d * scale.double()).sum(), s64)
        s32 = student[kept].clone().requires_grad_(True)  # plain PyTorch in float32 on the kept rows
        plain_d = ref._per_token(s32, teacher[kept], 0.2, 0.8, False, reverse, detach)
        (plain_dz,) = torch.autograd.grad((plain_d * scale[kept]).sum(), s32)
        assert d.dtype == torch.float32 and dz.dtype == torch.float32
        assert d[2] == 0 and (dz[2] == 0).all()
        assert_eager_budget(d[kept], plain_d, true_d[kept], scale="tensor", what="D")
        assert_eager_budget(dz[kept], plain_dz, true_dz[kept], what="dD/dz")
    d_only, none = skew_kl_rows(student, teacher, scale, need_grad=False, backend=backend)
    assert none is None and d_only[2] == 0
    with pytest.raises(ValueError, match="detach_mixture"):
        skew_kl_rows(student, teacher, scale, detach_mixture=True, backend=backend)


@pytest.mark.skipif(not _AVAILABLE["cpu"][0], reason="distillkit._C not built")
def test_teacher_gradient_needs_reference():
    s, t, _ = _inputs((4, 13), torch.float32, "cpu", seed=10)
    t.requires_grad_(True)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        distillkit.skew_kl(s, t, backend="cpu")
    distillkit.skew_kl(s, t, backend="reference").backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.skipif(not _AVAILABLE["cpu"][0], reason="distillkit._C not built")
def test_torch_compile_fullgraph():
    """The fused op is a torch.library custom op: a compiled training step traces through it."""
    student, teacher, labels = _inputs((2, 5, 33), torch.float32, "cpu", seed=11)

    def step(s, t, lab):
        return 2.0 * distillkit.skew_kl(s, t, lab, backend="cpu") + distillkit.skew_reverse_kl(s, t, lab, backend="cpu")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    compiled(s1, teacher, labels).backward()
    step(s2, teacher, labels).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@FUSED
def test_retained_graph_runs_backward_twice(backend, device):
    """The saved gradient is not consumed by the backward: retain_graph=True gives the same gradient again."""
    student, teacher, labels = _inputs((2, 37), torch.float32, device, seed=12)
    s = student.clone().requires_grad_(True)
    loss = distillkit.skew_kl(s, teacher, labels, backend=backend)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)


@ON_CPU
def test_saturation_where_the_student_is_confidently_wrong(backend, device):
    """Documented in the README: where q(teacher's token) -> 0, SKL_alpha -> -log(alpha) and its gradient on
    that logit -> 0 (proportional to q), while the plain KL (alpha = 0) keeps a gradient of -1."""
    teacher = torch.tensor([[30.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    for z in (-6.0, -12.0):
        student = torch.tensor([[z, 3.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
        q = torch.softmax(student.detach(), -1)[0, 0].item()
        loss = distillkit.skew_kl(student, teacher, alpha=0.1, backend=backend)
        (g,) = torch.autograd.grad(loss, student)
        # analytic bounds on the distance from the asymptote (float64: roundings are far below them)
        assert loss.item() == pytest.approx(-math.log(0.1), abs=2 * q / 0.1)
        assert abs(g[0, 0].item()) <= 10 * q  # ~ (1 - alpha) q / alpha
        plain = distillkit.skew_kl(student, teacher, alpha=0.0, backend=backend)
        (g0,) = torch.autograd.grad(plain, student)
        assert g0[0, 0].item() == pytest.approx(-1.0, abs=1e-3)  # analytic: g0 + 1 = q + (1 - p) < 2e-4 here


@ON_CPU
def test_weights_are_constants_on_every_backend(backend, device):
    """The spec treats token weights as constants: a weights tensor that requires grad gets none, on the
    reference as on the fused backends (which never differentiate the scale)."""
    s, t, labels = _inputs((3, 5, 41), torch.float32, device, seed=21)
    s.requires_grad_(True)
    w = torch.rand(3, 5, requires_grad=True)
    loss = distillkit.skew_reverse_kl(s, t, labels, w * 2, alpha=0.3, backend=backend)
    loss.backward()
    assert w.grad is None and s.grad is not None


@ON_CPU
@pytest.mark.parametrize("which", ["teacher NaN", "student NaN", "teacher +inf", "student +inf", "student all -inf",
                                   "teacher all -inf"])
@pytest.mark.parametrize("reverse", [False, True])
def test_undefined_rows_raise_on_every_backend(backend, device, which, reverse):
    """A kept row with NaN or +inf, or all -inf, in either logits tensor has no defined loss: ValueError on
    CPU for every backend, in both directions (the skew KL's weights are the teacher's probabilities, the
    reverse one's the student's, so a guard on the weights alone would drop such a row and return 0)."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 37, generator=g), torch.randn(3, 37, generator=g)
    x = t if which.startswith("teacher") else s
    if "NaN" in which:
        x[1, 4] = float("nan")
    elif "+inf" in which:
        x[1, 4] = float("inf")
    else:
        x[1, :] = float("-inf")
    f = distillkit.skew_reverse_kl if reverse else distillkit.skew_kl
    with pytest.raises(ValueError, match="row 1"):
        f(s, t, backend=backend)
    assert torch.isfinite(f(s, t, torch.tensor([0, -100, 0]), backend=backend))  # ignored: anything goes


@ON_CPU
@FUSED
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.0, 1e-6, 1.0])
@pytest.mark.parametrize("reverse", [False, True])
def test_alpha_ends_with_far_apart_distributions(backend, device, dtype, alpha, reverse):
    """alpha = 0 (plain KL) and near 0 with logits far apart (+-1e4, gaps of 100): the mixture underflows in
    probability space; the fused backends must still match the float64 log-space formula (finite). The Triton
    gradient at alpha = 0 was 6.3e-5 off (plain PyTorch 2.3e-8): its ratio q p / m was exp(log q + log p - log m)
    with log q and log m both ~-1e4, rounded in float32 (kernels/skew_kl.py v4)."""
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(4, 53, generator=g, dtype=torch.float64), torch.randn(4, 53, generator=g, dtype=torch.float64)
    s[0, 0], t[1, 3], s[2, 5], t[2, 1], t[3, 7], s[3, 7] = 100.0, 100.0, 1e4, -1e4, 1e4, -1e4
    f = distillkit.skew_reverse_kl if reverse else distillkit.skew_kl
    s, t = s.to(dtype), t.to(dtype)

    def run(x, backend):
        x = x.clone().requires_grad_(True)
        if backend == "plain":  # the reference formulas in the input dtype
            loss = (ref.skew_reverse_kl if reverse else ref.skew_kl)(x, t, alpha=alpha, reduction="none", upcast=False)
        else:
            loss = f(x, t.to(x.dtype), alpha=alpha, reduction="none", backend=backend)
        return loss.detach(), torch.autograd.grad(loss.sum(), x)[0]

    want, want_g = run(s.double(), "reference")
    got, got_g = run(s, backend)
    assert torch.isfinite(got).all() and torch.isfinite(got_g).all()
    if dtype == torch.float64:
        # nothing wider than float64 to measure against: the bound is 2^-52 times the condition, the size of the
        # log-probabilities (|logit| up to 1e4), with a factor 8 for the roundings per term
        plain, plain_g, budget = want, want_g, dict(ulps=8 * float(s.abs().max()))
    else:
        (plain, plain_g), budget = run(s, "plain"), {}
    # alpha = 1 gives exactly 0 (KL of a distribution with itself): losses are judged on the size of the
    # cancelling terms sum_v p |log p|; gradient components are differences of probabilities, of size <= 1
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    terms = max((p * p.log().abs().nan_to_num(0.0)).sum(-1).max().item(),
                (q * q.log().abs().nan_to_num(0.0)).sum(-1).max().item(), want.abs().max().item())
    assert_eager_budget(got, plain, want, scale=terms, what="loss", **budget)
    assert_eager_budget(got_g, plain_g, want_g, scale=1.0, what="grad", **budget)
