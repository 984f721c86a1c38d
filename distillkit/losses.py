"""nn.Module wrappers of the fused skew-KL losses: drop-in replacements for a hand-written KL.

    SkewKLLoss / SkewReverseKLLoss                        on logits          -> distillkit.ops.skew_kl
    FusedLinearSkewKLLoss / FusedLinearSkewReverseKLLoss  on hidden states   -> distillkit.ops.fused_linear
                                                          + lm_head weights     (never builds [N, V] logits)

The modules hold only the options (no parameters); every call forwards them to the functional op, so a
module and the function with the same options give the same result and gradients.

    logit_transform_from_config(config) -> dict(logit_scale=..., softcap=...)   a model's final logit transform
    FusedLinearSkewKLLoss.from_configs(student_config, teacher_config, **options) reads both sides' transforms
    final_hidden_states(model, input_ids, ...) -> [B, T, H]   the fused losses' input, through the wrapper's
                                                              own forward (DDP, FSDP2), logits of one position
"""
from __future__ import annotations

import math

import torch
from torch import nn

from distillkit._errors import InputError

__all__ = ["SkewKLLoss", "SkewReverseKLLoss", "FusedLinearSkewKLLoss", "FusedLinearSkewReverseKLLoss",
           "logit_transform_from_config", "final_hidden_states"]

# model_type prefix -> (config attribute, multiplies (True) or divides (False) the logits)
_LOGIT_SCALE_ATTRS = (
    ("cohere", "logit_scale", True),            # CohereForCausalLM: logits * logit_scale
    ("granite", "logits_scaling", False),       # GraniteForCausalLM and its MoE kin: logits / logits_scaling
    ("hyperclovax", "logits_scaling", True),    # HyperCLOVA X: logits * logits_scaling (MuP)
    ("falcon_h1", "lm_head_multiplier", True),  # FalconH1ForCausalLM: lm_head(h) * lm_head_multiplier
)
_SCALE_NAMES = ("logit_scale", "logits_scaling", "lm_head_multiplier")


def logit_transform_from_config(config) -> dict:
    """The transform a Hugging Face causal LM applies to ``lm_head(hidden)`` to get its logits, read from its config.

    Returns dict(logit_scale=float, softcap=float | None): logits = softcap * tanh(z * logit_scale / softcap)
    (z * logit_scale when softcap is None), the keywords of the fused-linear ops (prefixed ``student_`` /
    ``teacher_``) and of the scoring op. Read: ``final_logit_softcapping`` (Gemma-2/3 and kin), Cohere's
    ``logit_scale`` (multiplies), Granite's ``logits_scaling`` (divides: logit_scale = 1 / logits_scaling),
    HyperCLOVA X's ``logits_scaling`` (multiplies), Falcon-H1's ``lm_head_multiplier``. A multimodal config is
    read through its text config. A model type not listed above that still carries one of those scale
    attributes (not 1) raises InputError: which way it applies is the model's code, not its config; pass the
    keywords by hand then.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = None if softcap is None or softcap == 0 else float(softcap)
    model_type = str(getattr(config, "model_type", "") or "")
    for prefix, attr, multiplies in _LOGIT_SCALE_ATTRS:
        if model_type.startswith(prefix):
            value = getattr(config, attr, None)
            value = 1.0 if value is None else float(value)
            if not math.isfinite(value) or value <= 0:
                raise InputError(f"config.{attr}={value!r} ({model_type}): expected a finite number > 0")
            return dict(logit_scale=value if multiplies else 1.0 / value, softcap=softcap)
    for attr in _SCALE_NAMES:
        value = getattr(config, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            raise InputError(f"config.{attr}={value!r} on model_type={model_type!r}: distillkit does not know whether "
                             f"this model multiplies or divides its logits by it; pass logit_scale (student_/teacher_"
                             f"logit_scale) explicitly")
    return dict(logit_scale=1.0, softcap=softcap)


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        **kwargs) -> torch.Tensor:
    """The final hidden states [B, T, H] of a Hugging Face causal LM (after its final norm: what its lm_head
    multiplies), taken through ``model``'s own forward, so that a DistributedDataParallel or FSDP2 wrapper runs
    its hooks (hidden states from ``ddp_model.module.model(...)`` skip DDP's gradient all-reduce; see
    distillkit.ops._ddp). The model computes the logits of one position only (``logits_to_keep=1``), not [B, T, V].

    model: the model as trained (the DDP wrapper itself, an FSDP2-sharded root, or a plain model); input_ids
    [B, T]; attention_mask [B, T] or None; kwargs go to the forward. Gradients flow back through the hidden
    states as through the model's own logits.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                **kwargs)
    hidden_states = getattr(out, "hidden_states", None)
    if not hidden_states:
        raise InputError(f"{type(model).__name__} returned no hidden_states for output_hidden_states=True: pass a "
                         "Hugging Face causal LM (or its DDP / FSDP2 wrapper)")
    return hidden_states[-1]


