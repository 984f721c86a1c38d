"""LoRA + FSDP2 under torchrun (2 gloo ranks): a run killed after a checkpoint resumes to the uninterrupted run's
weights bit for bit, and the exported model (adapters merged) loads with from_pretrained, generates, and holds one
process's weights within the float32 budget."""
import json
import os

import pytest
import torch
from _trainer_launch import torchrun
from _trainer_run import examples, model, run

from _tolerance import assert_eager_budget

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ("--strategy", "fsdp", "--lora-r", "4", "--batch-size", "2", "--steps", "4", "--save-every", "2")


@pytest.mark.slow
@pytest.mark.timeout(600)  # three torchrun launches of 2 ranks: ~25 s each on a loaded 2-core CPU
def test_lora_fsdp_resume_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from distillkit.world.tiny import build_tokenizer

    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    proc = torchrun("--out", killed, *ARGS, "--kill-at", "2", check=False)
    assert proc.returncode != 0 and not os.path.exists(os.path.join(killed, "export"))
    assert torch.load(os.path.join(killed, "checkpoint", "rank0.pt"), weights_only=False)["step"] == 2
    torchrun("--out", killed, *ARGS)  # resumes at step 2
    assert len(json.load(open(os.path.join(killed, "tokens-rank0.json")))) == 2  # it trained steps 3 and 4 only
    torchrun("--out", clean, *ARGS)
    a = AutoModelForCausalLM.from_pretrained(os.path.join(killed, "export"))
    b = AutoModelForCausalLM.from_pretrained(os.path.join(clean, "export"))
    sa, sb = a.state_dict(), b.state_dict()
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k  # bit-exact: DCP restores the sharded model, optimizer, schedule, RNG
    assert [json.loads(x)["step"] for x in open(os.path.join(killed, "metrics.jsonl"))] == [1, 2, 3, 4]
    assert len([f for f in os.listdir(os.path.join(clean, "export")) if f.endswith(".safetensors")]) > 1  # sharded

    # merged: plain module names; targeted weights moved, others (no adapter, frozen) kept
    tok = build_tokenizer()
    init = model(tok, torch.float32).state_dict()
    assert not any("lora" in k for k in sb) and set(sb) == set(init)
    assert not torch.equal(sb["model.layers.0.self_attn.q_proj.weight"], init["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(sb["model.layers.0.self_attn.k_proj.weight"], init["model.layers.0.self_attn.k_proj.weight"])
    # one process on the same global batches (in place merge) against float64
    truth = run(str(tmp_path / "one64"), dtype="float64", batch_size=4, steps=4, lora_r=4).state_dict()
    eager = run(str(tmp_path / "one32"), batch_size=4, steps=4, lora_r=4).state_dict()
    for k in truth:
        assert_eager_budget(sb[k], eager[k], truth[k], what=k)

    ids = torch.tensor([tok(examples()[0].prompt)["input_ids"]])
    out = b.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 4
    assert torch.equal(out[0, :ids.shape[1]], ids[0]) and int(out.max()) < len(tok)
