"""The trainer under torchrun with 2 gloo ranks (DDP and FSDP2) gives one process's weights on the same global
batches, with ranks holding different numbers of kept tokens: the loss is normalised over the global count."""
import json
import os

import pytest
from _trainer_launch import torchrun
from _trainer_run import run

from _tolerance import assert_eager_budget, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _exported(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.join(out, "export"), dtype=None).state_dict()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """float64 truth and plain float32, one process, global batch 4 = 2 ranks x 2 (3 steps)."""
    root = tmp_path_factory.mktemp("one")
    return {dtype: run(str(root / dtype), dtype=dtype, batch_size=4).state_dict() for dtype in ("float64", "float32")}


def test_token_normalisation_matters(tmp_path, one_process):
    """The check below can tell: weighing each rank's mean loss the same (what a per-rank average does) misses
    the float32 budget, while accumulating the same two slices in one process with the global count meets it."""
    truth, eager = one_process["float64"], one_process["float32"]
    averaged = run(str(tmp_path / "avg"), batch_size=2, grad_accum=2, token_weighted=False).state_dict()
    accumulated = run(str(tmp_path / "acc"), batch_size=2, grad_accum=2).state_dict()
    worst = max(relative_error(averaged[k], truth[k]) / max(relative_error(eager[k], truth[k]), 1e-7) for k in truth)
    assert worst > 100, worst  # far outside 2x plain float32's error
    for k in truth:
        assert_eager_budget(accumulated[k], eager[k], truth[k], what=k)


@pytest.mark.slow
@pytest.mark.timeout(400)  # a torchrun launch of 2 ranks importing transformers: ~30 s on a loaded 2-core CPU
# both with 2 micro-batches of 1 example per rank and step (gradients reduced on the second only: DDP's no_sync,
# FSDP2's set_requires_gradient_sync): the global batch of 4 is the one process's
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, one_process, strategy):
    out = str(tmp_path / strategy)
    torchrun("--out", out, "--strategy", strategy, "--batch-size", "1", "--grad-accum", "2", "--steps", "3")
    tokens = [json.load(open(os.path.join(out, f"tokens-rank{r}.json"))) for r in range(2)]
    assert len(tokens[0]) == 6 and tokens[0] != tokens[1]  # uneven kept-token counts across the ranks
    steps = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [s["step"] for s in steps] == [1, 2, 3]  # rank 0 alone writes metrics
    assert [s["num_tokens"] for s in steps] == [a + b for a, b in zip(
        [sum(tokens[0][2 * i:2 * i + 2]) for i in range(3)], [sum(tokens[1][2 * i:2 * i + 2]) for i in range(3)])]
    got, truth, eager = _exported(out), one_process["float64"], one_process["float32"]
    assert set(got) == set(truth)
    for k in truth:
        assert_eager_budget(got[k], eager[k], truth[k], what=f"{strategy} {k}")
