"""distillkit.integrations.trl: TRL's trainers with the fused skew KL / SRKL. The loss on a fixed batch equals the
eager skew KL of the models' logits; GKD's lmbda (student-generated) and seq_kd (teacher-generated) paths and
DistillationTrainer's on-policy generation run a few steps with a finite loss."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")

import _hf_fixtures as fx  # noqa: E402

from _tolerance import assert_eager_budget  # noqa: E402

CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


def _tok():
    tok = fx.tokenizer()
    tok.chat_template = CHAT
    return tok


def _chats(n=4):
    return [{"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                          {"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(n)]


def _check(got, student, teacher, inputs, *, reverse, alpha=0.1, temperature=1.0):
    kw = dict(alpha=alpha, reverse=reverse, temperature=temperature)
    eager = fx.eager_loss(student, teacher, inputs, **kw)
    truth = fx.eager_loss(copy.deepcopy(student), copy.deepcopy(teacher), inputs, dtype=torch.float64, **kw)
    scale = fx.cancelling_scale(copy.deepcopy(student), copy.deepcopy(teacher), inputs, reverse=reverse,
                                temperature=temperature)
    assert_eager_budget(got, eager, truth, scale=scale, what="TRL trainer loss")


def _gkd(tmp_path, student, teacher, tok, *, lmbda=0.0, seq_kd=False, steps=2, **kw):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig

    from distillkit.integrations.trl import SkewKLGKDTrainer

    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps, max_new_tokens=4,
                     lmbda=lmbda, seq_kd=seq_kd, beta=0.0, report_to=[], use_cpu=True, save_strategy="no",
                     logging_steps=1, max_length=64, disable_tqdm=True, learning_rate=1e-3, seed=0)
    return SkewKLGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(_chats()),
                            processing_class=tok, **kw)


@pytest.mark.parametrize("reverse", [False, True])
def test_gkd_loss_equals_eager(tmp_path, reverse):
    tok = _tok()
    student, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1, hidden=48)
    trainer = _gkd(tmp_path, student, teacher, tok, alpha=0.2, reverse=reverse)
    assert trainer.reverse is reverse
    inputs = fx.batch(len(tok))
    _check(trainer.compute_loss(student, dict(inputs)), student, teacher, inputs, reverse=reverse, alpha=0.2)


@pytest.mark.parametrize("lmbda, seq_kd, generator", [(1.0, False, "student"), (0.0, True, "teacher")])
def test_gkd_on_policy_and_seq_kd_paths_train(tmp_path, monkeypatch, lmbda, seq_kd, generator):
    from distillkit.integrations.trl import SkewKLGKDTrainer

    tok = _tok()
    student, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1)
    generators = []
    original = SkewKLGKDTrainer.generate_on_policy_outputs

    def spy(model, inputs, generation_config):
        generators.append("teacher" if model is teacher else "student")
        return original(model, inputs, generation_config)

    monkeypatch.setattr(SkewKLGKDTrainer, "generate_on_policy_outputs", staticmethod(spy))
    trainer = _gkd(tmp_path, student, teacher, tok, lmbda=lmbda, seq_kd=seq_kd, steps=2)
    losses = []
    monkeypatch.setattr(trainer, "compute_loss", _recording(trainer.compute_loss, losses))
    trainer.train()
    assert generators == [generator, generator]
    assert len(losses) == 2 and all(torch.isfinite(x) and x > 0 for x in losses)


def _recording(fn, into):
    def wrapped(*a, **kw):
        out = fn(*a, **kw)
        into.append((out[0] if isinstance(out, tuple) else out).detach())
        return out
    return wrapped


def _distillation(tmp_path, student, teacher, tok, steps=2, **kw):
    from datasets import Dataset
    from trl import DistillationConfig

    from distillkit.integrations.trl import SkewKLDistillationTrainer

    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps,
                              max_completion_length=4, report_to=[], use_cpu=True, save_strategy="no",
                              logging_steps=1, disable_tqdm=True, learning_rate=1e-3, seed=0, temperature=1.0)
    prompts = Dataset.from_list([{"prompt": f"add {i} and {i + 1}: "} for i in range(4)])
    return SkewKLDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                     processing_class=tok, **kw)


def test_distillation_trainer_loss_equals_eager_and_trains(tmp_path, monkeypatch):
    tok = _tok()
    student, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1, hidden=48)
    trainer = _distillation(tmp_path, student, teacher, tok, alpha=0.1)
    assert trainer.reverse is True  # DistillationConfig's beta = 1 (reverse KL) -> SRKL
    # a fixed batch in the trainer's own layout: left-padded prompts, right-padded completions
    b = fx.batch(len(tok), n=4, padding=False)
    prompt_ids, completion_ids = b["input_ids"][:, :5], b["input_ids"][:, 5:]
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, -3:] = 0
    completion_mask[3, -1:] = 0
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[2, :2] = 0
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask}
    loss, _, n_valid = trainer._compute_loss(student, inputs, None)
    labels = torch.cat([torch.full_like(prompt_ids, -100), completion_ids.masked_fill(completion_mask == 0, -100)], 1)
    full = {"input_ids": b["input_ids"], "attention_mask": torch.cat([prompt_mask, completion_mask], 1),
            "labels": labels}
    assert n_valid == labels[:, 1:].ne(-100).sum()
    _check(loss, student, teacher, full, reverse=True)

    losses = []
    monkeypatch.setattr(trainer, "_compute_loss", _recording(trainer._compute_loss, losses))
    trainer.train()  # on-policy: the student generates every completion
    assert len(losses) == 2 and all(torch.isfinite(x) for x in losses)
    assert "entropy" not in trainer._metrics["train"] or not trainer._metrics["train"]["entropy"]
