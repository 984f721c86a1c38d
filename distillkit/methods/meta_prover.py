"""Moved to :mod:`distillkit.methods.cord.meta_prover`; this name stays importable (the same module object)."""
import sys

from distillkit.methods.cord import meta_prover as _moved

sys.modules[__name__] = _moved
