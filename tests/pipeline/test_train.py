"""The shared trainer: learning, schedule, accumulation, and resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from _tolerance import assert_eager_budget
from distillkit.pipeline.data import Example, SFTCollator, sft_loss
from distillkit.pipeline.train import TrainConfig, Trainer, cosine_with_warmup
from distillkit.world.tiny import build_tokenizer, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, a shared 2-core CPU


def _examples(n=32):
    return [Example(str(i), f"{i % 7} + {i % 5} =", f" {i % 7 + i % 5}</think> The final answer is {i % 7 + i % 5}.",
                    str(i % 7 + i % 5)) for i in range(n)]


def _model(tok, seed=0):
    return tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=seed,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def test_cosine_schedule():
    f = lambda s: cosine_with_warmup(s, warmup=4, total=20, min_ratio=0.1)  # noqa: E731
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # closed-form values of 0.1 + 0.9 * 0.5 * (1 + cos(pi * t)) at t = 0, 1, 1/2: a few float64 roundings (approx: 1e-6)
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1) and f(12) == pytest.approx(0.55)


def test_trainer_learns_and_writes_metrics(tmp_path):
    tok = build_tokenizer()
    model = _model(tok)
    exs = _examples()
    collate = SFTCollator(tok)
    with torch.no_grad():
        before = float(sft_loss(model, collate(exs[:16]))[0])
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=30, batch_size=8, lr=3e-3, log_every=5,
                      progress=False)
    out = Trainer(model, cfg, exs, collate, sft_loss).train()
    with torch.no_grad():
        after = float(sft_loss(model.eval(), collate(exs[:16]))[0])
    assert out["step"] == 30 and after < 0.7 * before
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [5, 10, 15, 20, 25, 30]
    assert {"loss", "lr", "grad_norm"} <= set(lines[0])


def test_grad_accumulation_matches_big_batch(tmp_path):
    tok = build_tokenizer()
    exs = [Example(str(i), "1 + 1 =", " 2.", "2") for i in range(16)]  # equal lengths: mean of means = mean
    states = []
    for bs, acc, dtype in ((8, 1, torch.float64), (8, 1, torch.float32), (4, 2, torch.float32)):
        model = _model(tok).to(dtype)
        cfg = TrainConfig(output_dir=str(tmp_path / f"b{bs}-{dtype}"), max_steps=3, batch_size=bs, grad_accum=acc,
                          lr=1e-3, progress=False)
        Trainer(model, cfg, exs, SFTCollator(tok), sft_loss).train()
        states.append(model.state_dict())
    truth, big_batch, accumulated = states
    for k in truth:  # accumulation errs no more than plain float32 big-batch training does, against float64
        assert_eager_budget(accumulated[k], big_batch[k], truth[k], what=k)


def test_bad_config():
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(output_dir="x", max_steps=0)
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig(output_dir="x", bf16="maybe")
    tok = build_tokenizer()
    with pytest.raises(ValueError, match="examples is empty"):
        Trainer(_model(tok), TrainConfig(output_dir="x"), [], SFTCollator(tok), sft_loss)


# kill_at: the child SIGKILLs itself from the trainer's on_step callback right after that step (no race
# with a timer: the kill lands at a known step whatever the machine's load)
_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)  # as the tests' one_thread fixture: tiny models, no OpenMP spin-waits on a shared CPU
    sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]  # test_train, and tests/_tolerance it imports
    from test_train import _examples, _model
    from distillkit.pipeline.data import SFTCollator, sft_loss
    from distillkit.pipeline.train import TrainConfig, Trainer
    from distillkit.world.tiny import build_tokenizer
    tok = build_tokenizer()
    model = _model(tok)
    cfg = TrainConfig(output_dir={out!r}, max_steps=30, batch_size=4, lr=1e-3, save_every=5, log_every=5,
                      progress=False)

    def on_step(step, metrics):
        if step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer(model, cfg, _examples(), SFTCollator(tok), sft_loss, on_step=on_step).train()
    torch.save(model.state_dict(), {out!r} + "/final.pt")
""")


