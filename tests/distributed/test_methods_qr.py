"""QR-Distill under torchrun with 2 gloo ranks (strategy ddp over the container of students, router, projections
and competence scores, the loss through the container's own forward): each rank routes and trains on its slice of
every global batch, every gradient (the router's too) is all-reduced, and the saved students and router are one
process's, accumulating the same slices, bit for bit."""
import json
import os
import subprocess
import sys

import pytest
from _trainer_launch import HERE, free_port

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def qr_run(*args: str, nproc: int = 0) -> None:
    """tests/distributed/_qr_run.py, under torchrun with ``nproc`` ranks (0: one plain process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                                                 str(free_port())]
    proc = subprocess.run([*launch, os.path.join(HERE, "_qr_run.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.timeout(400)  # a plain run and a torchrun launch of 2 ranks: ~20 s on a quiet 2-core CPU
@pytest.mark.parametrize("routing", ["topk", "bernoulli"])
def test_ddp_gives_the_one_process_students_and_router(tmp_path, routing):
    """topk routes deterministically; bernoulli draws each path's noise from (seed, its position in the stream of
    paths), so the ranks' draws are one process's draws on the same global batches (not one stream per rank)."""
    import torch
    from _qr_run import write_setup
    from transformers import AutoModelForCausalLM

    root = str(tmp_path / "setup")
    os.makedirs(root)
    setup = write_setup(root)
    one, ddp = str(tmp_path / "one"), str(tmp_path / "ddp")
    # 1 process x 2 micro-batches of 2 = 2 ranks x 2
    qr_run("--root", root, "--out", one, "--grad-accum", "2", "--routing", routing)
    qr_run("--root", root, "--out", ddp, "--strategy", "ddp", "--routing", routing, nproc=2)
    for student in setup["students"]:
        name = os.path.basename(student)
        want = AutoModelForCausalLM.from_pretrained(os.path.join(one, "students", name), dtype=None).state_dict()
        got = AutoModelForCausalLM.from_pretrained(os.path.join(ddp, "students", name), dtype=None).state_dict()
        start = AutoModelForCausalLM.from_pretrained(student, dtype=None).state_dict()
        assert set(got) == set(want) and any(not torch.equal(want[k], start[k]) for k in want)  # it trained
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name} {k}"
    want = torch.load(os.path.join(one, "router.pt"), weights_only=False)["router"]
    got = torch.load(os.path.join(ddp, "router.pt"), weights_only=False)["router"]
    for k in want:  # a router trained apart on each rank would differ from one process's
        assert torch.equal(got[k], want[k]), f"router {k}"
    lines = [json.loads(x) for x in open(os.path.join(ddp, "metrics.jsonl"))]
    ref = [json.loads(x) for x in open(os.path.join(one, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2, 3]  # rank 0 alone writes
    assert [(x["loss"], x["grad_norm"]) for x in lines] == [(x["loss"], x["grad_norm"]) for x in ref]
    summary = json.load(open(os.path.join(ddp, "qr_summary.json")))
    assert summary["train"]["step"] == 3 and len(summary["students"]) == 2