class _SkewOptions(nn.Module):
    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str | None = None, vocab_size: int | None = None):
        super().__init__()
        self.alpha = alpha
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.vocab_size = vocab_size

    def _options(self) -> dict:
        return dict(alpha=self.alpha, temperature=self.temperature, ignore_index=self.ignore_index,
                    reduction=self.reduction, backend=self.backend, vocab_size=self.vocab_size)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())


def _with_weights(weights: torch.Tensor | None) -> dict:
    # only pass weights when given, so the call matches the op's signature either way
    return {} if weights is None else {"weights": weights}


class SkewKLLoss(_SkewOptions):
    """KL(p || alpha p + (1 - alpha) q) on logits (DistiLLM's skew KL), fused over the vocabulary.

    forward(student_logits [N, V] or [B, T, V], teacher_logits (same shape), labels [N] / [B, T] or None,
    weights [N] / [B, T] or None) -> float32 loss (scalar, or per token for reduction="none").
    vocab_size: the number of real token ids when the two logits differ only by padding columns.
    """

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        from distillkit.ops.skew_kl import skew_kl

        return skew_kl(student_logits, teacher_logits, labels, **_with_weights(weights), **self._options())


class SkewReverseKLLoss(_SkewOptions):
    """KL(q || (1 - alpha) p + alpha q) on logits (DistiLLM's skew reverse KL).

    detach_mixture=True stops the gradient through the mixture (DistiLLM-2's variant). forward as in
    :class:`SkewKLLoss`.
    """

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str | None = None, detach_mixture: bool = False,
                 vocab_size: int | None = None):
        super().__init__(alpha, temperature, ignore_index, reduction, backend, vocab_size)
        self.detach_mixture = detach_mixture

    def _options(self) -> dict:
        return {**super()._options(), "detach_mixture": self.detach_mixture}

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        from distillkit.ops.skew_kl import skew_reverse_kl

        return skew_reverse_kl(student_logits, teacher_logits, labels, **_with_weights(weights), **self._options())


class FusedLinearSkewKLLoss(_SkewOptions):
    """Skew KL computed from hidden states and lm_head weights, chunk by chunk (no [N, V] logits).

    forward(student_hidden [N, H_s] or [B, T, H_s], student_weight [V_s, H_s], teacher_hidden [N, H_t] /
    [B, T, H_t], teacher_weight [V_t, H_t], labels=None, weights=None, student_bias [V_s]=None,
    teacher_bias [V_t]=None) -> float32 loss. Gradients reach student_hidden, student_weight, student_bias.
    chunk_size: rows per chunk (None: sized so a chunk's logits stay bounded). vocab_size: the number of real
    token ids when the lm_heads differ only by padding rows. student_/teacher_ logit_scale and softcap: each
    model's final logit transform; :meth:`from_configs` reads them from the two models' configs.
    """

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str | None = None, chunk_size: int | None = None, *,
                 vocab_size: int | None = None, student_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_logit_scale: float = 1.0,
                 teacher_softcap: float | None = None):
        super().__init__(alpha, temperature, ignore_index, reduction, backend, vocab_size)
        self.chunk_size = chunk_size
        self.student_logit_scale = student_logit_scale
        self.student_softcap = student_softcap
        self.teacher_logit_scale = teacher_logit_scale
        self.teacher_softcap = teacher_softcap

    @classmethod
    def from_configs(cls, student_config, teacher_config, **options):
        """The loss with each side's logit scale and softcap read from its Hugging Face config
        (:func:`logit_transform_from_config`); options are the constructor's other keywords (vocab_size, alpha,
        ...). A transform keyword given in options wins over the config's."""
        sides = {}
        for side, config in (("student", student_config), ("teacher", teacher_config)):
            t = logit_transform_from_config(config)
            sides[f"{side}_logit_scale"], sides[f"{side}_softcap"] = t["logit_scale"], t["softcap"]
        return cls(**{**sides, **options})

    def _options(self) -> dict:
        return {**super()._options(), "chunk_size": self.chunk_size,
                "student_logit_scale": self.student_logit_scale, "student_softcap": self.student_softcap,
                "teacher_logit_scale": self.teacher_logit_scale, "teacher_softcap": self.teacher_softcap}

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
        from distillkit.ops.fused_linear import fused_linear_skew_kl

        return fused_linear_skew_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, weights,
                                    student_bias=student_bias, teacher_bias=teacher_bias, **self._options())


class FusedLinearSkewReverseKLLoss(FusedLinearSkewKLLoss):
    """Skew reverse KL from hidden states and lm_head weights; options, from_configs and forward as in
    :class:`FusedLinearSkewKLLoss`, plus detach_mixture (DistiLLM-2's variant)."""

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str | None = None, chunk_size: int | None = None,
                 detach_mixture: bool = False, **transforms):
        super().__init__(alpha, temperature, ignore_index, reduction, backend, chunk_size, **transforms)
        self.detach_mixture = detach_mixture

    def _options(self) -> dict:
        return {**super()._options(), "detach_mixture": self.detach_mixture}

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
        from distillkit.ops.fused_linear import fused_linear_skew_reverse_kl

        return fused_linear_skew_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                            weights, student_bias=student_bias, teacher_bias=teacher_bias,
                                            **self._options())
