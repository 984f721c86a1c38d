"""all_reduce_average_ with gloo on 2 CPU processes equals average_ of the two branches."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distillkit.merge import all_reduce_average_, average_


def _branch(rank: int) -> nn.Module:
    torch.manual_seed(100 + rank)
    m = nn.Sequential(nn.Linear(37, 64), nn.ReLU(), nn.Linear(64, 5), nn.LayerNorm(5))
    m[0].to(torch.bfloat16)  # mixed dtypes: bf16 is summed in float32
    return m


def _worker(rank, world, port, out_dir, weights, bucket_bytes):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = _branch(rank)
        all_reduce_average_(m, weight=None if weights is None else weights[rank], bucket_bytes=bucket_bytes)
        torch.save(m.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("weights,bucket_bytes", [(None, 64 * 2**20), ([1.0, 3.0], 1024)])
def test_gloo_two_processes_equal_average(tmp_path, weights, bucket_bytes):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), weights, bucket_bytes), nprocs=2, join=True)
    want = _branch(0)
    average_(want, [_branch(0), _branch(1)], weights, backend="reference")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for name, t in want.state_dict().items():
        assert torch.equal(r0[name], r1[name]), name  # every rank holds the same weights
        # derived, not tuned: bf16 half an ulp (one rounding of a float32 sum); float32 ~8 ulp (two-term sums)
        tol = 2**-8 if t.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(r0[name].float(), t.float(), rtol=tol, atol=tol, msg=name)


def test_needs_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        all_reduce_average_(nn.Linear(2, 2))
