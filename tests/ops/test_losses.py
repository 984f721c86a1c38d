"""distillkit.losses: the nn.Module wrappers forward their options to the functional ops."""
import pytest
import torch

import distillkit
from _tolerance import assert_eager_budget
from distillkit._backend import backends
from distillkit.losses import FusedLinearSkewKLLoss, FusedLinearSkewReverseKLLoss, SkewKLLoss, SkewReverseKLLoss
from distillkit.reference import fused_linear as ref

AVAILABLE = [name for name, (ok, _) in backends().items() if ok]


def _logits(n=12, vocab=67, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=g)
    teacher = torch.randn(n, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = 3
    return student.to(device).requires_grad_(True), teacher.to(device), labels.to(device)


@pytest.mark.no_interpreter  # the modules only forward options: the interpreter adds nothing but minutes
def test_skew_modules_match_functional(backend, device):
    student, teacher, labels = _logits(device=device)
    opts = dict(alpha=0.3, temperature=1.7, ignore_index=3, reduction="sum", backend=backend)
    for module, fn, extra in [(SkewKLLoss, distillkit.skew_kl, {}),
                              (SkewReverseKLLoss, distillkit.skew_reverse_kl, {"detach_mixture": False})]:
        loss_fn = module(**opts, **extra)
        got = loss_fn(student, teacher, labels)
        (g_got,) = torch.autograd.grad(got, student)
        want = fn(student, teacher, labels, **opts, **extra)
        (g_want,) = torch.autograd.grad(want, student)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_got, g_want)
        assert "alpha=0.3" in repr(loss_fn) and "ignore_index=3" in repr(loss_fn)


@pytest.mark.no_interpreter
def test_skew_modules_against_float64_formula(backend, device):
    """Options really reach the op: compare with the float64 formulas (weights, ignore_index, temperature)."""
    student, teacher, labels = _logits(seed=1, device=device)
    weights = (torch.rand(student.shape[0], dtype=torch.float32, generator=torch.Generator().manual_seed(1))
               + 0.5).to(device)
    for reverse, module in [(False, SkewKLLoss(alpha=0.2, temperature=0.8, ignore_index=3, backend=backend)),
                            (True, SkewReverseKLLoss(alpha=0.2, temperature=0.8, ignore_index=3, backend=backend,
                                                     detach_mixture=True))]:
        got = module(student, teacher, labels, weights)
        keep = labels != 3

        def formula(dtype):
            d = ref.skew_divergence_rows(student.to(dtype), teacher.to(dtype), alpha=0.2, temperature=0.8,
                                         reverse=reverse, detach_mixture=True)
            return (d * weights.to(dtype) * keep).sum() / keep.sum()

        assert_eager_budget(got, formula(torch.float32), formula(torch.float64), what=f"reverse={reverse}")


def test_fused_linear_modules_forward_options():
    g = torch.Generator().manual_seed(2)
    sh, sw = torch.randn(10, 8, generator=g), torch.randn(40, 8, generator=g)
    th, tw = torch.randn(10, 6, generator=g), torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 40, (10,), generator=g)
    labels[1] = 7
    backend = "cpu" if "cpu" in AVAILABLE else "reference"
    for module, reverse in [(FusedLinearSkewKLLoss, False), (FusedLinearSkewReverseKLLoss, True)]:
        opts = dict(alpha=0.4, temperature=1.5, ignore_index=7, reduction="none", backend=backend, chunk_size=3)
        got = module(**opts)(sh, sw, th, tw, labels)
        want, eager = (ref.fused_linear_skew(sh.to(dt), sw.to(dt), th.to(dt), tw.to(dt), labels, alpha=0.4,
                                             temperature=1.5, ignore_index=7, reduction="none", reverse=reverse)
                       for dt in (torch.float64, torch.float32))
        assert_eager_budget(got, eager, want, scale="tensor", what=f"reverse={reverse}")
        assert got[1] == 0
    assert FusedLinearSkewReverseKLLoss(detach_mixture=True).detach_mixture
