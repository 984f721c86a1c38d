"""VCRD under torchrun with 2 gloo ranks on the world models: each rank draws the online rollouts of its own shard
of prompts (seeded by its slice of the global batch), the loss is averaged over all slices, and the run gives one
process's weights on the same global batches; a LoRA + FSDP2 run killed after a checkpoint resumes to the
uninterrupted run's weights bit for bit."""
import json
import os
import subprocess
import sys

import pytest
import torch
from _trainer_launch import HERE, free_port

from _tolerance import assert_eager_budget

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}


def vcrd_run(*args: str, nproc: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """tests/distributed/_vcrd_run.py, under torchrun with ``nproc`` ranks (0: one plain process)."""
    script = os.path.join(HERE, "_vcrd_run.py")
    launch = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                                                 str(free_port())]
    proc = subprocess.run([*launch, script, *args], env=_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from _vcrd_run import write_prompts

    return write_prompts(str(tmp_path_factory.mktemp("vcrd") / "prompts.jsonl"))


def _final(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"), dtype=None).state_dict()


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(x) for x in f]


@pytest.mark.timeout(600)  # 2 plain runs and 2 torchrun launches of 2 ranks: ~70 s on a quiet 2-core CPU
def test_ddp_and_fsdp_give_the_one_process_result(tmp_path, prompts):
    # one process accumulating 2 micro-batches of 2 prompts = 2 ranks x 1 micro-batch of 2 (the same slices, seeds)
    one, one64 = str(tmp_path / "one"), str(tmp_path / "one64")
    vcrd_run("--prompts", prompts, "--out", one, "--grad-accum", "2")
    vcrd_run("--prompts", prompts, "--out", one64, "--grad-accum", "2", "--float64")
    eager, truth = _final(one), _final(one64)
    assert eager[next(iter(eager))].dtype == torch.float32 and truth[next(iter(truth))].dtype == torch.float64
    start = _final_start()
    assert any(not torch.equal(eager[k], start[k]) for k in eager)  # it trained
    for strategy in ("ddp", "fsdp"):
        out = str(tmp_path / strategy)
        vcrd_run("--prompts", prompts, "--out", out, "--strategy", strategy, nproc=2)
        got = _final(out)
        assert set(got) == set(truth)
        lines, ref = _metrics(out), _metrics(one)
        assert [x["step"] for x in lines] == [1, 2, 3]  # rank 0 alone writes
        for a, b in zip(lines, ref):  # the same rollouts: the same token counts and losses
            assert a["tokens_teacher_prefix"] == b["tokens_teacher_prefix"]
            assert a["tokens_student_prefix"] == b["tokens_student_prefix"]
        if strategy == "ddp":  # the same slices, gradients averaged over 2 ranks (exact halves): bit-exact
            for k in got:
                assert torch.equal(got[k], eager[k]), k
            assert [x["loss"] for x in lines] == [x["loss"] for x in ref]
        else:  # FSDP2's sharded gradient norm sums in another order
            for k in truth:
                assert_eager_budget(got[k], eager[k], truth[k], what=f"{strategy} {k}")


def _final_start():
    from transformers import AutoModelForCausalLM

    from distillkit.world.models import asset_path

    return AutoModelForCausalLM.from_pretrained(asset_path("student-base"), dtype=torch.float32).state_dict()


@pytest.mark.timeout(600)  # three torchrun launches of 2 ranks: ~60 s on a quiet 2-core CPU
def test_lora_fsdp_run_resumes_exactly_after_a_kill(tmp_path, prompts):
    pytest.importorskip("peft")
    args = ("--prompts", prompts, "--strategy", "fsdp", "--lora-r", "4", "--steps", "3", "--save-every", "2")
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    proc = vcrd_run("--out", killed, *args, "--kill-at", "2", nproc=2, check=False)
    assert proc.returncode != 0 and not os.path.exists(os.path.join(killed, "final"))
    assert torch.load(os.path.join(killed, "checkpoint", "rank0.pt"), weights_only=False)["step"] == 2
    vcrd_run("--out", killed, *args, nproc=2)  # resumes at step 2
    vcrd_run("--out", clean, *args, nproc=2)
    a, b = _final(killed), _final(clean)
    start = _final_start()
    assert set(a) == set(start)  # a plain checkpoint: the adapters merged
    assert any(not torch.equal(b[k], start[k]) for k in b)
    for k in b:
        assert torch.equal(a[k], b[k]), k  # bit-exact: sharded model, optimizer, schedule, RNG and the rollout seeds
    assert [x["step"] for x in _metrics(killed)] == [1, 2, 3]
    assert [x["loss"] for x in _metrics(killed)] == [x["loss"] for x in _metrics(clean)]
