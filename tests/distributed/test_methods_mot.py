"""MoT under torchrun with 2 gloo ranks and 3 teachers (world size != number of teachers): every branch trains in
turn data-parallel over both ranks (DDP or FSDP2), is exported, and rank 0 merges the saved branches (average, DARE);
the final model is one process's within the float32 budget (float64 truth). Rounds after the first start every rank
from the merge on disk."""
import os
import subprocess
import sys

import pytest
from _trainer_launch import HERE, free_port

from _tolerance import assert_eager_budget

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def mot_run(*args: str, nproc: int = 0) -> None:
    """tests/distributed/_mot_run.py, under torchrun with ``nproc`` ranks (0: one plain process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                                                 str(free_port())]
    proc = subprocess.run([*launch, os.path.join(HERE, "_mot_run.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from _mot_run import write_setup

    student, data = write_setup(str(tmp_path_factory.mktemp("mot")))
    return ["--student", student, "--data", *data]


def _final(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"), dtype=None).state_dict()


@pytest.mark.timeout(600)  # 2 plain runs and a torchrun launch of 2 ranks: ~25 s on a quiet 2-core CPU
@pytest.mark.parametrize("strategy,merge,rounds", [("ddp", "average", 2), ("fsdp", "dare", 1)])
def test_three_teachers_on_two_ranks_give_the_one_process_result(tmp_path, setup, strategy, merge, rounds):
    import torch

    args = [*setup, "--merge", merge, "--rounds", str(rounds)]
    # one process accumulating 2 micro-batches of 2 traces = 2 ranks x 1 micro-batch of 2 (the same global batches)
    mot_run(*args, "--out", str(tmp_path / "one"), "--grad-accum", "2")
    mot_run(*args, "--out", str(tmp_path / "one64"), "--grad-accum", "2", "--float64")
    out = str(tmp_path / strategy)
    mot_run(*args, "--out", out, "--strategy", strategy, nproc=2)
    eager, truth, got = _final(tmp_path / "one"), _final(tmp_path / "one64"), _final(out)
    assert truth[next(iter(truth))].dtype == torch.float64 and set(got) == set(truth)
    for r in range(rounds):
        for k in range(3):  # every branch trained over both ranks and exported
            assert os.path.exists(os.path.join(out, f"round{r}", f"branch{k}", "model", "config.json"))
            assert os.path.exists(os.path.join(out, f"round{r}", f"branch{k}", "checkpoint", ".metadata"))
    start = _final_start(setup[1])
    assert any(not torch.equal(got[k], start[k]) for k in got)  # it trained
    for k in truth:
        assert_eager_budget(got[k], eager[k], truth[k], what=f"{strategy} {merge} {k}")


def _final_start(student):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).state_dict()
