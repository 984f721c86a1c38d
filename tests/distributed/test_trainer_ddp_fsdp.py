"""The trainer under torchrun with 2 gloo ranks (DDP and FSDP2) gives one process's weights on the same global
batches, with ranks holding different numbers of kept tokens: the loss is normalised over the global count."""

import pytest
from _trainer_launch import two_ranks_match
from _trainer_run import run

from _tolerance import assert_eager_budget, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """float64 truth and plain float32, one process, global batch 4 = 2 ranks x 2 (3 steps)."""
    root = tmp_path_factory.mktemp("one")
    return {(dtype, 0): run(str(root / dtype), dtype=dtype, batch_size=4).state_dict()
            for dtype in ("float64", "float32")}


def test_token_normalisation_matters(tmp_path, one_process):
    """The check below can tell: weighing each rank's mean loss the same (what a per-rank average does) misses
    the float32 budget, while accumulating the same two slices in one process with the global count meets it."""
    truth, eager = one_process["float64", 0], one_process["float32", 0]
    averaged = run(str(tmp_path / "avg"), batch_size=2, grad_accum=2, token_weighted=False).state_dict()
    accumulated = run(str(tmp_path / "acc"), batch_size=2, grad_accum=2).state_dict()
    worst = max(relative_error(averaged[k], truth[k]) / max(relative_error(eager[k], truth[k]), 1e-7) for k in truth)
    assert worst > 100, worst  # far outside 2x plain float32's error
    for k in truth:
        assert_eager_budget(accumulated[k], eager[k], truth[k], what=k)


@pytest.mark.slow
@pytest.mark.timeout(400)  # a torchrun launch of 2 ranks importing transformers: ~30 s on a loaded 2-core CPU
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, one_process, strategy):
    two_ranks_match(str(tmp_path / strategy), strategy, 0, one_process["float64", 0], one_process["float32", 0])
