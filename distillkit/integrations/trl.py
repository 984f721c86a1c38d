"""TRL's distillation trainers with distillkit's fused skew KL / SRKL in place of their divergence.

    SkewKLDistillationTrainer   trl.DistillationTrainer (TRL's current, documented on-policy distillation
                                trainer: the student generates every completion, vLLM optional)
    SkewKLGKDTrainer            trl.experimental.gkd.GKDTrainer (``lmbda``: the fraction of batches the student
                                generates; ``seq_kd``: otherwise the teacher generates; else the dataset's own)

A TRL user switches by changing the class name: the configs (DistillationConfig / GKDConfig), datasets,
generation, gradient-accumulation handling and distributed wrapping are TRL's own. What changes is the loss:
D_t = SKL(p || alpha p + (1 - alpha) q) or SRKL(q || (1 - alpha) p + alpha q) at every completion token, from
the models' final hidden states and lm_heads (never [B, T, V] logits), each model's logit scale and final
softcap read from its config, the temperature TRL's divergence uses (DistillationTrainer: ``args.temperature``;
GKDTrainer: 1, its args.temperature being the sampling temperature only), and the same reduction as
TRL's loss (sum over completion tokens / TRL's ``num_items_in_batch``, else the batch's mean).

    alpha: skew in [0, 1] (default 0.1).
    reverse: True for SRKL, False for SKL; None (default) follows TRL's ``beta``: beta == 1 (reverse KL) gives
        SRKL, anything else SKL (beta's generalised JSD mixture is replaced by the skew mixture).

Not computed: the student's entropy metric of DistillationTrainer (it needs the logits); it is not logged.
"""
from __future__ import annotations

import logging

import torch

from distillkit._errors import InputError
from distillkit.integrations._common import (
    check_options,
    fused_skew_sum,
    hidden_states_kwargs,
    logit_transform,
    require,
)

require("trl")
from trl import DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402

__all__ = ["SkewKLDistillationTrainer", "SkewKLGKDTrainer"]

logger = logging.getLogger(__name__)


def _reverse_from(reverse, beta) -> bool:
    if reverse is None:
        if 0.0 < float(beta) < 1.0:
            logger.info("beta=%s: the skew KL (reverse=False) replaces TRL's generalised JSD; pass reverse=True "
                        "for the skew reverse KL", beta)
        return float(beta) == 1.0
    if not isinstance(reverse, bool):
        raise InputError(f"reverse must be a bool or None (follow TRL's beta), got {reverse!r}")
    return reverse


class _SkewKLLoss:
    """The options and the loss both trainers share."""

    def _setup_skew(self, alpha, reverse, chunk_size, backend, loss_temperature):
        self.alpha = float(alpha)
        self.loss_temperature = float(loss_temperature)
        self.reverse = _reverse_from(reverse, self.beta)
        self.chunk_size, self.backend = chunk_size, backend

    def _skew_loss(self, student, h_s, teacher, h_t, labels, num_items_in_batch):
        """sum over kept tokens of D_t / num_items_in_batch (else / the kept count): h_* [B, K, H] already
        aligned with labels [B, K] (-100 skipped)."""
        total = fused_skew_sum(h_s, student.get_output_embeddings(), h_t, teacher.get_output_embeddings(), labels,
                               None, alpha=self.alpha, temperature=self.loss_temperature, reverse=self.reverse,
                               student_transform=logit_transform(student), teacher_transform=logit_transform(teacher),
                               vocab_size=None, chunk_size=self.chunk_size, backend=self.backend)
        n_valid = labels.ne(-100).sum()
        if num_items_in_batch is None:
            return total / n_valid.clamp(min=1), n_valid
        return total / torch.as_tensor(num_items_in_batch, device=total.device), n_valid


class SkewKLDistillationTrainer(_SkewKLLoss, DistillationTrainer):
    """``trl.DistillationTrainer`` with the fused skew KL / SRKL (see the module docstring); its arguments plus
    ``alpha``, ``reverse``, ``chunk_size``, ``backend``."""

    def __init__(self, *args, alpha: float = 0.1, reverse: bool | None = None, chunk_size: int | None = None,
                 backend: str | None = None, **kwargs):
        check_options(alpha, 1.0)
        super().__init__(*args, **kwargs)
        if self.teacher_model is None:
            raise InputError("teacher_model: SkewKLDistillationTrainer needs a local teacher model (the fused loss "
                             "reads its hidden states and lm_head)")
        # TRL's divergence here divides the logits by args.temperature (the sampling temperature)
        self._setup_skew(alpha, reverse, chunk_size, backend, self.temperature)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        before = len(self._metrics[mode]["entropy"])
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        del self._metrics[mode]["entropy"][before:]  # not computed by the fused loss (it needs the logits)
        return out

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # runs inside the student wrapper's forward (TRL's forward redirection), like the loss it replaces
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        h_s = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            h_t = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher,
                                            input_ids, attention_mask, keep)
        labels = inputs["completion_ids"].masked_fill(loss_mask == 0, -100).to(h_s.device)
        loss, n_valid = self._skew_loss(unwrapped_student, h_s, teacher, h_t, labels, num_items_in_batch)
        return loss, torch.zeros((), device=loss.device), n_valid


class SkewKLGKDTrainer(_SkewKLLoss, GKDTrainer):
    """TRL's ``GKDTrainer`` (lmbda on-policy mixing, seq_kd) with the fused skew KL / SRKL (see the module
    docstring); its arguments plus ``alpha``, ``reverse``, ``chunk_size``, ``backend``."""

    def __init__(self, *args, alpha: float = 0.1, reverse: bool | None = None, chunk_size: int | None = None,
                 backend: str | None = None, **kwargs):
        check_options(alpha, 1.0)
        super().__init__(*args, **kwargs)
        # GKD's divergence uses temperature 1 (args.temperature is its sampling temperature only)
        self._setup_skew(alpha, reverse, chunk_size, backend, 1.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        fwd = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        student = self.accelerator.unwrap_model(model)
        student_out = model(**fwd, **hidden_states_kwargs(student))  # the wrapper's own forward (DDP / FSDP hooks)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_out = self.teacher_model(**fwd, **hidden_states_kwargs(teacher))
        # the state at t predicts token t + 1; prompt and padding carry label -100 (TRL's collator)
        h_s = student_out.hidden_states[-1][:, :-1]
        h_t = teacher_out.hidden_states[-1][:, :-1]
        labels = inputs["labels"][:, 1:].to(h_s.device)
        loss, _ = self._skew_loss(student, h_s, teacher, h_t, labels, num_items_in_batch)
        return (loss, student_out) if return_outputs else loss