@pytest.mark.slow
# three child processes, each importing torch and transformers and training 15-30 steps: ~30 s on an idle 2-core
# CPU, 290 s measured on the shared one under load
@pytest.mark.timeout(600)
def test_resume_after_kill_equals_uninterrupted(tmp_path):
    """A run SIGKILLed right after step 15's checkpoint (save_every=5) and started again reaches bit for bit
    the weights of an uninterrupted run, with no metrics line lost or duplicated."""
    tests = os.path.dirname(__file__)
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests, out=killed, kill_at=15)])
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, "final.pt"))
    assert torch.load(os.path.join(killed, "trainer_state.pt"), weights_only=False)["step"] == 15
    for out in (killed, clean):  # resume the killed run; run the clean one from scratch (no kill: step 0 never comes)
        subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests, out=out, kill_at=0)], check=True)
    a = torch.load(os.path.join(killed, "final.pt"))
    b = torch.load(os.path.join(clean, "final.pt"))
    for k in b:
        assert torch.equal(a[k], b[k]), k  # bit-exact: resume restores the whole state, nothing approximated
    steps = [json.loads(x)["step"] for x in open(os.path.join(killed, "metrics.jsonl"))]
    assert steps == list(range(5, 31, 5))  # no step lost or duplicated in the metrics


def test_param_groups_keep_their_own_rate(tmp_path):
    tok = build_tokenizer()
    model = _model(tok)
    head = list(model.lm_head.parameters())
    head_ids = {id(p) for p in head}
    frozen_before = [p.detach().clone() for p in head]
    body = [p for p in model.parameters() if id(p) not in head_ids]
    body_before = [p.detach().clone() for p in body]
    groups = [{"params": body}, {"params": head, "lr": 0.0}]
    cfg = TrainConfig(output_dir=str(tmp_path / "g"), max_steps=3, batch_size=4, lr=1e-3, progress=False)
    Trainer(model, cfg, _examples(8), SFTCollator(tok), sft_loss, params=groups).train()
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, head))
    assert any(not torch.equal(a, b) for a, b in zip(body_before, body))
    with pytest.raises(ValueError, match="nothing to optimise"):
        Trainer(model, cfg, _examples(8), SFTCollator(tok), sft_loss, params=[])


def test_resume_keeps_metrics_after_a_bad_line(tmp_path):
    """Resuming at step 4 drops only the metric records after step 4: a line that does not parse in the middle
    of metrics.jsonl stays, and every complete record up to step 4 after it stays too (it used to cut the file
    at the first bad line); a torn last line is kept aside in metrics.jsonl.torn, not lost."""
    tok = build_tokenizer()
    out = tmp_path / "run"
    out.mkdir()
    lines = ['{"step": 1, "loss": 3.0}', '{"step": 2, "loss": 2.', '{"step": 3, "loss": 2.5}',
             '{"step": 4, "loss": 2.0}', '{"step": 5, "loss": 1.5}', '{"step": 6, "lo']
    (out / "metrics.jsonl").write_text("\n".join(lines))
    trainer = Trainer(_model(tok), TrainConfig(output_dir=str(out), progress=False), _examples(), SFTCollator(tok),
                      sft_loss)
    trainer._truncate_metrics(4)
    assert (out / "metrics.jsonl").read_text().splitlines() == lines[:4]
    assert (out / "metrics.jsonl.torn").read_text() == lines[5] + "\n"


def test_train_options_checked():
    from distillkit._errors import InputError

    for bad, match in (({"strategy": "deepspeed"}, "strategy"), ({"report_to": "mlflow"}, "report_to"),
                       ({"adam_betas": (0.9,)}, "adam_betas"), ({"adam_betas": (0.9, 1.0)}, "adam_betas"),
                       ({"lora_r": -1}, "lora_r"), ({"lora_dropout": 1.0}, "lora_dropout"),
                       ({"lora_alpha": 0}, "lora_alpha"), ({"weight_decay": -0.1}, "weight_decay"),
                       ({"lora_r": 8, "lora_target_modules": []}, "lora_target_modules")):
        with pytest.raises(InputError, match=match):
            TrainConfig(output_dir="x", **bad)
    assert TrainConfig(output_dir="x", adam_betas=[0.9, 0.95]).adam_betas == (0.9, 0.95)


def test_betas_weight_decay_reach_adamw(tmp_path):
    """MoT's paper values (0.9, 0.95) and 0.1 are what AdamW runs with."""
    tok = build_tokenizer()
    cfg = TrainConfig(output_dir=str(tmp_path), adam_betas=(0.9, 0.95), weight_decay=0.1, progress=False)
    trainer = Trainer(_model(tok), cfg, _examples(4), SFTCollator(tok), sft_loss)
    assert all(g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.1 for g in trainer.optimizer.param_groups)


