"""``SkewKLTrainer``: a ``transformers.Trainer`` that distils a teacher into the student with distillkit's fused
skew KL (or skew reverse KL), computed from the two models' final hidden states and lm_head weights.

    from distillkit.integrations.hf import SkewKLTrainer
    trainer = SkewKLTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                            train_dataset=ds, processing_class=tokenizer, alpha=0.1, reverse=False)
    trainer.train()

Per batch (input_ids, attention_mask, labels optional: without labels the input ids are the targets, padding
excluded):
    h_S = student(**batch).hidden_states[-1]   through the wrapped model, so DDP / FSDP2 hooks run; logits are
    h_T = teacher(**batch).hidden_states[-1]   computed for the last position only, never [B, T, V]
    loss = (sum_t w_t D_t(h_S[t], h_T[t]; label[t + 1])  +  ce_weight * sum_t CE_t) / num_items_in_batch
where D is SKL(p || alpha p + (1 - alpha) q) or, with reverse=True, SRKL(q || (1 - alpha) p + alpha q), p the
teacher's and q the student's softmax of their real logits (each model's logit scale and final softcap read
from its config) divided by ``temperature``; positions are shifted as in causal LM training (the state at t
predicts label t + 1; label -100 is skipped); w_t = 1 unless ``token_weights`` is given.

``num_items_in_batch`` is the number of kept target tokens over all gradient-accumulation micro-batches (and
over all ranks with ``average_tokens_across_devices``, the default), so batch 2 x accumulation 4 takes the same
step as batch 8 x 1, and 2 ranks the same as 1; the trainer says so to transformers (``loss_is_scaled_for_ga``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from distillkit._errors import InputError
from distillkit.integrations._common import (
    causal_labels,
    check_launch,
    check_options,
    chunked_cross_entropy_sum,
    fused_skew_sum,
    hidden_states_kwargs,
    logit_transform,
    prepare_teacher,
    require,
    shared_vocab_size,
)

require("transformers")
require("accelerate")
from transformers import Trainer  # noqa: E402

__all__ = ["SkewKLTrainer", "TokenWeights"]

#: token_weights(inputs, student_outputs, teacher_outputs) -> [B, T] float weights aligned with the batch's
#: labels (weight of target token t; the trainer shifts it with the labels). inputs: the batch dict;
#: *_outputs: the models' ModelOutputs (hidden_states; logits of the last position only). VCRD's validity
#: weights plug in here.
TokenWeights = Callable[[dict, Any, Any], torch.Tensor]


class SkewKLTrainer(Trainer):
    """``transformers.Trainer`` with distillkit's fused skew KL / SRKL from a teacher.

    Args (beyond Trainer's):
        teacher_model: a causal LM sharing the student's tokenizer (its lm_head may have padding rows: the loss is
            then over the shared vocabulary, the tokenizer's length when ``processing_class`` is given, else the
            smaller config vocab_size). Put in eval mode, frozen, on the student's device; sharded under FSDP2.
        alpha: skew in [0, 1] (0.1 as in DistiLLM). reverse: False for SKL, True for SRKL.
        temperature: > 0, divides both models' logits.
        ce_weight: >= 0; adds ce_weight x the student's cross-entropy on the labels (chunked, no [N, V] logits).
        token_weights: optional :data:`TokenWeights` callable giving per-token weights w_t ([B, T], same positions
            as the labels), e.g. VCRD's validity weights; rows with weight 0 count for nothing in the divergence.
        chunk_size, backend: passed to :func:`distillkit.fused_linear_skew_kl`.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by num_items_in_batch itself

    def __init__(self, model=None, args=None, *, teacher_model, alpha: float = 0.1, reverse: bool = False,
                 temperature: float = 1.0, ce_weight: float = 0.0, token_weights: TokenWeights | None = None,
                 chunk_size: int | None = None, backend: str | None = None, **kwargs):
        check_options(alpha, temperature, ce_weight, token_weights)
        if teacher_model is None:
            raise InputError("teacher_model: expected a causal LM (or its path), got None")
        if not isinstance(reverse, bool):
            raise InputError(f"reverse must be a bool (False: skew KL, True: skew reverse KL), got {reverse!r}")
        super().__init__(model=model, args=args, **kwargs)
        check_launch(self.accelerator)
        if isinstance(teacher_model, str):
            from transformers import AutoModelForCausalLM

            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model)
        self.alpha, self.reverse, self.temperature = float(alpha), reverse, float(temperature)
        self.ce_weight, self.token_weights = float(ce_weight), token_weights
        self.chunk_size, self.backend = chunk_size, backend
        student = self.accelerator.unwrap_model(self.model)
        self._student_transform = logit_transform(student)
        self._teacher_transform = logit_transform(teacher_model)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self._vocab_size = shared_vocab_size(student, teacher_model, student.get_output_embeddings(),
                                             teacher_model.get_output_embeddings(),
                                             tokenizer if tokenizer is not None and hasattr(tokenizer, "__len__")
                                             else None)
        self.teacher_model = prepare_teacher(teacher_model, self.accelerator)

    # ---- gradient accumulation: count kept target tokens whatever the model's forward signature --------------

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Kept target tokens (labels shifted as causal LM does, -100 excluded) over the accumulated micro-batches,
        summed over ranks when ``average_tokens_across_devices``; transformers counts only for models whose
        forward takes loss kwargs, this trainer always does."""
        if not batch_samples:
            return None
        count = sum(causal_labels(b)[..., 1:].ne(-100).sum() for b in batch_samples)
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    # ---- the loss ------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = causal_labels(inputs)
        forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
        unwrapped = self.accelerator.unwrap_model(model)
        student_out = model(**forward_inputs, **hidden_states_kwargs(unwrapped))  # the wrapper's own forward
        teacher_unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_out = self.teacher_model(**forward_inputs, **hidden_states_kwargs(teacher_unwrapped))
        h_s = student_out.hidden_states[-1][:, :-1]
        h_t = teacher_out.hidden_states[-1][:, :-1]
        shifted = labels[:, 1:].to(h_s.device)
        weights = None
        if self.token_weights is not None:
            w = self.token_weights(inputs, student_out, teacher_out)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(labels.shape):
                raise InputError(f"token_weights must return a tensor of the labels' shape {tuple(labels.shape)}, "
                                 f"got {getattr(w, 'shape', type(w).__name__)}")
            weights = w[:, 1:].to(device=h_s.device, dtype=torch.float32)
        student_head = unwrapped.get_output_embeddings()
        teacher_head = teacher_unwrapped.get_output_embeddings()
        total = fused_skew_sum(h_s, student_head, h_t, teacher_head, shifted, weights, alpha=self.alpha,
                               temperature=self.temperature, reverse=self.reverse,
                               student_transform=self._student_transform, teacher_transform=self._teacher_transform,
                               vocab_size=self._vocab_size, chunk_size=self.chunk_size, backend=self.backend)
        if self.ce_weight:
            total = total + self.ce_weight * chunked_cross_entropy_sum(h_s, student_head, shifted,
                                                                       self._student_transform)
        if num_items_in_batch is None:  # prediction without a count: the micro-batch's own mean
            loss = total / shifted.ne(-100).sum().clamp(min=1)
        else:
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # the count is global and DDP / FSDP average the ranks' gradients
                loss = loss * self.accelerator.num_processes
        return (loss, student_out) if return_outputs else loss
