"""Moved to :mod:`distillkit.pipeline.data`; this name stays importable (the same module object)."""
import sys

from distillkit.pipeline import data as _moved

sys.modules[__name__] = _moved
