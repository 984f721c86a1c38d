"""VCRD validity weights: every (backend, device) runnable here (tests/ops/conftest.py) against the float64
formula (distillkit.reference)."""
import math

import pytest
import torch

from _tolerance import assert_eager_budget
from distillkit import validity
from distillkit.reference import validity as ref

FAST = pytest.mark.backends("cpu", "triton", "cuda")


def _logits(n, vocab, dtype=torch.float32, seed=0, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(n, vocab, generator=g) * scale).to(dtype)
    student = torch.randn(n, vocab, generator=g)
    # a unique student maximum per row, so that argmax is tie-free in every dtype
    student[torch.arange(n), torch.randint(0, vocab, (n,), generator=g)] += 8.0
    return teacher.to(device), student.to(dtype).to(device)


def _expected(teacher, student, **kw):
    return ref.teacher_likelihood_validity(teacher.double(), student.double(), compute_dtype=torch.float64, **kw)


def _check(got, teacher, student, **kw):
    """got's elementwise relative error vs float64 within twice plain PyTorch's float32 error (each weight is
    an independent positive number, hence relative per element)."""
    got, teacher, student = got.cpu(), teacher.cpu(), student.cpu()
    eager = ref.teacher_likelihood_validity(teacher, student, compute_dtype=torch.float32, **kw)
    assert_eager_budget(got, eager, _expected(teacher, student, **kw), scale="element")


def _vocab_cases(interpreted):
    # the Triton interpreter is slow: small rows there
    return [(2, 97), (1, 301)] if interpreted else [(7, 97), (33, 1271), (4, 32003)]


@pytest.mark.parametrize("top_k", [1, 40, 128])
def test_matches_float64_formula(backend, device, interpreted, top_k):
    if interpreted and top_k == 1:
        pytest.skip("the interpreter is slow; top_k=1 takes the same path as top_k=40 (one 32/64-wide buffer)")
    for n, vocab in _vocab_cases(interpreted):
        teacher, student = _logits(n, vocab, seed=vocab + top_k, device=device)
        top_k = min(top_k, vocab)
        # the default clip, and one wide enough to see the ratio (only that one in the slow interpreter)
        for clip in [(1e-4, 1e4)] if interpreted else [(0.5, 2.0), (1e-4, 1e4)]:
            got = validity.teacher_likelihood_validity(teacher, student, top_k=top_k, clip=clip, backend=backend)
            assert got.dtype == torch.float32 and got.shape == (n,)
            _check(got, teacher, student, top_k=top_k, clip=clip)


def test_unclipped_range_and_options(backend, device, interpreted):
    # a wide clip keeps the ratio itself visible (the default clip saturates on random logits)
    teacher, student = _logits(3 if interpreted else 16, 67 if interpreted else 211, seed=3, scale=1.0, device=device)
    teacher[:, :3] += 4.0  # a peaky teacher: p_T(a_S) / sum top-k p^2 spans both sides of 1
    options = [(0.5, (1e-3, 1e3), 1e-8), (1.0, (1e-6, 1e6), 0.0), (0.0, (0.5, 2.0), 1e-8), (2.0, (0.7, 0.7), 1e-3)]
    for gamma, clip, eps in options[1:] if interpreted else options:
        got = validity.teacher_likelihood_validity(teacher, student, top_k=17, gamma=gamma, clip=clip, eps=eps,
                                                   backend=backend)
        _check(got, teacher, student, top_k=17, gamma=gamma, clip=clip, eps=eps)
        # exp(log(clip)) round trip in float32: a few float32 ulps (1e-6 is ~8 ulp), not a tuned constant
        assert bool((got >= clip[0] * (1 - 1e-6)).all() and (got <= clip[1] * (1 + 1e-6)).all())
    assert not bool(((got - 0.7).abs() > 1e-6).any())  # clip (0.7, 0.7) pins every weight (to ~8 float32 ulp)


