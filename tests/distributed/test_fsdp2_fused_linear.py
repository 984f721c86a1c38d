"""FSDP2 on 2 gloo ranks: the fused-linear loss with lm_head in its own fully_shard group (a sharded DTensor
when the loss reads it) and a fully_shard'ed teacher gives one process's loss, gradients and optimizer step,
with no glue in the caller. float64 models, so every difference left is summation order."""
from __future__ import annotations

import pytest
import torch
from _spawn import run, tiny_llama

pytestmark = pytest.mark.timeout(180)

VOCAB, BATCH, SEQ = 96, 4, 7
# (loss, alpha, keywords): the plain losses, and a padded vocabulary with logit transforms
CASES = [("skl", 0.1, {}), ("srkl", 0.3, {}),
         ("skl", 0.2, dict(vocab_size=VOCAB - 6, student_softcap=3.0, teacher_logit_scale=0.5))]


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[:, 0] = -100  # the same number of kept tokens on each rank: mean of rank means = global mean
    return ids, labels


def _loss(kind, student, teacher, ids, labels, alpha, kw):
    import distillkit

    # the root's own forward (so FSDP2's hooks run), final hidden states, logits of one position only
    hidden = student(ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    with torch.no_grad():
        teacher_hidden = teacher(ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    fn = distillkit.fused_linear_skew_reverse_kl if kind == "srkl" else distillkit.fused_linear_skew_kl
    return fn(hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels, alpha=alpha,
              temperature=1.5, chunk_size=5, **kw)


def _shard(model, **kw):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model.lm_head, **kw)  # its own group: a sharded DTensor outside its own forward
    fully_shard(model, **kw)


def _worker(rank):
    for kind, alpha, kw in CASES:
        _case(rank, kind, alpha, kw)
    _mixed_precision(rank)
    _logits_level_and_scoring(rank)


def _mixed_precision(rank):
    """MixedPrecisionPolicy(param_dtype=float32) over float64 parameters: the sharded lm_heads (float64
    DTensors) meet float32 hidden states and are cast shard by shard, as FSDP2 casts for its own forward. Loss
    and gradients against one float64 process, within twice one float32 process's error (+ 4 float32 ulp)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from _tolerance import assert_eager_budget

    ids, labels = _batch()
    mine = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    runs = {}
    for dtype in (torch.float64, torch.float32):  # the truth, and plain PyTorch's float32 error
        student, teacher = tiny_llama(32, VOCAB, seed=0, dtype=dtype), tiny_llama(48, VOCAB, seed=1, dtype=dtype)
        loss = _loss("skl", student, teacher, ids, labels, 0.1, {})
        loss.backward()
        runs[dtype] = loss.detach(), {n: p.grad for n, p in student.named_parameters()}
    student, teacher = tiny_llama(32, VOCAB, seed=0), tiny_llama(48, VOCAB, seed=1)
    policy = MixedPrecisionPolicy(param_dtype=torch.float32)
    _shard(student, mp_policy=policy)
    _shard(teacher, mp_policy=policy)
    loss = _loss("skl", student, teacher, ids[mine], labels[mine], 0.1, {})
    assert loss.dtype == torch.float32 and student.lm_head.weight.dtype == torch.float64
    mean = loss.detach().clone()
    torch.distributed.all_reduce(mean)
    assert_eager_budget(mean / 2, runs[torch.float32][0], runs[torch.float64][0], what="loss")
    loss.backward()
    for name, p in student.named_parameters():
        assert p.grad.dtype == torch.float64 and p.grad.placements == p.placements, name
        assert_eager_budget(p.grad.full_tensor(), runs[torch.float32][1][name], runs[torch.float64][1][name],
                            out_dtype=torch.float32, scale="tensor", what=name)


def _case(rank, kind, alpha, kw):
    from torch.distributed.tensor import DTensor

    ids, labels = _batch()
    mine = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    # one process: the whole batch, plain modules
    student, teacher = tiny_llama(32, VOCAB, seed=0), tiny_llama(48, VOCAB, seed=1)
    want_loss = _loss(kind, student, teacher, ids, labels, alpha, kw)
    want_rank_loss = _loss(kind, student, teacher, ids[mine], labels[mine], alpha, kw).detach()
    want_loss.backward()
    want_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    torch.optim.SGD(student.parameters(), lr=0.5).step()
    want_after = {n: p.detach().clone() for n, p in student.named_parameters()}

    # two ranks, each on its half of the batch, student and teacher fully_shard'ed, lm_heads in their own groups
    student, teacher = tiny_llama(32, VOCAB, seed=0), tiny_llama(48, VOCAB, seed=1)
    _shard(student)
    _shard(teacher)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    loss = _loss(kind, student, teacher, ids[mine], labels[mine], alpha, kw)
    assert isinstance(student.lm_head.weight, DTensor) and isinstance(teacher.lm_head.weight, DTensor)
    assert not isinstance(loss, DTensor)
    torch.testing.assert_close(loss.detach(), want_rank_loss, rtol=1e-12, atol=1e-14)
    mean = loss.detach().clone()
    torch.distributed.all_reduce(mean)
    torch.testing.assert_close(mean / 2, want_loss.detach(), rtol=1e-12, atol=1e-14)
    loss.backward()
    for name, p in student.named_parameters():
        assert isinstance(p.grad, DTensor), name
        assert p.grad.placements == p.placements and p.grad.device_mesh == p.device_mesh, name
        torch.testing.assert_close(p.grad.full_tensor(), want_grads[name], rtol=1e-10, atol=1e-13, msg=name)
    opt.step()
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.detach().full_tensor(), want_after[name], rtol=1e-10, atol=1e-13, msg=name)


def _logits_level_and_scoring(rank):
    """DTensor logits (a vocabulary-sharded lm_head's output) and a sharded lm_head in the scoring op: the
    plain tensors' results, the logits' gradient handed back with their placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    import distillkit

    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(5)
    z_s, z_t = torch.randn(6, VOCAB, generator=g, dtype=torch.float64), torch.randn(6, VOCAB, generator=g,
                                                                                    dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (6,), generator=g)
    plain = z_s.clone().requires_grad_(True)
    want = distillkit.skew_reverse_kl(plain, z_t, labels, alpha=0.2, vocab_size=VOCAB - 3)
    want.backward()
    sharded = distribute_tensor(z_s, mesh, [Shard(1)]).requires_grad_(True)
    got = distillkit.skew_reverse_kl(sharded, distribute_tensor(z_t, mesh, [Shard(1)]), labels, alpha=0.2,
                                     vocab_size=VOCAB - 3)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert isinstance(sharded.grad, DTensor) and sharded.grad.placements == (Shard(1),)
    torch.testing.assert_close(sharded.grad.full_tensor(), plain.grad, rtol=1e-13, atol=1e-16)

    hidden, weight = torch.randn(5, 16, generator=g), torch.randn(VOCAB, 16, generator=g)
    ids = torch.randint(0, VOCAB, (5,), generator=g)
    for kw in ({}, dict(softcap=2.0)):
        want = distillkit.answer_logprobs(hidden, weight, ids, **kw)
        got = distillkit.answer_logprobs(hidden, distribute_tensor(weight, mesh, [Shard(0)]), ids, **kw)
        assert not isinstance(got, DTensor)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fsdp2_lm_head_own_group_sharded_teacher_equals_one_process():
    """Skew KL, skew reverse KL, and a padded vocabulary with logit transforms; FSDP2's mixed precision (a
    float64 sharded lm_head, float32 hidden states); DTensor logits and a sharded lm_head in the scoring op:
    one spawn (the ranks' start-up dominates the time)."""
    run(_worker)
