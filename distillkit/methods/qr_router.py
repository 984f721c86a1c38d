"""Moved to :mod:`distillkit.methods.qr_distill.router`; this name stays importable (the same module object)."""
import sys

from distillkit.methods.qr_distill import router as _moved

sys.modules[__name__] = _moved