def test_top_k_beyond_row_support_and_full_vocab(backend, device, interpreted):
    # masked vocabulary: row r has only r + 1 finite teacher logits, fewer than top_k
    n, vocab = (3, 70) if interpreted else (6, 97)
    teacher, student = _logits(n, vocab, seed=11, device=device)
    for r in range(n):
        teacher[r, r + 1:] = -math.inf
    for top_k in (4, vocab) if interpreted else (4, 64, vocab):
        got = validity.teacher_likelihood_validity(teacher, student, top_k=top_k, clip=(1e-4, 1e4), backend=backend)
        _check(got, teacher, student, top_k=top_k, clip=(1e-4, 1e4))
    # the student's greedy token masked for the teacher: p_T(a_S) = 0 gives the low clip
    student[:, vocab - 1] = 100.0
    got = validity.teacher_likelihood_validity(teacher, student, top_k=3, backend=backend)
    torch.testing.assert_close(got.cpu(), torch.full((n,), 0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_3d(backend, device, interpreted, dtype):
    t = 1 if interpreted else 5
    teacher, student = _logits(2 * t, 301, dtype=dtype, seed=5, device=device)
    teacher, student = teacher.reshape(2, t, 301), student.reshape(2, t, 301)
    got = validity.teacher_likelihood_validity(teacher, student, top_k=9, clip=(1e-3, 1e3), backend=backend)
    assert got.shape == (2, t) and got.dtype == torch.float32
    _check(got, teacher, student, top_k=9, clip=(1e-3, 1e3))


@FAST
def test_mixed_dtypes_and_extreme_logits(backend, device, interpreted):
    teacher, student = _logits(2 if interpreted else 8, 97 if interpreted else 513, seed=9, device=device)
    teacher[0] *= 1e3  # extreme but finite: one-hot teacher
    teacher[1, 17] = 1e4
    got = validity.teacher_likelihood_validity(teacher, student.bfloat16(), top_k=33, clip=(1e-4, 1e4),
                                               backend=backend)
    _check(got, teacher, student.bfloat16(), top_k=33, clip=(1e-4, 1e4))


def test_no_gradient_and_empty():
    teacher, student = _logits(4, 50)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    w = validity.teacher_likelihood_validity(teacher, student, top_k=3)
    assert not w.requires_grad
    empty = validity.teacher_likelihood_validity(torch.empty(0, 50), torch.empty(0, 50), top_k=3)
    assert empty.shape == (0,)


def test_bad_inputs_name_the_argument(backend, device):
    teacher, student = _logits(4, 30, device=device)
    call = validity.teacher_likelihood_validity
    with pytest.raises(ValueError, match="student_logits"):
        call(teacher, student[:, :29], backend=backend)
    with pytest.raises(ValueError, match="top_k"):
        call(teacher, student, top_k=0, backend=backend)
    with pytest.raises(ValueError, match="top_k"):
        call(teacher, student, top_k=31, backend=backend)
    with pytest.raises(ValueError, match="gamma"):
        call(teacher, student, top_k=3, gamma=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="gamma"):
        call(teacher, student, top_k=3, gamma=-1.0, backend=backend)
    with pytest.raises(ValueError, match="clip"):
        call(teacher, student, top_k=3, clip=(2.0, 0.5), backend=backend)
    with pytest.raises(ValueError, match="clip"):
        call(teacher, student, top_k=3, clip=(0.0, 2.0), backend=backend)
    with pytest.raises(ValueError, match="eps"):
        call(teacher, student, top_k=3, eps=-1.0, backend=backend)
    with pytest.raises(TypeError, match="teacher_logits"):
        call(teacher.long(), student, top_k=3, backend=backend)
    bad = teacher.clone()
    bad[2, 7] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits"):
        call(bad, student, top_k=3, backend=backend)
    bad = student.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="student_logits"):
        call(teacher, bad, top_k=3, backend=backend)
    bad = teacher.clone()
    bad[3] = -math.inf
    with pytest.raises(ValueError, match="teacher_logits row 3"):
        call(bad, student, top_k=3, backend=backend)


def test_validity_ratio():
    r_s = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    r_t = torch.tensor([0.25, 0.5, 0.0], dtype=torch.float64)
    got = validity.validity_ratio(r_s, r_t)
    torch.testing.assert_close(got, r_s / (r_t + 1e-8))
    torch.testing.assert_close(validity.validity_ratio(r_s, r_t, eps=0.5), r_s / (r_t + 0.5))
    with pytest.raises(ValueError, match="r_teacher"):
        validity.validity_ratio(r_s, torch.tensor([float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="r_student"):
        validity.validity_ratio(torch.ones(2), torch.ones(3))
    with pytest.raises(TypeError, match="r_student"):
        validity.validity_ratio(torch.ones(3, dtype=torch.long), r_t)
