"""Answer accuracy of a causal LM by greedy generation, shared by the training methods."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from distillkit._errors import InputError
from distillkit.pipeline.data import DEFAULT_PROMPT, Example


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            if tokenizer.bos_token_id is not None:  # the same framing as training (bos + prompt)
                bos = torch.full((enc["input_ids"].shape[0], 1), tokenizer.bos_token_id, device=device)
                enc["input_ids"] = torch.cat([bos, enc["input_ids"]], 1)
                enc["attention_mask"] = torch.cat([torch.ones_like(bos), enc["attention_mask"]], 1)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def eval_prompts(tokenizer, questions: Sequence[dict], *, prompt_template: str = DEFAULT_PROMPT,
                 chat_template: str = "none", system_prompt: str | None = None) -> list[str]:
    """The texts :func:`generate` is given for ``questions``: each question in ``prompt_template``, rendered as in
    training (:func:`distillkit.pipeline.data.render_prompt`: ``chat_template`` auto wraps it in the tokenizer's
    chat template, ``system_prompt`` first). A BOS the template writes is dropped from the text: :func:`generate`
    puts the BOS token in front, so the model sees the token ids training gave it."""
    from distillkit.pipeline.data import CHAT_TEMPLATES, fill_prompt, render_prompt

    if chat_template not in CHAT_TEMPLATES:
        raise InputError(f"chat_template={chat_template!r}: expected one of {CHAT_TEMPLATES}")
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    out = []
    for q in questions:
        text = render_prompt(tokenizer, fill_prompt(prompt_template, question=q["question"]), chat_template,
                             system_prompt)
        out.append(text[len(bos):] if chat_template != "none" and bos and text.startswith(bos) else text)
    return out


def answer_accuracy(model, tokenizer, questions: Sequence[dict], *, prompt_template: str = DEFAULT_PROMPT,
                    max_new_tokens: int = 64, batch_size: int = 16, chat_template: str = "none",
                    system_prompt: str | None = None) -> dict:
    """Fraction of {question, answer} records whose generated final answer matches (and the outputs), the
    prompts built by :func:`eval_prompts` (``chat_template`` / ``system_prompt`` as the method trained with).
    A record without a question or a reference answer (missing, null, empty) raises InputError naming
    it before anything is generated."""
    from distillkit.pipeline.answers import answers_match, extract_answer
    from distillkit.pipeline.data import CHAT_TEMPLATES, check_reference_answer

    if chat_template not in CHAT_TEMPLATES:
        raise InputError(f"chat_template={chat_template!r}: expected one of {CHAT_TEMPLATES}")

    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str):
            raise InputError(f"{where}: expected a record with a text 'question', got {q!r:.80}")
        check_reference_answer(q, where)

    prompts = eval_prompts(tokenizer, questions, prompt_template=prompt_template, chat_template=chat_template,
                           system_prompt=system_prompt)
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = [answers_match(extract_answer(o), q["answer"]) for o, q in zip(outputs, questions)]
    return {"accuracy": sum(correct) / max(1, len(correct)), "n": len(correct), "outputs": outputs, "correct": correct}


@torch.no_grad()
def mean_loss(model, collate, examples: Sequence[Example], batch_size: int = 16) -> float:
    """Token-weighted mean cross-entropy of the responses of ``examples``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    return total / max(1, count)
