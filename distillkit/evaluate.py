"""Moved to :mod:`distillkit.pipeline.evaluate`; this name stays importable (the same module object)."""
import sys

from distillkit.pipeline import evaluate as _moved

sys.modules[__name__] = _moved