def test_strategy_needs_torchrun(tmp_path, monkeypatch):
    from distillkit._errors import InputError

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    tok = build_tokenizer()
    with pytest.raises(InputError, match="torchrun"):
        Trainer(_model(tok), TrainConfig(output_dir=str(tmp_path), strategy="fsdp"), _examples(4), SFTCollator(tok),
                sft_loss)


def test_gradient_checkpointing_recomputes_and_matches(tmp_path):
    """With gradient_checkpointing each decoder layer's inside runs twice per micro-batch (forward, then again in
    the backward) and training reaches the weights of a plain run within the float32 budget."""
    tok = build_tokenizer()
    states, calls = {}, {}
    for name, dtype, ckpt in (("truth", torch.float64, False), ("plain", torch.float32, False),
                              ("ckpt", torch.float32, True)):
        model = _model(tok).to(dtype)
        n, act = [0], model.model.layers[0].mlp.act_fn
        # counted in forward itself: torch runs no module hooks during a checkpoint's recompute

        def counted(x, n=n, forward=act.forward):
            n[0] += 1
            return forward(x)

        act.forward = counted
        cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=2, batch_size=4, lr=1e-3, progress=False,
                          gradient_checkpointing=ckpt)
        Trainer(model, cfg, _examples(8), SFTCollator(tok), sft_loss).train()
        states[name], calls[name] = model.state_dict(), n[0]
    assert calls["plain"] == 2 and calls["ckpt"] == 4
    for k in states["truth"]:
        assert_eager_budget(states["ckpt"][k], states["plain"][k], states["truth"][k], what=k)


def test_lora_merged_in_place_and_exported(tmp_path):
    """lora_r > 0: peft adapters on the target modules are trained, then merged into the caller's model (plain
    module names again); export writes it loadable by from_pretrained."""
    from transformers import AutoModelForCausalLM

    from distillkit._errors import InputError

    tok = build_tokenizer()
    model = _model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(output_dir=str(tmp_path / "lora"), max_steps=3, batch_size=4, lr=1e-2, progress=False,
                      lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    trainer = Trainer(model, cfg, _examples(8), SFTCollator(tok), sft_loss)
    trainer.train()
    after = model.state_dict()
    assert set(after) == set(before)  # merged: no lora_A / lora_B / base_layer left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
    trainer.export(str(tmp_path / "export"), tok)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).state_dict()
    assert all(torch.equal(loaded[k], after[k]) for k in after)
    with pytest.raises(InputError, match="params"):
        Trainer(_model(tok), cfg, _examples(8), SFTCollator(tok), sft_loss, params=list(model.parameters()))


def test_report_to(tmp_path, monkeypatch):
    """tensorboard: event files under output_dir/tensorboard; wandb missing: an ImportError naming it."""
    tok = build_tokenizer()
    cfg = TrainConfig(output_dir=str(tmp_path / "tb"), max_steps=2, batch_size=4, log_every=1, progress=False,
                      report_to="tensorboard")
    Trainer(_model(tok), cfg, _examples(8), SFTCollator(tok), sft_loss).train()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb" / "tensorboard"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        Trainer(_model(tok), TrainConfig(output_dir=str(tmp_path / "w"), report_to="wandb"), _examples(8),
                SFTCollator(tok), sft_loss)


def test_uneven_micro_batches_weigh_by_tokens(tmp_path):
    """grad_accum over micro-batches of different kept-token counts gives the big batch's gradient (the mean over
    every kept token), not the mean of the micro-batches' means."""
    tok = build_tokenizer()
    exs = [Example(str(i), "1 + 1 =", " 2" * (1 + 3 * (i % 2)) + ".", "2") for i in range(8)]
    states = []
    for bs, acc, dtype in ((4, 1, torch.float64), (4, 1, torch.float32), (2, 2, torch.float32)):
        model = _model(tok).to(dtype)
        cfg = TrainConfig(output_dir=str(tmp_path / f"b{bs}-{dtype}"), max_steps=2, batch_size=bs, grad_accum=acc,
                          lr=1e-3, seed=3, progress=False)
        Trainer(model, cfg, exs, SFTCollator(tok), sft_loss).train()
        states.append(model.state_dict())
    truth, big_batch, accumulated = states
    for k in truth:
        assert_eager_budget(accumulated[k], big_batch[k], truth[k], what=k)
