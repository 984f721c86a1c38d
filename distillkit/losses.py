"""nn.Module wrappers of the fused skew-KL losses: drop-in replacements for a hand-written KL.

    SkewKLLoss / SkewReverseKLLoss                        on logits          -> distillkit.ops.skew_kl
    FusedLinearSkewKLLoss / FusedLinearSkewReverseKLLoss  on hidden states   -> distillkit.ops.fused_linear
                                                          + lm_head weights     (never builds [N, V] logits)

The modules hold only the options (no parameters); every call forwards them to the functional op, so a
module and the function with the same options give the same result and gradients.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SkewKLLoss", "SkewReverseKLLoss", "FusedLinearSkewKLLoss", "FusedLinearSkewReverseKLLoss"]


class _SkewOptions(nn.Module):
    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str | None = None):
        super().__init__()
        self.alpha = alpha
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def _options(self) -> dict:
        return dict(alpha=self.alpha, temperature=self.temperature, ignore_index=self.ignore_index,
                    reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())


def _with_weights(weights: torch.Tensor | None) -> dict:
    # only pass weights when given, so the call matches the op's signature either way
    return {} if weights is None else {"weights": weights}


class SkewKLLoss(_SkewOptions):
    """KL(p || alpha p + (1 - alpha) q) on logits (DistiLLM's skew KL), fused over the vocabulary.

    forward(student_logits [N, V] or [B, T, V], teacher_logits (same shape), labels [N] / [B, T] or None,
    weights [N] / [B, T] or None) -> float32 loss (scalar, or per token for reduction="none").
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
                 reduction: str = "mean", backend: str | None = None, detach_mixture: bool = False):
        super().__init__(alpha, temperature, ignore_index, reduction, backend)
        self.detach_mixture = detach_mixture

    def _options(self) -> dict:
        return {**super()._options(), "detach_mixture": self.detach_mixture}

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        from distillkit.ops.skew_kl import skew_reverse_kl

        return skew_reverse_kl(student_logits, teacher_logits, labels, **_with_weights(weights), **self._options())


class FusedLinearSkewKLLoss(_SkewOptions):
    """Skew KL computed from hidden states and lm_head weights, chunk by chunk (no [N, V] logits).

    forward(student_hidden [N, H_s] or [B, T, H_s], student_weight [V, H_s], teacher_hidden [N, H_t] /
    [B, T, H_t], teacher_weight [V, H_t], labels=None, weights=None, student_bias [V]=None,
    teacher_bias [V]=None) -> float32 loss. Gradients reach student_hidden, student_weight, student_bias.
    chunk_size: rows per chunk (None: sized so a chunk's logits stay bounded).
    """

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str | None = None, chunk_size: int | None = None):
        super().__init__(alpha, temperature, ignore_index, reduction, backend)
        self.chunk_size = chunk_size

    def _options(self) -> dict:
        return {**super()._options(), "chunk_size": self.chunk_size}

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
        from distillkit.ops.fused_linear import fused_linear_skew_kl

        return fused_linear_skew_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, weights,
                                    student_bias=student_bias, teacher_bias=teacher_bias, **self._options())


class FusedLinearSkewReverseKLLoss(FusedLinearSkewKLLoss):
    """Skew reverse KL from hidden states and lm_head weights; options and forward as in
    :class:`FusedLinearSkewKLLoss`, plus detach_mixture (DistiLLM-2's variant)."""

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str | None = None, chunk_size: int | None = None,
                 detach_mixture: bool = False):
        super().__init__(alpha, temperature, ignore_index, reduction, backend, chunk_size)
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
