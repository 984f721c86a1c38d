"""SkewKLTrainer on 2 CPU ranks (gloo, 127.0.0.1): under torchrun (DDP, and the loss with an FSDP2-sharded
student whose lm_head is its own group and a sharded, padded teacher) and under ``accelerate launch`` with the
shipped FSDP2 config; every run gives one process's step / loss / gradients on the same global batch."""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(HERE, "_dist_run.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[:4]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _one_process(mode: str, out: str, **kw) -> dict:
    sys.path.insert(0, HERE)
    import _dist_run

    opts = argparse.Namespace(mode=mode, out=out, batch=2, accum=1, reverse=False, own_head=False)
    for k, v in kw.items():
        setattr(opts, k, v)
    (_dist_run.train if mode == "train" else _dist_run.fsdp2_loss)(opts)
    return torch.load(out)


def _assert_same_steps(got: dict, ref: dict) -> None:
    for name, step in ref["steps"].items():
        assert step.abs().max() > 0, name
        # float32, ranks' gradients all-reduced in another order than one process sums them (~1e-6 apart); the
        # failures caught (an unsynced or doubly scaled rank) are off by factors
        torch.testing.assert_close(got["steps"][name], step, rtol=1e-4, atol=1e-7, msg=f"SGD step of {name}")


@pytest.mark.slow
@pytest.mark.timeout(400)  # one torchrun launch of 2 ranks importing transformers: ~40 s on a loaded 2-core CPU
def test_torchrun_ddp_and_fsdp2_equal_one_process(tmp_path):
    out = tmp_path / "two"
    out.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), SCRIPT, "both", "--reverse", "--own-head", "--batch", "2",
          "--accum", "2", "--out", str(out)])
    # DDP: 2 ranks x batch 2 x accumulation 2 == 1 process x batch 4 x accumulation 2 (the same 8 examples)
    two = torch.load(out / "train.pt")
    assert two["world_size"] == 2 and two["distributed_type"].endswith("MULTI_CPU")
    _assert_same_steps(two, _one_process("train", str(tmp_path / "one.pt"), batch=4, accum=2, reverse=True))
    # FSDP2: lm_head in its own fully_shard group (a DTensor at the loss), sharded teacher with padding rows
    sharded = torch.load(out / "fsdp2.pt")
    ref = _one_process("fsdp2-loss", str(tmp_path / "one_fsdp2.pt"), reverse=True)
    assert sharded["world_size"] == 2 and ref["world_size"] == 1
    # float32 sums over two ranks vs one process: rounding-order differences only (~1e-7 relative)
    torch.testing.assert_close(sharded["loss"], ref["loss"], rtol=1e-5, atol=0)
    for name, g in ref["grads"].items():
        assert not hasattr(sharded["grads"][name], "full_tensor")
        torch.testing.assert_close(sharded["grads"][name], g, rtol=1e-4, atol=1e-7, msg=f"gradient of {name}")


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not installed")
def test_accelerate_launch_with_the_fsdp2_config_starts_two_ranks(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (--cpu takes the single-process launcher);
    the shipped config starts 2 torchrun ranks, which join over gloo with TrainingArguments(use_cpu=True)."""
    config = os.path.join(ROOT, "examples", "accelerate", "fsdp2.yaml")
    out = tmp_path / "acc.pt"
    _run(["accelerate", "launch", "--config_file", config, "--main_process_ip", "127.0.0.1", "--main_process_port",
          str(_free_port()), SCRIPT, "train", "--batch", "2", "--accum", "2", "--out", str(out)])
    two = torch.load(out)
    assert two["world_size"] == 2
    _assert_same_steps(two, _one_process("train", str(tmp_path / "one.pt"), batch=4, accum=2))


def test_lone_ranks_are_refused(tmp_path, monkeypatch):
    """A launcher that started 2 processes which accelerate did not join (each would train alone) is an error."""
    sys.path.insert(0, HERE)
    import _hf_fixtures as fx
    from transformers import TrainingArguments

    from distillkit._errors import InputError
    from distillkit.integrations.hf import SkewKLTrainer

    tok = fx.tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args._setup_devices  # noqa: B018 - the accelerate state is set up (one process) before the launcher's variable
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="WORLD_SIZE"):
        SkewKLTrainer(model=fx.llama(len(tok), 0), teacher_model=fx.llama(len(tok), 1), args=args,
                      processing_class=tok)
