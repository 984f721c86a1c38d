"""Predictive-perplexity scoring for CoRD's meta-prover: the op lives in :mod:`distillkit.ops.scoring`; this
name stays importable (README: ``from distillkit.scoring import predictive_perplexity``)."""
from distillkit.ops.scoring import answer_logprobs, check_values, predictive_perplexity

__all__ = ["answer_logprobs", "predictive_perplexity", "check_values"]
