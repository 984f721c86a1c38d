"""DDP on 2 gloo ranks: hidden states from ``ddp_model.module.model(...)`` skip DDP's forward (no gradient
all-reduce, ranks drift): the fused loss refuses them with the recipe; the recipe
(distillkit.losses.final_hidden_states through the wrapper) keeps the ranks in sync and equal to one process."""
from __future__ import annotations

import os

import pytest
import torch
from _spawn import run, tiny_llama

pytestmark = pytest.mark.timeout(180)

VOCAB, BATCH, SEQ, STEPS = 80, 4, 6, 3


def _batch(step):
    g = torch.Generator().manual_seed(10 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[:, -1] = -100  # the same number of kept tokens on each rank
    return ids, labels


def _train(student, teacher, hidden_of, rows, steps=STEPS):
    import distillkit

    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    model = student.module if hasattr(student, "module") else student
    lm_head = model.lm_head
    for step in range(steps):
        ids, labels = _batch(step)
        ids, labels = ids[rows], labels[rows]
        with torch.no_grad():
            teacher_hidden = teacher.model(ids).last_hidden_state
        loss = distillkit.fused_linear_skew_kl(hidden_of(student, ids), lm_head.weight, teacher_hidden,
                                               teacher.lm_head.weight, labels, alpha=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _other_rank(params):
    """The other rank's copy of each tensor."""
    out = {}
    for name, t in params.items():
        both = [torch.empty_like(t) for _ in range(2)]
        torch.distributed.all_gather(both, t.contiguous())
        out[name] = both[1 - torch.distributed.get_rank()]
    return out


def _worker(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from distillkit._errors import InputError
    from distillkit.losses import final_hidden_states

    mine = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    teacher = tiny_llama(48, VOCAB, seed=1).requires_grad_(False)
    want = _train(tiny_llama(32, VOCAB, seed=0), teacher, final_hidden_states, slice(None))  # one process

    def bypass(model, ids):  # the pitfall: a submodule's forward, DDP's own never runs
        return model.module.model(ids).last_hidden_state

    with pytest.raises(InputError, match="DistributedDataParallel.*final_hidden_states"):
        _train(DDP(tiny_llama(32, VOCAB, seed=0)), teacher, bypass, mine, steps=1)

    # what the guard prevents: with it off, the same loop leaves the ranks apart
    os.environ["DISTILLKIT_CHECK_DDP"] = "0"
    try:
        drifted = _train(DDP(tiny_llama(32, VOCAB, seed=0)), teacher, bypass, mine)
    finally:
        del os.environ["DISTILLKIT_CHECK_DDP"]
    other = _other_rank(drifted)
    assert max((drifted[n] - other[n]).abs().max().item() for n in drifted) > 1e-4

    # the recipe: through the wrapper's forward; in sync, and one process's weights
    got = _train(DDP(tiny_llama(32, VOCAB, seed=0)), teacher, final_hidden_states, mine)
    other = _other_rank(got)
    for name in got:
        assert torch.equal(got[name], other[name]), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13, msg=name)


def test_ddp_bypassed_forward_is_refused_and_recipe_keeps_ranks_in_sync():
    run(_worker)
