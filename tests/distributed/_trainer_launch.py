"""Starts tests/distributed/_trainer_run.py under torchrun with 2 gloo ranks on 127.0.0.1 and a free port, and
the check the tests share: a 2-rank run equals one process on the same global batches."""
import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), os.path.join(HERE, "_trainer_run.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def two_ranks_match(out: str, strategy: str, lora_r: int, truth: dict, eager: dict) -> None:
    """2 ranks x 2 micro-batches of 1 example per step (gradients reduced on the second only: DDP's no_sync, FSDP2's
    set_requires_gradient_sync), 3 steps: the exported weights err against ``truth`` (one process, float64, global
    batch 4) no more than ``eager`` (the same in float32) does, within tests/_tolerance.py's budget; the ranks'
    kept-token counts differ, and rank 0 alone logs the global count."""
    from transformers import AutoModelForCausalLM

    from _tolerance import assert_eager_budget

    torchrun("--out", out, "--strategy", strategy, "--batch-size", "1", "--grad-accum", "2", "--steps", "3",
             "--lora-r", str(lora_r))
    tokens = [json.load(open(os.path.join(out, f"tokens-rank{r}.json"))) for r in range(2)]
    assert len(tokens[0]) == 6 and tokens[0] != tokens[1]  # uneven kept-token counts across the ranks
    steps = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [s["step"] for s in steps] == [1, 2, 3]  # one writer
    per_step = [[sum(t[2 * i:2 * i + 2]) for i in range(3)] for t in tokens]
    assert [s["num_tokens"] for s in steps] == [a + b for a, b in zip(*per_step)]  # the global count
    got = AutoModelForCausalLM.from_pretrained(os.path.join(out, "export"), dtype=None).state_dict()
    assert set(got) == set(truth)
    for k in truth:
        assert_eager_budget(got[k], eager[k], truth[k], what=f"{strategy} lora_r={lora_r} {k}")
