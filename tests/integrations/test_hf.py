"""distillkit.integrations.hf.SkewKLTrainer: the loss equals the eager skew KL of the models' real logits
(softcap, logit scale, padded vocabulary, per-token weights, cross-entropy term), and gradient accumulation
takes the step of the large batch."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import _hf_fixtures as fx  # noqa: E402

from _tolerance import assert_eager_budget  # noqa: E402
from distillkit._errors import InputError  # noqa: E402


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1.0,
                optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to=[],
                save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path, student, teacher, tok=None, train=None, args=None, **kw):
    from distillkit.integrations.hf import SkewKLTrainer

    return SkewKLTrainer(model=student, teacher_model=teacher, args=args or _args(tmp_path), train_dataset=train,
                         processing_class=tok, **kw)


def _check_loss(trainer, student, teacher, inputs, *, alpha, reverse, temperature=1.0, vocab=None, weights=None):
    got = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=None)
    kw = dict(alpha=alpha, reverse=reverse, temperature=temperature, vocab=vocab, weights=weights)
    eager = fx.eager_loss(student, teacher, inputs, **kw)
    truth = fx.eager_loss(copy.deepcopy(student), copy.deepcopy(teacher), inputs, dtype=torch.float64, **kw)
    # the divergence is a small difference of entropy-sized terms: errors are judged on their scale
    scale = fx.cancelling_scale(copy.deepcopy(student), copy.deepcopy(teacher), inputs, reverse=reverse,
                                temperature=temperature, vocab=vocab)
    assert_eager_budget(got, eager, truth, scale=scale, what="SkewKLTrainer loss")
    return got


@pytest.mark.parametrize("reverse", [False, True])
def test_loss_and_gradient_equal_eager(tmp_path, reverse):
    tok = fx.tokenizer()
    student, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1, hidden=48)
    trainer = _trainer(tmp_path, student, teacher, tok, alpha=0.2, reverse=reverse, temperature=1.5)
    inputs = fx.batch(len(tok))
    got = _check_loss(trainer, student, teacher, inputs, alpha=0.2, reverse=reverse, temperature=1.5)
    got.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    truth_s, truth_t = copy.deepcopy(student), copy.deepcopy(teacher)
    fx.eager_loss(student, teacher, inputs, alpha=0.2, reverse=reverse, temperature=1.5).backward()
    fx.eager_loss(truth_s, truth_t, inputs, alpha=0.2, reverse=reverse, temperature=1.5, dtype=torch.float64).backward()
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert_eager_budget(fused[name], student.get_parameter(name).grad, truth_s.get_parameter(name).grad,
                            what=f"gradient of {name}")


def test_teacher_is_frozen_in_eval_mode(tmp_path):
    tok = fx.tokenizer()
    teacher = fx.llama(len(tok), seed=1)
    trainer = _trainer(tmp_path, fx.llama(len(tok), seed=0), teacher, tok)
    assert not trainer.teacher_model.training
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())


def test_softcapped_student_and_scaled_teacher_with_padded_vocab(tmp_path):
    """A Gemma-2 student (final softcap 5, logits far beyond it) and a Cohere teacher (logit_scale 0.25) whose
    lm_head has 22 padding rows: the loss is the skew KL of their real logits over the tokenizer's ids."""
    tok = fx.tokenizer()
    v = len(tok)
    student, teacher = fx.gemma2(v, seed=0, softcap=5.0), fx.cohere(v + 22, seed=1, logit_scale=0.25)
    trainer = _trainer(tmp_path, student, teacher, tok, alpha=0.1)
    assert trainer._vocab_size == v
    inputs = fx.batch(v, padding=False)
    got = _check_loss(trainer, student, teacher, inputs, alpha=0.1, reverse=False, vocab=v)
    # the transforms matter here: the loss of hidden @ W.T alone is far from it
    h = student.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    raw = (h @ student.lm_head.weight.T)[:, :-1]
    assert raw.abs().max().item() > 5.0  # beyond the cap
    untransformed = fx.eager_loss(_Uncapped(student), teacher, inputs, alpha=0.1, reverse=False, vocab=v)
    assert abs(untransformed.item() - got.item()) > 0.1 * got.item()


