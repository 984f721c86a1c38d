"""VCRD's validity weights: the op lives in :mod:`distillkit.ops.validity`; this name stays importable."""
from distillkit.ops.validity import IMPLEMENTED, resolve_backend, teacher_likelihood_validity, validity_ratio

__all__ = ["validity_ratio", "teacher_likelihood_validity", "IMPLEMENTED", "resolve_backend"]
