"""QR-Distill's routing noise is a function of (seed, the path's position in the run's stream of paths): a path
draws the same noise whatever the rows it is batched with, the rank it lands on and the global RNG."""
from types import SimpleNamespace

import pytest
import torch

from distillkit.methods.qr_distill.router import path_uniforms, route
from distillkit.methods.qr_distill.training import PathItem, QRCollator, stream_positions
from distillkit.pipeline.data import Example

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("routing", ["bernoulli", "gumbel_top1", "random"])
def test_a_paths_noise_does_not_depend_on_the_batch_split(routing):
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    keys = torch.arange(40, 48)
    learned = routing != "random"

    def go(rows):
        torch.manual_seed(int(rows[0]) + 100)  # the global RNG differs per call: it must not matter
        return route(logits[rows] if learned else None, len(rows), 3, routing=routing,
                     noise_keys=keys[rows], noise_seed=7).hard

    whole = go(torch.arange(8))
    split = torch.cat([go(torch.arange(0, 4)), go(torch.arange(4, 8))])
    assert torch.equal(whole, split)
    reordered = go(torch.tensor([5, 1, 7, 3, 0, 2, 6, 4]))
    assert torch.equal(reordered, whole[[5, 1, 7, 3, 0, 2, 6, 4]])
    other = route(logits if learned else None, 8, 3, routing=routing, noise_keys=keys, noise_seed=8).hard
    assert not torch.equal(other, whole)  # another seed draws other noise


def test_path_uniforms_per_key_and_seed():
    u = path_uniforms(torch.tensor([3, 4, 3]), 11, 5)
    assert u.shape == (3, 5) and u.dtype == torch.float32 and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert not torch.equal(path_uniforms(torch.tensor([3]), 12, 5)[0], u[0])
    state = torch.get_rng_state()
    path_uniforms(torch.arange(4), 0, 2)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone


def test_stream_positions_are_one_process_positions_on_every_rank():
    """2 ranks x batch 2 (rank r, step s) cover the positions 1 process x batch 2 x grad_accum 2 covers at step s."""
    def trainer(rank, world, accum):
        return SimpleNamespace(cfg=SimpleNamespace(batch_size=2, grad_accum=accum),
                               dist=SimpleNamespace(rank=rank, world_size=world))

    for step in range(3):
        one = [list(stream_positions(trainer(0, 1, 2), step, m)) for m in range(2)]
        ddp = [list(stream_positions(trainer(r, 2, 1), step, 0)) for r in range(2)]
        assert one == ddp == [[4 * step, 4 * step + 1], [4 * step + 2, 4 * step + 3]]


def test_the_collator_hands_the_positions_to_the_loss():
    from distillkit.world.tiny import build_tokenizer

    tok = build_tokenizer()
    items = [PathItem(Example(f"p{i}", "1 + 1", " 2", "2", True), "forward", i, position=10 + i) for i in range(3)]
    batch = QRCollator([tok, tok], 32)(items)
    assert batch["route_keys"].tolist() == [10, 11, 12]
    bare = [PathItem(it.example, it.style, it.index) for it in items]
    assert "route_keys" not in QRCollator([tok, tok], 32)(bare)