class _Uncapped(torch.nn.Module):
    """The student's logits without its final softcap (what a loss from hidden @ W.T alone would see)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        from types import SimpleNamespace

        h = self.model.model(**kw).last_hidden_state
        return SimpleNamespace(logits=h @ self.model.lm_head.weight.T)


def test_padded_vocab_without_tokenizer_uses_smaller_config_vocab(tmp_path):
    tok = fx.tokenizer()
    v = len(tok)
    student, teacher = fx.llama(v, seed=0), fx.llama(v + 10, seed=1)
    trainer = _trainer(tmp_path, student, teacher, None, alpha=0.1)
    assert trainer._vocab_size == v
    _check_loss(trainer, student, teacher, fx.batch(v), alpha=0.1, reverse=False, vocab=v)


def test_token_weights_callback(tmp_path):
    tok = fx.tokenizer()
    student, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1)
    inputs = fx.batch(len(tok))
    g = torch.Generator().manual_seed(3)
    w = torch.rand(inputs["labels"].shape, generator=g)
    seen = {}

    def token_weights(batch, student_out, teacher_out):
        seen["hidden"] = student_out.hidden_states[-1].shape
        return w

    trainer = _trainer(tmp_path, student, teacher, tok, alpha=0.1, token_weights=token_weights)
    _check_loss(trainer, student, teacher, inputs, alpha=0.1, reverse=False, weights=w)
    assert seen["hidden"][:2] == inputs["input_ids"].shape

    bad = _trainer(tmp_path, student, teacher, tok, token_weights=lambda *a: w[:, 1:])
    with pytest.raises(InputError, match="token_weights"):
        bad.compute_loss(bad.model, dict(inputs))


def test_ce_weight_adds_the_students_cross_entropy(tmp_path):
    tok = fx.tokenizer()
    student, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1)
    inputs = fx.batch(len(tok))
    plain = _trainer(tmp_path, student, teacher, tok).compute_loss(student, dict(inputs))
    with_ce = _trainer(tmp_path, student, teacher, tok, ce_weight=0.5).compute_loss(student, dict(inputs))
    ce = student(**inputs).loss  # the model's own causal LM loss: mean over shifted kept targets
    # with_ce - plain cancels the skew-KL part: what is left carries a few float32 roundings of both losses
    bound = 8 * torch.finfo(torch.float32).eps * (abs(float(with_ce)) + abs(float(plain)))
    assert abs(float(with_ce - plain - 0.5 * ce)) <= bound


def test_options_are_checked(tmp_path):
    tok = fx.tokenizer()
    s, t = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1)
    for kw, word in ((dict(alpha=1.5), "alpha"), (dict(temperature=0), "temperature"),
                     (dict(ce_weight=-1), "ce_weight"), (dict(token_weights=3), "token_weights"),
                     (dict(reverse="yes"), "reverse")):
        with pytest.raises(InputError, match=word):
            _trainer(tmp_path, s, t, tok, **kw)
    with pytest.raises(InputError, match="rows"):  # a real vocabulary mismatch: the tokenizer is longer
        _trainer(tmp_path, fx.llama(len(tok) - 5, seed=0), fx.llama(len(tok) - 3, seed=1), tok)


def _one_sgd_step(tmp_path, batch_size, accumulation, reverse, accepts_loss_kwargs=True):
    tok = fx.tokenizer()
    student, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = _args(tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
    trainer = _trainer(tmp_path, student, teacher, tok, train=fx.examples(len(tok), 8), args=args,
                       alpha=0.1, reverse=reverse)
    # transformers counts the batch's tokens only for models whose forward takes **kwargs: the trainer must not
    # depend on it
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.train()
    return {n: p.detach() - before[n] for n, p in student.named_parameters()}


@pytest.mark.parametrize("reverse, accepts_loss_kwargs", [(False, True), (True, True), (False, False)])
def test_gradient_accumulation_takes_the_large_batch_step(tmp_path, reverse, accepts_loss_kwargs):
    """batch 2 x accumulation 4 gives the SGD step of batch 8 x 1 (the kept-token counts differ per
    micro-batch, so a per-micro-batch mean, or a sum not divided across the accumulation, would not)."""
    big = _one_sgd_step(tmp_path / "a", 8, 1, reverse, accepts_loss_kwargs)
    accumulated = _one_sgd_step(tmp_path / "b", 2, 4, reverse, accepts_loss_kwargs)
    for name, step in big.items():
        assert step.abs().max() > 0, name
        # two float32 summation orders of one step (~1e-6 apart); the bugs caught are 2x-4x (a per-micro-batch
        # mean, or a sum not divided across the accumulation)
        torch.testing.assert_close(accumulated[name], step, rtol=1e-4, atol=1e-7, msg=f"SGD step of {name}")


def test_peft_student(tmp_path):
    """A LoRA student: the loss is still the eager skew KL, and only the adapters move."""
    peft = pytest.importorskip("peft")
    tok = fx.tokenizer()
    base, teacher = fx.llama(len(tok), seed=0), fx.llama(len(tok), seed=1)
    student = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    trainer = _trainer(tmp_path, student, teacher, tok, train=fx.examples(len(tok), 8), alpha=0.1)
    _check_loss(trainer, student, teacher, fx.batch(len(tok)), alpha=0.1, reverse=False)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
